"""Distributed training: `torchrun --nproc_per_node 2 train/run.py ...` on CPU (gloo), tiny profile.

Each run starts torchrun (``python -m torch.distributed.run --standalone``: a free rendezvous port) on THIS file:
run as a script it is one rank (``_rank_main``), which instruments the process and then calls train/run.py's
command with the arguments it was given. The instruments only observe:

- every training item a rank loads (``AnomalyDataset.__getitem__``), labelled with the epoch the loop announces
  through the dataset's ``set_epoch``; every loss a rank computes;
- every file-system change a rank makes under --out (a ``sys.addaudithook`` hook: files opened for writing,
  temporary files, renames, mkdir, deletes), and on rank 1 a zero file-size limit, so that any byte it writes to
  any file (native writers such as torch.save or safetensors too, which the hook cannot see) fails the run;
- on rank 0, the parameters before and after, and the (averaged) gradients of, the run's first 3 optimiser steps.

Records travel as lines on stdout (rank 1 may write no file); rank 0's tensors as a file outside --out.

The data: the synthetic set's brick class with 21 images, so the two shards differ in size (11 + 10) and, at batch
5, in batch count (3 + 2): steps 1 and 2 take 5 + 5 samples, step 3 takes rank 0's last one while rank 1, out of
batches, steps with it on a stand-in batch at share 0.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MARK = "ZSAD-DDP-TEST "
BATCH = 5
DROPPED = ("000", "001", "002")  # brick/test/good images left out of the set: 24 -> 21


# == one rank of a torchrun launch ==================================================================================
_FS_EVENTS = {"open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime",
              "os.link", "os.symlink", "tempfile.mkstemp", "tempfile.mkdtemp", "shutil.copyfile", "shutil.move",
              "shutil.rmtree"}
_TWO_PATHS = {"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.move"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _emit(kind: str, **fields) -> None:
    # one write() per line: the two processes share the pipe, and a write under PIPE_BUF is never split
    line = MARK + json.dumps({"rank": int(os.environ["RANK"]), "kind": kind, **fields}) + "\n"
    os.write(1, line.encode())


def _watch_writes(out: str) -> None:
    """Emit every file-system change this process makes under ``out`` (Python-level: what the audit hook sees)."""

    def under_out(p) -> bool:
        if not isinstance(p, str | bytes | os.PathLike):
            return False  # a file descriptor
        p = os.path.realpath(os.fsdecode(p))
        return p == out or p.startswith(out + os.sep)

    def audit(event: str, eargs: tuple) -> None:
        if event not in _FS_EVENTS:
            return
        if event == "open":  # (path, mode, flags): only opening for writing changes anything
            path, mode, flags = eargs
            writing = flags & _WRITE_FLAGS if isinstance(flags, int) else any(c in (mode or "") for c in "wax+")
            paths = [path] if writing else []
        else:
            paths = list(eargs[:2] if event in _TWO_PATHS else eargs[:1])
        for p in filter(under_out, paths):
            _emit("fs", event=event, path=os.fsdecode(p))

    sys.addaudithook(audit)


def _forbid_file_writes(probe: Path) -> None:
    """No byte to any file from here on (RLIMIT_FSIZE 0, SIGXFSZ ignored: a write fails with EFBIG), native writers
    included; emits whether a probe write was refused."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
        _emit("limit", blocked=False)
    except OSError:
        _emit("limit", blocked=True)
    probe.unlink(missing_ok=True)


def _log_items_and_losses() -> None:
    """Emit each training item a process loads, with the epoch the loop announces (``set_epoch``), and each loss."""
    import zsad.train.loop as loop
    from zsad.data import AnomalyDataset

    epoch = [None]
    AnomalyDataset.set_epoch = lambda self, e: epoch.__setitem__(0, int(e))
    get_item, forward = AnomalyDataset.__getitem__, loop._LossModule.forward

    def logged_item(self, i):
        _emit("item", epoch=epoch[0], path=str(self.samples[i].image))
        return get_item(self, i)

    def logged_loss(self, batch):
        losses = forward(self, batch)
        _emit("loss", epoch=epoch[0], total=float(losses["total"]), n=len(batch["label"]))
        return losses

    AnomalyDataset.__getitem__, loop._LossModule.forward = logged_item, logged_loss


def _dump_first_steps(path: Path, count: int) -> None:
    """Save the parameters before and after, and the (averaged) gradients of, the run's first ``count`` steps."""
    import zsad.train.loop as loop

    make_optimizer, steps = loop.make_optimizer, []

    def dumping_optimizer(method, cfg, stage=1):
        opt = make_optimizer(method, cfg, stage)
        named, step = method.trainable_parameters(), opt.step

        def logged_step(*a, **k):
            if len(steps) >= count:
                return step(*a, **k)
            before = {n: p.detach().clone() for n, p in named.items()}
            grad = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
            result = step(*a, **k)
            steps.append({"before": before, "grad": grad, "after": {n: p.detach().clone() for n, p in named.items()}})
            torch.save(steps, path)
            return result

        opt.step = logged_step
        return opt

    loop.make_optimizer = dumping_optimizer


