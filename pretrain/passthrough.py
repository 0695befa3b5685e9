"""Pass-through samples for the shard writer (``python -m pretrain.shards --passthrough``).

A micrograph already stored in a format the training loader decodes to the very array
:func:`pretrain.io.read_micrograph` gives (single-page gray uint8/uint16 TIFF, 8/16-bit gray PNG,
gray JPEG) is copied into the shard byte for byte instead of being decoded and re-encoded as PNG:
sharding then costs about what copying the files costs (``bench/shard_writer.py``).

Checks, per file: the header (tifffile / Pillow parse the tags, not the pixels) must show one page,
one gray sample of 8 or 16 bits, a 2-D shape, black-is-zero photometry; anything else (colour, RGB
with equal channels, palette, float, multi-page, inverted) takes the normal decode + re-encode path,
which collapses, converts and checks it, and stores it as a lossless zstd TIFF (``shard_write.encode_image(fast=True)``;
about 25x faster to write than PNG). Every ``check_every``-th file (by input index; 1 = all) is
also decoded twice, as the writer would read it and as the loader will (``pretrain.io.decode_image``
on the copied bytes), and the two must be equal. Copied files are hashed by their bytes for the
duplicate report (``bytes:`` prefix; re-encoded ones by their pixels), so among copied files only
byte-identical copies are reported; leave ``--passthrough`` off for the pixel-level report.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from pretrain.io import ImageReadError, decode_image, is_tiff, read_micrograph
from pretrain.pixel_size import tiff_pixel_size_nm

__all__ = ["PassInfo", "probe", "read_checked"]

_PIL_GRAY = {"L": ("uint8", 8), "I;16": ("uint16", 16), "I;16B": ("uint16", 16), "I;16L": ("uint16", 16)}
_EXT = {"PNG": "png", "JPEG": "jpg"}


@dataclass(frozen=True)
class PassInfo:
    """What the header says about a file that can be copied as it is."""

    ext: str  # the sample's member extension: tif, png or jpg
    height: int
    width: int
    dtype: str
    bit_depth: int
    pixel_size_nm: float | None


def probe(path: str | Path, data: bytes | None = None) -> PassInfo | None:
    """The header facts of ``path`` (read from ``data``, its bytes, when given) when it can be copied as it
    is, else None (re-encode it)."""
    path = Path(path)
    source = io.BytesIO(data) if data is not None else path
    try:
        if is_tiff(data if data is not None else path):
            with tifffile.TiffFile(source) as tif:
                if len(tif.pages) != 1:
                    return None
                page = tif.pages.first
                if (page.samplesperpixel != 1 or len(page.shape) != 2 or page.dtype not in (np.uint8, np.uint16)
                        or page.photometric != tifffile.PHOTOMETRIC.MINISBLACK):
                    return None
                return PassInfo("tif", int(page.shape[0]), int(page.shape[1]), page.dtype.name,
                                page.dtype.itemsize * 8, tiff_pixel_size_nm(tif))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as img:
                gray = _PIL_GRAY.get(img.mode)
                if img.format not in _EXT or gray is None or getattr(img, "n_frames", 1) != 1:
                    return None
                if img.format == "JPEG" and gray[1] != 8:
                    return None
                w, h = img.size
                return PassInfo(_EXT[img.format], h, w, gray[0], gray[1], None)
    except Exception:  # noqa: BLE001 - unreadable headers go the normal way, which reports them
        return None


def read_checked(path: str | Path, info: PassInfo, *, decode: bool, data: bytes | None = None) -> tuple[bytes, str]:
    """The file's bytes (``data`` when already read) and their hash (``bytes:`` + 16 hex digits of sha256).

    With ``decode``: the writer's reading (:func:`read_micrograph`) and the loader's decoding of
    the bytes (``pretrain.io.decode_image``) must agree with each other and with the header,
    or :class:`ImageReadError` says what differs."""
    path = Path(path)
    data = path.read_bytes() if data is None else data
    content = "bytes:" + hashlib.sha256(data).hexdigest()[:16]
    if not decode:
        return data, content

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = read_micrograph(path, gray=True).image
    loaded = decode_image(data, info.ext)
    if image.shape != (info.height, info.width) or image.dtype.name != info.dtype:
        raise ImageReadError(path, f"header says {info.height}x{info.width} {info.dtype}, pixels are "
                                   f"{image.shape} {image.dtype}")
    if loaded.shape != image.shape or loaded.dtype != image.dtype or not np.array_equal(loaded, image):
        raise ImageReadError(path, "the training loader would decode these bytes differently; re-encode it "
                                   "(without --passthrough)")
    return data, content
