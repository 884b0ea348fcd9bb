"""Bounded reading of released and CLIP weights files (issue 21 item 2).

Each crafted file goes through a real command (zsad-import, or zsad-eval's on-the-fly import) in a subprocess that
reports its own peak RSS (/proc VmHWM) when it exits. A crafted file must be refused in one line
(``error: ...``, no traceback), within seconds, with a peak no higher than a legitimate tiny import's plus a small
margin: the deflate bomb declares 2 GiB, the stride-0 view 40 GB, the nesting would crash CPython's hash with a C
stack overflow, the memo index would allocate 16 GiB, so anything but an early refusal shows. A SOWA checkpoint of
~300 MB with its bundled CLIP imports with a peak far below its size + 1 GB, and the shape tables the checks use are
compared with the modules they describe.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import types
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_import import (
    EMPTY_DICT,
    NONE,
    PROTO,
    SETITEM,
    STOP,
    TUPLE1,
    _adaptor_classes,
    _FakeModules,
    anomalyclip_file,
    crafted_file,
    op_str,
    sowa_file,
    tensor_record,
)
from torch import nn

from zsad import ZsadError
from zsad import load as zsad_load
from zsad.backbone import load_clip
from zsad.importers import read_torch_file
from zsad.importers.shapes import clip_state_shapes, trainable_shapes

ROOT = Path(__file__).resolve().parents[1]
# VmHWM is the process's own high-water mark. ru_maxrss is not: Linux carries it over execve from the memory the
# process had before (subprocess forks with vfork, so that is this pytest process's RSS), so it is printed, not used.
# The address space is capped at 8 GiB, so a crafted file that got through (or a mutant) cannot exhaust the machine.
PEAK = """
import atexit, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a regression fails with MemoryError, not the OOM killer
def peak():
    hwm = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
    print(f"PEAK_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {hwm}", file=sys.stderr)
atexit.register(peak)
"""
ENTRY = """
import importlib
entry, sys.argv = sys.argv[1], sys.argv[1:]
module, _, fn = entry.partition(":")
getattr(importlib.import_module(module), fn)()
"""
IMPORT = "zsad.importers.cli:main"
MARGIN_MB = 64  # a refusal may cost this much over a legitimate tiny import


class Run:
    def __init__(self, rc: int, lines: list[str], peak_mb: float, seconds: float):
        self.rc, self.lines, self.peak_mb, self.seconds = rc, lines, peak_mb, seconds

    def __repr__(self):
        return f"rc={self.rc} peak={self.peak_mb:.0f} MB {self.seconds:.1f} s stderr={self.lines}"


def run_python(code: str, *args, timeout: float = 120) -> Run:
    """``code`` with ``args`` in a fresh interpreter that reports its peak RSS (MB) when it exits."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", PEAK + code, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    seconds = time.monotonic() - t0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    peaks = [ln for ln in lines if ln.startswith("PEAK_KB ")]
    assert len(peaks) == 1, f"no peak report (rc {r.returncode}): {r.stderr[-2000:]}"
    kb = int(peaks[0].split()[2])  # VmHWM (see PEAK)
    return Run(r.returncode, [ln for ln in lines if not ln.startswith("PEAK_KB ")], kb / 1024, seconds)


def run(entry: str, *args, timeout: float = 120) -> Run:
    """The click command ``entry`` (module:function) with ``args``, as from its console script."""
    return run_python(ENTRY, entry, *args, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Run:
    """A legitimate tiny import through the same command: the peak every refusal is held to."""
    d = tmp_path_factory.mktemp("ref")
    anomalyclip_file(d / "epoch_15.pth", 128, depth=3)
    r = run(IMPORT, "--from", "anomalyclip", d / "epoch_15.pth", "--out", d / "ckpt", "--profile", "tiny")
    assert r.rc == 0, r
    return r


def assert_refused(r: Run, reference: Run, message: str) -> None:
    assert r.rc == 2, r
    assert len(r.lines) == 1 and r.lines[0].startswith("error: ") and message in r.lines[0], r
    assert r.seconds < 30, r
    assert r.peak_mb <= reference.peak_mb + MARGIN_MB, (r, reference)


# -- crafted files -------------------------------------------------------------------------------------------------
def hand_zip(path: Path, entries: list[tuple[str, bytes, int, int, int]], central: list[int] | None = None) -> Path:
    """A zip written field by field: entries (name, stored payload, method, crc, uncompressed size); ``central``
    lists which entries the central directory names (default: each once; repeats make overlapping entries)."""
    out, offsets = bytearray(), []
    for name, payload, method, crc, size in entries:
        offsets.append(len(out))
        n = name.encode()
        out += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(payload), size, len(n), 0)
        out += n + payload
    cd = bytearray()
    for k, i in enumerate(central if central is not None else range(len(entries))):
        name, payload, method, crc, size = entries[i]
        n = (name if central is None else f"{name}.{k}").encode()
        cd += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(payload), size, len(n),
                          0, 0, 0, 0, 0, offsets[i]) + n
    count = len(central) if central is not None else len(entries)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, len(cd), len(out), 0)
    path.write_bytes(bytes(out + cd + end))
    return path