def _rank_main(args: list[str]) -> None:
    rank, dump = int(os.environ["RANK"]), Path(os.environ["ZSAD_DDP_TEST_DUMP"])
    _watch_writes(os.path.realpath(args[args.index("--out") + 1]))
    if rank:
        _forbid_file_writes(dump / "rank1-probe")  # outside --out: the hook stays quiet
    import zsad.train.loop as loop
    from zsad.train.run import main

    _log_items_and_losses()
    heldout = os.environ.get("ZSAD_DDP_TEST_HELDOUT")
    if heldout:  # scripted held-out metrics per rank (an evaluation that differs between processes)
        values = json.loads(heldout)[str(rank)]
        loop.heldout_metric = lambda *a, **k: values.pop(0)
    if rank == 0:
        _dump_first_steps(dump / "steps.pt", 3)
    main(args, prog_name="train/run.py")


if __name__ == "__main__":
    _rank_main(sys.argv[1:])


# == the launches ===================================================================================================
def _torchrun(args: list[str], dump: Path, env: dict | None = None, timeout: int = 120) -> list[dict]:
    """Run train/run.py under torchrun with 2 CPU processes; returns the ranks' records (asserts success). A launch
    past ``timeout`` (processes waiting on each other forever) is killed with its workers, and fails."""
    dump.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "ZSAD_DDP_TEST_DUMP": str(dump), "OMP_NUM_THREADS": "1",
                **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *args,
           "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: torchrun and both workers
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s (killed): {stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-6000:]
    return [json.loads(line[len(MARK):]) for line in stdout.splitlines() if line.startswith(MARK)]


def _copy_class(src: Path, dst: Path, drop: dict[str, tuple[str, ...]]) -> None:
    """``src`` (an MVTec-layout class folder) into ``dst`` without the test images drop[defect] (and their masks)."""
    shutil.copytree(src, dst)
    for defect, stems in drop.items():
        for stem in stems:
            (dst / "test" / defect / f"{stem}.png").unlink()
            (dst / "ground_truth" / defect / f"{stem}_mask.png").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory):
    """Three launches on the same data: 2 epochs straight; 1 epoch; that run resumed for a 2nd epoch."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    _copy_class(synthetic / "brick", data / "brick", {"good": DROPPED})
    common = ["--model", "anomalyclip", "--profile", "tiny", "--data", str(data), "--batch-size", str(BATCH)]
    straight = _torchrun([*common, "--epochs", "2", "--out", str(tmp / "straight")], tmp / "dump-straight")
    first = _torchrun([*common, "--epochs", "1", "--out", str(tmp / "split")], tmp / "dump-first")
    resumed = _torchrun(["--model", "anomalyclip", "--resume", "--epochs", "2", "--out", str(tmp / "split")],
                        tmp / "dump-resumed")
    images = sorted(str(p) for p in (data / "brick" / "test").rglob("*.png"))
    assert len(images) == 21
    return {"tmp": tmp, "data": data, "images": images, "straight": straight, "first": first, "resumed": resumed}


def _items(records, epoch, rank):
    return [r["path"] for r in records if r["kind"] == "item" and r["epoch"] == epoch and r["rank"] == rank]


def _losses(records, epoch, rank):
    return [r["total"] for r in records if r["kind"] == "loss" and r["epoch"] == epoch and r["rank"] == rank]


# == (a) the shards =================================================================================================
@pytest.mark.slow
def test_each_sample_is_seen_once_per_epoch_across_the_processes(runs):
    recs, images = runs["straight"], runs["images"]
    assert {r["epoch"] for r in recs if r["kind"] == "item"} == {0, 1}
    for epoch in (0, 1):
        r0, r1 = _items(recs, epoch, 0), _items(recs, epoch, 1)
        # all 21 images exactly once over the two processes: none twice (DistributedSampler pads an odd set with a
        # repeat), none missing, and a near-even split
        assert sorted(r0 + r1) == images
        assert sorted([len(r0), len(r1)]) == [10, 11]
    # a fresh shuffle every epoch, the same for every process (else the shards would overlap above)
    assert _items(recs, 0, 0) != _items(recs, 1, 0)
    assert Counter(_items(recs, 0, 0)) != Counter(_items(recs, 1, 0))
    # the order is a function of (seed, epoch): the 1-epoch run and the resumed 2nd epoch load the same items
    for rank in (0, 1):
        assert _items(runs["first"], 0, rank) == _items(recs, 0, rank)
        assert _items(runs["resumed"], 1, rank) == _items(recs, 1, rank)
        assert _items(runs["resumed"], 0, rank) == []  # the resumed run does not redo epoch 1


# == (b) one DDP step == the single-process step on the union =======================================================
@pytest.mark.slow
def test_each_ddp_step_equals_the_single_process_step_on_the_union_of_the_shards(runs):
    """AnomalyCLIP's loss is a per-sample mean (image CE: mean over images; focal: mean over the pixels of equal-sized
    images; dice: mean of per-image dice), so a DDP step's gradient must be the gradient of the loss on the union of
    the processes' batches: 5 + 5 samples at steps 1 and 2 of the first epoch, 1 + none at step 3 (rank 1's shard
    is used up). Reference: the method built afresh here at the parameters rank 0 had before each step, one
    forward/backward on the union of the items the two processes loaded for it, and torch's own Adam step."""
    import zsad.methods as M
    from zsad.data import AnomalyDataset, load_samples

    recs, dumps = runs["first"], torch.load(runs["tmp"] / "dump-first" / "steps.pt", weights_only=True)
    assert len(dumps) == 3
    by_path = {str(s.image): s for s in load_samples(runs["data"], "test")}
    m = M.create("anomalyclip", "tiny").train()
    params = m.trainable_parameters()
    assert set(params) == set(dumps[0]["before"])
    assert all(torch.equal(params[k], dumps[0]["before"][k]) for k in params)  # the same start
    for step, dump in enumerate(dumps):
        shards = [_items(recs, 0, rank)[step * BATCH:(step + 1) * BATCH] for rank in (0, 1)]
        assert [len(s) for s in shards] == ([5, 5] if step < 2 else [1, 0])
        union = shards[0] + shards[1]
        m.load_trainable_state_dict(dump["before"])
        m.zero_grad(set_to_none=True)
        ds = AnomalyDataset([by_path[p] for p in union], m.config.backbone.image_size)
        loss = m.loss(torch.utils.data.default_collate([ds[i] for i in range(len(ds))]))["total"]
        loss.backward()
        # the processes' own losses on their batches (means), weighted by batch size: the union's per-sample mean
        own = [_losses(recs, 0, rank)[step] for rank in (0, 1)]
        mean = sum(v * len(s) for v, s in zip(own, shards, strict=True)) / len(union)
        assert mean == pytest.approx(float(loss.detach()), rel=1e-5)
        # Tolerance: the two sides differ only in float32 summation order (two batches of 5 then gloo's sum / 2, vs
        # one batch of 10): measured 1.1e-6 of a tensor's largest entry. 1e-4 of it leaves room for that and still
        # refuses a summed (x2), halved or one-shard gradient, which differ by O(1).
        for k, p in params.items():
            assert torch.allclose(dump["grad"][k], p.grad, rtol=0, atol=1e-4 * float(p.grad.abs().max())), (step, k)
        if step == 0:
            _check_first_adam_step(m, dump)


