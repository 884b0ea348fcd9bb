"""One ViT-L attention pair at the paper profile (1370 tokens, 16 heads of 64), three ways, compiled by OpenVINO in
bf16 with the LATENCY hint (issue 25, epyc.md): the stock and V-V attentions as two SDPA calls (what zsad exports),
as one SDPA call over a doubled batch, and unfused (matmul, softmax, matmul).

    python attention_variants.py 0|1      # 1: CPU_DENORMALS_OPTIMIZATION on

Prints the median of 15 runs after 3 warm-ups per variant and its max difference from torch's SDPA (stock half).
"""
import sys
import time

import numpy as np
import openvino as ov
import torch
import torch.nn.functional as F

N, H, D = 1370, 16, 64
GFLOP_PAIR = 2 * 4 * N * N * D * H / 1e9  # q k^T and p v, for both attentions


class Two(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(v, v, v)


class Batched(torch.nn.Module):
    def forward(self, q, k, v):
        o = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
        return o[:1], o[1:]


class Unfused(torch.nn.Module):
    def forward(self, q, k, v):
        s = 1 / D ** 0.5
        return (torch.softmax((q * s) @ k.transpose(-1, -2), -1) @ v,
                torch.softmax((v * s) @ v.transpose(-1, -2), -1) @ v)


def main(denormals: bool) -> None:
    torch.manual_seed(0)
    x = [torch.randn(1, H, N, D) for _ in range(3)]
    feed = [t.numpy() for t in x]
    ref = F.scaled_dot_product_attention(x[0], x[1], x[2])
    core = ov.Core()
    for name, module in [("two", Two()), ("batched", Batched()), ("unfused", Unfused())]:
        compiled = core.compile_model(ov.convert_model(module, example_input=tuple(x)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                       "CPU_DENORMALS_OPTIMIZATION": denormals})
        out = compiled(feed)
        for _ in range(3):
            compiled(feed)
        times = []
        for _ in range(15):
            start = time.perf_counter()
            compiled(feed)
            times.append(time.perf_counter() - start)
        ms = float(np.median(times)) * 1e3
        err = float((torch.from_numpy(out[0]) - ref).abs().max())
        print(f"{name:8s} {ms:6.1f} ms for the pair ({GFLOP_PAIR:.1f} GFLOP, {GFLOP_PAIR / ms * 1e3:.0f} GFLOP/s); "
              f"max |diff| vs torch {err:.3g}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] == ["1"])