def deflated_zeros(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``size`` zero bytes (a 1 MiB block, fully flushed, repeated) and its CRC-32."""
    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(mib)
    c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no back-reference before it
    crc = 0
    for _ in range(size >> 20):
        crc = zlib.crc32(mib, crc)
    return block * (size >> 20) + c.flush(), crc


ANOMALYCLIP_TINY = {"ctx_pos": (1, 1, 12, 128), "ctx_neg": (1, 1, 12, 128), "compound_prompts_text.0": (4, 128),
                    "compound_prompts_text.1": (4, 128), "token_prefix_pos": (1, 1, 1, 128)}


def anomalyclip_pickle(records: dict[str, bytes]) -> bytes:
    """{"prompt_learner": {name: record}} as data.pkl."""
    body = b"".join(op_str(k) + v + SETITEM for k, v in records.items())
    return PROTO + EMPTY_DICT + op_str("prompt_learner") + EMPTY_DICT + body + SETITEM + STOP


def contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(torch.Size(shape[i + 1:]).numel()) for i in range(len(shape)))


def deflate_bomb(path: Path) -> list:
    """AnomalyCLIP's layout whose ctx_pos storage is declared 2 GiB and stored as 2 GiB of zeros deflated (~2 MB)."""
    big = 1 << 31
    records, storages = {}, []
    for i, (k, shape) in enumerate(ANOMALYCLIP_TINY.items()):
        numel = big // 4 if k == "ctx_pos" else int(torch.Size(shape).numel())
        records[k] = tensor_record(str(i), numel, shape, contiguous(shape))
        storages.append((f"archive/data/{i}", numel * 4))
    entries = [("archive/data.pkl", anomalyclip_pickle(records), 0, 0, 0)]
    for name, size in storages:
        if size == big:
            payload, crc = deflated_zeros(big)
            entries.append((name, payload, 8, crc, big))
        else:
            entries.append((name, bytes(size), 0, zlib.crc32(bytes(size)), size))
    entries = [(n, p, m, zlib.crc32(p) if n.endswith(".pkl") else c, len(p) if n.endswith(".pkl") else s)
               for n, p, m, c, s in entries]
    hand_zip(path, entries)
    assert path.stat().st_size < 4 << 20
    return ["--from", "anomalyclip", path]


def stride0(path: Path) -> list:
    """ctx_pos declared 100000 x 100000 with stride (0, 0) over a one-value storage (40 GB if copied)."""
    records = {k: tensor_record(str(i), int(torch.Size(s).numel()), s, contiguous(s))
               for i, (k, s) in enumerate(ANOMALYCLIP_TINY.items())}
    records["ctx_pos"] = tensor_record("9", 1, (100000, 100000), (0, 0))
    storages = {str(i): bytes(4 * int(torch.Size(s).numel())) for i, s in enumerate(ANOMALYCLIP_TINY.values())}
    crafted_file(path, anomalyclip_pickle(records), {**storages, "9": bytes(4)})
    return ["--from", "anomalyclip", path]


def size_mismatch(path: Path) -> list:
    """A storage declared as 2**28 floats (1 GiB) whose archive entry holds 48 bytes."""
    records = {k: tensor_record(str(i), int(torch.Size(s).numel()), s, contiguous(s))
               for i, (k, s) in enumerate(ANOMALYCLIP_TINY.items())}
    records["ctx_neg"] = tensor_record("9", 1 << 28, (1, 1, 12, 128), contiguous((1, 1, 12, 128)))
    storages = {str(i): bytes(4 * int(torch.Size(s).numel())) for i, s in enumerate(ANOMALYCLIP_TINY.values())}
    crafted_file(path, anomalyclip_pickle(records), {**storages, "9": bytes(48)})
    return ["--from", "anomalyclip", path]


def self_containing(path: Path) -> list:
    """AF-CLIP's adaptor module whose submodule lists the adaptor itself (the pickle's memo makes the cycle)."""
    mod = _adaptor_classes()
    pkg = types.ModuleType("clip")
    pkg.adaptor = mod  # type: ignore[attr-defined]
    with _FakeModules({"clip": pkg, "clip.adaptor": mod}):
        adaptor = mod.Adaptor(128, 4, 32)
        adaptor.attention._modules["loop"] = adaptor
        torch.save(adaptor, path.with_name("mvtec_adaptor.pt"))
    torch.save(nn.Parameter(torch.zeros(1, 12, 128)), path.with_name("mvtec_prompt.pt"))
    return ["--from", "afclip", path.with_name("mvtec_prompt.pt"), path.with_name("mvtec_adaptor.pt")]


def deep_nesting(path: Path) -> list:
    """A dict key nested 100,000 tuples deep (hashing it overflows CPython's C stack: a segfault, not an error)."""
    crafted_file(path, PROTO + EMPTY_DICT + NONE + TUPLE1 * 100_000 + NONE + SETITEM + STOP)
    return ["--from", "anomalyclip", path]


def memo_bomb(path: Path) -> list:
    """LONG_BINPUT 0x7fffffff: the C unpickler would grow its memo to 2**32 slots (32 GiB)."""
    crafted_file(path, PROTO + NONE + b"r" + struct.pack("<I", 0x7FFFFFFF) + STOP)
    return ["--from", "anomalyclip", path]


def overlapping(path: Path) -> list:
    """One 1 MiB stored entry named 200 times by the central directory (200 MiB declared in a 1 MiB file)."""
    data = bytes(1 << 20)
    hand_zip(path, [("archive/data/0", data, 0, zlib.crc32(data), len(data))], central=[0] * 200)
    return ["--from", "anomalyclip", path]


def past_the_end(path: Path) -> list:
    """An entry whose declared (stored) size runs past the end of the file."""
    hand_zip(path, [("archive/data.pkl", PROTO + NONE + STOP, 0, 0, 1 << 30)])
    raw = bytearray(path.read_bytes())  # the local header keeps the real size, the central directory claims 1 GiB
    at = raw.index(b"PK\x01\x02")
    raw[at + 20:at + 28] = struct.pack("<II", 1 << 30, 1 << 30)
    path.write_bytes(bytes(raw))
    return ["--from", "anomalyclip", path]


def many_entries(path: Path) -> list:
    """70,000 archive entries (zip64 end record): counted from the end record and refused before parsing."""
    with zipfile.ZipFile(path, "w") as z:
        for i in range(70_000):
            z.writestr(f"archive/data/{i}", b"")
    return ["--from", "anomalyclip", path]


class Big:
    """Pickles as torch.save's record of a 100000 x 100000 fp16 view with stride (0, 0) over a one-value storage:
    OpenAI's CLIP files are fp16, and widening this one to float32 would allocate 40 GB."""

    def __reduce__(self):
        storage = torch.zeros(1, dtype=torch.float16)._typed_storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (100000, 100000), (0, 0), False, OrderedDict())


