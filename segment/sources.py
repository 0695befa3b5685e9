"""Row sources: the rows of one micrograph, read a band at a time (DESIGN.md 4).

Inputs are read row by row through a :class:`RowSource`: an uncompressed TIFF is memory-mapped,
a striped or tiled compressed TIFF is decoded one chunk row at a time, anything else is read
whole in its native dtype (still ``1/(4K)`` of the float map). :func:`open_source` picks one.
:func:`source_intensity_window` computes the intensity window of a whole source from a strided
read (once per image, so memory stays bounded), and :func:`thumbnail` a display preview;
:mod:`segment.stream` runs the tiles over a source's rows.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tifffile

from pretrain.intensity import (
    check_finite,
    intensity_sample_stride,
    intensity_window,
    parse_intensity,
    to_float,
)
from pretrain.io import ImageReadError, read_micrograph, read_pixel_size_nm

__all__ = [
    "RowSource",
    "ArraySource",
    "TiffSource",
    "CroppedSource",
    "open_source",
    "thumbnail",
    "source_intensity_window",
]

logger = logging.getLogger(__name__)


class RowSource(Protocol):
    """Rows of one micrograph: ``shape`` is ``(H, W)``; ``rows(y0, y1)`` gives ``y1 - y0`` rows
    (``h x W`` or ``h x W x C``) in the file's dtype."""

    path: Path | None
    pixel_size_nm: float | None

    @property
    def shape(self) -> tuple[int, int]: ...

    def rows(self, y0: int, y1: int) -> np.ndarray: ...

    def close(self) -> None: ...


