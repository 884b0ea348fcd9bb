"""The Method contract, checked for every registered method and for a sixth, test-only method.

Per registered method (tiny profile): the exported ONNX stage files, chained by tensor name in ONNX Runtime, give
what the eager torch method gives; a checkpoint restores the exact outputs of perturbed weights; few-shot methods
change their output with a memory bank and return to zero-shot without it, the others refuse it.

The probe method below is registered only inside the tests. It goes create -> stages -> zsad-export (ONNX, parity)
-> checkpoint -> zsad-bench with no edit in export/, serve/ or bench/: that is the proof that a new method needs
none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import zsad.methods as M
from zsad import ZsadError
from zsad.checkpoint import load_checkpoint, save_checkpoint
from zsad.export.parity import synthetic_class_names, synthetic_images
from zsad.methods.base import BackboneConfig, Method, TrainConfig
from zsad.methods.stages import BoundStage, EncoderStage, Stage
from zsad.postprocess import Postprocess


def _ort_chain(repo: Path, model: str, stages, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the exported stage files of ``repo`` in ONNX Runtime, chained by tensor name (our own loop, not the
    exporter's parity code)."""
    import onnxruntime as ort

    env = dict(feed)
    for st in stages:
        sess = ort.InferenceSession(str(repo / f"{model}_{st.name}" / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        outs = sess.run(None, {i.name: env[i.name] for i in sess.get_inputs()})
        env.update(zip((o.name for o in sess.get_outputs()), outs, strict=True))
    return env


def _eager_and_feed(method, images: torch.Tensor):
    names = synthetic_class_names(images.shape[0]) if method.text_inputs() else None
    with torch.no_grad():
        out = method(images, names)
    feed = {k: v.numpy() for k, v in method.stage_inputs(images, names).items()}
    return out, feed


def _export(tmp_path, model: str, profile: str):
    from zsad.export.exporter import ExportOptions, export_model

    return export_model(ExportOptions(model=model, profile=profile, backend="onnxruntime", device="cpu", max_batch=2,
                                      parity_images=1, out=tmp_path / "repo"), log=lambda *a: None)


def _assert_exported_matches_eager(tmp_path, model: str, profile: str):
    with pytest.warns(UserWarning, match="UNTRAINED"):
        res = _export(tmp_path, model, profile)
    assert all(r.ok for r in res.parity_rows)
    method = M.create(model, profile)  # creation is seeded: the same weights the exporter used
    images = torch.from_numpy(synthetic_images(method.image_size, n=1))
    eager, feed = _eager_and_feed(method, images)
    got = _ort_chain(res.repo, model, method.stages(), feed)
    np.testing.assert_allclose(got["score"], eager.score.numpy(), rtol=1e-4, atol=1e-5)
    amap = eager.anomaly_map.numpy()
    assert np.abs(got["anomaly_map"] - amap).max() <= 1e-4 * max(np.abs(amap).max(), 1e-6)


def _assert_checkpoint_round_trip(tmp_path, method):
    images = torch.from_numpy(synthetic_images(method.image_size, n=2))
    before, _ = _eager_and_feed(method, images)
    with torch.no_grad():  # move every trainable weight, so a checkpoint that restored nothing would show
        gen = torch.Generator().manual_seed(1)
        for p in method.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    method.invalidate_text_cache()
    perturbed, _ = _eager_and_feed(method, images)
    assert not torch.allclose(perturbed.anomaly_map, before.anomaly_map)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "ckpt", method))
    assert type(loaded) is type(method)
    restored, _ = _eager_and_feed(loaded, images)
    torch.testing.assert_close(restored.score, perturbed.score, rtol=0, atol=0)
    torch.testing.assert_close(restored.anomaly_map, perturbed.anomaly_map, rtol=0, atol=0)


