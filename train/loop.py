"""The training loop: seeded data order, per-epoch atomic checkpoints, exact resume, optional DDP.

Exact resume: the data order of epoch e depends only on (seed, e); after every epoch the trainable parameters
(checkpoint.safetensors), the optimizer state and the epoch counter (train_state.pt) are written atomically.
``resume=True`` reloads them and continues with epoch e+1, so 2 epochs in one run and 1 + 1 resumed give the
same weights. An epoch interrupted half-way is redone from its start.

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
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from zsad import ZsadError
from zsad.checkpoint import WEIGHTS_NAME, atomic_write, atomic_write_text, save_checkpoint

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
        if not state_path.is_file():
            raise ZsadError(f"--resume: no {STATE_NAME} in {out_dir} (nothing to resume)")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        method.load_trainable_state_dict(load_file(str(out_dir / WEIGHTS_NAME)))
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), json.loads(state["history"])
        if start_epoch >= cfg.epochs:
            raise ZsadError(f"--resume: {out_dir} already finished {start_epoch} of {cfg.epochs} epochs")
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
            save_checkpoint(out_dir, method, epochs=epoch + 1, steps_per_epoch=n, history=history, **(meta or {}))
            atomic_write(state_path, lambda p: torch.save(
                {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "history": json.dumps(history)}, p))
            atomic_write_text(out_dir / HISTORY_NAME, _history_csv(history))
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
