"""Repository written for a stock Triton container: the preprocess, class-name and restore models import no zsad,
torch or open_clip (checked in a subprocess that refuses those imports), and compute what the eager code computes
(open_clip's tokeniser, zsad.data.decode_image + preprocess); the code they share with zsad (zsad_common) imports
only the standard library, numpy and Pillow and is copied as is; batcher defaults and warm-up on every model, read
from the written configs."""
import ast
import io
import json
import random
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from zsad import ZsadError
from zsad._compat import ensure_torchvision_importable
from zsad.export.exporter import ExportOptions, export_model
from zsad.export.triton_repo import COMMON, SOURCES, RepoOptions

ensure_torchvision_importable()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("repo")
    export_model(ExportOptions(model="bayespfl", profile="tiny", backend="python-ort", out=out, max_batch=4,
                               parity_images=2, resize_to_input=True), log=lambda *a: None)
    return out


def _configs(repo):
    return {p.parent.name: text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
            for p in repo.glob("*/config.pbtxt")}


@pytest.mark.slow
def test_batcher_has_no_preferred_sizes_and_every_model_warms_up(repo):
    configs = _configs(repo)
    assert {"bayespfl_text_class_name", "bayespfl_restore", "bayespfl_preprocess"} <= set(configs)
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            continue  # Triton has no warm-up or batcher for ensembles: their members have them
        assert cfg.HasField("dynamic_batching"), name
        assert list(cfg.dynamic_batching.preferred_batch_size) == [], name
        assert 0 < cfg.dynamic_batching.max_queue_delay_microseconds <= 1000, name
        assert len(cfg.model_warmup) == 1, f"{name} has no warm-up"
        for inp in cfg.model_warmup[0].inputs.values():
            if inp.input_data_file:
                assert (repo / name / "warmup" / inp.input_data_file).is_file(), (name, inp.input_data_file)
    # the warm-up files hold what the models accept: the default class name, a real size
    text = (repo / "bayespfl_text_class_name" / "warmup" / "text.bin").read_bytes()
    assert int.from_bytes(text[:4], "little") == len(text) - 4 and text[4:].decode().strip()
    size = np.frombuffer((repo / "bayespfl_restore" / "warmup" / "original_size.bin").read_bytes(), "<i4")
    assert size.tolist() == [224, 224]


@pytest.mark.slow
def test_steps_that_refuse_client_input_run_alone(repo):
    """Triton 2.51 crashes when an ensemble step fails while another step of the same request is being scheduled
    (SIGSEGV under the hostile test): the text model (a bad class name) runs first and alone, then preprocess (a bad
    image), which takes the tokens, unread, for that ordering; every stage model waits for preprocess's images."""
    configs = _configs(repo)
    for ens in ("bayespfl", "bayespfl_raw"):
        pre_name = f"bayespfl_preprocess{ens[len('bayespfl'):]}"
        steps = {s.model_name: s for s in configs[ens].ensemble_scheduling.step}
        request = {t.name for t in configs[ens].input}
        made_by = {t: name for name, s in steps.items() for t in s.output_map.values()}
        needs = {name: {made_by[t] for t in s.input_map.values() if t not in request} for name, s in steps.items()}
        assert needs["bayespfl_text_class_name"] == set()  # the only entry step
        assert needs[pre_name] == {"bayespfl_text_class_name"}

        for name in set(steps) - {"bayespfl_text_class_name", pre_name}:
            assert pre_name in _upstream(needs, name), name
        pre = configs[pre_name]
        assert {t.name for t in pre.input} == {"image" if ens == "bayespfl_raw" else "image_bytes", "class_tokens"}
        assert {i for w in pre.model_warmup for i in w.inputs} == {t.name for t in pre.input}


def _upstream(needs: dict, name: str) -> set:
    return set().union(*({d} | _upstream(needs, d) for d in needs[name]))


def test_preferred_batch_size_only_when_asked(tiny_method):
    from zsad.export import runtimes

    st = tiny_method("bagclip").stages()[0]
    opts = RepoOptions(name="m", backend="onnxruntime", max_batch=16, preferred_batch=[16, 8])
    cfg = runtimes.get("onnxruntime").triton_config(opts, st, "m")
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [8, 16]
    with pytest.raises(ZsadError, match="preferred batch sizes must be in 1..16"):
        RepoOptions(name="m", backend="onnxruntime", max_batch=16, preferred_batch=[32])