def lying_entry_count(path: Path) -> list:
    """The 70,000 entries again, the end records claiming 10: the parsed directory is counted too."""
    many_entries(path)
    raw = bytearray(path.read_bytes())
    at = raw.rindex(b"PK\x06\x06")  # the zip64 end record: entries on this disk / in total at +24 / +32
    raw[at + 24:at + 40] = struct.pack("<QQ", 10, 10)
    path.write_bytes(bytes(raw))
    return ["--from", "anomalyclip", path]


def clip_weights_stride0(path: Path) -> list:
    """A CLIP weights file for zsad-tiny whose token embedding is a :class:`Big` view, given as --clip-weights."""
    ok = path.with_name("epoch_15.pth")
    anomalyclip_file(ok, 128, depth=3)
    torch.save({k: Big() if k == "token_embedding.weight" else torch.zeros(v)
                for k, v in clip_state_shapes("zsad-tiny").items()}, path)
    return ["--from", "anomalyclip", ok, "--clip-weights", path]


def sowa_clip_stride0(path: Path) -> list:
    """SOWA's Lightning checkpoint whose bundled CLIP holds a :class:`Big` token embedding."""
    state = {k: torch.randn(v) for k, v in clip_state_shapes("zsad-tiny").items()}  # distinct blocks
    state["token_embedding.weight"] = Big()  # type: ignore[assignment]
    sowa_file(path, 128, 128, [1, 2, 3, 4], clip_state=state)
    return ["--from", "sowa", path]


