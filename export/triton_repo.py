"""Triton model-repository writer: config.pbtxt for every model and the ensemble that chains them.

Per exported model NAME (docs/architecture.md, sections 3 and 4, shows where these sit in the whole path):

    NAME            ensemble, input image_bytes (TYPE_STRING, one encoded image per batch item)
    NAME_raw        ensemble, input image (TYPE_UINT8 [H,W,3])
    NAME_preprocess / NAME_preprocess_raw   python: decode, resize, normalise (zsad.data.preprocess)
    NAME_<stage>    one model per Method.stages() entry: onnxruntime_onnx | tensorrt_plan | openvino, or python
                    running ONNX Runtime (triton_models/stage_ort) or OpenVINO (triton_models/stage_openvino)
    NAME_text_<field>  python, where the method takes text per request (Bayes-PFL's class_name): tokenises it
    NAME_restore    python, optional (--resize-to-input): anomaly maps back to the input images' sizes, flattened
                    and concatenated per request (``original_size`` tells how to split them)
    NAME_torch      python-torch backend only (triton_models/torch_chain): the whole stage chain in one process
                    (fp16 / CUDA graphs on GPU), which keeps the encoder's taps (up to 22 MB per image) out of
                    Triton's inter-model traffic

Configs are rendered from plain dicts into protobuf text format; ``validate_config`` parses them against Triton's
own ``ModelConfig`` schema (shipped in tritonclient) so a typo never reaches a server.
"""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import zsad.triton_models as _triton_models
from zsad import ZsadError

OV_PERFORMANCE_HINTS = ("latency", "throughput")
SOURCES = Path(_triton_models.__file__).resolve().parent  # shipped in the wheel as package data
_DTYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.int64: "TYPE_INT64",
           torch.int32: "TYPE_INT32", torch.uint8: "TYPE_UINT8", torch.bool: "TYPE_BOOL"}


class Sym(str):
    """An enum value in protobuf text format (written without quotes)."""


