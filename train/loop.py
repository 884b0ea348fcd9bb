"""The training loop: seeded data order, per-epoch atomic checkpoints, exact resume, optional DDP.

Exact resume: the data order of epoch e depends only on (seed, e). After every epoch ONE file, train_state.pt,
commits everything a resume needs (epoch counter, trainable parameters, optimizer state, history, the checkpoint
sidecar) by one atomic rename; checkpoint.safetensors/.json and history.csv are then written from the same values.
``resume=True`` reloads train_state.pt alone, rewrites the other files from it (repairing any a crash left
behind) and continues with epoch e+1, so 2 epochs in one run and 1 + 1 resumed give the same weights, wherever
a crash fell. An epoch interrupted half-way is redone from its start.

DDP: under ``torchrun --nproc_per_node N train/run.py ...`` each process trains on its shard
(DistributedSampler, same seed), gradients of the trainable parameters are all-reduced, rank 0 writes.
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
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
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


class _LossModule(nn.Module):
    """DDP hooks into forward(); the method's training entry is loss(), so wrap it."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, batch):
        return self.method.loss(batch)


def make_optimizer(method, cfg) -> torch.optim.Optimizer:
    params = list(method.trainable_parameters().values())
    if not params:
        raise ZsadError(f"{method.name} has no trainable parameters")
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.optimizer not in kinds:
        raise ZsadError(f"train.optimizer must be one of {sorted(kinds)}, got '{cfg.optimizer}'")
    groups = method.param_groups(cfg.lr)
    for g in groups:
        g["base_lr"] = g["lr"]  # the schedule scales each group's own rate
    return kinds[cfg.optimizer](groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


SCHEDULES = ("constant", "cosine")


def lr_factor(cfg, step: int, total: int) -> float:
    """Learning-rate multiplier at global step ``step`` of ``total`` (a function of the step: resume stays exact)."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ZsadError(f"train.schedule must be one of {SCHEDULES}, got '{cfg.schedule}'")
    warm = int(round(cfg.warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _epoch_loader(dataset, batch_size: int, seed: int, epoch: int, workers: int, dinfo: DistInfo) -> DataLoader:
    if dinfo.world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=dinfo.world_size, rank=dinfo.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
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


def train(method, dataset, out_dir: Path, *, resume: bool = False, device: str = "cpu", workers: int = 0,
          progress: bool = True, meta: dict | None = None, dinfo: DistInfo | None = None) -> dict:
    """Train ``method`` (its config.train holds epochs / batch size / lr / seed) and write checkpoints to ``out_dir``."""
    cfg = method.config.train
    dinfo = dinfo or DistInfo()
    out_dir = Path(out_dir)
    if len(dataset) == 0:
        raise ZsadError("the training set is empty")
    method.to(device)
    optimizer = make_optimizer(method, cfg)
    start_epoch, history = 0, []
    state_path = out_dir / STATE_NAME
    if resume:
        state = load_train_state(out_dir)
        method.load_trainable_state_dict(state["weights"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as err:
            raise ZsadError(f"--resume: the optimizer state in {state_path} does not fit this method ({err})") from err
        start_epoch, history = state["epoch"], state["history"]
        if start_epoch >= cfg.epochs:
            raise ZsadError(f"--resume: {out_dir} already finished {start_epoch} of {cfg.epochs} epochs")
        if dinfo.main:  # a crash after the commit may have left these stale or half-written
            _write_run_files(out_dir, state["weights"], state["sidecar"], history)
    model = _LossModule(method)
    if dinfo.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dinfo.local_rank] if device.startswith("cuda") else None)
    method.train()
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(dataset, "set_epoch"):  # per-epoch random augmentation (SOWA's mosaic), reproducible on resume
            dataset.set_epoch(epoch)
        loader = _epoch_loader(dataset, cfg.batch_size, cfg.seed, epoch, workers, dinfo)
        # randomness inside loss() (Bayes-PFL's Monte-Carlo samples, on-device augmentation) depends only on
        # (seed, epoch, rank): a resumed run draws the same
        torch.manual_seed((cfg.seed * 1_000_003 + epoch) * 1_009 + dinfo.rank)
        sums, n, t0 = {}, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and dinfo.main),
                   dynamic_ncols=True, leave=True)
        for batch in bar:
            factor = lr_factor(cfg, epoch * len(loader) + n, cfg.epochs * len(loader))
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            losses = model(_to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            values = {k: float(v.detach()) for k, v in losses.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.set_postfix(loss=f"{values['total']:.4f}")
        row = {"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()},
               "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        if dinfo.main:
            weights = trainable_state(method)
            sidecar = checkpoint_sidecar(method, weights, epochs=epoch + 1, steps_per_epoch=n, history=history,
                                         **(meta or {}))
            sidecar = json.loads(json.dumps(sidecar, default=str))  # what the JSON file holds, exactly
            committed = {"epoch": epoch + 1, "weights": weights, "optimizer": optimizer.state_dict(),
                         "history": json.dumps(history), "sidecar": json.dumps(sidecar)}
            atomic_write(state_path, lambda p: torch.save(committed, p))  # the commit point
            _write_run_files(out_dir, weights, sidecar, history)
        if dinfo.world_size > 1:
            dist.barrier()
    method.eval()
    return {"epochs": cfg.epochs, "history": history, "out_dir": str(out_dir)}


def _history_csv(history: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()
