"""OpenAI-Triton kernels, each beside its torch reference, with a dispatch() that falls back to the reference.

Modules (each: ``@triton.jit`` kernel(s), torch reference, ``dispatch()``, ``perf_sweep()``):

- ``knn_graph``         BAG-CLIP's kNN graph: fused Gram + row-wise top-k, then symmetrise / self-loops / normalise
- ``window_attention``  SOWA's window V-V cosine attention (12 x 12 windows, per-head clamped scale, position bias)
- ``dual_attention``    the backbone's dual stream: softmax(QKᵀ)V and softmax(VVᵀ)V in one pass over K and V
- ``trt_plugins``       TensorRT ``tensorrt.plugin`` glue for the three (written against the docs, never run)
- ``aot``               every launch the dispatchers make at the papers' shapes, built ahead of time for sm_80 / sm_89
                        / sm_90a on a CPU and checked for spills and shared memory (``python -m zsad.kernels.aot``)
- ``_common``           the guarded triton import, the dispatch rule, ``for_current_mode`` (interpreted or compiled,
                        chosen at each launch from ``TRITON_INTERPRET``), the online-softmax step both attention
                        kernels call (``online_softmax_update``), perf-sweep rows

A leaf package: it imports torch and, where installed, triton; never ``zsad``. Importing this package itself
imports neither kernels nor triton. ``dispatch()`` runs Triton only for CUDA tensors outside autograd/export with
triton installed; everywhere else (CPU included) it runs the torch reference, which is the model's own math.
``ZSAD_KERNELS=0`` forces the reference everywhere.

Tests: tests/test_kernels.py runs every kernel on CPU through Triton's interpreter (TRITON_INTERPRET=1) against the
references in float64; tests/test_kernels_gpu.py (marker ``gpu``, run on its own) compiles them at the real sizes.
"""

KERNEL_MODULES = ("knn_graph", "window_attention", "dual_attention")


def perf_sweep(device: str = "cuda", kernels: tuple[str, ...] = KERNEL_MODULES) -> list[dict]:
    """All kernels' perf rows (for zsad-bench). Without CUDA: rows marked ``status="skipped"``, no numbers."""
    import importlib

    rows: list[dict] = []
    for name in kernels:
        rows.extend(importlib.import_module(f"{__name__}.{name}").perf_sweep(device))
    return rows
