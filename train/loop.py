"""The training loop: seeded data order, per-epoch atomic checkpoints, exact resume, optional DDP.

Exact resume: the data order of epoch e depends only on (seed, e). After every epoch ONE file, train_state.pt,
commits everything a resume needs (epoch counter, trainable parameters, optimizer state, history, the checkpoint
sidecar) by one atomic rename; checkpoint.safetensors/.json and history.csv are then written from the same values.
``resume=True`` reloads train_state.pt alone, rewrites the other files from it (repairing any a crash left
behind) and continues with epoch e+1, so 2 epochs in one run and 1 + 1 resumed give the same weights, wherever
a crash fell. An epoch interrupted half-way is redone from its start.

Stages: ``method.training_stages()`` lists the phases of training (one for most methods; Bayes-PFL's released recipe
has a second, CE-only stage on its image head). Each stage gets its own optimizer and schedule, and the epoch
counter runs on across stages. With ``heldout`` samples (train.heldout_classes), the stage's monitored metric is
computed on them after every epoch: a stage ends at a non-improving epoch after ``train.patience`` non-improving
ones (ties count as improving: the released Bayes-PFL rule), and the next stage starts from the best epoch's
weights. train_state.pt records the stage, its epoch count, the early-stopping counters and the best weights, so a
resume at or across a stage boundary continues exactly.

DDP: under ``torchrun --nproc_per_node N train/run.py ...`` process r trains on every N-th sample of the epoch's
order, from the r-th (:class:`EpochShard`: nothing padded or dropped, so each sample is seen once per epoch), the
gradients of the trainable parameters are averaged over the processes, rank 0 alone writes, and history rows are
means over every process's steps. Step s of N processes at batch B thus trains on the same samples as step s of one
process at batch N*B. Shards may differ by a sample, so an epoch's last batches may differ in size or be missing on
some process: each process scales its mean loss by :func:`batch_share` (1 wherever the batches are equal-sized),
and a process whose shard is used up takes the step on a stand-in batch at share 0, so every process steps with
the same gradient and its optimizer state stays the same. For a loss that is a per-sample mean (see README,
Training) every step is then the one-process step on the union of the processes' batches, up to float rounding.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from zsad import ZsadError
from zsad.checkpoint import atomic_write, atomic_write_text, checkpoint_sidecar, trainable_state, write_checkpoint

STATE_NAME = "train_state.pt"
HISTORY_NAME = "history.csv"


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _stage_kwargs(method, stage: int) -> dict:
    """``stage=`` for the loss / param_groups of methods with several training stages (others take none)."""
    return {"stage": stage} if len(method.training_stages()) > 1 else {}


class _LossModule(nn.Module):
    """DDP hooks into forward(); the method's training entry is loss(), so wrap it."""

    def __init__(self, method) -> None:
        super().__init__()
        self.method = method
        self.stage_kwargs: dict = {}

    def forward(self, batch):
        return self.method.loss(batch, **self.stage_kwargs)


