"""The image decoder on hostile bytes: it decodes to 8-bit RGB or raises ZsadError, nothing else, in bounded time.

The served preprocess model calls decode_image on whatever clients send; any other exception would fail the
whole dynamic batch. Seeded header mutations of a small valid file of every format this Pillow can both open
and save, plus crafted cases (truncated, zero size, huge declared size), plus the float/16-bit range rule.
"""
import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from zsad import ZsadError
from zsad.data.io import DECODED_FORMATS, decode_image

FUZZ_MAX_PIXELS = 1_000_000  # keeps a mutated "4000x4000" header from decoding 16 M pixels per case


def _saved(fmt: str) -> bytes | None:
    """A small valid file of ``fmt`` (the first mode its plugin saves), or None if it cannot save one here."""
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for make in (lambda: Image.fromarray(pixels), lambda: Image.fromarray(pixels[..., 0]),
                 lambda: Image.fromarray(pixels).convert("P"), lambda: Image.fromarray(pixels[..., 0] > 127)):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # IM: "deprecated format"
                make().save(buf, fmt)
        except Exception:  # noqa: BLE001 -- this plugin does not save this mode (or at all)
            continue
        return buf.getvalue()
    return None


def _seeds() -> dict[str, bytes]:
    Image.init()
    files = {fmt: data for fmt in sorted(set(Image.OPEN) & set(Image.SAVE)) if (data := _saved(fmt))}
    # the decoded formats again in their high-depth / odd modes, where the range rule and mode conversion run
    extra = {"PNG-I16": (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257, "PNG"),
             "TIFF-I16": (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200, "TIFF"),
             "TIFF-F": (np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), "TIFF")}
    for key, (arr, fmt) in extra.items():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        files[key] = buf.getvalue()
    return files


SEEDS = _seeds()


def _check(data: bytes, case: str) -> str:
    """decode_image must return an RGB image or raise a short, one-line ZsadError."""
    try:
        img = decode_image(data, FUZZ_MAX_PIXELS, "image 0")
    except ZsadError as err:
        msg = str(err)
        assert "\n" not in msg and len(msg) < 300, (case, msg)
        return "refused"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.size > 0, (case, arr.shape)
    return "decoded"


def test_seed_files_cover_the_decoded_formats():
    # every format decode_image accepts has a seed, and the seeds themselves decode (so mutations start valid)
    for fmt in DECODED_FORMATS:
        assert fmt in SEEDS, fmt
        assert _check(SEEDS[fmt], fmt) == "decoded", fmt
    assert len(SEEDS) >= 20  # this Pillow opens and saves about two dozen formats


def test_mutated_headers_only_raise_zsad_error():
    rng = np.random.default_rng(20261129)
    outcomes, cases, t0 = {"decoded": 0, "refused": 0}, 0, time.perf_counter()
    for name, seed in SEEDS.items():
        rounds = 120 if name.split("-")[0] in DECODED_FORMATS else 24
        for r in range(rounds):
            data = bytearray(seed)
            span = min(len(data), 96 if r % 3 else len(data))  # mostly the header, sometimes anywhere
            for pos in rng.integers(0, span, int(rng.integers(1, 5))):
                data[pos] = int(rng.integers(0, 256)) if r % 2 else data[pos] ^ (1 << int(rng.integers(0, 8)))
            if r % 5 == 4:
                data = data[: int(rng.integers(1, len(data)))]
            outcomes[_check(bytes(data), f"{name} round {r}")] += 1
            cases += 1
    seconds = time.perf_counter() - t0
    print(f"{cases} mutated files: {outcomes}, {seconds:.1f} s")
    assert cases >= 1000 and outcomes["refused"] > 0 and seconds < 60


def _png(width: int, height: int, bit_depth: int = 8, colour: int = 2, idat: bytes = b"") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_crafted_files():
    # a valid hand-made PNG decodes: 2x1 RGB, filter byte 0 per row
    good = _png(2, 1, idat=zlib.compress(b"\x00" + bytes([10, 20, 30, 40, 50, 60])))
    assert np.asarray(decode_image(good)).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    # every truncation of it is refused (or, for none, decoded)
    for n in range(1, len(good)):
        _check(good[:n], f"truncated to {n}")
    with pytest.raises(ZsadError, match="empty image data"):
        decode_image(b"")
    with pytest.raises(ZsadError):
        decode_image(_png(0, 5))
    # a huge declared size is refused from the header, before any pixel buffer exists (so: fast)
    t0 = time.perf_counter()
    with pytest.raises(ZsadError, match="100000x600 pixels, above the limit of 50,000,000"):
        decode_image(_png(100_000, 600, idat=zlib.compress(b"\x00" * 1000)))
    with pytest.raises(ZsadError, match="decompression bomb"):  # Pillow's own check, already in open()
        decode_image(_png(100_000, 100_000, idat=zlib.compress(b"\x00" * 1000)))
    bmp = bytearray(SEEDS["BMP"])
    bmp[18:26] = struct.pack("<ii", 6_000, 6_000)
    with pytest.raises(ZsadError, match="above the limit"):
        decode_image(bytes(bmp), 10_000_000)
    assert time.perf_counter() - t0 < 1.0
    # formats outside the decoded set are refused by name, not handed to their plugins
    with pytest.raises(ZsadError, match="not a PNG, JPEG"):
        decode_image(SEEDS["ICO"])
    with pytest.raises(ZsadError, match="not a PNG, JPEG"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


def _tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF")
    return buf.getvalue()


def test_float_and_high_depth_range_rule():
    # floats in [0, 1] scale by 255 (hand-computed: 0.5 * 255 = 127.5 -> 128, 0.2 * 255 = 51)
    arr = np.array([[0.0, 0.2, 0.5, 1.0]], np.float32)
    out = np.asarray(decode_image(_tiff(arr)))
    assert out[..., 0].tolist() == [[0, 51, 128, 255]] and (out == out[..., :1]).all()
    # one value above 1 used to decode the rest almost black; now the file is refused, naming the range
    with pytest.raises(ZsadError, match=r"float image with values in \[0, 1\.5\]"):
        decode_image(_tiff(np.array([[0.0, 0.5, 1.5]], np.float32)))
    with pytest.raises(ZsadError, match=r"values in \[-0\.25, 0\.5\]"):
        decode_image(_tiff(np.array([[-0.25, 0.5]], np.float32)))
    with pytest.raises(ZsadError, match="NaN or infinite"):
        decode_image(_tiff(np.array([[0.0, np.nan]], np.float32)))
    # 16-bit: value / 257 (65535 -> 255, 32896 -> 128, 257 -> 1)
    out = np.asarray(decode_image(_tiff(np.array([[65535, 32896, 257, 0]], np.uint16))))
    assert out[..., 0].tolist() == [[255, 128, 1, 0]]
    # 32-bit integer TIFF declares 32 bits: 3 * 2**29 / (2**32 - 1) * 255 = 95.625 -> 96; negatives are refused
    out = np.asarray(decode_image(_tiff(np.array([[3 * 2**29, 0]], np.int32))))
    assert out[..., 0].tolist() == [[96, 0]]
    with pytest.raises(ZsadError, match=r"values in \[-5, 7\]"):
        decode_image(_tiff(np.array([[-5, 7]], np.int32)))