def test_export_cli_takes_preferred_batch_size_and_refuses_garbage():
    from click.testing import CliRunner

    from zsad.export.cli import main

    res = CliRunner().invoke(main, ["--model", "bagclip", "--profile", "tiny", "--preferred-batch-size", "8,x"])
    assert res.exit_code != 0 and "comma-separated integers" in res.output and "Traceback" not in res.output


def test_no_dynamic_batching_writes_no_batcher(tiny_method):
    from zsad.export import runtimes

    st = tiny_method("bagclip").stages()[0]
    for backend in ("onnxruntime", "python-ort"):
        cfg = runtimes.get(backend).triton_config(RepoOptions(name="m", backend=backend, max_batch=8,
                                                              dynamic_batching=False), st, "m")
        assert "dynamic_batching" not in cfg and cfg["max_batch_size"] == 8, backend
        on = runtimes.get(backend).triton_config(RepoOptions(name="m", backend=backend, max_batch=8), st, "m")
        assert on["dynamic_batching"]["max_queue_delay_microseconds"] == 200, backend


def test_export_cli_dynamic_batching_switch(monkeypatch):
    """--no-dynamic-batching reaches the export; batcher settings given with it are refused, not silently dropped."""
    from click.testing import CliRunner

    from zsad.export import exporter
    from zsad.export.cli import main

    seen = []
    monkeypatch.setattr(exporter, "export_model", lambda opts, log=None: seen.append(opts))
    base = ["--model", "bagclip", "--profile", "tiny"]
    for args, batching, delay in [([], True, 200), (["--no-dynamic-batching"], False, 200),
                                  (["--queue-delay-us", "50"], True, 50)]:
        res = CliRunner().invoke(main, base + args)
        assert res.exit_code == 0, res.output
        assert (seen[-1].dynamic_batching, seen[-1].queue_delay_us) == (batching, delay), args
    assert seen[-2].repo_options("m").dynamic_batching is False
    for extra in (["--queue-delay-us", "50"], ["--preferred-batch-size", "8"]):
        res = CliRunner().invoke(main, base + ["--no-dynamic-batching", *extra])
        assert res.exit_code != 0 and "--no-dynamic-batching turns off" in res.output, res.output
        assert "Traceback" not in res.output
    assert len(seen) == 3


# -- the standalone modules against the eager code, in a process that refuses zsad / torch / open_clip ---------------
_BLOCKER = textwrap.dedent("""
    import importlib.abc, sys, types
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("zsad", "torch", "open_clip", "ftfy", "regex", "onnxruntime"):
                raise ImportError(f"{name} is not in a stock Triton container")
    sys.meta_path.insert(0, Refuse())
    sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
""")


# Triton's pb_utils as far as the python models use it, for the blocked process (a request: {input name: array})
_FAKE_PB_UTILS = textwrap.dedent("""
    pb = sys.modules["triton_python_backend_utils"]
    class Tensor:
        def __init__(self, name, arr):
            self.name, self.arr = name, arr
        def as_numpy(self):
            return self.arr
    class TritonError:
        INVALID_ARG = "INVALID_ARG"
        def __init__(self, message, code="INTERNAL"):
            self.message, self.code = message, code
    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs, self.error = {t.name: t.arr for t in output_tensors}, error
    class Logger:
        @staticmethod
        def log_error(message):
            pass
    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.Logger = Tensor, TritonError, InferenceResponse, Logger
    pb.get_input_tensor_by_name = lambda request, name: Tensor(name, request[name])
""")