# -- every registered method ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", M.available())
def test_stage_chain_by_hand_equals_forward(tiny_method, name):
    """Each stage called on its declared inputs gives its declared outputs (names, shapes, dtypes), and the chain
    ends in exactly what ``forward`` returns."""
    method = tiny_method(name)
    images = torch.from_numpy(synthetic_images(method.image_size, n=3))
    out, feed = _eager_and_feed(method, images)
    env = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        for st in method.stages():
            res = st.module(*[env[n] for n in st.inputs])
            res = res if isinstance(res, tuple) else (res,)
            assert len(res) == len(st.outputs), st.name
            for (oname, shape), t in zip(st.outputs.items(), res, strict=True):
                assert tuple(t.shape) == tuple(3 if d == "B" else d for d in shape), (st.name, oname)
                assert t.dtype == st.dtype(oname), (st.name, oname)
                env[oname] = t
    assert torch.equal(env["score"], out.score) and torch.equal(env["anomaly_map"], out.anomaly_map)


@pytest.mark.slow
@pytest.mark.parametrize("name", M.available())
def test_exported_onnx_chain_equals_eager(tmp_path, name):
    _assert_exported_matches_eager(tmp_path, name, "tiny")


@pytest.mark.parametrize("name", M.available())
def test_checkpoint_round_trip_restores_outputs(tmp_path, name):
    _assert_checkpoint_round_trip(tmp_path, M.create(name, "tiny"))


@pytest.mark.parametrize("name", M.available())
def test_few_shot_where_declared(tiny_method, name):
    method = tiny_method(name)
    images = torch.from_numpy(synthetic_images(method.image_size, n=3))
    if not method.few_shot:
        with pytest.raises(ZsadError, match="no few-shot mode"):
            method.fit_memory(images[:2])
        return
    zero_shot, _ = _eager_and_feed(method, images[2:])
    try:
        method.fit_memory(images[:2])
        few_shot, feed = _eager_and_feed(method, images[2:])
        with torch.no_grad():  # the stage chain carries the memory bank too (it is what gets exported)
            chained = M.run_stages(method.stages(), **{k: torch.from_numpy(v) for k, v in feed.items()})
        torch.testing.assert_close(chained["anomaly_map"], few_shot.anomaly_map)
        assert not torch.allclose(few_shot.anomaly_map, zero_shot.anomaly_map, atol=1e-5)
    finally:
        method.clear_memory()
    back, _ = _eager_and_feed(method, images[2:])
    torch.testing.assert_close(back.anomaly_map, zero_shot.anomaly_map)


# -- a sixth method, registered only here ------------------------------------------------------------------------
@dataclass
class ProbeConfig:
    backbone: BackboneConfig
    train: TrainConfig
    taps: list[int]
    sigma: float


class ProbeMethod(Method):
    """Patch score = sigmoid(last tap . w); image score = sigmoid(mean of the global embedding * a)."""

    name = "contract_probe"
    config_class = ProbeConfig

    def __init__(self, config: ProbeConfig, profile: str):
        super().__init__(config, profile)
        self.backbone = self.load_backbone()
        info = self.backbone.info
        self.patch_weight = nn.Parameter(torch.randn(info.width) / info.width ** 0.5)
        self.global_scale = nn.Parameter(torch.ones(()))
        self.postprocess = Postprocess(info.image_size, config.sigma)

    def encode(self, images):
        return self.backbone.forward_taps(images, self.config.taps)

    def head(self, global_embedding, taps):
        g = self.backbone.info.grid
        patch_map = torch.sigmoid(taps[:, -1] @ self.patch_weight).reshape(-1, g, g)
        return torch.sigmoid(global_embedding.mean(dim=-1) * self.global_scale), patch_map

    def stages(self) -> list[Stage]:
        info = self.backbone.info
        s, g, n, d, e = info.image_size, info.grid, info.grid ** 2, info.width, info.embed_dim
        enc = {"global_embedding": ("B", e), "taps": ("B", len(self.config.taps), n, d)}
        head = {"image_prob": ("B",), "patch_map": ("B", g, g)}
        return [Stage("encoder", EncoderStage(self), {"images": ("B", 3, s, s)}, enc),
                Stage("head", BoundStage(self, "head"), enc, head),
                Stage("postprocess", self.postprocess, head, {"score": ("B",), "anomaly_map": ("B", s, s)})]

    def loss(self, batch):
        out = self(batch["image"])
        total = torch.nn.functional.binary_cross_entropy(out.score.clamp(1e-6, 1 - 1e-6), batch["label"].float())
        return {"total": total}

    def text_embeddings(self):
        return torch.zeros(0)


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """Register the probe method and write its profile (a .json path extending the tiny profile)."""
    monkeypatch.setitem(M.METHODS, ProbeMethod.name, ProbeMethod)
    profile = tmp_path / "probe_profile.json"
    profile.write_text(json.dumps({"extends": "tiny", ProbeMethod.name: {
        "train": {"optimizer": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "epochs": 1,
                  "batch_size": 2, "seed": 7},
        "taps": [1, 2], "sigma": 2.0}}))
    return str(profile)


