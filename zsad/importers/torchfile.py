"""Read a ``torch.save`` (or TorchScript) zip archive without running anything from it, in bounded memory.

``read_torch_file(path)`` never calls ``torch.load``: it reads the archive itself, in three guarded steps.

1. **The archive** (:class:`Archive`). At most ``MAX_ENTRIES`` entries (counted from the end record, before the
   central directory is parsed); every entry zsad reads (``data.pkl``, ``byteorder``, the storages ``data/*``)
   stored, never compressed (``torch.save`` and ``torch.jit.save`` store them; a deflated entry can expand to any
   size: refused; TorchScript's deflated ``code/`` entries are never read); none encrypted, each lying inside the
   file; the entries' sizes together no larger than the file (overlapping entries refused); one ``<dir>/data.pkl`` of
   at most ``MAX_PICKLE_BYTES``; a ``byteorder`` entry, if any, says ``little``. Entries are later read by offset
   and exact length (``os.preadv``), never decompressed and never past their declared size.
2. **The pickle, before it is unpickled** (:func:`scan_pickle`): one pass over its opcodes that simulates the
   unpickler's stack to bound the nesting depth of what it would build (``MAX_NESTING``: a deeply nested tuple used
   as a dict key crashes CPython's hash with a C stack overflow), refuses memo indices beyond the pickle's own
   length (``LONG_BINPUT 0x7fffffff`` makes the C unpickler allocate a 32 GiB memo) and opcodes ``torch.save``
   never writes (``INST``/``OBJ``/``EXT*``/out-of-band buffers).
3. **Unpickling** (:class:`RestrictedUnpickler`), whose ``find_class`` hands out only inert things:

   - the tensor-rebuild functions and storage types of ``torch.save``: a tensor becomes a :class:`TensorRef`
     (storage entry, dtype, offset, size, stride), checked on creation against the storage actually in the archive
     (the pickle's declared storage size must equal the entry's size; offset + extent must lie inside it);
   - ``dict`` / ``set`` / ``OrderedDict`` / ``defaultdict`` as guarded factories that take only plain containers
     (never an object whose ``keys`` / ``__iter__`` could be looked up), and ``defaultdict`` becomes a plain dict
     (its factory is dropped, so nothing from the file is kept to be called later);
   - :class:`ModuleState` for ``nn.Module`` classes (AF-CLIP's ``clip.adaptor``, ``torch.nn.modules.*``) and
     TorchScript classes (``__torch__.*``, OpenAI's CLIP files): the pickled state kept as plain data;
   - :class:`Inert` for what a Lightning / Hydra checkpoint stores beside its weights (``functools.partial``,
     ``torch.optim.*``, SOWA's ``src.*`` classes, ``omegaconf.*`` containers / nodes / metadata,
     ``typing.Any``, ``lightning.*``, numpy scalars): it records its arguments and does nothing else.

   Any other global (``os.system``, ``builtins.exec`` / ``eval`` / ``getattr``, ``subprocess.Popen``,
   ``torch.load``, ...) raises ZsadError naming it, before anything is called. The stand-in classes, the factories
   and :class:`TensorRef` refuse ``BUILD`` / attribute assignment, so a pickle cannot re-point them afterwards.

A tensor is read only by :func:`materialize`, which needs the expected shape: the declared shape is compared with
it first, a view that would hold more values than its storage (a stride-0 broadcast) is refused, and only the
bytes the view spans are read. So no tensor costs more memory than the storage bytes in the file, and only the
tensors an importer maps are read at all.
"""
from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import pickletools
import struct
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
MODULE_CLASS_PREFIXES = ("clip.adaptor.", "adaptor.", "torch.nn.modules.", "__torch__.")
INERT_NAMES = {"functools.partial", "numpy.core.multiarray.scalar", "numpy.dtype", "numpy._core.multiarray.scalar",
               "torch.device", "pathlib.PosixPath"}
INERT_PREFIXES = ("torch.optim.", "src.", "omegaconf.", "lightning.", "pytorch_lightning.", "lightning_fabric.",
                  "torchmetrics.", "hydra.", "dotmap.", "typing.")

