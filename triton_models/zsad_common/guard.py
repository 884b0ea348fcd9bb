"""Per-request isolation for zsad's python-backend models (imported by triton_models/*/model.py inside the stub),
and the batching around a stage model's run (:func:`run_stage_requests`).

Part of ``zsad_common`` (see its ``__init__``): needs only numpy, so the models that need nothing else (preprocess,
the class-name tokeniser, restore) run in a stock Triton container.

Triton hands a python model a list of requests (a dynamic batch). An exception raised out of ``execute`` fails all
of them with HTTP 500, so every model answers each request on its own: an input error (``BadInput``; a model that
runs zsad code turns zsad's ``ZsadError`` into it) becomes that request's HTTP 400 / gRPC INVALID_ARGUMENT with a
short, sanitised message; anything else is an internal fault: logged with its traceback, HTTP 500 for that request
only. Messages never carry object reprs, file paths or more than ``MAX_MESSAGE`` characters of what a client sent.
"""
from __future__ import annotations

import re
import traceback

import numpy as np

MAX_MESSAGE = 200
_REPR = re.compile(r"<[^<>]{0,200}>")  # <_io.BytesIO object at 0x...>, <PIL.Image ...>
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-]+){2,}[/\\]?")  # /usr/lib/python3/..., C:\x\y


class BadInput(Exception):
    """A request's input is unusable: answered with INVALID_ARG, never logged as a server fault. (zsad raises
    ``ZsadError`` for the same mistakes: ``zsad.raising_zsad_error`` converts at its calls into this package.)"""


def short_message(text: str) -> str:
    """One line, no reprs, no paths, at most MAX_MESSAGE characters."""
    text = _PATH.sub("<path>", _REPR.sub("<object>", " ".join(str(text).split())))
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def error_response(pb_utils, err: BaseException, model: str):
    """The response for one failed request: 400 for input errors, 500 (logged, message generic) otherwise."""
    if isinstance(err, BadInput):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(
            short_message(f"bad input: {err}"), pb_utils.TritonError.INVALID_ARG))
    pb_utils.Logger.log_error(f"{model}: internal error: {''.join(traceback.format_exception(err))}")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(
        f"internal error in {model} ({type(err).__name__}); see the server log"))


def each_request(pb_utils, requests, handle, model: str) -> list:
    """``[handle(request) or its error response for request in requests]``: one bad request fails alone."""
    responses = []
    for request in requests:
        try:
            responses.append(handle(request))
        except Exception as err:  # noqa: BLE001 - the point: nothing escapes to fail the other requests
            responses.append(error_response(pb_utils, err, model))
    return responses


def check_tensor(name: str, arr: np.ndarray, bound: int | None = None) -> None:
    """Refuse non-finite floats and integers outside ``[0, bound)`` (indices, token ids) before a stage runs."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadInput(f"{name} holds NaN or infinite values")
    elif arr.dtype.kind in "iu" and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or (bound is not None and hi >= bound):
            raise BadInput(f"{name} holds values in [{lo}, {hi}], allowed [0, {bound - 1 if bound else 'inf'}]")


def run_batched(pb_utils, requests, read, run, write, model: str) -> list:
    """Stage models: validate each request (``read`` -> its feeds, raising BadInput), run the valid ones as one
    batch (``run(list of feeds) -> list of outputs``), and if that batch fails, run each request alone so only a
    request that fails by itself gets an error. ``write(outputs) -> response``."""
    responses: list = [None] * len(requests)
    valid = []
    for i, request in enumerate(requests):
        try:
            valid.append((i, read(request)))
        except Exception as err:  # noqa: BLE001
            responses[i] = error_response(pb_utils, err, model)
    if valid:
        try:
            outs = run([f for _, f in valid])
            for (i, _), out in zip(valid, outs, strict=True):
                responses[i] = write(out)
        except Exception:  # noqa: BLE001 - find the culprit(s): one request at a time
            for i, feeds in valid:
                try:
                    responses[i] = write(run([feeds])[0])
                except Exception as err:  # noqa: BLE001
                    responses[i] = error_response(pb_utils, err, model)
    return responses


def run_stage_requests(pb_utils, requests, inputs: list, outputs: list, run, model: str, bounds=None) -> list:
    """The request loop of a stage model (stage_ort, stage_openvino, torch_chain): each request's ``inputs``
    checked (:func:`check_tensor`, integer bounds from ``bounds``), the valid requests of a dynamic batch
    concatenated along the batch axis into one ``run({input name: array}) -> [array per output]`` call, the
    outputs split back into one response per request; :func:`run_batched` retries a failed batch one by one."""
    bounds = bounds or {}

    def read(request):
        feeds = [pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in inputs]
        for n, x in zip(inputs, feeds, strict=True):
            check_tensor(n, x, bounds.get(n))
        return feeds

    def run_concatenated(feeds_list):
        batch = {n: np.concatenate([f[i] for f in feeds_list]) for i, n in enumerate(inputs)}
        splits = np.cumsum([f[0].shape[0] for f in feeds_list])[:-1]
        return list(zip(*[np.split(np.asarray(o), splits) for o in run(batch)], strict=True))

    def write(outs):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(n, np.ascontiguousarray(o)) for n, o in zip(outputs, outs, strict=True)])

    return run_batched(pb_utils, requests, read, run_concatenated, write, model)
