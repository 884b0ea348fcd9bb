"""Served mode: a concurrency sweep against a Triton ensemble with tritonclient's asynchronous gRPC API.

For each concurrency c, c requests (one encoded image each) are kept in flight for ``seconds``: every completion
callback records its latency and submits the next request. Throughput = completed requests / wall time.
``export_and_serve`` builds its own server when no URL is given: the method exported twice into one repository
(python-ort, python-torch or python-openvino stages), as NAME with Triton's dynamic batcher and NAME_nodb without
it, so both are swept.
"""
from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def sweep_one(grpc_url: str, model: str, images: list[bytes], concurrency: int, seconds: float,
              texts: dict[str, list[str]] | None = None) -> dict:
    """``texts``: per-image text fields of models that take them (field -> one string per image)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    state = {"outstanding": 0, "next": 0}
    deadline = time.monotonic() + seconds

    def submit():
        with lock:
            i = state["next"]
            state["next"] += 1
            state["outstanding"] += 1
        inp = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[images[i % len(images)]]], dtype=object))
        inputs = [inp]
        for field, values in (texts or {}).items():
            t = grpcclient.InferInput(field, [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[values[i % len(values)].encode("utf-8")]], dtype=object))
            inputs.append(t)
        t0 = time.perf_counter()

        def callback(result, error):
            dt = (time.perf_counter() - t0) * 1000.0
            with lock:
                state["outstanding"] -= 1
                if error is not None:
                    errors.append(str(error)[:200])
                else:
                    latencies.append(dt)
            if time.monotonic() < deadline:
                submit()
            else:
                with lock:
                    if state["outstanding"] == 0:
                        done.set()

        client.async_infer(model, inputs, callback=callback, outputs=[grpcclient.InferRequestedOutput("score")])

    t_start = time.perf_counter()
    for _ in range(concurrency):
        submit()
    done.wait(timeout=seconds + 300)
    wall = time.perf_counter() - t_start
    client.close()
    lat = np.asarray(latencies)
    return {"concurrency": concurrency, "requests": int(lat.size), "errors": len(errors),
            "error_examples": errors[:2], "wall_s": round(wall, 3),
            "images_per_s": float(lat.size / wall) if wall else 0.0,
            **({"p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
                "mean_ms": float(lat.mean())} if lat.size else {})}


def served_predictions(url: str, model: str, images: list[bytes], texts: dict[str, list[str]] | None = None,
                       selections: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """{"score" [n], "anomaly_map" [n,S,S], and each of ``selections`` the ensemble outputs} from one request, for
    the parity check (an ensemble exported before selections were outputs has none: compared without them)."""
    from zsad.serve.client import AnomalyClient

    names = next(iter(texts.values())) if texts else None  # the class names (the one text field there is)
    client = AnomalyClient(url, model)
    extra = [n for n in selections if n in client.outputs]
    preds = client.infer(images, class_names=names, outputs=extra)
    return {"score": np.array([p.score for p in preds]), "anomaly_map": np.stack([p.anomaly_map for p in preds]),
            **{n: np.stack([p.extra[n] for p in preds]) for n in extra}}


@contextmanager
def export_and_serve(method_name: str, profile: str, checkpoint: str | None, overrides: dict | None,
                     max_batch: int, log=lambda *a: None, backend: str = "python-ort", device: str = "cpu",
                     precision: str = "fp32", calibration_images: int = 16, ov_hint: str = "latency"):
    """Yield (a ready TritonServer holding NAME (dynamic batching) and NAME_nodb (without), the precision exported),
    exported with ``backend`` for ``device`` (cpu or gpu); ``precision`` for the OpenVINO backends (bf16 / int8 pass
    the precision gate at export, int8 calibrated on ``calibration_images`` synthetic images; auto: what
    ``zsad-export --precision auto`` keeps on this machine, chosen by the first export and given to the second;
    ``ov_hint`` their performance hint)."""
    from zsad.export.exporter import ExportOptions, export_model
    from zsad.serve.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="zsad-bench-repo-") as tmp:
        repo = Path(tmp)
        for name, dynamic in ((method_name, True), (f"{method_name}_nodb", False)):
            result = export_model(ExportOptions(model=None if checkpoint else method_name, checkpoint=checkpoint,
                                                profile=profile, backend=backend, device=device, out=repo, name=name,
                                                max_batch=max_batch, parity_images=2, dynamic_batching=dynamic,
                                                overrides=overrides, precision=precision,
                                                calibration_images=calibration_images, ov_hint=ov_hint), log=log)
            precision = result.precision
        with TritonServer(repo) as server:
            yield server, precision
