"""Load against a served ensemble: a bounded run (``run_load``) or a soak (``soak``), one load generator for both.

    python -m zsad.serve.loadtest --url 127.0.0.1:8000 --model bagclip --clients 8 --seconds 20 --out result.json
    python -m zsad.serve.loadtest --soak 30 --repo REPO --model bagclip --profile tiny --out soak-dir/

Each client (its own connection, in its own thread) sends one encoded synthetic-defect image per request, cycling
through a fixed set, and checks every answer against a reference answer for that image: the single-request answer
(bounded run) or the eager torch answer of the exported method (soak). A soak mixes HTTP and gRPC clients and a
steady share of bad requests (images the served decoder must refuse); a bad request must get 400 /
INVALID_ARGUMENT and is counted apart from the good requests' failures. Every ``interval`` seconds the soak records
throughput, p50/p99, the counts, and the resident memory of tritonserver and of each python stub; its report is a
JSON, a CSV time series, a PNG plot and a markdown summary with each process's memory slope (MB per 10k requests,
least squares over the samples after the warm-up).
"""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np

from zsad import ZsadError
from zsad.cli import cli_entry
from zsad.data.synthetic import sample_pngs

BAD_STATUS = ("400", "StatusCode.INVALID_ARGUMENT")  # how HTTP / gRPC say "bad input" (never 500)
WARMUP_FRACTION = 0.2  # the first fifth of a soak (allocator pools, ORT arenas filling) is left out of the slopes
SLOPE_UNIT = 10_000  # requests


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def bad_images() -> dict[str, bytes]:
    """Encoded "images" the served decoder must refuse with 400 / INVALID_ARGUMENT (what each one trips)."""
    dds_header = (struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + b"\0" * 44 + struct.pack("<2I", 32, 0x4)
                  + b"ZZZZ" + b"\0" * 20 + struct.pack("<4I", 0x1000, 0, 0, 0) + b"\0" * 4)
    tiny_png = _png(np.zeros((1, 1, 3), np.uint8))
    return {
        "dds unknown fourcc (NotImplementedError)": b"DDS " + dds_header + b"\0" * 64,
        "blp1 bad compression (BLPFormatError)": b"BLP1" + struct.pack("<5I", 7, 0, 4, 4, 0) + b"\0" * 2000,
        "blp2 bad encoding (BLPFormatError)": b"BLP2" + struct.pack("<I", 1) + bytes([9, 0, 0, 0])
        + struct.pack("<2I", 4, 4) + b"\0" * 2000,
        "png 100000x100000 header": tiny_png[:16] + struct.pack(">II", 100_000, 100_000) + tiny_png[24:],
        "empty": b"",
        "random bytes": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    }