def test_probe_method_is_created_from_the_registry(probe):
    assert ProbeMethod.name in M.available()
    method = M.create(ProbeMethod.name, probe)
    assert isinstance(method, ProbeMethod) and method.config.taps == [1, 2]
    images = torch.from_numpy(synthetic_images(method.image_size, n=2))
    with torch.no_grad():
        out = method(images)
        g, taps = method.encode(images)
        by_hand = torch.sigmoid(taps[:, -1] @ method.patch_weight).reshape(2, method.backbone.info.grid, -1)
    assert out.anomaly_map.shape == (2, method.image_size, method.image_size)
    torch.testing.assert_close(out.score, torch.sigmoid(g.mean(dim=-1) * method.global_scale))
    # Gaussian smoothing keeps the map within the range of the upsampled patch probabilities
    assert by_hand.min() - 1e-5 <= out.anomaly_map.min() and out.anomaly_map.max() <= by_hand.max() + 1e-5


@pytest.mark.slow
def test_probe_method_exports_with_parity(tmp_path, probe):
    _assert_exported_matches_eager(tmp_path, ProbeMethod.name, probe)


def test_probe_method_checkpoint_round_trip(tmp_path, probe):
    _assert_checkpoint_round_trip(tmp_path, M.create(ProbeMethod.name, probe))


