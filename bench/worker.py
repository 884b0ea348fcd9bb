"""Each timed backend of a zsad-bench run in its own worker process, so one command with every CPU backend fits in
the memory of a small machine (issue 25: seven CPU backends of a paper-profile ViT-L in one process were killed
by the OOM killer at 24 GB).

The worker is *spawned* (a fresh interpreter), not forked from a parent that already holds a ViT-L: it rebuilds the
method from the same description (random weights are seeded by ``backbone.init_seed``; a checkpoint is read again),
opens the run's :class:`~zsad.export.runtimes.runners.Scratch` folder (the ONNX export and the calibration images
are shared as files, made by the first worker that needs them), times its backend on the parity images it is
given, and sends back its rows, its outputs on those images (the parent computes parity against its torch fp32
reference) and its own peak resident memory. Then it exits, and everything it held goes with it; the parent joins
it before the next backend starts.

Peak RSS is the worker's ``VmHWM`` (/proc/self/status), not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries
ru_maxrss over exec from the forked parent image, so a worker spawned by a parent holding 10 GB would report
at least 10 GB (checked with a 1.5 GB parent: ru_maxrss 1514 MB, VmHWM 15 MB).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class BackendTask:
    """What a worker needs to time one backend: plain values only. The parity images travel as a file: a spawned
    worker reads its pickled task before it runs anything, and a task larger than the pipe's buffer would block
    the parent in ``Process.start`` for good if the worker died first (an unguarded ``__main__`` re-run by spawn,
    for one)."""

    backend: str
    model: str
    profile: str
    image_size: int | None
    checkpoint: str | None
    images_npy: str  # [n,3,S,S] the parity images as .npy (the timed batches are drawn from them)
    base: dict  # the row fields every row of the run shares
    batches: list[int]
    device: str
    iters: int
    warmup: int
    gflops: float
    scratch_dir: str
    calibration_images: int


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM) in MB, or None where /proc is not there."""
    from zsad.serve.loadtest import proc_status_kb

    kb = proc_status_kb("self", "VmHWM")
    return None if kb is None else kb / 1024.0


def _work(task: BackendTask, conn) -> None:
    """The worker's body: build, time, send {"rows", "outputs", "pid", "peak_rss_mb"} (or {"error", ...})."""
    from zsad.serve.server import die_with_parent

    # a zsad-bench killed without its cleanup (SIGKILL, a default SIGTERM) would leave this multi-GB worker running
    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the request above
        os._exit(1)
    import torch

    from zsad.bench.one_backend import build_method, failure_reason, timed_rows
    from zsad.export.runtimes.runners import Scratch

    result: dict = {"pid": os.getpid()}
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's random-weights warning, once per worker otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the parent already warned about random weights
            method, _ = build_method(task.model, task.profile, task.image_size, task.checkpoint)
        scratch = Scratch(task.scratch_dir, task.calibration_images)
        images = torch.from_numpy(np.load(task.images_npy, allow_pickle=False))
        rows, outputs = timed_rows(task.backend, method, scratch, images, task.base,
                                   task.batches, task.device, task.iters, task.warmup, task.gflops)
        result.update(rows=rows, outputs=outputs)
    except Exception as err:  # noqa: BLE001 -- any failure becomes the backend's skipped rows, with the reason
        result["error"] = failure_reason(err)
    result["peak_rss_mb"] = peak_rss_mb()
    conn.send(result)
    conn.close()


def run_in_worker(task: BackendTask) -> dict:
    """Run ``task`` in a spawned worker and wait for it to end (joined: reaped, its memory released). Returns the
    worker's result; a worker that died without answering (e.g. killed by the out-of-memory killer) gives
    {"error": why, "pid": ...}."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    # not a daemon: a daemonic process may not start processes of its own (compile workers, say); it is joined below
    # on every path, and terminated first when we are interrupted
    proc = ctx.Process(target=_work, args=(task, send), name=f"zsad-bench {task.backend}")
    proc.start()
    send.close()  # only the worker writes; our copy closed, a dead worker reads as EOF
    result = None
    try:
        while result is None and (proc.is_alive() or receive.poll()):
            if receive.poll(0.5):
                try:
                    result = receive.recv()
                except EOFError:
                    break
    finally:
        if result is None and proc.is_alive():  # interrupted: do not leave it running
            proc.terminate()
        proc.join()
        receive.close()
    if result is None:
        code = proc.exitcode
        why = " (SIGKILL: the kernel's out-of-memory killer, or a user)" if code == -9 else ""
        result = {"error": f"the worker process ended without a result, exit code {code}{why} (its own error, if any, "
                           f"is on stderr above)", "pid": proc.pid}
    return result