def make_optimizer(method, cfg, stage: int = 1) -> torch.optim.Optimizer:
    params = list(method.trainable_parameters().values())
    if not params:
        raise ZsadError(f"{method.name} has no trainable parameters")
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.optimizer not in kinds:
        raise ZsadError(f"train.optimizer must be one of {sorted(kinds)}, got '{cfg.optimizer}'")
    groups = method.param_groups(cfg.lr, **_stage_kwargs(method, stage))
    for g in groups:
        g["base_lr"] = g["lr"]  # the schedule scales each group's own rate
    return kinds[cfg.optimizer](groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


SCHEDULES = ("constant", "cosine")


def lr_factor(cfg, step: int, total: int, schedule: str | None = None) -> float:
    """Learning-rate multiplier at step ``step`` of ``total`` (a function of the step: resume stays exact);
    ``schedule`` (a stage's) overrides ``cfg.schedule``."""
    schedule = schedule or cfg.schedule
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ZsadError(f"train.schedule must be one of {SCHEDULES}, got '{schedule}'")
    warm = int(round(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class EpochShard(Sampler[int]):
    """Process ``rank``'s samples of one epoch: ``perm[rank::world_size]`` of the epoch's permutation, which is drawn
    from (seed, epoch) alone (the same on every process and on resume). Unlike DistributedSampler nothing is padded
    or dropped: across the processes each sample comes exactly once per epoch, and shards differ by at most one
    sample. With one process it is RandomSampler's order for the same generator seed."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.epoch, self.rank, self.world_size = n, seed, epoch, rank, world_size

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        return iter(perm[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps in an epoch of ``n`` samples: those of the largest shard (the schedule's unit on every
    process, so all of them follow the same learning rates)."""
    return math.ceil(math.ceil(n / world_size) / batch_size)


def _epoch_loader(dataset, batch_size: int, seed: int, epoch: int, workers: int, dinfo: DistInfo) -> DataLoader:
    sampler = EpochShard(len(dataset), seed, epoch, dinfo.rank, dinfo.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=False,
                      persistent_workers=False)


_STATE_KEYS = ("epoch", "weights", "optimizer", "history", "sidecar")


def load_train_state(out_dir: Path) -> dict:
    """The committed state of a run (see the module doc), checked; a missing or damaged file is a ZsadError."""
    path = Path(out_dir) / STATE_NAME
    if not path.is_file():
        raise ZsadError(f"--resume: no {STATE_NAME} in {out_dir} (nothing to resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- a truncated/garbled file makes torch raise many error types
        raise ZsadError(f"--resume: {path} is damaged ({type(err).__name__}: {str(err)[:160]}); "
                        f"start a new run") from err
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ZsadError(f"--resume: {path} lacks {', '.join(missing)} (damaged, or written by an older zsad); "
                        f"start a new run")
    try:
        state = {**state, "epoch": int(state["epoch"]), "history": json.loads(state["history"]),
                 "sidecar": json.loads(state["sidecar"])}
    except (TypeError, ValueError) as err:
        raise ZsadError(f"--resume: {path} is damaged ({err})") from err
    return state


def _write_run_files(out_dir: Path, weights: dict, sidecar: dict, history: list[dict]) -> None:
    """The files derived from a committed state: the checkpoint pair and history.csv."""
    write_checkpoint(out_dir, weights, sidecar)
    atomic_write_text(out_dir / HISTORY_NAME, _history_csv(history))


def heldout_metric(method, samples, name: str, device: str, batch_size: int) -> float:
    """The held-out metric early stopping watches: ``name`` of zsad.evaluate's class mean (e.g. pixel_ap)."""
    from zsad.evaluate import evaluate

    method.eval()
    try:
        mean = evaluate(method, samples, batch_size=batch_size, device=device, progress=False)["mean"]
    finally:
        method.train()
    if name not in mean or mean[name] is None or math.isnan(mean[name]):
        raise ZsadError(f"early stopping: the held-out classes give no {name} (need normal and anomalous images"
                        f"{' with masks' if name.startswith('pixel') else ''})")
    return float(mean[name])


def _fresh_progress(stage: int) -> dict:
    """Where training stands: stage (0-based position in training_stages()), epochs done in it, early stopping."""
    return {"stage": stage, "stage_epoch": 0, "best": None, "bad": 0, "stopped": False}


def _resume_state(method, out_dir: Path, stages, dinfo: DistInfo) -> tuple[dict, dict, dict | None]:
    """Load train_state.pt into ``method``; returns the state, the progress and the best weights so far."""
    state = load_train_state(out_dir)
    method.load_trainable_state_dict(state["weights"])
    start_epoch, history, prog, best_weights = state["epoch"], state["history"], _fresh_progress(0), None
    if "progress" in state:
        prog = json.loads(state["progress"])
        best_weights = state.get("best_weights") or None
    else:  # a run written before stages were recorded: one stage
        prog["stage_epoch"] = start_epoch
    if prog["stage"] >= len(stages):
        raise ZsadError(f"--resume: {out_dir} was at training stage {prog['stage'] + 1}, but this method has "
                        f"{len(stages)}")
    last = stages[-1]
    if prog["stage"] == len(stages) - 1 and (prog["stopped"] or prog["stage_epoch"] >= last.epochs):
        raise ZsadError(f"--resume: {out_dir} already finished {start_epoch} epochs "
                        f"(stage {last.index}: {prog['stage_epoch']} of {last.epochs})")
    if dinfo.main:  # a crash after the commit may have left these stale or half-written
        _write_run_files(out_dir, state["weights"], state["sidecar"], history)
    return state, prog, best_weights


def _load_optimizer_state(optimizer, state: dict, out_dir: Path) -> None:
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as err:
        raise ZsadError(f"--resume: the optimizer state in {out_dir / STATE_NAME} does not fit this method "
                        f"({err})") from err


def _seed_epoch(dataset, cfg, epoch: int, workers: int, dinfo: DistInfo) -> DataLoader:
    """Everything random in epoch ``epoch`` seeded from (seed, epoch, rank) alone, so a resume repeats it; returns
    the epoch's loader."""
    if hasattr(dataset, "set_epoch"):  # per-epoch random augmentation (SOWA's mosaic), reproducible on resume
        dataset.set_epoch(epoch)
    loader = _epoch_loader(dataset, cfg.batch_size, cfg.seed, epoch, workers, dinfo)
    # randomness inside loss() (Bayes-PFL's Monte-Carlo samples, on-device augmentation)
    torch.manual_seed((cfg.seed * 1_000_003 + epoch) * 1_009 + dinfo.rank)
    return loader


def _next_stage(method, cfg, stages, prog: dict, best_weights):
    """Progress, best weights and optimizer of the stage after ``prog``'s, which starts from the best epoch's weights
    (released: ema.load_check)."""
    if best_weights is not None:
        method.load_trainable_state_dict(best_weights)
    prog = _fresh_progress(prog["stage"] + 1)
    return prog, None, make_optimizer(method, cfg, stages[prog["stage"]].index)


def batch_share(n: int, batch_size: int, world_size: int, rank: int, step: int) -> float:
    """What process ``rank`` scales its mean loss by at step ``step`` of an epoch of ``n`` samples: its batch's sample
    count times the process count over the step's samples in all processes (1.0 wherever the batches are equal, 0
    once its shard is used up). DDP averages the processes' gradients, so a step's gradient is then the per-sample
    mean over the step's samples of all processes, whatever their batch sizes."""
    sizes = [min(batch_size, max(0, len(range(r, n, world_size)) - step * batch_size)) for r in range(world_size)]
    return sizes[rank] * world_size / sum(sizes)


def _train_epoch(model, optimizer, cfg, st, stage_epoch: int, steps: int, device: str, bar,
                 n_samples: int, dinfo: DistInfo) -> tuple[dict, int]:
    """``steps`` optimiser steps over the epoch's batches (``bar``) under the stage's schedule; returns the summed loss
    terms and the count of this process's batches. A process out of batches (a shorter shard under DDP) still takes
    the last steps with the others, on its last batch at share 0 (see :func:`batch_share`)."""
    sums: dict[str, float] = {}
    n = 0
    batches, batch = iter(bar), {}
    for step in range(steps):
        stand_in = step >= len(bar)  # this process's shard is used up: its last batch again, at share 0
        if not stand_in:
            batch = next(batches)
        factor = lr_factor(cfg, stage_epoch * steps + step, st.epochs * steps, st.schedule)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        losses = model(_to_device(batch, device))
        optimizer.zero_grad(set_to_none=True)
        (losses["total"] * batch_share(n_samples, cfg.batch_size, dinfo.world_size, dinfo.rank, step)).backward()
        optimizer.step()
        if stand_in:
            continue
        values = {k: float(v.detach()) for k, v in losses.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        bar.set_postfix(loss=f"{values['total']:.4f}")
    return sums, n


def _epoch_means(sums: dict, n: int, device: str, dinfo: DistInfo) -> dict:
    """Each loss term's mean over the epoch's steps, of every process under DDP (rank 0's alone cover only its
    shard)."""
    t = torch.tensor([*sums.values(), float(n)], dtype=torch.float64, device=device)
    if dinfo.world_size > 1:
        dist.all_reduce(t)
    return {k: float(v) / max(float(t[-1]), 1.0) for k, v in zip(sums, t[:-1].tolist(), strict=True)}


def _early_stopping(method, heldout, st, device: str, cfg, prog: dict, row: dict, best_weights, dinfo: DistInfo):
    """Score the held-out classes, record the value in ``row`` and update ``prog``; returns the best weights.

    Under DDP rank 0 scores and every process takes its value: processes deciding apart (an evaluation that is not
    bit-reproducible across them) would leave one waiting forever for the others' next step."""
    value = heldout_metric(method, heldout, st.monitor, device, cfg.batch_size) if dinfo.main else 0.0
    if dinfo.world_size > 1:
        shared = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(shared, src=0)
        value = float(shared[0])
    row[f"heldout_{st.monitor}"] = value
    if prog["best"] is None or value >= prog["best"]:
        prog["best"], prog["bad"] = value, 0
        return trainable_state(method)
    if prog["bad"] >= cfg.patience:
        prog["stopped"] = True
    else:
        prog["bad"] += 1
    return best_weights


def _commit(out_dir: Path, method, optimizer, epoch: int, steps: int, history: list, prog: dict, best_weights,
            stage_meta: dict, meta: dict | None) -> None:
    """Write train_state.pt (the commit point, one atomic rename), then the checkpoint pair and history.csv."""
    weights = trainable_state(method)
    sidecar = checkpoint_sidecar(method, weights, epochs=epoch, steps_per_epoch=steps, history=history,
                                 **stage_meta, **(meta or {}))
    sidecar = json.loads(json.dumps(sidecar, default=str))  # what the JSON file holds, exactly
    committed = {"epoch": epoch, "weights": weights, "optimizer": optimizer.state_dict(),
                 "history": json.dumps(history), "sidecar": json.dumps(sidecar),
                 "progress": json.dumps(prog), "best_weights": best_weights or {}}
    atomic_write(out_dir / STATE_NAME, lambda p: torch.save(committed, p))  # the commit point
    _write_run_files(out_dir, weights, sidecar, history)


def train(method, dataset, out_dir: Path, *, resume: bool = False, device: str = "cpu", workers: int = 0,
          progress: bool = True, meta: dict | None = None, dinfo: DistInfo | None = None,
          heldout=None) -> dict:
    """Train ``method`` (its config.train holds epochs / batch size / lr / seed) and write checkpoints to ``out_dir``.

    ``heldout``: samples for early stopping (see the module doc); None or empty: fixed epochs per stage."""
    cfg = method.config.train
    stages = method.training_stages()
    dinfo = dinfo or DistInfo()
    out_dir = Path(out_dir)
    if len(dataset) < dinfo.world_size:
        raise ZsadError(f"the training set has {len(dataset)} samples, fewer than the {dinfo.world_size} processes"
                        if len(dataset) else "the training set is empty")
    steps = steps_per_epoch(len(dataset), cfg.batch_size, dinfo.world_size)
    method.to(device)
    state, history, prog, best_weights = None, [], _fresh_progress(0), None
    if resume:
        state, prog, best_weights = _resume_state(method, out_dir, stages, dinfo)
        history = state["history"]
    optimizer = make_optimizer(method, cfg, stages[prog["stage"]].index)
    if state is not None:
        _load_optimizer_state(optimizer, state, out_dir)
    loss_module = _LossModule(method)
    model: nn.Module = loss_module
    if dinfo.world_size > 1:
        # unused parameters: a stage may train only some of them (Bayes-PFL's second stage, its image head
        # in the first); those no process used keep no gradient, as in one process
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dinfo.local_rank] if device.startswith("cuda") else None, find_unused_parameters=True)
    method.train()
    epoch = state["epoch"] if state is not None else 0
    total_epochs = sum(s.epochs for s in stages)
    while True:
        st = stages[prog["stage"]]
        if prog["stopped"] or prog["stage_epoch"] >= st.epochs:  # this stage is over
            if prog["stage"] + 1 >= len(stages):
                break
            prog, best_weights, optimizer = _next_stage(method, cfg, stages, prog, best_weights)
            continue
        stage_meta = {"stage": st.index} if len(stages) > 1 else {}
        loss_module.stage_kwargs = _stage_kwargs(method, st.index)
        loader = _seed_epoch(dataset, cfg, epoch, workers, dinfo)
        t0 = time.perf_counter()
        desc = f"epoch {epoch + 1}/{total_epochs}" + (f" (stage {st.index})" if len(stages) > 1 else "")
        bar = tqdm(loader, desc=desc, disable=not (progress and dinfo.main), dynamic_ncols=True, leave=True)
        sums, n = _train_epoch(model, optimizer, cfg, st, prog["stage_epoch"], steps, device, bar, len(dataset), dinfo)
        row = {"epoch": epoch + 1, **stage_meta, **_epoch_means(sums, n, device, dinfo),
               "seconds": round(time.perf_counter() - t0, 2)}
        prog["stage_epoch"] += 1
        if heldout:
            best_weights = _early_stopping(method, heldout, st, device, cfg, prog, row, best_weights, dinfo)
        history.append(row)
        epoch += 1
        if dinfo.main:  # rank 0 alone writes (the others wait at the barrier)
            _commit(out_dir, method, optimizer, epoch, n, history, prog, best_weights, stage_meta, meta)
        if dinfo.world_size > 1:
            dist.barrier()
    method.eval()
    return {"epochs": epoch, "history": history, "out_dir": str(out_dir)}


def _history_csv(history: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()
