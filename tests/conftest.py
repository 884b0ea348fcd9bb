import os

# Offline box: make Hugging Face fail fast instead of retrying for a minute (read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.path.exists("/dev/nvidiactl"):
    # No GPU: Triton kernels can only run in its interpreter, which must be chosen before triton is first
    # imported (importing torchvision imports it, below).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from zsad._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # tests import open_clip directly too

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The synthetic-defect data set, generated once per test session (tests only read it)."""
    from zsad.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), progress=False)


_METHOD_CACHE = {}


@pytest.fixture
def tiny_method():
    """Build (once per session) a tiny-profile method; returns a factory name -> fresh-state method in eval mode."""
    import zsad.methods as M

    def get(name):
        if name not in _METHOD_CACHE:
            _METHOD_CACHE[name] = M.create(name, "tiny")
        m = _METHOD_CACHE[name].eval()
        return m

    return get