def proc_status_kb(pid: int | str, field: str) -> int | None:
    """One kB field of /proc/PID/status (``pid`` "self" for this process; e.g. VmRSS, VmHWM: the peak); None where
    the process is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def process_rss(pid: int) -> int:
    """Resident bytes of one process (Linux /proc); 0 when it is gone."""
    return (proc_status_kb(pid, "VmRSS") or 0) * 1024


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        total += process_rss(p)
    return total


def same_answer(pred, ref, tol: float) -> bool:
    """Score and map within ``tol`` relative to the reference's scale; a map at another size than the reference's
    (an export without --resize-to-input against an answer at the image's size) is resized to it first."""
    from zsad.data.transforms import resize_map

    amap = pred.anomaly_map
    if amap.shape != ref.anomaly_map.shape:
        amap = resize_map(amap, *ref.anomaly_map.shape)
    scale = max(float(np.abs(ref.anomaly_map).max()), 1e-12)
    return (abs(pred.score - ref.score) <= tol * max(abs(ref.score), 1e-12)
            and float(np.abs(amap - ref.anomaly_map).max()) <= tol * scale)


class _Load:
    """Client threads sending until ``stop_at``; each answer appended to ``records`` as (monotonic time it came
    back, latency s, outcome). Outcomes: ok / mismatch / failed (good requests), refused / accepted / wrong_status
    (bad requests: only "refused", a 400 or INVALID_ARGUMENT, is right)."""

    def __init__(self, model: str, images: list[bytes], reference: list, tol: float, class_name: str | None,
                 bad: Sequence[bytes] = (), bad_every: int = 0):
        if bad_every and not bad:
            raise ZsadError("bad_every needs bad images to send")
        self.model, self.images, self.reference, self.tol = model, images, reference, tol
        self.class_name, self.bad, self.bad_every = class_name, list(bad), bad_every
        self.records: list[tuple[float, float, str]] = []
        self.examples: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def run(self, targets: Sequence[tuple[str, str]], seconds: float) -> float:
        """One client thread per (url, protocol) for ``seconds``; returns the wall time."""
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=self._worker, args=(k, url, protocol, stop_at))
                   for k, (url, protocol) in enumerate(targets)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    def _worker(self, k: int, url: str, protocol: str, stop_at: float) -> None:
        from zsad.serve.client import AnomalyClient

        client = AnomalyClient(url, self.model, protocol)
        i = k
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            if self.bad_every and i % self.bad_every == self.bad_every - 1:
                outcome, detail = self._bad_request(client, self.bad[(i // self.bad_every) % len(self.bad)])
            else:
                idx = i % len(self.images)
                try:
                    pred = client.infer([self.images[idx]], class_names=self.class_name)[0]
                    ok = same_answer(pred, self.reference[idx], self.tol)
                    outcome, detail = ("ok", "") if ok else ("mismatch", f"image {idx} over {protocol}")
                except Exception as err:  # count, keep going: the caller asserts there are none
                    outcome, detail = "failed", f"{protocol}: {str(err)[:200]}"
            dt = time.perf_counter() - t0
            with self.lock:
                self.records.append((time.monotonic(), dt, outcome))
                if detail and len(self.examples.setdefault(outcome, [])) < 3:
                    self.examples[outcome].append(detail)
            i += 1

    def _bad_request(self, client, blob: bytes) -> tuple[str, str]:
        try:
            client.infer([blob], class_names=self.class_name)
        except ZsadError as err:
            status = getattr(err.__cause__, "status", lambda: None)()
            if status in BAD_STATUS:
                return "refused", ""
            return "wrong_status", f"{client.protocol}: status {status}: {str(err)[:200]}"
        except Exception as err:  # not the server's answer (connection lost, ...)
            return "wrong_status", f"{client.protocol}: {str(err)[:200]}"
        return "accepted", f"{client.protocol}: a bad image of {len(blob)} bytes was scored"


def _percentiles_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    lat = np.asarray(latencies) * 1000.0
    return {q: round(float(np.percentile(lat, int(q[1:]))), 2) if lat.size else None for q in ("p50", "p90", "p99")}


def run_load(url: str, model: str, images: list[bytes], clients: int = 8, seconds: float = 20.0,
             protocol: str = "http", server_pid: int | None = None, tol: float = 1e-3,
             class_name: str | None = None) -> dict:
    """``class_name``: sent with every image to models that take one (Bayes-PFL), ignored by the others.

    An answer counts as a mismatch when its score or map differs from the single-request answer by more than
    ``tol`` relative to that answer's scale. Not zero: the dynamic batcher runs an image in batches of varying
    size, float GEMMs differ in the last bits across batch sizes, and a kNN graph (BAG-CLIP) can then pick a
    different neighbour at a rounding boundary (measured: up to 1.4e-4 relative on the map). A response that
    belongs to another request differs by O(1), far above ``tol``.
    """
    from zsad.serve.client import AnomalyClient

    reference = [AnomalyClient(url, model, protocol).infer([b], class_names=class_name)[0] for b in images]
    rss_before = process_tree_rss(server_pid) if server_pid else None
    load = _Load(model, images, reference, tol, class_name)
    wall = load.run([(url, protocol)] * clients, seconds)
    outcomes = [r[2] for r in load.records]
    good = [r[1] for r in load.records if r[2] != "failed"]
    return {
        "model": model, "protocol": protocol, "clients": clients, "seconds": round(wall, 2),
        "requests": len(good), "failures": outcomes.count("failed"),
        "failure_examples": load.examples.get("failed", []),
        "mismatches": outcomes.count("mismatch"), "requests_per_s": round(len(good) / wall, 2),
        "latency_ms": _percentiles_ms(good),
        "server_rss_mb": {"before": rss_before and round(rss_before / 2**20, 1),
                          "after": server_pid and round(process_tree_rss(server_pid) / 2**20, 1)},
    }


# -- soak -------------------------------------------------------------------------------------------------------------
def memory_slope(requests: Sequence[float], rss_mb: Sequence[float]) -> float:
    """Least-squares slope of resident memory against requests served, in MB per ``SLOPE_UNIT`` requests."""
    x = np.asarray(requests, np.float64) / SLOPE_UNIT
    y = np.asarray(rss_mb, np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        raise ZsadError(f"a memory slope needs at least two samples at different request counts, got {x.size}")
    dx = x - x.mean()
    return float(np.dot(dx, y - y.mean()) / np.dot(dx, dx))


def _memory_by_process(server_pid: int) -> tuple[dict[str, float], dict[str, int]]:
    """({process: RSS MB}, {stub instance: pid}): tritonserver itself and each python stub by instance name (the
    model's name, then Triton's instance suffix)."""
    from zsad.serve.server import python_stubs

    stubs = python_stubs(server_pid)
    rss = {"tritonserver": process_rss(server_pid) / 2**20}
    rss.update({stub.instance: process_rss(pid) / 2**20
                for pid, stub in sorted(stubs.items(), key=lambda s: s[1].instance)})
    return rss, {stub.instance: pid for pid, stub in stubs.items()}


def soak(http_url: str, grpc_url: str, model: str, images: list[bytes], reference: list, server_pid: int,
         minutes: float, clients: int = 4, interval: float = 10.0, bad_every: int = 10, tol: float | None = None,
         class_name: str | None = None, log=lambda *a: None) -> dict:
    """``clients`` threads (half HTTP, half gRPC) for ``minutes``; every ``bad_every``-th request of a client is a
    bad image (:func:`bad_images`). Each good answer is checked against ``reference`` (the eager answers per image)
    at ``tol`` (default: the served-chain fp32 tolerance, ``zsad.export.parity.CHAIN_TOL``). Returns the report
    dict: settings, one sample per ``interval`` s, totals and the memory slopes."""
    from zsad.export.parity import CHAIN_TOL

    if minutes <= 0 or interval <= 0 or clients < 1:
        raise ZsadError(f"a soak needs minutes > 0, interval > 0 and clients >= 1 (got {minutes}, {interval}, "
                        f"{clients})")
    if minutes * 60 < 4 * interval:
        raise ZsadError(f"a {minutes} min soak with {interval} s samples has too few samples for a slope: "
                        f"sample more often (--interval)")
    tol = CHAIN_TOL["fp32"] if tol is None else tol
    bad = bad_images()
    load = _Load(model, images, reference, tol, class_name, list(bad.values()), bad_every)
    targets = [(http_url, "http") if k % 2 == 0 else (grpc_url, "grpc") for k in range(clients)]
    samples: list[dict] = []
    rss, pids = _memory_by_process(server_pid)
    restarts: dict[str, int] = {}
    t_start = time.monotonic()
    samples.append(_sample(0.0, [], [], rss))
    runner = threading.Thread(target=load.run, args=(targets, minutes * 60), daemon=True)
    runner.start()
    seen = 0
    while runner.is_alive():
        runner.join(timeout=max(0.0, t_start + len(samples) * interval - time.monotonic()))
        now = time.monotonic()
        with load.lock:
            window, everything = load.records[seen:], list(load.records)
        seen = len(everything)
        rss, now_pids = _memory_by_process(server_pid)
        for inst, pid in now_pids.items():  # a stub with a new pid was restarted (zsad-serve reloads dead ones)
            if inst in pids and pids[inst] != pid:
                restarts[inst] = restarts.get(inst, 0) + 1
        pids.update(now_pids)
        span = now - (t_start + samples[-1]["t_s"])
        samples.append(_sample(now - t_start, window, everything, rss, span))
        s = samples[-1]
        log(f"{s['t_s']:7.1f} s  {s['requests']:7d} requests  {s['requests_per_s']:6.1f}/s  p99 {s['p99_ms']} ms  "
            f"failed {s['failed']}  bad refused {s['bad_refused']}  tritonserver {rss['tritonserver']:.1f} MB")
    outcomes = [r[2] for r in load.records]
    counts = {k: outcomes.count(k) for k in ("ok", "mismatch", "failed", "refused", "accepted", "wrong_status")}
    after = [s for s in samples if s["t_s"] >= WARMUP_FRACTION * minutes * 60]
    processes = list(dict.fromkeys(p for s in samples for p in s["rss_mb"]))
    slopes = {}
    for p in processes:
        pts = [(s["requests"], s["rss_mb"][p]) for s in after if p in s["rss_mb"]]
        slopes[p] = {"mb_per_10k_requests": memory_slope(*zip(*pts, strict=True)) if len(pts) >= 2 else None,
                     "samples": len(pts), "rss_mb_first": samples[0]["rss_mb"].get(p),
                     "rss_mb_last": samples[-1]["rss_mb"].get(p)}
    good = [r[1] for r in load.records if r[2] in ("ok", "mismatch")]
    return {
        "settings": {"model": model, "minutes": minutes, "clients": clients,
                     "protocols": sorted({t[1] for t in targets}),
                     "interval_s": interval, "bad_every": bad_every, "bad_images": list(bad), "tolerance": tol,
                     "warmup_s": WARMUP_FRACTION * minutes * 60,
                     "slope": f"least squares of RSS (MB) on requests served, MB per {SLOPE_UNIT} requests, over "
                              f"the samples after the warm-up (the first {WARMUP_FRACTION:.0%} of the soak)"},
        "totals": {"requests": len(outcomes), "good": len(good), **counts,
                   "requests_per_s": round(len(outcomes) / max(samples[-1]["t_s"], 1e-9), 2),
                   "latency_ms": _percentiles_ms(good), "stub_restarts": restarts,
                   "examples": load.examples},
        "samples": samples,
        "slopes": slopes,
    }


def _sample(t: float, window: list, everything: list, rss: dict[str, float], span: float = 0.0) -> dict:
    """One row of the time series: throughput and latency over the last window, counts since the start."""
    outcomes = [r[2] for r in everything]
    lat = _percentiles_ms([r[1] for r in window if r[2] in ("ok", "mismatch")])
    return {"t_s": round(t, 2), "requests": len(everything),
            "requests_per_s": round(len(window) / span, 2) if span > 0 else 0.0,
            "p50_ms": lat["p50"], "p99_ms": lat["p99"],
            "failed": outcomes.count("failed"), "mismatched": outcomes.count("mismatch"),
            "bad_refused": outcomes.count("refused"),
            "bad_not_refused": outcomes.count("accepted") + outcomes.count("wrong_status"),
            "rss_mb": {p: round(v, 2) for p, v in rss.items()}}


def write_soak_report(report: dict, out: Path, note: str = "") -> dict[str, Path]:
    """soak.json, soak.csv (one row per sample), soak.png (every series over time) and soak.md in ``out``, which
    must be new or empty (nothing there is overwritten). ``note``: a line for the markdown (e.g. the machine)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ZsadError(f"{out} exists and is not an empty folder: give a new one (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"soak.{k}" for k in ("json", "csv", "png", "md")}
    paths["json"].write_text(json.dumps({**report, "note": note}, indent=2))
    processes = list(report["slopes"])
    fields = ["t_s", "requests", "requests_per_s", "p50_ms", "p99_ms", "failed", "mismatched", "bad_refused",
              "bad_not_refused"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields + [f"rss_mb:{p}" for p in processes])
        for s in report["samples"]:
            w.writerow([s[k] for k in fields] + [s["rss_mb"].get(p, "") for p in processes])
    if not _plot(report, paths["png"]):
        paths.pop("png")
    paths["md"].write_text(_markdown(report, note, "png" in paths))
    return paths


def _plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = report["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    axes[0].plot(t, [x["requests_per_s"] for x in s])
    axes[0].set_ylabel("requests/s")
    for q in ("p50_ms", "p99_ms"):
        axes[1].plot(t, [x[q] if x[q] is not None else np.nan for x in s], label=q[:3])
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend()
    for k in ("failed", "mismatched", "bad_refused", "bad_not_refused"):
        axes[2].plot(t, [x[k] for x in s], label=k)
    axes[2].set_ylabel("requests (cumulative)")
    axes[2].legend(fontsize=8)
    for p in report["slopes"]:
        axes[3].plot(t, [x["rss_mb"].get(p, np.nan) for x in s], label=p)
    axes[3].axvline(report["settings"]["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
    axes[3].set_ylabel("RSS (MB)")
    axes[3].set_yscale("log")
    axes[3].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, never over them
    axes[3].set_xlabel("minutes")
    fig.suptitle(f"soak: {report['settings']['model']}, {report['settings']['clients']} clients (HTTP + gRPC)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _markdown(report: dict, note: str, plotted: bool) -> str:
    st, tot = report["settings"], report["totals"]
    lines = [f"# Soak: {st['model']}, {st['minutes']} min", ""]
    if note:
        lines += [note, ""]
    lines += [f"{st['clients']} clients ({' + '.join(st['protocols'])}), one image per request, every "
              f"{st['bad_every']}th request a bad image ({len(st['bad_images'])} kinds); good answers checked against "
              f"eager at relative tolerance {st['tolerance']:g}; a sample every {st['interval_s']:g} s.", "",
              "| requests | good ok | good failed | good mismatched | bad refused (400) | bad not refused | "
              "requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|---|",
              f"| {tot['requests']} | {tot['ok']} | {tot['failed']} | {tot['mismatch']} | {tot['refused']} | "
              f"{tot['accepted'] + tot['wrong_status']} | {tot['requests_per_s']} | {tot['latency_ms']['p50']} | "
              f"{tot['latency_ms']['p99']} |", "",
              f"Memory slope: {st['slope']}.", "",
              "| process | RSS first (MB) | RSS last (MB) | slope (MB per 10k requests) | samples |",
              "|---|---|---|---|---|"]
    for p, v in report["slopes"].items():
        slope = "n/a" if v["mb_per_10k_requests"] is None else f"{v['mb_per_10k_requests']:+.3f}"
        lines.append(f"| {p} | {v['rss_mb_first']} | {v['rss_mb_last']} | {slope} | {v['samples']} |")
    if tot["stub_restarts"]:
        lines += ["", f"Python stubs restarted during the soak: {tot['stub_restarts']}"]
    for kind, ex in tot["examples"].items():
        lines += ["", f"Examples ({kind}): " + "; ".join(ex)]
    if plotted:
        lines += ["", "![soak time series](soak.png)"]
    return "\n".join(lines) + "\n"


def _eager_reference(model: str, profile: str, checkpoint: str | None, images: list[bytes],
                     class_name: str | None) -> list:
    from zsad.load import load
    from zsad.predict import Predictor

    method = load(checkpoint, model=None if checkpoint else model, profile=profile).method
    return Predictor(method).predict(images, class_names=class_name if method.text_inputs() else None)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--url", default="127.0.0.1:8000", help="HTTP address (the bounded run: with --protocol grpc, gRPC).")
@click.option("--model", required=True, help="Ensemble name.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", help="Bounded run only.")
@click.option("--clients", type=int, default=8, help="Concurrent clients (a soak splits them over HTTP and gRPC).")
@click.option("--seconds", type=float, default=20.0, help="Bounded run length.")
@click.option("--server-pid", type=int, default=None, help="tritonserver PID, to report its memory.")
@click.option("--out", type=click.Path(), default=None,
              help="Bounded run: write the result JSON here too. Soak: a new folder for the report (required).")
@click.option("--class-name", default="object", help="Class name sent to models that take one (Bayes-PFL).")
@click.option("--soak", "soak_minutes", type=float, default=None,
              help="Soak for this many minutes instead: HTTP + gRPC clients, bad requests mixed in, answers checked "
                   "against eager, memory sampled; needs --out, and --repo or --grpc-url with --server-pid.")
@click.option("--repo", type=click.Path(), default=None, help="Soak: start a tritonserver on this repository.")
@click.option("--grpc-url", default=None, help="Soak against a running server: its gRPC address.")
@click.option("--interval", type=float, default=10.0, help="Soak: seconds between samples.")
@click.option("--bad-every", type=int, default=10, help="Soak: every Nth request of a client is a bad image.")
@click.option("--profile", default="tiny", help="Soak: the profile the ensemble was exported from (eager reference).")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Soak: the checkpoint the ensemble was exported from (eager reference), instead of --profile.")
@click.option("--note", default="", help="Soak: a line for the report (machine, what else ran).")
@cli_entry
def main(url, model, protocol, clients, seconds, server_pid, out, class_name, soak_minutes, repo, grpc_url,
         interval, bad_every, profile, checkpoint, note):
    """Concurrent load against a served zsad ensemble: a bounded run, or a soak (--soak MINUTES)."""
    if soak_minutes is None:
        result = run_load(url, model, sample_pngs(6), clients, seconds, protocol, server_pid, class_name=class_name)
        text = json.dumps(result, indent=2)
        click.echo(text)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text)
        return
    if not out:
        raise ZsadError("--soak needs --out (a new folder for the report)")
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise ZsadError(f"{out} exists and is not an empty folder: give a new one (nothing is overwritten)")
    if repo is None and not (grpc_url and server_pid):
        raise ZsadError("--soak needs --repo (a server is started on it), or --grpc-url and --server-pid of a "
                        "running one")
    images = sample_pngs(6, with_good=True)
    reference = _eager_reference(model, profile, checkpoint, images, class_name)

    def run(http, grpc, pid):
        report = soak(http, grpc, model, images, reference, pid, soak_minutes, clients, interval, bad_every,
                      class_name=class_name, log=click.echo)
        for kind, path in write_soak_report(report, Path(out), note).items():
            click.echo(f"wrote {kind}: {path}")

    if repo is not None:
        from zsad.serve.server import TritonServer

        with TritonServer(repo) as server:
            assert server.process is not None
            run(server.http_url, server.grpc_url, server.process.pid)
    else:
        run(url, grpc_url, server_pid)


if __name__ == "__main__":
    main()