def _check_first_adam_step(m, dump) -> None:
    """The parameters after step 1 against torch's Adam, at the profile's settings, on the reference gradient."""
    params, cfg = m.trainable_parameters(), m.config.train
    assert cfg.optimizer == "adam" and cfg.schedule == "constant"
    torch.optim.Adam(list(params.values()), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay).step()
    # Tolerance: Adam's first step moves each entry by lr * g / (|g| + eps) with eps = 1e-8; a gradient error dg
    # changes that by at most lr * eps * |dg| / g^2. With every |g| >= 1e-4 (asserted) and |dg| <= 1e-3 (the
    # gradient check above) that is < 1e-5 * lr, 1e-3 * lr leaves room; a step taken with another gradient differs
    # by ~2 lr wherever a sign differs, and a wrong lr or beta by a multiple of lr. (Adam's first step does not see
    # a gradient's scale: that is why the gradients themselves are compared above.)
    for k, p in params.items():
        assert float(p.grad.abs().min()) >= 1e-4, k
        assert torch.allclose(p.detach(), dump["after"][k], rtol=0, atol=1e-3 * cfg.lr), k


@pytest.mark.slow
def test_history_rows_are_means_over_every_process(runs):
    """history.csv's loss of an epoch: the mean over the epoch's steps of BOTH processes (3 on rank 0, 2 on rank 1),
    not rank 0's alone."""
    from zsad.train.loop import load_train_state

    recs, history = runs["straight"], load_train_state(runs["tmp"] / "straight")["history"]
    for epoch in (0, 1):
        # each process's losses on its own batches (rank 1, out of batches, takes step 3 on a stand-in: not counted)
        losses = [loss for rank in (0, 1) for loss in _losses(recs, epoch, rank)[:math.ceil(
            len(_items(recs, epoch, rank)) / BATCH)]]
        assert len(losses) == 5
        assert history[epoch]["total"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


# == (c) rank 0 alone writes ========================================================================================
@pytest.mark.slow
def test_rank_zero_alone_writes_the_run(runs):
    for name in ("straight", "first", "resumed"):
        recs = runs[name]
        assert next(r for r in recs if r["kind"] == "limit" and r["rank"] == 1)["blocked"]  # the limit bites
        assert [r for r in recs if r["kind"] == "fs" and r["rank"] == 1] == []
        # the hook sees rank 0's writes (so an empty list above is not blindness): each file lands by a rename
        renamed = {Path(r["path"]).name for r in recs if r["kind"] == "fs" and r["rank"] == 0
                   and r["event"] == "os.rename" and not Path(r["path"]).name.startswith(".")}
        assert renamed == {"train_state.pt", "checkpoint.safetensors", "checkpoint.json", "history.csv"}, name


# == (d) --resume under torchrun ====================================================================================
def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.slow
def test_resume_under_torchrun_continues_exactly(runs):
    """2 epochs in one launch == 1 epoch, then --resume for the 2nd in another: bit-identical weights and optimizer
    state, the same history (but for the wall-clock seconds). Each epoch has 2+ steps per process, so a process
    resuming with a wrong optimizer state or position would feed wrong gradients into rank 0's next step."""
    from zsad.checkpoint import read_sidecar
    from zsad.train.loop import load_train_state

    a, b = (load_train_state(runs["tmp"] / n) for n in ("straight", "split"))
    assert a["epoch"] == b["epoch"] == 2
    assert _same(a["weights"], b["weights"])
    assert _same(a["optimizer"], b["optimizer"])
    assert int(a["optimizer"]["state"][0]["step"]) == 2 * 3  # 3 steps an epoch (rank 0's shard: 11 at batch 5)

    def strip(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert strip(a["history"]) == strip(b["history"]) and len(a["history"]) == 2
    meta = read_sidecar(runs["tmp"] / "split")
    assert (meta["epochs"], meta["world_size"], meta["steps_per_epoch"]) == (2, 2, 3)


# == (e) export =====================================================================================================
@pytest.mark.slow
def test_a_ddp_trained_run_exports_through_the_parity_gate(runs, tmp_path):
    from click.testing import CliRunner

    from zsad.export.cli import main as export_cli

    run = runs["tmp"] / "straight"
    res = CliRunner().invoke(export_cli, ["--checkpoint", str(run), "--backend", "onnxruntime", "--device", "cpu",
                                          "--out", str(tmp_path / "repo")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "repo" / "anomalyclip" / "parity_report.json").read_text())
    assert report["trained"] and report["worst"] <= report["tolerance"]
    assert (tmp_path / "repo" / "anomalyclip_encoder" / "config.pbtxt").is_file()


# == Bayes-PFL: two stages, early stopping ==========================================================================
@pytest.mark.slow
def test_two_stage_training_with_early_stopping_under_torchrun(synthetic, tmp_path):
    """Bayes-PFL's recipe (second stage on; early stopping on a held-out class): each stage trains only some
    parameters (DDP must allow unused ones), and every process must end stage 1 at the epoch rank 0's held-out
    metric picks, even when the processes' own evaluations disagree (here scripted: rank 1's would keep going, and a
    process left in stage 1 would wait forever for the others)."""
    data = tmp_path / "data"
    _copy_class(synthetic / "brick", data / "brick", {"good": ("002", "003", "004", "005", "006", "007"),
                                                      "crack": ("001", "002", "003"), "hole": ("001", "002", "003"),
                                                      "scratch": ("000", "001", "002", "003"),
                                                      "stain": ("000", "001", "002", "003")})
    _copy_class(synthetic / "washer", data / "washer", {})
    profile = tmp_path / "two_stage.json"
    profile.write_text(json.dumps({"extends": "tiny", "bayespfl": {
        "train": {"epochs": 3, "heldout_classes": ["washer"], "patience": 0},
        "second_stage": {"enabled": True, "epochs": 1}}}))
    scripted = {"0": [0.5, 0.4, 0.3], "1": [0.5, 0.6, 0.7]}  # rank 0: epoch 2 does not improve -> stage 2
    out = tmp_path / "run"
    _torchrun(["--model", "bayespfl", "--profile", str(profile), "--data", str(data), "--batch-size", "2",
               "--out", str(out)], tmp_path / "dump", env={"ZSAD_DDP_TEST_HELDOUT": json.dumps(scripted)},
)
    from zsad.train.loop import load_train_state

    history = load_train_state(out)["history"]
    assert [(r["epoch"], r["stage"]) for r in history] == [(1, 1), (2, 1), (3, 2)]
    assert [r.get("heldout_pixel_ap") for r in history[:2]] == [0.5, 0.4] and history[2]["heldout_image_ap"] == 0.3
    assert math.isfinite(history[2]["total"])
