"""Read a ``torch.save`` file without running any code from it.

``read_torch_file`` first tries ``torch.load(weights_only=True)`` (tensors, dicts, Parameters: enough for
AnomalyCLIP, Bayes-PFL and AF-CLIP's prompt). Where that refuses a global (AF-CLIP's pickled
``clip.adaptor.Adaptor`` module, SOWA's Lightning checkpoint with Hydra ``functools.partial`` hyper-parameters),
it reads the zip archive itself with :class:`RestrictedUnpickler`, whose ``find_class`` admits only

- the tensor-rebuild functions and storage types of ``torch.save`` (re-implemented here: nothing of torch's is
  called with the file's arguments), ``collections.OrderedDict`` and ``builtins.set``;
- :class:`ModuleState`, a stand-in for ``nn.Module`` classes (AF-CLIP's ``clip.adaptor`` classes and
  ``torch.nn.modules.*``): it keeps the pickled ``__dict__`` (``_parameters``, ``_modules``, ...) as plain data;
- :class:`Inert`, a record for the few names a Lightning/Hydra checkpoint stores outside its ``state_dict``
  (``functools.partial``, ``torch.optim.*``, SOWA's own ``src.*`` classes, ``omegaconf``, ``lightning``,
  ``torchmetrics``, numpy scalars): calling it stores the arguments and does nothing else.

Any other global (``os.system``, ``builtins.exec``, ``subprocess.Popen``, ...) raises ZsadError naming it, before
anything is called. Tensors are read lazily (:class:`TensorRef`), so a 1.7 GB Lightning file costs only the
tensors that are converted.
"""
from __future__ import annotations

import _compat_pickle
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from zsad import ZsadError

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
MODULE_CLASS_PREFIXES = ("clip.adaptor.", "adaptor.", "torch.nn.modules.")
INERT_NAMES = {"functools.partial", "builtins.getattr", "numpy.core.multiarray.scalar", "numpy.dtype",
               "numpy._core.multiarray.scalar", "collections.defaultdict", "torch.device", "pathlib.PosixPath"}
INERT_PREFIXES = ("torch.optim.", "src.", "omegaconf.", "lightning.", "pytorch_lightning.", "lightning_fabric.",
                  "torchmetrics.", "hydra.", "dotmap.", "typing.")


class ModuleState:
    """Stand-in for a pickled ``nn.Module``: keeps its class name and its pickled ``__dict__`` as plain data."""

    qualname = "?"

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}

    def tensors(self, prefix: str = "") -> dict[str, object]:
        """``state_dict``-style flat {name: tensor} from the kept ``_parameters`` / ``_buffers`` / ``_modules``."""
        out: dict[str, object] = {}
        state = getattr(self, "state", {})
        for group in ("_parameters", "_buffers"):
            for k, v in (state.get(group) or {}).items():
                if v is not None:
                    out[prefix + k] = v
        for k, child in (state.get("_modules") or {}).items():
            if isinstance(child, ModuleState):
                out.update(child.tensors(f"{prefix}{k}."))
        return out


class Inert:
    """Record of a Lightning/Hydra object: stores what it was built from; never calls anything."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class TensorRef:
    """A tensor in the archive, read on ``load()``: storage key, dtype, offset, size, stride (in elements)."""

    def __init__(self, archive: _Archive, key: str, dtype: torch.dtype, offset: int, size, stride):
        self.archive, self.key, self.dtype = archive, key, dtype
        self.offset, self.shape, self.stride = int(offset), torch.Size(size), tuple(stride)

    def load(self) -> torch.Tensor:
        flat = self.archive.storage(self.key, self.dtype)
        return torch.as_strided(flat, self.shape, self.stride, self.offset).clone()


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype):
        self.key, self.dtype = key, dtype


class _Archive:
    def __init__(self, path: Path):
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise ZsadError(f"{path} is not a torch.save zip archive (legacy or corrupt file): {err}") from err
        pkls = [n for n in self.zip.namelist() if n.endswith("data.pkl")]
        if len(pkls) != 1:
            raise ZsadError(f"{path} is not a torch.save archive (no single data.pkl)")
        self.prefix = pkls[0][: -len("data.pkl")]
        self.path = path
        self._cache: dict[str, torch.Tensor] = {}

    def storage(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        if key not in self._cache:
            try:
                raw = bytearray(self.zip.read(f"{self.prefix}data/{key}"))
            except KeyError as err:
                raise ZsadError(f"{self.path}: storage {key} missing from the archive") from err
            self._cache[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self._cache[key]


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise ZsadError("malformed tensor record in the pickle")
    return TensorRef(_current_archive(), storage.key, storage.dtype, offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    return data  # a Parameter is kept as its plain tensor


_ARCHIVE_STACK: list[_Archive] = []


def _current_archive() -> _Archive:
    return _ARCHIVE_STACK[-1]


def _set(items=()):
    return set(items)


_ALLOWED = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": _set,
}


def _stand_in(base: type, name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (base,), {"qualname": name})


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` allow-list (module docstring); storages come from the archive via ``persistent_load``."""

    def find_class(self, module: str, name: str):
        # protocol-2 pickles name Python-2 modules (__builtin__.set): the standard mapping to Python 3 names
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if full.startswith(MODULE_CLASS_PREFIXES) and name[:1].isupper():
            return _stand_in(ModuleState, full)
        if full in INERT_NAMES or full.startswith(INERT_PREFIXES):
            return _stand_in(Inert, full)
        raise ZsadError(f"refused to load: the file asks for the global '{full}', which a released checkpoint "
                        f"never needs (nothing in the file was run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise ZsadError(f"unsupported persistent id in the pickle: {str(pid)[:80]}")
        dtype = pid[1]
        if not isinstance(dtype, torch.dtype):
            raise ZsadError(f"unsupported storage type in the pickle: {dtype!r}")
        return _Storage(str(pid[2]), dtype)


def _restricted_load(path: Path):
    archive = _Archive(path)
    _ARCHIVE_STACK.append(archive)
    try:
        with archive.zip.open(f"{archive.prefix}data.pkl") as f:
            return RestrictedUnpickler(f).load()
    except ZsadError:
        raise
    except Exception as err:  # malformed pickle: say what, never a traceback
        raise ZsadError(f"could not read {path}: {type(err).__name__}: {err}") from err
    finally:
        _ARCHIVE_STACK.pop()


def read_torch_file(path: str | Path):
    """The object in a ``torch.save`` file, with no code from it run (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ZsadError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global weights_only does not admit: read it with the restricted unpickler below
    except Exception as err:
        if not zipfile.is_zipfile(path):
            raise ZsadError(f"could not read {path} as a torch file: {type(err).__name__}: {str(err)[:200]}") from err
    return _restricted_load(path)


def materialize(value) -> torch.Tensor:
    """A tensor from ``torch.load`` or a :class:`TensorRef` -> a plain CPU tensor."""
    if isinstance(value, TensorRef):
        return value.load()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    raise ZsadError(f"expected a tensor, found {type(value).__name__}")


def shape_of(value) -> tuple[int, ...]:
    if isinstance(value, (TensorRef, torch.Tensor)):
        return tuple(value.shape)
    raise ZsadError(f"expected a tensor, found {type(value).__name__}")
