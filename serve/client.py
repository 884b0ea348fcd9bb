"""A Python client for an exported zsad ensemble (HTTP or gRPC, via tritonclient); zsad-infer is a thin layer over it.

    client = AnomalyClient("127.0.0.1:8000", "bagclip")            # "grpc://127.0.0.1:8001" for gRPC
    results = client.infer(["a.png", "b.jpg"])                       # encoded bytes -> the NAME ensemble
    results = client.infer([np.zeros((480, 640, 3), np.uint8)])      # raw uint8 HWC -> the NAME_raw ensemble
    results = client.infer([float_rgb_in_0_1], scale=255)            # other dtypes only with an explicit scale
    AnomalyClient(url, "bagclip_raw").infer([arr])                    # the raw ensemble by name: arrays only
    results[0].score, results[0].anomaly_map                         # float, float32 [S,S] (or input size)
    AnomalyClient(url, "bayespfl").infer(["a.png"], class_names="bottle")   # models that take the class name
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zsad import ZsadError, per_image_names
from zsad.predict import Prediction


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
            try:
                loaded = f"loaded: {', '.join(self.models()) or 'none'}"
            except Exception:  # zsad-serve restricts the repository index to itself
                loaded = "the server does not list its models to clients"
            raise ZsadError(f"model '{model}' is not ready on {protocol}://{url} ({loaded})")
        inputs, self.outputs = self._io_names(model)
        # the NAME_raw ensemble given by name takes decoded pixels ("image") only: its "_raw" is not added again
        self.raw_only = "image" in inputs and "image_bytes" not in inputs
        # per-image text inputs besides the image (from Method.text_inputs()): ["class_name"] for Bayes-PFL
        self.text_fields = [n for n in inputs if n not in ("image_bytes", "image")]

    def models(self) -> list[str]:
        index = self.client.get_model_repository_index()
        entries = index if isinstance(index, list) else [{"name": m.name, "state": m.state} for m in index.models]
        return [m["name"] for m in entries if m.get("state") == "READY"]

    def _io_names(self, model: str) -> tuple[list[str], list[str]]:
        """(input names, output names) of a model, from one metadata request (HTTP dicts or gRPC messages)."""
        meta = self.client.get_model_metadata(model)
        if isinstance(meta, dict):
            return [t["name"] for t in meta["inputs"]], [t["name"] for t in meta["outputs"]]
        return [t.name for t in meta.inputs], [t.name for t in meta.outputs]

    def _wanted(self, extra: Sequence[str]) -> list[str]:
        """The outputs to ask for: the score, the maps the client returns, and ``extra`` (e.g. BAG-CLIP's
        ``knn_index``); an ensemble's other outputs are not sent."""
        maps = ["anomaly_map_original", "original_size"] if "anomaly_map_original" in self.outputs else ["anomaly_map"]
        unknown = [n for n in extra if n not in self.outputs]
        if unknown:
            raise ZsadError(f"model '{self.model}' has no output {unknown[0]!r} (it has {', '.join(self.outputs)})")
        return ["score", *maps, *[n for n in extra if n not in maps and n != "score"]]

    def _call(self, model: str, feeds: list[tuple[str, np.ndarray, str]],
              wanted: Sequence[str]) -> dict[str, np.ndarray]:
        tc = self.tc
        inputs = []
        for name, data, dtype in feeds:
            inp = tc.InferInput(name, list(data.shape), dtype)
            inp.set_data_from_numpy(data)
            inputs.append(inp)
        outputs = [tc.InferRequestedOutput(n) for n in wanted]
        try:
            kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            res = self.client.infer(model, inputs, outputs=outputs, **kwargs)
        except Exception as err:  # InferenceServerException: the server's own message is the useful part
            message = getattr(err, "message", None)
            msg = message() if callable(message) else str(err)
            raise ZsadError(f"inference failed on {model}: {msg}") from err
        return {n: res.as_numpy(n) for n in wanted}

    def infer(self, images: Sequence, sources: Sequence[str] | None = None,
              class_names: str | Sequence[str] | None = None, scale: float | None = None,
              outputs: Sequence[str] = ()) -> list[Prediction]:
        """One request for a batch: file paths / encoded bytes (the NAME ensemble) or uint8 HxWx3 arrays (NAME_raw).

        Raw arrays in one request must share a shape (one tensor); files may differ in size. Arrays of another
        dtype are refused unless ``scale`` says how they map to 0..255 (``scale=255`` for floats in [0, 1],
        ``scale=1/257`` for 16-bit): a silent cast would score the wrong image. Scaled values must land in
        [0, 255]. ``class_names`` (one per image, or one for all) is required by models whose prompts use the
        object's name (Bayes-PFL) and ignored by the others. ``outputs``: further ensemble outputs to return, per
        image, in ``Prediction.extra`` (BAG-CLIP's ``knn_index``: each patch's graph neighbours).
        """
        if len(images) == 0:
            return []
        wanted = self._wanted(outputs)
        raw = all(isinstance(i, np.ndarray) for i in images)
        if self.raw_only and not raw:
            raise ZsadError(f"model '{self.model}' takes decoded uint8 [H,W,3] arrays only; send files or bytes to "
                            f"the ensemble without '_raw'")
        feeds = []
        if self.text_fields:
            if class_names is None:
                raise ZsadError(f"model '{self.model}' takes the object's class name with every image "
                                f"({', '.join(self.text_fields)}): pass class_names (zsad-infer --class-name)")
            names = per_image_names(class_names, len(images))
            text = np.array([n.encode("utf-8") for n in names], dtype=object).reshape(-1, 1)
            feeds = [(field, text, "BYTES") for field in self.text_fields]
        if sources and len(sources) != len(images):
            raise ZsadError(f"got {len(sources)} sources for {len(images)} images: give one per image, or none")
        sources = list(sources) if sources else [str(i) if isinstance(i, (str, Path)) else f"#{k}"
                                                 for k, i in enumerate(images)]
        if raw:
            shapes = {i.shape for i in images}
            if len(shapes) > 1:
                raise ZsadError(f"raw images in one request must share a shape, got {sorted(shapes)}")
            arr = np.stack([_to_uint8(i, scale) for i in images])
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ZsadError(f"raw images must be uint8 [H,W,3], got {list(arr.shape[1:])}")
            out = self._call(self.model if self.raw_only else f"{self.model}_raw", [("image", arr, "UINT8")] + feeds,
                             wanted)
        else:
            blobs = [Path(i).read_bytes() if isinstance(i, (str, Path)) else bytes(i) for i in images]
            out = self._call(self.model, [("image_bytes", np.array(blobs, dtype=object).reshape(-1, 1), "BYTES")]
                             + feeds, wanted)
        scores = out["score"].reshape(-1)
        if "anomaly_map_original" in out:  # exported --resize-to-input: per-image maps, flattened and concatenated
            flat, start, maps = out["anomaly_map_original"].reshape(-1), 0, []
            for h, w in out["original_size"].tolist():
                maps.append(flat[start:start + h * w].reshape(h, w))
                start += h * w
        else:
            maps = list(out["anomaly_map"])
        return [Prediction(float(s), m, src, {n: out[n][i] for n in outputs})
                for i, (s, m, src) in enumerate(zip(scores, maps, sources, strict=True))]


def _to_uint8(image: np.ndarray, scale: float | None) -> np.ndarray:
    """A raw image as uint8: uint8 as is; any other dtype only times an explicit ``scale``, rounded, in range."""
    if image.dtype == np.uint8 and scale is None:
        return image
    if scale is None:
        raise ZsadError(f"raw images must be uint8, got {image.dtype}: pass scale= to say how its values map to "
                        f"0..255 (e.g. scale=255 for floats in [0, 1])")
    if image.dtype.kind not in "uif" and image.dtype != np.bool_:
        raise ZsadError(f"raw images must be numeric arrays, got {image.dtype}")
    x = image.astype(np.float64) * float(scale)
    if not np.isfinite(x).all():
        raise ZsadError("raw image holds NaN or infinite values")
    if x.size and (x.min() < -0.5 or x.max() > 255.5):
        raise ZsadError(f"raw image values times scale={scale} must lie in [0, 255], "
                        f"got [{x.min():.4g}, {x.max():.4g}]")
    return np.rint(x).astype(np.uint8)