def safetensors_lies(path: Path) -> list:
    """A .safetensors header declaring a 100000 x 100000 tensor over 4 bytes of data."""
    header = json.dumps({"token_embedding.weight": {"dtype": "F32", "shape": [100000, 100000],
                                                    "data_offsets": [0, 4]}}).encode()
    path = path.with_suffix(".safetensors")
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    ok = path.with_name("epoch_15.pth")
    anomalyclip_file(ok, 128, depth=3)
    return ["--from", "anomalyclip", ok, "--clip-weights", path]


CASES = {  # name: (builder, what the one-line error says)
    "deflate-bomb-2GiB": (deflate_bomb, "is compressed (zip method 8)"),
    "stride0-view": (stride0, "key 'ctx_pos' has shape (100000, 100000), expected (1, 1, 12, 128)"),
    "storage-size-mismatch": (size_mismatch, "declared as 268435456 x torch.float32 (1073741824 bytes) but the "
                                             "archive holds 48 bytes"),
    "self-containing-module": (self_containing, "contains itself"),
    "deep-nesting": (deep_nesting, "nests objects more than 200 levels deep"),
    "memo-bomb": (memo_bomb, "memo index 2147483647"),
    "overlapping-entries": (overlapping, "(overlapping entries)"),
    "entry-past-the-end": (past_the_end, "extends past the end"),
    "70000-entries": (many_entries, "70000 archive entries ("),  # counted from the end record, before parsing
    "lying-entry-count": (lying_entry_count, "70000 archive entries; at most 65536 are read"),
    "clip-weights-stride0": (clip_weights_stride0, "token_embedding.weight (100000, 100000) vs (49408, 128)"),
    "sowa-bundled-clip-stride0": (sowa_clip_stride0, "token_embedding.weight (100000, 100000) vs (49408, 128)"),
    "safetensors-header-lies": (safetensors_lies, "Could not read CLIP weights"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_crafted_file_is_refused_in_one_line_quickly_in_bounded_memory(tmp_path, reference, case):
    build, message = CASES[case]
    args = build(tmp_path / "crafted.pth")
    r = run(IMPORT, *args, "--out", tmp_path / "out", "--profile", "tiny")
    assert_refused(r, reference, message)
    assert not (tmp_path / "out" / "checkpoint.json").exists()


@pytest.mark.slow
def test_on_the_fly_import_refuses_a_bomb_given_as_checkpoint(tmp_path, reference):
    """zsad-eval --checkpoint RELEASED_FILE takes the same reader: the bomb is refused before any data is read."""
    args = deflate_bomb(tmp_path / "epoch_15.pth")
    r = run("zsad.evaluate_cli:main", "--checkpoint", args[-1], "--data", tmp_path)
    assert_refused(r, reference, "is compressed (zip method 8)")
    with pytest.raises(ZsadError, match="is compressed") as err:  # and in-process, for the library path
        zsad_load.sidecar(args[-1])
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_paper_profile_import_builds_no_model(tmp_path, reference):
    """Checking a paper-width AnomalyCLIP file against the ViT-L-14-336 profile costs no model (was ~2.2 GB)."""
    anomalyclip_file(tmp_path / "epoch_15.pth", 768)
    r = run(IMPORT, "--from", "anomalyclip", tmp_path / "epoch_15.pth", "--out", tmp_path / "ckpt")
    assert r.rc == 0, r
    assert r.peak_mb <= reference.peak_mb + MARGIN_MB, (r, reference)


def test_stride0_view_of_the_right_shape_is_refused_before_it_is_copied(tmp_path):
    """A view that passes the shape table but repeats one stored value (numel > storage) is refused by the storage
    check: no tensor may cost more than the bytes the file stores for it."""

    class Expanded:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (torch.zeros(1)._typed_storage(), 0, (49408, 128), (0, 0), False,
                                                     OrderedDict())

    state = {k: torch.zeros(s) for k, s in clip_state_shapes("zsad-tiny").items()}
    state["token_embedding.weight"] = Expanded()  # type: ignore[assignment]
    torch.save(state, tmp_path / "clip.pt")
    with pytest.raises(ZsadError, match=r"repeats the 1 value\(s\) of its storage 6324224 times"):
        load_clip("zsad-tiny", weights=tmp_path / "clip.pt")


def test_torchscript_clip_file_is_read_as_data(tmp_path, monkeypatch):
    """OpenAI's CLIP files are TorchScript archives (their code/ entries deflated): read as data, never
    torch.jit.load-ed (which would compile and run the archive's code), giving the same weights."""
    from zsad.importers.clipfile import clip_tensors

    visual = load_clip("zsad-tiny").clip.visual
    torch.jit.save(torch.jit.trace(visual, torch.zeros(1, 3, 224, 224)), tmp_path / "visual.pt")
    with zipfile.ZipFile(tmp_path / "visual.pt") as z:
        assert any(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())  # what torch.jit.save writes

    def no_jit(*_a, **_k):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    refs = clip_tensors(tmp_path / "visual.pt")
    want = visual.state_dict()
    assert set(refs) == set(want)
    for k, ref in refs.items():
        assert torch.equal(ref.load(want[k].shape), want[k]), k

    class WithMask(nn.Module):  # a tensor attribute that is no parameter or buffer (OpenAI's attn_mask is one)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))
            self.mask = torch.full((3,), 7.0)

        def forward(self, x):
            return x * self.weight + self.mask.sum()

    torch.jit.save(torch.jit.script(WithMask()), tmp_path / "mask.pt")
    assert set(clip_tensors(tmp_path / "mask.pt")) == {"weight", "mask"}
    assert set(clip_tensors(tmp_path / "mask.pt", {"weight": (2,)})) == {"weight"}


def test_a_tensor_record_is_read_only_at_its_expected_shape(tmp_path):
    """TensorRef.load compares the declared shape with the expected one before reading a byte."""
    data = PROTO + EMPTY_DICT + op_str("x") + tensor_record("0", 4, (4,), (1,)) + SETITEM + STOP
    ref = read_torch_file(crafted_file(tmp_path / "x.pt", data, {"0": struct.pack("<4f", 1, 2, 3, 4)}))["x"]
    assert torch.equal(ref.load((4,)), torch.tensor([1.0, 2, 3, 4]))
    with pytest.raises(ZsadError, match=r"shape \(4,\) where \(2, 2\) is expected: refused before reading it"):
        ref.load((2, 2))


def test_clip_file_keys_and_positional_grid_are_checked_at_import(tmp_path):
    """--clip-weights at import: an extra key, or a positional table that is no square grid, is refused by the
    table alone; another square grid of the same width is accepted (it is resized on loading)."""
    from zsad.importers import import_checkpoint

    anomalyclip_file(tmp_path / "a.pth", 128, depth=3)
    base = {k: torch.zeros(s) for k, s in clip_state_shapes("zsad-tiny").items()}
    for name, edit, message in (("extra", {"extra.weight": torch.zeros(3)}, r"1 unexpected \(e\.g\. 'extra\.weight'\)"),
                                ("grid", {"visual.positional_embedding": torch.zeros(150, 128)},
                                 r"visual\.positional_embedding \(150, 128\) vs \(197, 128\)")):
        save_file({**base, **edit}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ZsadError, match=message):
            import_checkpoint("anomalyclip", [tmp_path / "a.pth"], tmp_path / name, profile="tiny",
                              clip_weights=tmp_path / f"{name}.safetensors")
    save_file({**base, "visual.positional_embedding": torch.zeros(101, 128)}, str(tmp_path / "g10.safetensors"))
    out = import_checkpoint("anomalyclip", [tmp_path / "a.pth"], tmp_path / "ok", profile="tiny",
                            clip_weights=tmp_path / "g10.safetensors")
    assert (out / "checkpoint.json").is_file()


# -- real-size memory ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_300_mb_sowa_checkpoint_imports_far_below_its_size_plus_1_gb(tmp_path, reference):
    """SOWA with its bundled CLIP (a ViT of width 512, 8 + 8 layers: ~300 MB): the import reads and writes one
    tensor at a time, so its peak stays well under file size + 1 GB (it held every storage, a float copy of the
    CLIP, safetensors' byte copy and a built model before)."""
    from zsad._compat import import_open_clip

    cfg = json.loads((ROOT / "zsad" / "configs" / "clip" / "zsad-tiny.json").read_text())
    cfg["vision_cfg"].update(width=512, layers=8, head_width=64)
    cfg["text_cfg"].update(width=512, layers=8, heads=8)
    cfg["embed_dim"] = 512
    arch = tmp_path / "zsad-wide.json"
    arch.write_text(json.dumps(cfg))
    from zsad.backbone import resolve_arch

    clip = import_open_clip().create_model(resolve_arch(str(arch)), pretrained=None)
    state = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    del clip
    ckpt = tmp_path / "last.ckpt"
    sowa_file(ckpt, 512, 512, [1, 2, 3, 4], clip_state=state)
    size_mb = ckpt.stat().st_size / 2**20
    assert 250 < size_mb < 400
    script = (f"from zsad.importers import import_checkpoint; import_checkpoint('sowa', [{str(ckpt)!r}], "
              f"{str(tmp_path / 'ckpt')!r}, profile='tiny', overrides={{'backbone': {{'arch': {str(arch)!r}}}}})")
    r = run_python(script, timeout=300)
    assert r.rc == 0, r
    print(f"SOWA import: file {size_mb:.0f} MB, peak {r.peak_mb:.0f} MB, tiny reference {reference.peak_mb:.0f} MB, "
          f"{r.seconds:.1f} s")
    assert r.peak_mb < size_mb + 1024
    assert r.peak_mb - reference.peak_mb < 0.5 * size_mb + 100  # ~ one tensor over the baseline, not the file
    written = load_file(str(tmp_path / "ckpt" / "clip_weights.safetensors"))
    assert written.keys() == state.keys()
    assert all(torch.equal(written[k], state[k]) for k in state)


# -- the tables are the modules' shapes ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["zsad-tiny", "ViT-L-14-336", "ViT-B-16"])
def test_clip_shape_table_is_open_clips_state_dict(arch):
    from zsad._compat import import_open_clip
    from zsad.backbone import resolve_arch

    model = import_open_clip().create_model(resolve_arch(arch), pretrained=None, device="meta")  # shapes only
    assert clip_state_shapes(arch) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["anomalyclip", "afclip", "bayespfl", "sowa"])
def test_trainable_shape_table_is_the_methods_parameters(method):
    import zsad.methods as M

    m = M.create(method, "tiny", backbone={"pretrained": None})
    assert trainable_shapes(method, m.config) == {k: tuple(p.shape) for k, p in m.trainable_parameters().items()}
    wider = M.create(method, "tiny", backbone={"pretrained": None}, taps=[1, 3])
    assert trainable_shapes(method, wider.config) == {k: tuple(p.shape)
                                                      for k, p in wider.trainable_parameters().items()}


def test_clip_table_refuses_architectures_it_does_not_describe(tmp_path):
    cfg = json.loads((ROOT / "zsad" / "configs" / "clip" / "zsad-tiny.json").read_text())
    cfg["vision_cfg"]["ls_init_value"] = 1e-5  # layer scale adds ls_1 / ls_2 to every block
    arch = tmp_path / "zsad-ls.json"
    arch.write_text(json.dumps(cfg))
    with pytest.raises(ZsadError, match="no shape table for its options.*ls_init_value"):
        clip_state_shapes(str(arch))


def test_safetensors_clip_weights_are_checked_before_reading(tmp_path):
    """A .safetensors CLIP file with one wrong shape: refused naming it, by the header alone."""
    state = {k: torch.zeros(s) for k, s in clip_state_shapes("zsad-tiny").items()}
    state["visual.proj"] = torch.zeros(128, 64)
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ZsadError, match=r"shape mismatch: visual\.proj \(128, 64\) vs \(128, 128\)"):
        load_clip("zsad-tiny", weights=tmp_path / "clip.safetensors")