MAX_ENTRIES = 65_536  # a ViT-L Lightning checkpoint with optimizer state has ~1,000
MAX_CENTRAL_DIRECTORY = 8 << 20  # 65,536 entries with names of ~80 characters
MAX_PICKLE_BYTES = 64 << 20  # the structure only: SOWA's data.pkl with every hyper-parameter is ~0.2 MB
MAX_NESTING = 200  # OmegaConf's deepest pickled chains are ~30 levels
MAX_MODULES = 100_000  # module visits when a pickled module tree is flattened (shared submodules count each time)
MAX_MODULE_DEPTH = 64
REFUSED_OPCODES = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}
MUTATING_OPCODES = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def describe(x, n: int = 60) -> str:
    """A one-line, length-bounded name for something read from a file (never its full repr)."""
    return repr(x)[:n] if isinstance(x, (str, int, float, bytes)) else type(x).__name__


# -- 1. the archive -----------------------------------------------------------------------------------------------
def _end_record(f, size: int) -> tuple[int, int] | None:
    """(entries, central directory bytes) from a zip's end record (zip64 where it says so); None: not a zip."""
    f.seek(max(0, size - 22 - 0xFFFF))
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    entries, cd_size = struct.unpack("<HI", tail[at + 10:at + 16])
    if (entries == 0xFFFF or cd_size == 0xFFFFFFFF) and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
        f.seek(struct.unpack("<Q", tail[at - 12:at - 4])[0])
        record = f.read(56)
        if len(record) < 56 or record[:4] != b"PK\x06\x06":
            return None
        entries, cd_size = struct.unpack("<QQ", record[32:48])
    return entries, cd_size