def _run_standalone(folder, body: str) -> dict:
    code = _BLOCKER + f"sys.path.insert(0, {str(folder)!r})\n" + textwrap.dedent(body)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _strings(n=150, seed=0) -> list[str]:
    """Class names we use plus unicode, long, empty, punctuation and random mixes."""
    fixed = ["bottle", "metal_nut", "Screw", "pcb1", "PCB4", "macaroni2", "chewinggum", "pipe_fryum", "capsules",
             "", "   ", "___", "a" * 300, "it's a dog's toy", "I'M HERE", "café", "naïve façade", "日本語のテキスト",
             "Привет мир", "🙂 emoji 🚀", "ﬁsh ﬂower", "ＦＵＬＬ　ｗｉｄｔｈ", "“quoted” ‘single’", "x&amp;y",
             "&amp;amp;amp;", "<b>&amp;</b>", "tab\there\nnew\r\nline", "12345 ½ ² Ⅻ", "a--b...c!!!", "e\u0301",
             "<start_of_text>x", "!<end_of_text>", "\x00ctrl\x7f", "\x93smart\x94", "ǅemal", "under_score_",
             "zero\u200bwidth", "\u00a0nbsp", "Ａｂｃ１２３", "transistor  ", "wood-grain", "hazelnut's shell"]
    rng = random.Random(seed)
    alphabet = "abcXYZ _-'.,!&;#0123456789éüßçñøåΩπжщ中文かな한국🙂\u0301\u2019\u201c\uff21\t"
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.slow
def test_tokenizer_equals_open_clip_without_importing_it(repo):
    from open_clip.tokenizer import SimpleTokenizer

    strings = _strings()
    ref = SimpleTokenizer()(strings).tolist()
    out = _run_standalone(repo / "bayespfl_text_class_name" / "1", f"""
        import json, os
        from zsad_common.text import ClipTokenizer
        folder = {str(repo / "bayespfl_text_class_name" / "1")!r}
        tok = ClipTokenizer(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"))
        print(json.dumps([tok(s) for s in {strings!r}]))
    """)
    diff = [(s, a[:8], b[:8]) for s, a, b in zip(strings, ref, out, strict=True) if a != b]
    assert not diff, diff[:5]


