"""A Python client for an exported zsad ensemble (HTTP or gRPC, via tritonclient); zsad-infer is a thin layer over it.

    client = AnomalyClient("127.0.0.1:8000", "bagclip")            # "grpc://127.0.0.1:8001" for gRPC
    results = client.infer(["a.png", "b.jpg"])                       # encoded bytes -> the NAME ensemble
    results = client.infer([np.zeros((480, 640, 3), np.uint8)])      # raw uint8 HWC -> the NAME_raw ensemble
    results[0].score, results[0].anomaly_map                         # float, float32 [S,S] (or input size)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from zsad import ZsadError


@dataclass
class Prediction:
    score: float
    anomaly_map: np.ndarray  # [S,S] at the model resolution, or the input size when the export resized back
    source: str = ""


class AnomalyClient:
    def __init__(self, url: str, model: str, protocol: str | None = None, timeout: float = 120.0):
        if "://" in url:
            scheme, url = url.split("://", 1)
            protocol = protocol or scheme
        protocol = (protocol or "http").lower()
        if protocol not in ("http", "grpc"):
            raise ZsadError(f"protocol must be http or grpc, got '{protocol}'")
        try:
            if protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
        except ImportError as err:
            raise ZsadError("the client needs tritonclient: pip install 'zsad[serve]'") from err
        self.tc, self.protocol, self.model, self.url = tc, protocol, model, url
        self.timeout = timeout
        kwargs = {"network_timeout": timeout, "connection_timeout": timeout} if protocol == "http" else {}
        self.client = tc.InferenceServerClient(url, **kwargs)
        try:
            live = self.client.is_server_live()
        except Exception as err:
            raise ZsadError(f"no Triton server answers at {protocol}://{url}: {err}") from err
        if not live:
            raise ZsadError(f"Triton server at {protocol}://{url} is not live")
        if not self.client.is_model_ready(model):
            raise ZsadError(f"model '{model}' is not ready on {protocol}://{url} (loaded: "
                            f"{', '.join(self.models()) or 'none'})")
        self.outputs = self._output_names(model)

    def models(self) -> list[str]:
        index = self.client.get_model_repository_index()
        entries = index if isinstance(index, list) else [{"name": m.name, "state": m.state} for m in index.models]
        return [m["name"] for m in entries if m.get("state") == "READY"]

    def _output_names(self, model: str) -> list[str]:
        meta = self.client.get_model_metadata(model)
        outs = meta["outputs"] if isinstance(meta, dict) else [{"name": o.name} for o in meta.outputs]
        return [o["name"] for o in outs]

    def _call(self, model: str, name: str, data: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        tc = self.tc
        inp = tc.InferInput(name, list(data.shape), dtype)
        inp.set_data_from_numpy(data)
        outputs = [tc.InferRequestedOutput(n) for n in self.outputs]
        try:
            kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            res = self.client.infer(model, [inp], outputs=outputs, **kwargs)
        except Exception as err:  # InferenceServerException: the server's own message is the useful part
            msg = err.message() if callable(getattr(err, "message", None)) else str(err)
            raise ZsadError(f"inference failed on {model}: {msg}") from err
        return {n: res.as_numpy(n) for n in self.outputs}

    def infer(self, images: Sequence, sources: Sequence[str] | None = None) -> list[Prediction]:
        """One request for a batch: file paths / encoded bytes (the NAME ensemble) or uint8 HxWx3 arrays (NAME_raw).

        Raw arrays in one request must share a shape (one tensor); files may differ in size.
        """
        if len(images) == 0:
            return []
        sources = list(sources) if sources else [str(i) if isinstance(i, (str, Path)) else f"#{k}"
                                                 for k, i in enumerate(images)]
        if all(isinstance(i, np.ndarray) for i in images):
            shapes = {i.shape for i in images}
            if len(shapes) > 1:
                raise ZsadError(f"raw images in one request must share a shape, got {sorted(shapes)}")
            arr = np.stack([np.asarray(i, dtype=np.uint8) for i in images])
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ZsadError(f"raw images must be uint8 [H,W,3], got {list(arr.shape[1:])}")
            out = self._call(f"{self.model}_raw", "image", arr, "UINT8")
        else:
            blobs = [Path(i).read_bytes() if isinstance(i, (str, Path)) else bytes(i) for i in images]
            out = self._call(self.model, "image_bytes", np.array(blobs, dtype=object).reshape(-1, 1), "BYTES")
        scores = out["score"].reshape(-1)
        if "anomaly_map_original" in out:  # exported --resize-to-input: crop the zero padding of mixed sizes
            maps = [m[:h, :w] for m, (h, w) in zip(out["anomaly_map_original"], out["original_size"].tolist())]
        else:
            maps = list(out["anomaly_map"])
        return [Prediction(float(s), m, src) for s, m, src in zip(scores, maps, sources)]