class Archive:
    """A zip archive checked entry by entry on opening (module docstring, step 1); reads by offset, never inflates."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            end = _end_record(f, self.size)  # the end record only: count the entries before parsing them
            if end is None:
                raise ZsadError(f"{self.path} is not a zip archive, so not a torch.save file zsad reads (a legacy "
                                f"pre-1.6 torch file or not a torch file: re-save it with torch.save)")
            if end[0] > MAX_ENTRIES or end[1] > MAX_CENTRAL_DIRECTORY:
                raise ZsadError(f"{self.path}: {end[0]} archive entries ({end[1]} bytes of directory); at most "
                                f"{MAX_ENTRIES} entries are read")
            try:
                infos = zipfile.ZipFile(f).infolist()
            except (zipfile.BadZipFile, ValueError, OSError) as err:
                raise ZsadError(f"{self.path} is a corrupt zip archive: {str(err)[:120]}") from err
            if len(infos) > MAX_ENTRIES:  # the end record's count can lie; the directory's size bounded this parse
                raise ZsadError(f"{self.path}: {len(infos)} archive entries; at most {MAX_ENTRIES} are read")
            self.entries: dict[str, tuple[int, int]] = {}  # name -> (data offset, size) of every stored entry
            total = 0
            for info in infos:
                start = self._check_entry(f, info)
                if info.compress_type == zipfile.ZIP_STORED:
                    self.entries[info.filename] = (start, info.file_size)
                total += info.compress_size
        if total > self.size:
            raise ZsadError(f"{self.path}: the archive's entries declare {total} bytes in a {self.size}-byte file "
                            f"(overlapping entries): refused")
        pkls = [n for n in self.entries if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ZsadError(f"{self.path} is not a torch.save archive (no single <dir>/data.pkl)")
        self.prefix = pkls[0][: -len("data.pkl")]
        if self.entries[pkls[0]][1] > MAX_PICKLE_BYTES:
            raise ZsadError(f"{self.path}: data.pkl is {self.entries[pkls[0]][1]} bytes; a checkpoint's structure "
                            f"is far smaller (at most {MAX_PICKLE_BYTES} read)")
        order = self.prefix + "byteorder"
        if order in self.entries and self.read(order) not in (b"little", b"little\n"):
            raise ZsadError(f"{self.path} was saved big-endian; zsad reads little-endian archives only")

    def _check_entry(self, f, info: zipfile.ZipInfo) -> int:
        """The entry's data offset, after checking it lies in the file. The entries zsad reads (data.pkl, byteorder,
        data/*) must be stored; TorchScript's code/ and debug entries may be deflated, they are never read."""
        name = describe(info.filename)
        if info.flag_bits & 0x1:
            raise ZsadError(f"{self.path}: archive entry {name} is encrypted: refused")
        read = info.filename.partition("/")[2]
        if info.compress_type != zipfile.ZIP_STORED and (read in ("data.pkl", "byteorder") or read.startswith("data/")):
            raise ZsadError(f"{self.path}: archive entry {name} is compressed (zip method {info.compress_type}); "
                            f"torch.save stores entries uncompressed and a compressed one can expand to any size: "
                            f"refused")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise ZsadError(f"{self.path}: archive entry {name} declares {info.file_size} bytes but stores "
                            f"{info.compress_size}: refused")
        f.seek(info.header_offset)
        head = f.read(_LOCAL_HEADER.size)
        if len(head) != _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            raise ZsadError(f"{self.path}: archive entry {name} has no local header: corrupt archive")
        fields = _LOCAL_HEADER.unpack(head)
        start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
        if start + info.compress_size > self.size:
            raise ZsadError(f"{self.path}: archive entry {name} ({info.compress_size} bytes) extends past the end of "
                            f"the {self.size}-byte file: truncated or crafted archive")
        return start

    def entry_size(self, name: str) -> int | None:
        e = self.entries.get(name)
        return None if e is None else e[1]

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytearray:
        """``length`` bytes of stored entry ``name`` from ``start`` (default: to its end), never past the entry."""
        offset, size = self.entries[name]
        length = size - start if length is None else length
        if start < 0 or length < 0 or start + length > size:
            raise ZsadError(f"{self.path}: read of {length} bytes at {start} outside entry {describe(name)} "
                            f"({size} bytes)")
        buf = bytearray(length)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < length:
                chunk = os.preadv(fd, [memoryview(buf)[done:]], offset + start + done)
                if chunk <= 0:
                    raise ZsadError(f"{self.path} changed or was truncated while being read")
                done += chunk
        finally:
            os.close(fd)
        return buf


# -- 2. the pickle, before unpickling ----------------------------------------------------------------------------
def _pop(op, stack: list[int], marks: list[int], where: str) -> tuple[list[int], list[int]]:
    """Remove what ``op`` consumes: (items below its mark or the fixed items, the items above its mark)."""
    before, popped = op.stack_before, []
    n_below = len(before)
    if pickletools.stackslice in before:
        if not marks:
            raise ZsadError(f"{where} is malformed (no mark for {op.name})")
        m = marks.pop()
        popped = stack[m:]
        del stack[m:]
        n_below = before.index(pickletools.markobject)
    if len(stack) < n_below:
        raise ZsadError(f"{where} is malformed (stack underflow at {op.name})")
    below = stack[len(stack) - n_below:] if n_below else []
    del stack[len(stack) - n_below:]
    return below, popped


def scan_pickle(data: bytes, where: str = "the pickle") -> None:
    """Check ``data`` opcode by opcode before it is unpickled (module docstring, step 2)."""
    stack: list[int] = []  # nesting depth of each item the unpickler's stack would hold
    marks: list[int] = []
    memo: dict[int, int] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in REFUSED_OPCODES:
                raise ZsadError(f"{where} uses the opcode {name}, which torch.save never writes: refused")
            if name == "MARK":
                marks.append(len(stack))
                continue
            below, popped = _pop(op, stack, marks, where)
            if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not stack or not isinstance(arg, int) or arg > len(data):
                    raise ZsadError(f"{where}: memo index {describe(arg)} in a {len(data)}-byte pickle: refused (the "
                                    f"unpickler would allocate a memo that large)")
                memo[arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, 0) if isinstance(arg, int) else 0)
            elif name in ("DUP", "MEMOIZE"):
                stack.extend(below * (2 if name == "DUP" else 1))
                memo.update({len(memo): below[0]} if name == "MEMOIZE" else {})
            elif name in MUTATING_OPCODES:  # the container (first item below) now holds the popped items
                stack.append(max([below[0]] + [d + 1 for d in below[1:] + popped]))
            elif op.stack_after:  # a new object built from what was popped
                stack.append(max(below + popped) + 1 if below or popped else 0)
            if stack and stack[-1] > MAX_NESTING:
                raise ZsadError(f"{where} nests objects more than {MAX_NESTING} levels deep: refused")
    except ZsadError:
        raise
    except Exception as err:  # genops: truncated data, unknown opcode, bad argument
        raise ZsadError(f"{where} is malformed: {type(err).__name__}: {str(err)[:120]}") from err


# -- 3. what the unpickler may hand out ------------------------------------------------------------------------------
class _Frozen(type):
    """Metaclass of every class a pickle can name: a pickle's BUILD cannot set attributes on the class itself."""

    def __setattr__(cls, name, value):
        raise ZsadError(f"the pickle tried to set '{describe(name)}' on the class {cls.__name__}: refused")

    def __delattr__(cls, name):
        raise ZsadError(f"the pickle tried to delete '{describe(name)}' from the class {cls.__name__}: refused")


class ModuleState(metaclass=_Frozen):
    """Stand-in for a pickled ``nn.Module`` or TorchScript object: its class name and pickled state, as plain data."""

    qualname = "?"

    def __setstate__(self, state):
        self.__dict__["state"] = state if isinstance(state, dict) else {}

    def __setattr__(self, name, value):
        raise ZsadError(f"the pickle tried to set '{describe(name)}' on a {self.qualname}: refused")

    def tensors(self) -> dict[str, object]:
        """``state_dict``-style flat {name: TensorRef}: ``_parameters`` / ``_buffers`` / ``_modules`` of a pickled
        ``nn.Module``, or the tensor and module attributes of a TorchScript object. Walked without recursion; a
        module that contains itself, a tree deeper than ``MAX_MODULE_DEPTH`` or more than ``MAX_MODULES`` visits is
        refused."""
        out: dict[str, object] = {}
        todo: list[tuple[ModuleState, str, tuple[int, ...]]] = [(self, "", (id(self),))]
        visits = 0
        while todo:
            mod, prefix, path = todo.pop()
            visits += 1
            if visits > MAX_MODULES or len(path) > MAX_MODULE_DEPTH:
                raise ZsadError(f"pickled module {self.qualname}: more than {MAX_MODULES} module visits or "
                                f"{MAX_MODULE_DEPTH} levels: refused")
            state = mod.__dict__.get("state", {})
            if "_parameters" in state or "_modules" in state:  # a pickled nn.Module
                items = [(k, v) for g in ("_parameters", "_buffers") for k, v in _mapping(state.get(g), g)]
                children = list(_mapping(state.get("_modules"), "_modules"))
            else:  # a TorchScript object: parameters, buffers and submodules are its attributes
                items = [(k, v) for k, v in state.items() if isinstance(v, TensorRef)]
                children = [(k, v) for k, v in state.items() if isinstance(v, ModuleState)]
            for k, v in items:
                if v is None:
                    continue
                if not isinstance(v, TensorRef):
                    raise ZsadError(f"pickled module {self.qualname}: '{prefix}{describe(k)}' is a "
                                    f"{type(v).__name__}, not a tensor")
                out[prefix + str(k)] = v
            for k, child in reversed(children):
                if not isinstance(child, ModuleState):
                    continue
                if id(child) in path:
                    raise ZsadError(f"pickled module {self.qualname}: '{prefix}{k}' contains itself: refused")
                todo.append((child, f"{prefix}{k}.", path + (id(child),)))
        return out


def _mapping(value, what: str):
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ZsadError(f"pickled module: {what} is a {type(value).__name__}, not a mapping")
    for k in value:
        if not isinstance(k, str):
            raise ZsadError(f"pickled module: a {what} name is a {type(k).__name__}, not a string")
    return list(value.items())


class Inert(metaclass=_Frozen):
    """Record of a Lightning / Hydra / OmegaConf object: what it was built from; never calls anything."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.__dict__.update(args=args, kwargs=kwargs)

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setattr__(self, name, value):
        raise ZsadError(f"the pickle tried to set '{describe(name)}' on a {self.qualname}: refused")


class _Storage:
    """A storage entry of the archive, its size checked against the pickle's declaration."""

    __slots__ = ("archive", "name", "dtype", "numel")
    archive: Archive
    name: str
    dtype: torch.dtype
    numel: int

    def __init__(self, archive: Archive, name: str, dtype: torch.dtype, numel: int):
        for k, v in (("archive", archive), ("name", name), ("dtype", dtype), ("numel", numel)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name, value):
        raise ZsadError("the pickle tried to modify a storage record: refused")

    def __reduce__(self):
        raise ZsadError("a storage record cannot be pickled")


class TensorRef:
    """A tensor in the archive, read only by :func:`materialize`: storage, offset, size, stride (in elements).

    Checked on creation: sizes and strides are non-negative ints of one length, and offset + extent (the last element
    the view addresses) lies inside the storage. Immutable: a later BUILD in the pickle cannot re-point it.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "numel", "extent")
    storage: _Storage
    offset: int
    shape: torch.Size
    stride: tuple[int, ...]
    numel: int
    extent: int

    def __init__(self, storage: _Storage, offset, size, stride):
        where = f"{storage.archive.path}: tensor on storage {describe(storage.name)}"
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= 64
                and all(type(v) is int and v >= 0 for v in (offset, *size, *stride))):
            raise ZsadError(f"{where}: malformed size / stride / offset record")
        numel = 1
        for s in size:
            numel *= s
        extent = 0 if numel == 0 else 1 + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if offset + extent > storage.numel:
            raise ZsadError(f"{where}: the view (offset {offset}, size {size}, stride {stride}) reaches element "
                            f"{offset + extent} of a {storage.numel}-element storage: refused")
        for k, v in (("storage", storage), ("offset", offset), ("shape", torch.Size(size)), ("stride", stride),
                     ("numel", numel), ("extent", extent)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name, value):
        raise ZsadError("the pickle tried to modify a tensor record: refused")

    def __setstate__(self, state):
        raise ZsadError("the pickle tried to rebuild a tensor record's state: refused")

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def view_key(self) -> tuple:
        return (id(self.storage.archive), self.storage.name, self.storage.dtype, self.offset, self.shape, self.stride)

    def same_view(self, other) -> bool:
        """The same elements of the same storage entry (so equal without reading them)."""
        return isinstance(other, TensorRef) and other.view_key() == self.view_key()

    def load(self, shape) -> torch.Tensor:
        """The tensor, after its declared shape was found equal to ``shape``: reads only the bytes it spans."""
        if tuple(self.shape) != tuple(shape):
            raise ZsadError(f"{self.storage.archive.path}: tensor of shape {tuple(self.shape)} where "
                            f"{tuple(shape)} is expected: refused before reading it")
        if self.numel > self.storage.numel:
            raise ZsadError(f"{self.storage.archive.path}: a tensor of shape {tuple(self.shape)} (stride "
                            f"{self.stride}) repeats the {self.storage.numel} value(s) of its storage "
                            f"{self.numel} times over; a released checkpoint holds no such view: refused")
        size = self.dtype.itemsize
        raw = self.storage.archive.read(self.storage.name, self.offset * size, self.extent * size)
        flat = torch.frombuffer(raw, dtype=self.dtype) if raw else torch.empty(0, dtype=self.dtype)
        view = torch.as_strided(flat, self.shape, self.stride)
        return view if self.extent == self.numel and view.is_contiguous() else view.clone()


class _Guarded:
    """A callable the pickle may name: no state, no attribute assignment, no BUILD (no ``__dict__``)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise ZsadError(f"the pickle tried to set '{describe(name)}' on {type(self).__name__}: refused")


def _plain_pairs(arg, what: str):
    """``arg`` as (key, value) pairs when it is a plain container; anything else is refused (module docstring)."""
    if type(arg) is dict or type(arg) is StateDict:
        return list(arg.items())
    if type(arg) in (list, tuple) and all(type(p) is tuple and len(p) == 2 for p in arg):
        return list(arg)
    raise ZsadError(f"the pickle calls {what} with a {type(arg).__name__}: refused (only plain containers)")


class _Dict(_Guarded):
    def __call__(self, *args):
        if len(args) > 1:
            raise ZsadError("the pickle calls builtins.dict with several arguments: refused")
        return dict(_plain_pairs(args[0], "builtins.dict")) if args else {}


class _Set(_Guarded):
    def __call__(self, *args):
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple, set, frozenset)):
            raise ZsadError("the pickle calls builtins.set with something other than a plain sequence: refused")
        return set(args[0]) if args else set()


class _DefaultDict(_Guarded):
    """``defaultdict(factory)`` -> a plain dict: the factory is dropped, never kept to be called on a missing key."""

    def __call__(self, *args):
        if len(args) > 1:
            raise ZsadError("the pickle calls collections.defaultdict with several arguments: refused")
        return {}


class StateDict(OrderedDict):
    """What ``collections.OrderedDict`` becomes: a state dict's ``_metadata`` attribute is accepted and dropped."""

    def __setstate__(self, state):
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise ZsadError("the pickle sets attributes other than _metadata on an OrderedDict: refused")


class _OrderedDict(_Guarded):
    def __call__(self, *args):
        if len(args) > 1:
            raise ZsadError("the pickle calls collections.OrderedDict with several arguments: refused")
        return StateDict(_plain_pairs(args[0], "collections.OrderedDict")) if args else StateDict()


class _RebuildTensor(_Guarded):
    def __call__(self, storage=None, offset=None, size=None, stride=None, *_ignored):
        if not isinstance(storage, _Storage):
            raise ZsadError("malformed tensor record in the pickle")
        return TensorRef(storage, offset, size, stride)


class _RebuildParameter(_Guarded):
    def __call__(self, data=None, *_ignored):
        if not isinstance(data, TensorRef):
            raise ZsadError("malformed parameter record in the pickle")
        return data  # a Parameter is kept as its plain tensor


_REBUILD_TENSOR, _REBUILD_PARAMETER = _RebuildTensor(), _RebuildParameter()
_ALLOWED = {
    "torch._utils._rebuild_tensor_v2": _REBUILD_TENSOR,
    "torch._utils._rebuild_tensor": _REBUILD_TENSOR,
    "torch._utils._rebuild_parameter": _REBUILD_PARAMETER,
    "torch._utils._rebuild_parameter_with_state": _REBUILD_PARAMETER,
    "collections.OrderedDict": _OrderedDict(),
    "collections.defaultdict": _DefaultDict(),
    "builtins.dict": _Dict(),
    "builtins.set": _Set(),
}


def _stand_in(base: type, name: str) -> type:
    return _Frozen(name.rsplit(".", 1)[-1], (base,), {"qualname": name, "__module__": __name__})


def global_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 spells it (protocol-2 pickles name Python-2 modules: ``__builtin__.dict``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` allow-list (module docstring); storages come from the archive via ``persistent_load``."""

    def __init__(self, file, archive: Archive):
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str):
        full = global_name(module, name)
        if not full.isprintable():
            raise ZsadError(f"refused to load: the file names a global with unprintable characters {describe(full)}")
        if full in _ALLOWED:
            return _ALLOWED[full]
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if full.startswith(MODULE_CLASS_PREFIXES) and name[:1].isupper():
            return _stand_in(ModuleState, full)
        if full in INERT_NAMES or full.startswith(INERT_PREFIXES):
            return _stand_in(Inert, full)
        raise ZsadError(f"refused to load: the file asks for the global '{full[:120]}', which a "
                        f"released checkpoint never needs (nothing in the file was run)")

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise ZsadError(f"unsupported persistent id in the pickle: a {type(pid).__name__}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise ZsadError(f"unsupported storage type in the pickle: {describe(dtype)}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise ZsadError("malformed storage record in the pickle")
        entry = f"{self.archive.prefix}data/{key}"
        have = self.archive.entry_size(entry)
        if have is None:
            raise ZsadError(f"{self.archive.path}: storage {describe(key)} missing from the archive")
        if have != numel * dtype.itemsize:
            raise ZsadError(f"{self.archive.path}: storage {describe(key)} is declared as {numel} x {dtype} "
                            f"({numel * dtype.itemsize} bytes) but the archive holds {have} bytes: refused")
        return _Storage(self.archive, entry, dtype, numel)


def read_torch_file(path: str | Path):
    """The object in a ``torch.save`` / ``torch.jit.save`` file, read as the module docstring says: nothing from the
    file is run, and tensors come back as :class:`TensorRef` (read later by :func:`materialize`)."""
    path = Path(path)
    if not path.is_file():
        raise ZsadError(f"file not found: {path}")
    archive = Archive(path)
    data = bytes(archive.read(archive.prefix + "data.pkl"))
    scan_pickle(data, f"{path} (data.pkl)")
    try:
        return RestrictedUnpickler(io.BytesIO(data), archive).load()
    except ZsadError:
        raise
    except Exception as err:  # malformed pickle: say what, never a traceback
        raise ZsadError(f"could not read {path}: {type(err).__name__}: {str(err)[:160]}") from err


def materialize(value, shape) -> torch.Tensor:
    """A :class:`TensorRef` (or tensor) -> a plain CPU tensor, after its shape was found equal to ``shape``."""
    if isinstance(value, TensorRef):
        return value.load(shape)
    if isinstance(value, torch.Tensor):
        if tuple(value.shape) != tuple(shape):
            raise ZsadError(f"tensor of shape {tuple(value.shape)} where {tuple(shape)} is expected")
        return value.detach().cpu()
    raise ZsadError(f"expected a tensor, found {type(value).__name__}")


def shape_of(value) -> tuple[int, ...]:
    if isinstance(value, (TensorRef, torch.Tensor)):
        return tuple(value.shape)
    raise ZsadError(f"expected a tensor, found {type(value).__name__}")


def dtype_of(value) -> torch.dtype:
    if isinstance(value, (TensorRef, torch.Tensor)):
        return value.dtype
    raise ZsadError(f"expected a tensor, found {type(value).__name__}")


def same_tensor(a, b) -> bool:
    """Whether two tensors (already known to have equal shapes) hold equal values: the same stored view without
    reading it, else element by element."""
    if isinstance(a, TensorRef) and a.same_view(b):
        return True
    return torch.equal(materialize(a, shape_of(a)), materialize(b, shape_of(a)))
