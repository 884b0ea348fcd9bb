#!/usr/bin/env bash
# Best effort: perf_analyzer for tests/test_protocol_docs.py (docs/protocols.md has the setup and why this version).
# Prints the path of a wrapper that sets the library path it needs; prints nothing if any step fails (the test
# then skips, saying why).
set -uo pipefail
dir="${1:-/tmp/zsad-perf-analyzer}"
{
  apt-get update -qq && apt-get install -y -qq libb64-0d &&
  python3 -m venv "$dir/venv" &&
  "$dir/venv/bin/pip" install -q tritonclient==2.41.0 nvidia-cuda-runtime-cu12
} >"$dir.log" 2>&1 || exit 0
lib=$(ls -d "$dir"/venv/lib/python3*/site-packages/nvidia/cuda_runtime/lib 2>/dev/null | head -1)
[ -n "$lib" ] && [ -x "$dir/venv/bin/perf_analyzer" ] || exit 0
mkdir -p "$dir/bin"
printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
  "$lib" "$dir/venv/bin/perf_analyzer" >"$dir/bin/perf_analyzer"
chmod +x "$dir/bin/perf_analyzer"
"$dir/bin/perf_analyzer" --version >/dev/null 2>&1 && echo "$dir/bin/perf_analyzer"
