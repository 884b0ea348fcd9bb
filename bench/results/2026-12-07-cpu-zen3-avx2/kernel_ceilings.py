"""What OpenVINO's CPU kernels reach alone at BAG-CLIP paper-profile shapes (ViT-L/14, 1370 tokens): each
FullyConnected of a block and one attention op (as ScaledDotProductAttention and as MatMul-Softmax-MatMul), f32,
LATENCY hint, best of N runs, with the kernel each ran. Prints GFLOP/s; compare with the peak zsad-bench measures.

    python bench/results/2026-12-07-cpu-zen3-avx2/kernel_ceilings.py
"""
import time

import numpy as np
import openvino as ov
from openvino import opset13 as ops

TOKENS, HEADS, HEAD_DIM, RUNS = 1370, 16, 64, 5
CONFIG = {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


def best_ms(model, feed):
    request = ov.Core().compile_model(model, "CPU", CONFIG).create_infer_request()
    request.infer(feed)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        request.infer(feed)
        times.append(time.perf_counter() - start)
    kernels = sorted({f"{n.node_type} {n.exec_type}" for n in request.profiling_info if n.status.name == "EXECUTED"})
    return min(times) * 1e3, kernels


def main():
    rng = np.random.default_rng(0)
    for k, n in ((1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)):
        x = ops.parameter([1, TOKENS, k], np.float32, name="x")
        weight = ops.constant(rng.standard_normal((n, k), dtype=np.float32) / k ** 0.5)
        ms, kernels = best_ms(ov.Model([ops.matmul(x, weight, False, True)], [x]),
                              {0: rng.standard_normal((1, TOKENS, k), dtype=np.float32)})
        print(f"linear {k}->{n}: {ms:.1f} ms, {2 * TOKENS * k * n / ms / 1e6:.0f} GFLOP/s, {kernels}")
    shape = [1, HEADS, TOKENS, HEAD_DIM]
    feed = {i: rng.standard_normal(shape, dtype=np.float32) for i in range(3)}
    flops = 4 * TOKENS * TOKENS * HEAD_DIM * HEADS
    q, k, v = (ops.parameter(shape, np.float32, name=c) for c in "qkv")
    fused = ov.Model([ops.scaled_dot_product_attention(q, k, v, causal=False)], [q, k, v])
    q, k, v = (ops.parameter(shape, np.float32, name=c) for c in "qkv")
    scores = ops.matmul(ops.multiply(q, ops.constant(np.float32(HEAD_DIM ** -0.5))), k, False, True)
    decomposed = ov.Model([ops.matmul(ops.softmax(scores, -1), v, False, False)], [q, k, v])
    for name, model in (("attention (SDPA op)", fused), ("attention (MatMul-Softmax-MatMul)", decomposed)):
        ms, kernels = best_ms(model, feed)
        print(f"{name}: {ms:.1f} ms, {flops / ms / 1e6:.0f} GFLOP/s, {kernels}")


if __name__ == "__main__":
    main()