class _SourceBase:
    path: Path | None = None
    pixel_size_nm: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def rows(self, y0: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles (nothing to do by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check(self, y0: int, y1: int) -> None:
        h = self.shape[0]
        if not 0 <= y0 <= y1 <= h:
            raise IndexError(f"rows [{y0}, {y1}) outside an image of {h} rows")


class ArraySource(_SourceBase):
    """Rows of an in-memory (or ``np.memmap``) ``H x W`` / ``H x W x C`` array."""

    def __init__(self, array: np.ndarray, path: str | os.PathLike[str] | None = None,
                 pixel_size_nm: float | None = None) -> None:
        if array.ndim not in (2, 3):
            raise ValueError(f"expected an H x W or H x W x C image, got shape {array.shape}")
        self.array = array
        self.path = Path(path) if path is not None else None
        self.pixel_size_nm = pixel_size_nm

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.array.shape[0]), int(self.array.shape[1])

    def rows(self, y0: int, y1: int) -> np.ndarray:
        self._check(y0, y1)
        return np.asarray(self.array[y0:y1])


class CroppedSource(_SourceBase):
    """The first ``height`` rows of another source (e.g. everything above an SEM data bar)."""

    def __init__(self, source: RowSource, height: int) -> None:
        if not 0 < height <= source.shape[0]:
            raise ValueError(f"crop height {height} outside 1..{source.shape[0]}")
        self.source = source
        self.height = int(height)
        self.path = source.path
        self.pixel_size_nm = source.pixel_size_nm

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.source.shape[1]

    def rows(self, y0: int, y1: int) -> np.ndarray:
        self._check(y0, y1)
        return self.source.rows(y0, y1)

    def close(self) -> None:
        self.source.close()


class TiffSource(_SourceBase):
    """Rows of the first page of a single-channel TIFF without reading the whole page.

    Uncompressed contiguous pages are memory-mapped; striped or tiled pages (any codec tifffile
    and imagecodecs decode: LZW, deflate, JPEG ...) are decoded one chunk row at a time, the last
    one cached. Raises :class:`ImageReadError` for files it cannot stream; :func:`open_source`
    then falls back to reading the whole image.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tif: Any = None
        self._memmap: np.ndarray | None = None
        self._cache: tuple[int, np.ndarray] | None = None
        try:
            self._tif = tifffile.TiffFile(self.path)
            page = self._tif.pages.first
            n_pages = len(self._tif.pages)
            shaped = tuple(page.shaped)  # (separate samples, depth, length, width, contig samples)
            dtype = np.dtype(page.dtype) if page.dtype is not None else None
            if shaped[0] != 1 or shaped[1] != 1 or shaped[4] != 1 or dtype is None \
                    or dtype.kind not in "uif" or dtype.itemsize > 4 or page.bitspersample not in (8, 16, 32):
                raise ImageReadError(self.path, f"not a streamable single-channel page (shape {page.shape}, "
                                                f"dtype {page.dtype}, {page.bitspersample} bits)")
            self._shape = (int(shaped[2]), int(shaped[3]))
            self.dtype = dtype
            if page.is_memmappable:
                self._memmap = tifffile.memmap(self.path, page=0, mode="r").reshape(self._shape)
                self._close_tif()
            else:
                self._page = page
                self._chunk_h = int(page.chunks[0])
                self._chunk_w = int(page.chunks[1]) if page.is_tiled else self._shape[1]
                self._grid = tuple(int(n) for n in page.chunked[:2])  # chunk rows, chunk columns
                self._chunk_row(0)  # probe the codec now rather than mid-stream
            if n_pages > 1:
                logger.warning("%s: %d pages, using the first", self.path, n_pages)
        except ImageReadError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile and codecs raise many types
            self.close()
            raise ImageReadError(self.path, f"cannot stream TIFF ({exc})") from exc
        self.pixel_size_nm = read_pixel_size_nm(self.path)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def memory_mapped(self) -> bool:
        return self._memmap is not None

    def rows(self, y0: int, y1: int) -> np.ndarray:
        self._check(y0, y1)
        if self._memmap is not None:
            return np.asarray(self._memmap[y0:y1])
        if y1 == y0:
            return np.zeros((0, self._shape[1]), self.dtype)
        ch = self._chunk_h
        r0, r1 = y0 // ch, (y1 - 1) // ch + 1
        block = np.concatenate([self._chunk_row(r) for r in range(r0, r1)]) if r1 - r0 > 1 \
            else self._chunk_row(r0)
        return block[y0 - r0 * ch : y1 - r0 * ch]

    def _chunk_row(self, r: int) -> np.ndarray:
        """Rows ``[r * chunk_h, (r + 1) * chunk_h)`` (clipped to the image), decoded."""
        if self._cache is not None and self._cache[0] == r:
            return self._cache[1]
        h, w = self._shape
        ch, cw = self._chunk_h, self._chunk_w
        n_cols = self._grid[1]
        out = np.zeros((min(ch, h - r * ch), w), self.dtype)
        page, fh = self._page, self._tif.filehandle
        try:
            for i in range(r * n_cols, (r + 1) * n_cols):
                offset, count = page.dataoffsets[i], page.databytecounts[i]
                if not count:
                    continue  # missing chunk: zeros, as tifffile fills them
                fh.seek(offset)
                seg, index, _ = page.decode(fh.read(count), i, jpegtables=page.jpegtables,
                                            jpegheader=page.jpegheader)
                if seg is None:
                    continue
                seg = np.asarray(seg).reshape(seg.shape[-3], seg.shape[-2])
                x0 = (i - r * n_cols) * cw
                rows, cols = min(seg.shape[0], out.shape[0]), min(seg.shape[1], w - x0)
                out[:rows, x0 : x0 + cols] = seg[:rows, :cols]
        except Exception as exc:  # noqa: BLE001 - codec errors come in many types
            raise ImageReadError(self.path, f"cannot decode rows {r * ch}..{r * ch + out.shape[0]} ({exc})") from exc
        self._cache = (r, out)
        return out

    def _close_tif(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def close(self) -> None:
        self._close_tif()
        self._memmap = None
        self._cache = None


def open_source(path: str | os.PathLike[str], *, gray: bool = True) -> RowSource:
    """The best :class:`RowSource` for a micrograph file.

    Single-channel TIFFs stream (memory-mapped or chunk by chunk); other files (PNG, JPEG, colour
    or exotic TIFFs) are read whole with :func:`pretrain.io.read_micrograph` in their native
    dtype. ``gray`` as in ``read_micrograph`` (False keeps true colour for 3-channel models).
    Raises :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            is_tiff = fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        is_tiff = False  # read_micrograph gives the precise error
    if is_tiff and path.suffix.lower() in (".tif", ".tiff"):
        try:
            return TiffSource(path)
        except ImageReadError as exc:
            logger.debug("%s", exc)  # not streamable: fall through to a whole read
    mg = read_micrograph(path, gray=gray)
    return ArraySource(mg.image, path=path, pixel_size_nm=mg.pixel_size_nm)


def thumbnail(source: RowSource, max_side: int = 2048, band: int = 1024) -> tuple[np.ndarray, int]:
    """A float32 [0, 1] preview subsampled by an integer stride so its longest side <= ``max_side``.

    Read band by band (nearest-neighbour subsampling, display only). Returns ``(image, stride)``.
    """
    h, w = source.shape
    stride = max(1, math.ceil(max(h, w) / max_side))
    return to_float(_strided(source, stride, band)), stride


def _strided(source: RowSource, stride: int, band: int = 1024) -> np.ndarray:
    """``image[::stride, ::stride]`` in the source's dtype, read ``band`` rows at a time."""
    h = source.shape[0]
    band = max(stride, band - band % stride)
    return np.concatenate([source.rows(y, min(y + band, h))[::stride, ::stride] for y in range(0, h, band)])


def source_intensity_window(source: RowSource, intensity: str = "percentile",
                            band: int = 1024) -> tuple[float, float] | None:
    """Intensity window ``(lo, hi)`` of a whole streamed image for ``scale_intensity(value_range=)``
    (None for ``"dtype"``, which needs none).

    Reads ``[::s, ::s]`` (``s`` from :func:`pretrain.intensity.intensity_sample_stride`, so at most about
    4M pixels are held) band by band and applies :func:`pretrain.intensity.intensity_window`; that is the
    subsample ``intensity_window`` itself takes of the whole image, so the result is the same.
    NaN/Inf in the sample raise an ``ImageContentError`` naming the file before any tile is run.
    """
    if parse_intensity(intensity)[0] == "dtype":
        return None
    h, w = source.shape
    sample = _strided(source, intensity_sample_stride(h, w), band)
    check_finite(sample, getattr(source, "path", None))
    return intensity_window(sample, intensity)
