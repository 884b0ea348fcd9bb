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

# under pytest-xdist the workers share the cores: one torch thread per worker's share, not two each contending
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


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


@pytest.fixture
def served_imports(monkeypatch):
    """Import a triton_models/<model>/model.py as its python stub does: call the returned function first, with a
    stand-in for Triton's pb_utils (a bare module if none), and the stub's names resolve (triton_python_backend_utils,
    and zsad_common, which the export copies beside model.py); undone after the test."""
    import sys
    import types

    import zsad.triton_models.zsad_common as common
    import zsad.triton_models.zsad_common.guard as guard

    def install(pb_utils=None):
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                            pb_utils or types.ModuleType("triton_python_backend_utils"))
        monkeypatch.setitem(sys.modules, "zsad_common", common)
        monkeypatch.setitem(sys.modules, "zsad_common.guard", guard)

    return install


# Trained states (issue 27): comparisons that met only random weights are untested. Each method trained once per
# session at the tiny profile on two synthetic training classes (48 images) for TRAINED_EPOCHS epochs, enough to
# leave the random start (tests/test_trained_export.py asserts the weights moved and the loss fell).
TRAINED_CLASSES = "brick,plate"
TRAINED_EPOCHS = 3
_TRAINED: dict = {}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic):
    """A factory: method name -> the run directory of that method trained as above, shared by every test and, under
    pytest-xdist, by every worker of this run (trained once, under a file lock: worksteal can put the tests that
    train on both workers, and the five trainings cost ~65 s each time)."""
    from filelock import FileLock

    from zsad.train.run import run

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's folder, not older runs'

    def get(name: str):
        if name not in _TRAINED:
            out, done = shared / f"trained_{name}", shared / f"trained_{name}.done"
            with FileLock(str(shared / f"trained_{name}.lock")):
                if not done.exists():
                    run(model=name, profile="tiny", data=str(synthetic), split="test", classes=TRAINED_CLASSES,
                        clip_weights=None, epochs=TRAINED_EPOCHS, batch_size=None, lr=None, image_size=None,
                        seed=None, out=str(out), resume=False, device="cpu", workers=0, progress=False)
                    done.touch()
            _TRAINED[name] = out
        return _TRAINED[name]

    return get
