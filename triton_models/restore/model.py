"""Triton python backend: resize the model-resolution anomaly map back to each input image's size.

A request's output is one tensor, so maps of images of different sizes are zero-padded to the largest one in the
request; the ensemble also returns ``original_size`` [2] (H, W) per image, and clients crop
(zsad.serve.client does). Uses zsad.data.transforms.resize_map (numpy + PIL), the function zsad-infer uses too.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from zsad.data.transforms import resize_map


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            maps = pb_utils.get_input_tensor_by_name(request, "anomaly_map").as_numpy()
            sizes = pb_utils.get_input_tensor_by_name(request, "original_size").as_numpy().astype(int)
            out = np.zeros((len(maps), sizes[:, 0].max(), sizes[:, 1].max()), np.float32)
            for i, (m, (h, w)) in enumerate(zip(maps, sizes)):
                out[i, :h, :w] = resize_map(m, h, w)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("anomaly_map_original", out)]))
        return responses