@pytest.mark.slow
def test_probe_method_benchmarks(tmp_path, probe):
    from click.testing import CliRunner

    from zsad.bench.cli import main

    out = tmp_path / "bench"
    res = CliRunner().invoke(main, ["--model", ProbeMethod.name, "--profile", probe, "--batch", "1",
                                    "--backend", "torch-fp32,ort", "--device", "cpu", "--iters", "1",
                                    "--warmup", "0", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    (result,) = out.glob("*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["backend"], r["status"], r["parity_ok"]) for r in rows] == [("torch-fp32", "ok", True),
                                                                          ("ort", "ok", True)]


# -- the contract is enforced where a method is defined ----------------------------------------------------------
def _define(drop: str = "", **attrs):
    """Define a ProbeMethod subclass with ``drop`` left out (reverted to the abstract base) and ``attrs`` set."""
    body = {"name": "probe_variant", **attrs}
    if drop:
        body[drop] = getattr(Method, drop)  # the base's abstract placeholder: as if the subclass never defined it
    return type("Variant", (ProbeMethod,), body)


def test_a_complete_method_is_accepted():
    assert issubclass(_define(), Method)


@pytest.mark.parametrize("piece", ["encode", "stages", "loss", "text_embeddings"])
def test_a_method_missing_a_piece_is_refused_at_definition(piece):
    with pytest.raises(TypeError, match=f"does not implement {piece}"):
        _define(piece)


def test_config_class_name_and_signatures_are_checked_at_definition():
    with pytest.raises(TypeError, match="config_class must be a dataclass"):
        _define(config_class=dict)
    with pytest.raises(TypeError, match="name must be an identifier"):
        _define(name="")
    with pytest.raises(TypeError, match=r"stages must take \(self\), takes \(self, fold\)"):
        _define(stages=lambda self, fold=True: [])
    with pytest.raises(TypeError, match=r"encode must take \(self, images\)"):
        _define(encode=lambda self, images, extra: None)


@pytest.mark.parametrize("attr, value", [("paper_aupro_mode", "pro"), ("paper_aupro_mode", "")])
def test_paper_aupro_mode_is_checked_at_definition(attr, value):
    with pytest.raises(TypeError, match=f"{attr} must be one of"):
        _define(**{attr: value})


def test_paper_names_are_the_reference_tables_names():
    from zsad.reference import efficiency_rows, known_datasets, paper_method_name, paper_metrics, tables

    named = {r["method"] for r in tables()["results"]}
    for n in M.available():
        cls = M.METHODS[n]
        if not cls.paper_name:  # a method in none of the papers' tables (allowed: paper_name "")
            continue
        assert paper_method_name(n) == cls.paper_name and cls.paper_name in named
        assert any(paper_metrics(n, ds) for ds in known_datasets()), n  # published zero-shot numbers somewhere
        if cls.paper_few_shot_name:
            assert paper_method_name(n, "few-shot-4") == cls.paper_few_shot_name in named
    assert all(r["method"] == "BAG-CLIP" for r in efficiency_rows("bagclip")) and efficiency_rows("bagclip")
    assert paper_method_name("not_registered") == "not_registered"


def test_paper_facts_come_from_the_method(monkeypatch):
    """The reference tables and the paper protocol read a registered method's own attributes; a method with no
    paper name maps to itself."""
    from zsad.protocols import paper_aupro_mode
    from zsad.reference import paper_method_name

    variant = _define(paper_aupro_mode="mvtec", paper_name="SOWA")
    monkeypatch.setitem(M.METHODS, "probe_variant", variant)
    monkeypatch.setitem(M.METHODS, ProbeMethod.name, ProbeMethod)
    assert paper_method_name("probe_variant") == "SOWA" and paper_aupro_mode(variant) == "mvtec"
    assert paper_method_name(ProbeMethod.name) == ProbeMethod.name


def test_bound_stage_bakes_its_constants_and_checks_its_function():
    m = M.create("anomalyclip", "tiny")
    text = torch.randn(2, m.backbone.info.embed_dim)
    stage = BoundStage(m, "head", text=text)
    assert "text" in dict(stage.named_buffers()) and torch.equal(stage.text, text) and stage.text is not text
    g, taps = torch.randn(2, m.backbone.info.embed_dim), torch.randn(2, len(m.config.taps), 196, 128)
    with torch.no_grad():
        torch.testing.assert_close(stage(g, taps), m.head(g, taps, text), rtol=0, atol=0)
    with pytest.raises(TypeError, match="no function 'hed'"):
        BoundStage(m, "hed")
    with pytest.raises(TypeError, match=r"head has no parameter \['txt'\]"):
        BoundStage(m, "head", txt=text)


def test_probe_methods_paper_protocol_is_its_own(tmp_path, probe, synthetic):
    """A sixth method's released-test-script rules live in its own class (``paper_protocol``): under
    ``--protocol paper`` evaluation takes its image scores (here: minus the map maximum, so the image AUROC becomes
    that of -max(map), checked with sklearn) and its description lines; under ``zsad`` nothing changes."""
    from sklearn.metrics import roc_auc_score

    from zsad.data import load_samples
    from zsad.evaluate import evaluate
    from zsad.protocols import PaperProtocol, describe

    class ProbeProtocol(PaperProtocol):
        def image_scores(self, cls, terms, dataset, shots):
            return -terms["map_max"]

        def describe(self, dataset, shots):
            return ["image score = -max(map) (the probe's release)"]

    method = M.create(ProbeMethod.name, probe).eval()
    method.paper_protocol = ProbeProtocol()
    samples = load_samples(synthetic, "test", classes=["gravel"])[:8]
    zsad = evaluate(method, samples, progress=False, heatmaps_per_class=0)
    paper = evaluate(method, samples, progress=False, heatmaps_per_class=0, protocol="paper")
    with torch.no_grad():
        from zsad.data import AnomalyDataset

        ds = AnomalyDataset(samples, method.image_size)
        x = torch.stack([ds[i]["image"] for i in range(len(ds))])
        out = method(x)
    labels = [s.label for s in samples]
    want_paper = roc_auc_score(labels, -out.anomaly_map.flatten(1).amax(1).numpy())
    want_zsad = roc_auc_score(labels, out.score.numpy())
    assert paper["per_class"]["gravel"]["image_auroc"] == pytest.approx(want_paper, abs=1e-9)
    assert zsad["per_class"]["gravel"]["image_auroc"] == pytest.approx(want_zsad, abs=1e-9)
    assert describe(method)[1:] == ["image score = -max(map) (the probe's release)"]
