"""How steady this VM's vector rate is: AVX-512 FMA throughput sampled on every core at once, back to back.

    python bench/results/2026-12-06-cpu-epyc/vector_rate_spells.py [SECONDS] [--json OUT]

Each sample is zsad.cpu_probe's fp32 loop (12 independent vfmadd231ps zmm) on all physical cores at once for ~10 ms,
each thread timed by its own CPU time (so preemption does not count). A sample below ``LOW`` of the run's best
is "low"; consecutive low samples make a spell. Prints the share of low samples, the spell lengths and the rates.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "zsad"))
import cpu_probe  # noqa: E402  (stdlib-only module, imported as a file like the probe's child)

LOW = 0.85


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seconds", type=float, nargs="?", default=60.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    code = cpu_probe._Code(cpu_probe.vector_loop("vfmadd231ps", 512))
    sample = cpu_probe._probe(code, cpu_probe.ACCUMULATORS * 32, cores, 0.01, 1)
    t0, samples = time.perf_counter(), []
    while time.perf_counter() - t0 < args.seconds:
        samples.append((time.perf_counter() - t0, sample() / 1e9))
    best = max(r for _, r in samples)
    sample_s = args.seconds / len(samples)
    spells, start, last = [], None, 0.0
    for t, r in samples:
        if r < LOW * best:
            start = t if start is None else start
            last = t
        elif start is not None:
            spells.append(last - start + sample_s)
            start = None
    if start is not None:  # a spell still open when the run ended
        spells.append(last - start + sample_s)
    low = [r for _, r in samples if r < LOW * best]
    out = {"cpu_threads": cores, "seconds": args.seconds, "samples": len(samples), "best_gflops": best,
           "median_gflops": statistics.median(r for _, r in samples), "low_share": len(low) / len(samples),
           "low_median_gflops": statistics.median(low) if low else None, "spells": len(spells),
           "longest_spells_s": sorted(spells)[-5:]}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