@pytest.mark.slow
def test_served_class_name_ids_equal_the_eager_encoder(repo, tiny_method):
    ti = tiny_method("bayespfl").text_inputs()[0]
    names = [s for s in _strings(60, seed=1) if len(s.encode()) <= 256]
    expected = []
    for s in names:
        try:
            expected.append(ti.encode([s]).tolist()[0])
        except ZsadError:
            expected.append("refused")
    folder = repo / "bayespfl_text_class_name" / "1"
    cfg = text_format.Parse((folder.parent / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    spec = json.loads(cfg.parameters["text_input"].string_value)
    assert (spec["request_name"], spec["tensor"], spec["length"]) == (ti.request_name, ti.tensor, ti.length)
    out = _run_standalone(folder, _FAKE_PB_UTILS + textwrap.dedent(f"""
        import json
        import numpy as np
        import model
        from zsad_common.text import class_name_ids
        assert model.class_name_ids is class_name_ids  # the rule zsad.methods.bayespfl applies too
        served = model.TritonPythonModel()
        served.initialize({{"model_name": "text", "model_config": json.dumps(
            {{"parameters": {{"text_input": {{"string_value": {json.dumps(spec)!r}}}}}}})}})
        res = []
        for r in served.execute([{{{ti.request_name!r}: np.array([[s.encode()]], dtype=object)}} for s in {names!r}]):
            assert r.error is None or r.error.code == "INVALID_ARG", r.error.message
            res.append(r.outputs[{ti.tensor!r}].tolist()[0] if r.error is None else "refused")
        print(json.dumps(res))
    """))
    assert "refused" in expected and any(e != "refused" for e in expected)  # both branches exercised
    assert out == expected
    # the client's text as given on both sides: a folder name is not renamed ("pcb1" is not "printed circuit board")
    i, j = names.index("pcb1"), names.index("metal_nut")
    assert out[i] != ti.encode(["printed circuit board"]).tolist()[0] and out[j] != ti.encode(["metal nut"]).tolist()[0]


def _encoded_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for size, mode, fmt in [((37, 53), "RGB", "PNG"), ((64, 64), "L", "PNG"), ((20, 90), "RGBA", "PNG"),
                            ((48, 40), "RGB", "JPEG"), ((30, 30), "P", "BMP"), ((224, 224), "RGB", "PNG")]:
        arr = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(mode)
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray((rng.random((16, 16)) * 65535).astype(np.uint16)).save(buf, "PNG")  # 16-bit: scaled by 257
    return out + [buf.getvalue()]


@pytest.mark.slow
def test_preprocess_and_restore_equal_zsad_without_importing_it(repo, tmp_path):
    from zsad.data import decode_image, preprocess
    from zsad.data.transforms import resize_map

    images = _encoded_images()
    ref = np.stack([preprocess(decode_image(b), 224) for b in images])
    raw = np.random.default_rng(1).integers(0, 256, (2, 31, 45, 3), dtype=np.uint8)
    ref_raw = np.stack([preprocess(a, 224) for a in raw])
    amap = np.random.default_rng(2).random((224, 224)).astype(np.float32)
    ref_map = resize_map(amap, 77, 301)
    np.savez(tmp_path / "in.npz", *[np.frombuffer(b, np.uint8) for b in images], raw=raw, amap=amap)
    out = _run_standalone(repo / "bayespfl_preprocess" / "1", f"""
        import json, numpy as np, sys
        from zsad_common.image import decode_image
        from zsad_common.transforms import preprocess
        from zsad_common.guard import BadInput
        d = np.load({str(tmp_path / "in.npz")!r})
        n = len([k for k in d.files if k.startswith("arr_")])
        x = np.stack([preprocess(decode_image(d[f"arr_{{i}}"].tobytes()), 224) for i in range(n)])
        xr = np.stack([preprocess(a, 224) for a in d["raw"]])
        np.savez({str(tmp_path / "out.npz")!r}, x=x, xr=xr)
        try:
            decode_image(b"not an image")
            refused = False
        except BadInput:
            refused = True
        print(json.dumps({{"refused": refused}}))
    """)
    _run_standalone(repo / "bayespfl_restore" / "1", f"""
        import json, numpy as np
        from zsad_common.transforms import resize_map
        d = np.load({str(tmp_path / "in.npz")!r})
        np.save({str(tmp_path / "map.npy")!r}, resize_map(d["amap"], 77, 301))
        print(json.dumps({{}}))
    """)
    got = np.load(tmp_path / "out.npz")
    assert out["refused"]
    np.testing.assert_array_equal(got["x"], ref)
    np.testing.assert_array_equal(got["xr"], ref_raw)
    np.testing.assert_array_equal(np.load(tmp_path / "map.npy"), ref_map)


@pytest.mark.slow
def test_every_python_model_folder_carries_the_shared_package_as_is(repo):
    """zsad_common beside every python model.py: the source package's files, byte for byte, and nothing else."""
    source = {p.name: p.read_bytes() for p in (SOURCES / COMMON).glob("*.py")}
    assert {"__init__.py", "guard.py", "image.py", "transforms.py", "text.py"} <= set(source)
    folders = [f for f in repo.glob("*/1") if (f / "model.py").is_file()]
    assert {f.parent.name for f in folders} >= {"bayespfl_preprocess", "bayespfl_text_class_name", "bayespfl_restore",
                                                "bayespfl_encoder"}
    for folder in folders:
        copied = {p.name: p.read_bytes() for p in (folder / COMMON).iterdir()}
        assert copied == source, folder
    for kind in ("preprocess", "text_input", "restore"):  # the stock-container models: no zsad import at all
        text = (SOURCES / kind / "model.py").read_text()
        assert "from zsad." not in text and "import zsad" not in text and "import torch" not in text, kind


@pytest.mark.slow
def test_shared_package_imports_only_stdlib_numpy_pillow(repo):
    """zsad_common's imports, read with ast: the standard library, numpy, PIL, and its own modules by relative
    import; then every module of a written copy imported where zsad, torch and open_clip cannot be."""
    modules = {p.stem for p in (SOURCES / COMMON).glob("*.py")}
    for path in sorted((SOURCES / COMMON).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: one of its own modules
                assert node.level == 1, (path.name, node.module)
                names = [node.module] if node.module else [a.name for a in node.names]
                assert set(names) <= modules, (path.name, names)
                continue
            elif isinstance(node, ast.ImportFrom):
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            for top in tops:
                assert top in sys.stdlib_module_names or top in ("numpy", "PIL"), (path.name, top)
    out = _run_standalone(repo / "bayespfl_preprocess" / "1", f"""
        import importlib, json
        names = sorted({sorted(modules - {"__init__"})!r})
        for n in names:
            importlib.import_module("zsad_common." + n)
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("zsad"))))
    """)
    assert out == ["zsad_common", *[f"zsad_common.{n}" for n in sorted(modules - {"__init__"})]]


def test_zsad_runs_the_shared_functions_and_raises_zsad_errors():
    """zsad.data's decoder and transforms are zsad_common's functions (one implementation), raising ZsadError where
    those raise BadInput, and pickled by reference under their zsad names as before."""
    import pickle

    from zsad.data import decode_image, preprocess
    from zsad.data.transforms import preprocess_mask, resize_map
    from zsad.triton_models.zsad_common import image, transforms
    from zsad.triton_models.zsad_common.guard import BadInput

    pairs = [(decode_image, image.decode_image), (preprocess, transforms.preprocess),
             (preprocess_mask, transforms.preprocess_mask), (resize_map, transforms.resize_map)]
    for ours, shared in pairs:
        assert ours.__wrapped__ is shared and pickle.loads(pickle.dumps(ours)) is ours
    for call, match in ((lambda: decode_image(b""), "empty image data"),
                        (lambda: preprocess(np.zeros((4, 4, 3), np.uint8), 0), "size must be positive"),
                        (lambda: resize_map(np.zeros(3, np.float32), 2, 2), "2-D map")):
        with pytest.raises(ZsadError, match=match) as err:
            call()
        assert isinstance(err.value.__cause__, BadInput)
    with pytest.raises(BadInput, match="empty image data"):
        image.decode_image(b"")


# -- the stage models' request loop (zsad_common.guard.run_stage_requests), with a stand-in for Triton's pb_utils ---
def _fake_pb_utils():
    """``_FAKE_PB_UTILS`` (what the blocked process runs) made into a module here: one stand-in for both."""
    module = types.ModuleType("triton_python_backend_utils")
    exec(_FAKE_PB_UTILS, {"sys": types.SimpleNamespace(modules={"triton_python_backend_utils": module})})
    return module


_PB_UTILS = _fake_pb_utils()


def test_stage_request_loop_batches_splits_and_isolates_bad_requests():
    from zsad.triton_models.zsad_common.guard import run_stage_requests

    rng = np.random.default_rng(0)
    xs = [rng.random((n, 3)).astype(np.float32) for n in (1, 2, 1, 3)]
    # per request: a class id per row; 9 is out of range (bound 5)
    ids = [np.array([[k]] * len(x), np.int64) for k, x in zip((0, 1, 9, 2), xs, strict=True)]
    xs[3][1, 0] = np.nan
    calls = []

    def run(batch):  # doubles x, sums it, adds the id: a different result per row, so a mis-split shows
        calls.append(len(batch["x"]))
        if (batch["x"] > 0.99).any():
            raise RuntimeError("boom")
        return [batch["x"] * 2, batch["x"].sum(axis=1) + batch["ids"][:, 0]]

    requests = [{"x": x, "ids": i} for x, i in zip(xs, ids, strict=True)]
    got = run_stage_requests(_PB_UTILS, requests, ["x", "ids"], ["y", "s"], run, "m", bounds={"ids": 5})
    assert calls == [3]  # requests 0 and 1 (1 + 2 rows) in one run; 2 and 3 refused before it
    for r, x, i in zip(got[:2], xs, ids, strict=False):  # the first two requests
        assert r.error is None
        np.testing.assert_array_equal(r.outputs["y"], x * 2)
        expected_sums = [row.sum() + k for row, k in zip(x, i[:, 0], strict=True)]
        np.testing.assert_allclose(r.outputs["s"], expected_sums, rtol=1e-6)
    assert got[2].error.code == "INVALID_ARG" and "allowed [0, 4]" in got[2].error.message
    assert got[3].error.code == "INVALID_ARG" and "NaN" in got[3].error.message
    # a batch that fails: each request runs alone, and only the one that fails by itself gets an (internal) error
    xs[1][0, 0] = 0.995
    calls.clear()
    got = run_stage_requests(_PB_UTILS, requests[:2], ["x", "ids"], ["y", "s"], run, "m", bounds={"ids": 5})
    assert calls == [3, 1, 2]
    np.testing.assert_array_equal(got[0].outputs["y"], xs[0] * 2)
    assert got[1].error.code == "INTERNAL" and "RuntimeError" in got[1].error.message


def test_torch_chain_answers_a_zsad_error_as_that_requests_bad_input(monkeypatch, served_imports):
    """python-torch runs zsad code inside the zsad-free guard: a ZsadError out of the chain becomes BadInput, so it
    is that request's INVALID_ARG (HTTP 400) and the other requests of the batch are answered."""
    served_imports(_PB_UTILS)  # the served model's own module, imported as its stub imports it
    monkeypatch.delitem(sys.modules, "zsad.triton_models.torch_chain.model", raising=False)
    from zsad.triton_models.torch_chain import model

    def chain(x):
        if (x < 0).any():
            raise ZsadError("x must be >= 0")
        return [x * 2]

    served = model.TritonPythonModel()
    served.device, served.fp16, served.chain, served.model_name = "cpu", False, chain, "m_torch"
    served.inputs, served.outputs = ["x"], ["y"]
    ok, bad = np.ones((1, 2), np.float32), -np.ones((1, 2), np.float32)
    got = served.execute([{"x": ok}, {"x": bad}])
    np.testing.assert_array_equal(got[0].outputs["y"], ok * 2)
    assert got[1].error.code == "INVALID_ARG" and "x must be >= 0" in got[1].error.message