def _scalar(v) -> str:
    if isinstance(v, Sym):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_pbtxt(msg: dict, indent: int = 0) -> str:
    """dict -> protobuf text. dict values are messages, lists of dicts repeated messages, other lists scalars."""
    pad = "  " * indent
    lines = []
    for key, value in msg.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                lines += [f"{pad}{key} {{", to_pbtxt(v, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def validate_config(text: str):
    """Parse a config.pbtxt against Triton's ModelConfig protobuf; returns the message, raises ZsadError if invalid."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise ZsadError("validating Triton configs needs tritonclient: pip install 'zsad[serve]'") from err
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise ZsadError(f"generated config.pbtxt does not parse as Triton's ModelConfig: {err}\n{text}") from err


def tensor_config(name: str, shape: tuple, dtype: torch.dtype) -> dict:
    """A config input/output; shape includes the leading "B". A per-item scalar becomes dims [1] + reshape []."""
    dims = [int(d) for d in shape[1:]]
    out: dict[str, object] = {"name": name, "data_type": Sym(_DTYPES[dtype]), "dims": dims or [1]}
    if not dims:
        out["reshape"] = {"shape": []}
    return out


@dataclass
class RepoOptions:
    name: str
    backend: str  # a name in zsad.export.runtimes (the exporter checks it)
    max_batch: int = 32
    instance_kind: str = "KIND_GPU"  # KIND_GPU | KIND_CPU
    instances: int = 1
    # Triton's batcher guide: set preferred sizes only where a model is measured to run some sizes much faster;
    # by default the batcher takes what has queued within the (small) delay, up to max_batch
    preferred_batch: list[int] = field(default_factory=list)
    queue_delay_us: int = 200
    resize_to_input: bool = False
    fp16: bool = False
    dynamic_batching: bool = True  # off: every request runs alone (zsad-bench compares both)
    # a request's decoded pixels, summed over its images, above this are refused (decompression bombs, absurd
    # inputs): it bounds preprocess's memory and the restored maps' size
    max_pixels: int = 50_000_000
    # OpenVINO backends: the CPU plugin's performance hint (latency: one stream on every core; throughput: several
    # streams, the python-openvino stage running the images of a dynamic batch on them at once)
    ov_hint: str = "latency"

    def __post_init__(self):
        if not 1 <= self.max_batch <= 4096:
            raise ZsadError(f"max batch must be in 1..4096, got {self.max_batch}")
        bad = [b for b in self.preferred_batch if not 1 <= b <= self.max_batch]
        if bad:
            raise ZsadError(f"preferred batch sizes must be in 1..{self.max_batch} (the max batch), got {bad}")
        if self.queue_delay_us < 0:
            raise ZsadError(f"the max queue delay must be >= 0 microseconds, got {self.queue_delay_us}")
        if self.ov_hint not in OV_PERFORMANCE_HINTS:
            raise ZsadError(f"the OpenVINO hint must be one of {', '.join(OV_PERFORMANCE_HINTS)}, got '{self.ov_hint}'")


def _common(opts: RepoOptions, name: str) -> dict:
    return {"name": name, "max_batch_size": opts.max_batch}


def _scheduling(opts: RepoOptions, kind: str | None = None) -> dict:
    out: dict[str, object] = {}
    if opts.dynamic_batching:
        batching = {"preferred_batch_size": sorted(set(opts.preferred_batch))} if opts.preferred_batch else {}
        out["dynamic_batching"] = {**batching, "max_queue_delay_microseconds": opts.queue_delay_us}
    out["instance_group"] = [{"count": opts.instances, "kind": Sym(kind or opts.instance_kind)}]
    return out


def _warmup(inputs: list[dict], batch: int = 1) -> dict:
    return {"model_warmup": [{
        "name": f"zeros_batch{batch}", "batch_size": batch,
        "inputs": [{"key": t["name"], "value": {"data_type": t["data_type"], "dims": t["dims"], "zero_data": True}}
                   for t in inputs],
    }]}


def _parameters(params: dict) -> dict:
    return {"parameters": [{"key": k, "value": {"string_value": str(v)}} for k, v in params.items()]}


def index_bounds_parameters(stage) -> dict:
    """The stage's declared index inputs (``Stage.index_bounds``, e.g. BAG-CLIP's knn_index < N) for the python
    stage models' request checks: a client can call a stage model directly, and an out-of-range index in a scatter
    is undefined behaviour in some runtimes."""
    return {"index_bounds": json.dumps(stage.index_bounds)} if stage.index_bounds else {}


def model_config(opts: RepoOptions, model_name: str, runs_on: dict, inputs: list[dict], outputs: list[dict],
                 parameters: dict | None = None, kind: str | None = None) -> dict:
    """A chain model's config (a stage, or a whole chain). Its runtime (zsad.export.runtimes) gives what runs it
    (``runs_on``: {"platform": ...} or {"backend": ...}), its ``parameters`` and, where fixed, its instance ``kind``."""
    cfg = _common(opts, model_name)
    cfg.update(runs_on)
    cfg.update({"input": inputs, "output": outputs})
    cfg.update(_scheduling(opts, kind))
    if parameters:
        cfg.update(_parameters(parameters))
    cfg.update(_warmup(inputs))
    return cfg


def stage_config(opts: RepoOptions, stage, model_name: str, runs_on: dict, parameters: dict | None = None,
                 kind: str | None = None) -> dict:
    """A stage model's config (see :func:`model_config`), its tensors the stage's."""
    inputs = [tensor_config(n, s, stage.dtype(n)) for n, s in stage.inputs.items()]
    outputs = [tensor_config(n, s, stage.dtype(n)) for n, s in stage.outputs.items()]
    return model_config(opts, model_name, runs_on, inputs, outputs, parameters, kind)


def preprocess_config(opts: RepoOptions, model_name: str, raw: bool, image_size: int, mean, std,
                      after: Sequence[dict] = ()) -> dict:
    """The preprocess model. ``after``: tensor configs (the text models' outputs) it takes as extra inputs and never
    reads, so that in the ensemble it runs after the text models (see ``zsad.export.exporter._ensemble``)."""
    cfg = _common(opts, model_name)
    cfg["backend"] = "python"
    cfg["input"] = [{"name": "image", "data_type": Sym("TYPE_UINT8"), "dims": [-1, -1, 3]} if raw else
                    {"name": "image_bytes", "data_type": Sym("TYPE_STRING"), "dims": [1]}]
    cfg["input"] += [dict(t) for t in after]
    cfg["output"] = [{"name": "images", "data_type": Sym("TYPE_FP32"), "dims": [3, image_size, image_size]},
                     {"name": "original_size", "data_type": Sym("TYPE_INT32"), "dims": [2]}]
    cfg.update(_scheduling(opts, "KIND_CPU"))  # decoding runs on the CPU whatever the stages use
    cfg.update(_parameters({"input_kind": "raw" if raw else "bytes", "image_size": image_size,
                            "mean": ",".join(map(str, mean)), "std": ",".join(map(str, std)),
                            "max_pixels": opts.max_pixels}))
    unread = [{"key": t["name"], "value": {"data_type": t["data_type"], "dims": t["dims"], "zero_data": True}}
              for t in after]
    if raw:
        cfg.update({"model_warmup": [{"name": "zeros_image", "batch_size": 1, "inputs": [
            {"key": "image", "value": {"data_type": Sym("TYPE_UINT8"), "dims": [image_size, image_size, 3],
                                       "zero_data": True}}, *unread]}]})
    else:  # a real PNG from the model's warmup/ folder: warm-up exercises the decoder too
        cfg.update({"model_warmup": [{"name": "png", "batch_size": 1, "inputs": [
            {"key": "image_bytes", "value": {"data_type": Sym("TYPE_STRING"), "dims": [1],
                                             "input_data_file": "warmup.bin"}}, *unread]}]})
    return cfg


def restore_config(opts: RepoOptions, model_name: str, image_size: int) -> dict:
    cfg = _common(opts, model_name)
    cfg["backend"] = "python"
    cfg["input"] = [{"name": "anomaly_map", "data_type": Sym("TYPE_FP32"), "dims": [image_size, image_size]},
                    {"name": "original_size", "data_type": Sym("TYPE_INT32"), "dims": [2]}]
    # per request: each image's map at its own size, flattened and concatenated (see triton_models/restore)
    cfg["output"] = [{"name": "anomaly_map_original", "data_type": Sym("TYPE_FP32"), "dims": [-1]}]
    cfg.update(_scheduling(opts, "KIND_CPU"))
    cfg.update(_parameters({"max_pixels": opts.max_pixels}))
    # zeros would ask for 0x0 maps (refused): warm up with a real size from warmup/original_size.bin
    cfg["model_warmup"] = [{"name": "map_at_model_size", "batch_size": 1, "inputs": [
        {"key": "anomaly_map", "value": {"data_type": Sym("TYPE_FP32"), "dims": [image_size, image_size],
                                         "zero_data": True}},
        {"key": "original_size", "value": {"data_type": Sym("TYPE_INT32"), "dims": [2],
                                           "input_data_file": "original_size.bin"}}]}]
    return cfg


def restore_warmup_files(image_size: int) -> dict[str, bytes]:
    """The restore model's warm-up data (``extra`` of :func:`write_model`): original_size = (S, S), int32."""
    return {"warmup/original_size.bin": struct.pack("<2i", image_size, image_size)}


def text_output_config(text_input) -> dict:
    """The token tensor a text model hands the ensemble (its output; also preprocess's unread ordering input)."""
    return {"name": text_input.tensor, "data_type": Sym("TYPE_INT64"), "dims": [text_input.length]}


def text_input_config(opts: RepoOptions, model_name: str, text_input) -> dict:
    """A python model turning a request's text field (one string per image) into its token tensor."""
    import dataclasses
    import json

    cfg = _common(opts, model_name)
    cfg["backend"] = "python"
    cfg["input"] = [{"name": text_input.request_name, "data_type": Sym("TYPE_STRING"), "dims": [1]}]
    cfg["output"] = [text_output_config(text_input)]
    cfg.update(_scheduling(opts, "KIND_CPU"))  # tokenising is CPU work whatever the stages use
    _standalone_text_encoder(text_input)
    cfg.update(_parameters({"text_input": json.dumps(dataclasses.asdict(text_input))}))
    # warm-up with the method's default text (an empty string is refused): warmup/text.bin
    cfg["model_warmup"] = [{"name": "default_text", "batch_size": 1, "inputs": [
        {"key": text_input.request_name, "value": {"data_type": Sym("TYPE_STRING"), "dims": [1],
                                                   "input_data_file": "text.bin"}}]}]
    return cfg


def text_warmup_files(text_input) -> dict[str, bytes]:
    """The text model's warm-up data (``extra`` of :func:`write_model`): the method's default text."""
    return {"warmup/text.bin": string_tensor_file([text_input.default.encode("utf-8")])}


def ensemble_config(opts: RepoOptions, name: str, inputs: list[dict], outputs: list[dict],
                    steps: list[tuple[str, dict, dict]]) -> dict:
    """steps: (model name, {model input: ensemble tensor}, {model output: ensemble tensor})."""
    cfg = _common(opts, name)
    cfg["platform"] = "ensemble"
    # an ensemble sees its members' external shapes: a per-item scalar is [1] there, so no reshape
    strip = lambda ts: [{k: v for k, v in t.items() if k != "reshape"} for t in ts]  # noqa: E731
    cfg["input"], cfg["output"] = strip(inputs), strip(outputs)
    cfg["ensemble_scheduling"] = {"step": [
        {"model_name": model, "model_version": -1,
         "input_map": [{"key": k, "value": v} for k, v in imap.items()],
         "output_map": [{"key": k, "value": v} for k, v in omap.items()]}
        for model, imap, omap in steps]}
    return cfg


def ensemble_step(model: str, inputs, outputs) -> tuple[str, dict, dict]:
    """An ensemble step whose model's tensors keep their names in the ensemble."""
    return model, {n: n for n in inputs}, {n: n for n in outputs}


def write_model(repo: Path, cfg: dict, files: Mapping[str, Path | bytes] | None = None,
                extra: Mapping[str, Path | bytes] | None = None) -> Path:
    """Write ``repo/<name>/config.pbtxt`` (validated), version files under 1/, other files beside the config."""
    text = to_pbtxt(cfg) + "\n"
    validate_config(text)
    mdir = Path(repo) / cfg["name"]
    (mdir / "1").mkdir(parents=True, exist_ok=True)
    (mdir / "config.pbtxt").write_text(text)
    for base, entries in ((mdir / "1", files or {}), (mdir, extra or {})):
        for rel, src in entries.items():
            dst = base / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            elif Path(src).is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)
    return mdir


# the TextInput.standalone versions triton_models/text_input implements (without zsad)
_STANDALONE_TEXT_MODELS = ("clip_class_name",)


def _standalone_text_encoder(text_input):
    """open_clip's SimpleTokenizer of the method's architecture, refusing what the served model cannot repeat."""
    from zsad._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    from zsad.backbone import resolve_arch

    if text_input.standalone not in _STANDALONE_TEXT_MODELS:
        raise ZsadError(f"internal: the served text model has no standalone version of {text_input.encoder}")
    tok = open_clip.get_tokenizer(resolve_arch(text_input.kwargs["arch"]))
    if not isinstance(tok, open_clip.tokenizer.SimpleTokenizer) \
            or tok.clean_fn is not open_clip.tokenizer._clean_lower \
            or tok.reduction_fn is not None or tok.context_length != 77:
        raise ZsadError(f"architecture {text_input.kwargs['arch']} uses a tokeniser other than CLIP's BPE "
                        f"(open_clip {type(tok).__name__}); the served text model cannot reproduce it")
    return tok


# the code zsad shares with its served models (triton_models/zsad_common: zsad-free), copied as is beside every
# python model.py under this same folder name (the stub puts the version folder on sys.path)
COMMON = "zsad_common"


def common_files() -> dict[str, Path]:
    """The shared package's files, by their path in a model's version folder: ``zsad_common/*.py``, unchanged."""
    return {f"{COMMON}/{p.name}": p for p in sorted((SOURCES / COMMON).glob("*.py"))}


def python_model_files(kind: str) -> dict[str, Path | bytes]:
    """The files of a python model's version folder: model.py and the shared package it imports (zsad_common: the
    backend guard, image decoding, CLIP pre-processing, class-name text), plus open_clip's BPE vocabulary for
    text_input."""
    files: dict[str, Path | bytes] = {"model.py": python_source(kind), **common_files()}
    if kind == "text_input":
        from zsad._compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from open_clip.tokenizer import default_bpe

        files["bpe_simple_vocab_16e6.txt.gz"] = Path(default_bpe())
    return files


def python_source(kind: str) -> Path:
    """A shipped python-backend model.py: ``triton_models/<kind>/model.py`` (one folder per kind)."""
    path = SOURCES / kind / "model.py"
    if not path.is_file():
        raise ZsadError(f"python backend source missing: {path} (broken installation?)")
    return path


def string_tensor_file(items: list[bytes]) -> bytes:
    """Triton's serialised TYPE_STRING layout (4-byte little-endian length + bytes per element): warm-up data."""
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def _dims(t: dict) -> str:
    return "[B, " + ", ".join(str(d) for d in t["dims"]) + "]"


def repository_readme(name: str, ensembles: list[dict], backend: str, trained: bool, image_size: int) -> str:
    """README.md for an exported model (written into its ensemble folder): how to serve and query it."""
    lines = [f"# {name}", "", f"Written by zsad-export: backend `{backend}`, {image_size} px, "
             f"{'trained' if trained else 'UNTRAINED (random prompts and heads: for benchmarks only)'}. "
             f"`parity_report.json` beside this file says how close every stage came to PyTorch.", "",
             "## Serve", "", "```bash",
             "tritonserver --model-repository=$(pwd)/<this repository>"
             "   # or, on a CPU box: zsad-serve <this repository>",
             "```", "", "## Ensembles", ""]
    for cfg in ensembles:
        lines += [f"### `{cfg['name']}`", "", "| | tensor | type | shape |", "|---|---|---|---|"]
        lines += [f"| input | `{t['name']}` | {t['data_type']} | {_dims(t)} |" for t in cfg["input"]]
        lines += [f"| output | `{t['name']}` | {t['data_type']} | {_dims(t)} |" for t in cfg["output"]]
        lines.append("")
    text_inputs = [t["name"] for t in ensembles[0]["input"] if t["name"] != "image_bytes"]
    header = {"inputs": [{"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": 0}}]
              + [{"name": t, "shape": [1, 1], "datatype": "BYTES", "data": ["bottle"]} for t in text_inputs],
              "outputs": [{"name": "score"}]}
    head = json.dumps(header, separators=(",", ":"))
    lines += ["## Query with curl", "",
              "`image_bytes` carries the encoded file (PNG, JPEG, BMP, TIFF, ...) through Triton's binary-data "
              "extension: a JSON header, then the tensor's bytes. A BYTES element travels as a 4-byte little-endian "
              "length and the file, so `binary_data_size` is the file size + 4; `Inference-Header-Content-Length` "
              "is the header's length. (base64 text in JSON is refused with a 400.)", "",
              "```bash", "IMG=image.png; URL=http://localhost:8000; N=$(stat -c %s \"$IMG\")",
              "HEADER=$(printf '" + head.replace("%", "%%").replace('"binary_data_size":0', '"binary_data_size":%d')
              + "' $((N + 4)))",
              "{ printf '%s' \"$HEADER\"; perl -e 'print pack(\"V\", shift)' \"$N\"; cat \"$IMG\"; } |",
              "  curl -s --data-binary @- -H \"Content-Type: application/octet-stream\" \\",
              "  -H \"Inference-Header-Content-Length: ${#HEADER}\" \"$URL/v2/models/" + name + "/infer\"",
              "```", "",
              f"The `{name}_raw` ensemble takes decoded pixels instead (`image`, UINT8 [B, H, W, 3]) and works "
              "with plain JSON. Python: `zsad.serve.client.AnomalyClient(url, \"" + name + "\")`, or `zsad-infer`.",
              ""]
    return "\n".join(lines)
