"""Triton python backend: resize the model-resolution anomaly map back to each input image's size.

All images of one request must share a size (a request's output is one tensor); requests are independent.
Uses zsad.data.transforms.resize_map (numpy + PIL), the function zsad-infer uses too.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from zsad.data.transforms import resize_map


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            maps = pb_utils.get_input_tensor_by_name(request, "anomaly_map").as_numpy()
            sizes = pb_utils.get_input_tensor_by_name(request, "original_size").as_numpy()
            if len({tuple(s) for s in sizes.tolist()}) > 1:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "bad input: resize-to-input needs images of one size per request; send them separately")))
                continue
            h, w = (int(v) for v in sizes[0])
            out = np.stack([resize_map(m, h, w) for m in maps])
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("anomaly_map_original", out.astype(np.float32))]))
        return responses
