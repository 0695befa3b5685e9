"""Micrograph reading and writing shared by pretraining and segmentation.

One place decides how a file on disk becomes pixels: TIFF (8/16-bit, float32, gray/RGB/RGBA,
multi-page) through tifffile, PNG/JPEG through Pillow, native dtypes kept (16-bit data is never
silently rescaled, unlike OpenCV's default read). The physical pixel size is taken from SEM vendor
metadata (FEI/Thermo, Zeiss), ImageJ calibration or the TIFF resolution tags
(:mod:`pretrain.pixel_size`). How pixels then become [0, 1] is :mod:`pretrain.intensity`; how files are
written atomically is :mod:`pretrain.outputs`. Every failure is an :class:`ImageReadError` whose message names the file and the reason.
"""
from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from pretrain.outputs import atomic_path
from pretrain.pixel_size import tiff_pixel_size_nm

__all__ = [
    "decode_image",
    "IMAGE_SUFFIXES",
    "PathLike",
    "ImageContentError",
    "ImageReadError",
    "MicrographWarning",
    "Micrograph",
    "is_tiff",
    "list_images",
    "read_micrograph",
    "read_raw",
    "read_pixel_size_nm",
    "write_tiff",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
"""A file or folder name as the commands take it."""

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""File suffixes this module reads (matched case-insensitively)."""


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as Pillow's "L" conversion


class ImageReadError(ValueError):
    """A micrograph could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageContentError(ImageReadError):
    """A micrograph was read but its pixels cannot be used (NaN/Inf, one value everywhere).

    A problem of the file, not of a model: the message names the file (or ``<image array>``).
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        ValueError.__init__(self, f"{path if path is not None else '<image array>'}: {reason}")
        self.path = Path(path) if path is not None else None  # type: ignore[assignment]
        self.reason = reason


class MicrographWarning(UserWarning):
    """A file was read, but not all of it was used as stored (extra pages, colour to gray)."""


@dataclass
class Micrograph:
    """Pixels of one micrograph and what is known about them.

    ``image`` is HxW, or HxWx3 for true colour read with ``gray=False``, in the file's dtype
    (uint8, uint16 or float32). ``bit_depth`` is the bits per sample of that dtype.
    ``pixel_size_nm`` is the physical pixel width in nanometres, or None when the file has none.
    """

    image: np.ndarray
    path: Path
    bit_depth: int
    pixel_size_nm: float | None


def list_images(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Sorted paths of the readable images under ``folder``.

    Hidden files (names starting with '.', e.g. macOS '._x.tif' resource forks) are skipped.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not an existing folder")
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        p for p in candidates
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def read_micrograph(path: str | os.PathLike[str], *, gray: bool = True) -> Micrograph:
    """Read one micrograph as an intensity image in its native dtype.

    Alpha is dropped; colour channels that are all equal collapse to HxW. With ``gray=True`` true
    colour is converted with BT.601 luminance weights (dtype kept, :class:`MicrographWarning`);
    with ``gray=False`` it is returned as HxWx3. Multi-page files give their first page (warned).
    """
    path = Path(path)
    pixels, pixel_size = _decode(path, want_pixel_size=True, palette_as_colour=True)
    image = _as_intensity(pixels, path, gray=gray)
    return Micrograph(image=image, path=path, bit_depth=image.dtype.itemsize * 8,
                      pixel_size_nm=pixel_size)


def read_raw(path: str | os.PathLike[str]) -> np.ndarray:
    """Pixels as stored: every channel (RGBA kept), palette images as their indices.

    Meant for masks (colour overlays, index maps). Bilevel images become uint8 0/1.
    """
    path = Path(path)
    pixels, _ = _decode(path, want_pixel_size=False, palette_as_colour=False)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    return pixels


def read_pixel_size_nm(path: str | os.PathLike[str]) -> float | None:
    """Physical pixel width in nanometres from a TIFF's metadata, or None when it has none.

    Sources, first found wins: FEI/Thermo ``[Scan] PixelWidth`` (metres), Zeiss
    ``ap_image_pixel_size``, ImageJ calibration unit + XResolution, XResolution with an inch,
    centimetre (or tifffile's millimetre/micrometre) ResolutionUnit. Unit NONE and the software
    defaults 1/72/96 dpi are not calibrations and give None. PNG and JPEG give None.
    """
    path = Path(path)
    _check_file(path)
    if not is_tiff(path):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise ImageReadError(path, "not a readable TIFF (no image pages)")
            return tiff_pixel_size_nm(tif)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, struct.error, ...
        raise ImageReadError(path, f"cannot read TIFF metadata ({exc})") from exc


def write_tiff(path: str | os.PathLike[str], image: np.ndarray,
               pixel_size_nm: float | None = None) -> Path:
    """Write ``image`` (HxW, HxWx3 or HxWx4) as a deflate-compressed TIFF, atomically.

    With ``pixel_size_nm`` the resolution tags are set in pixels per centimetre so that
    :func:`read_pixel_size_nm` gives the value back. The file appears complete or not at all
    (temporary file in the same folder, then ``os.replace``). Parent folders are created.
    """
    path = Path(path)
    image = np.asarray(image)
    if image.ndim == 2:
        photometric, extrasamples = "minisblack", None
    elif image.ndim == 3 and image.shape[-1] in (3, 4):
        photometric, extrasamples = "rgb", (("unassalpha",) if image.shape[-1] == 4 else None)
    else:
        raise ValueError(f"{path}: cannot write image of shape {image.shape} (need HxW, HxWx3 or HxWx4)")
    kwargs: dict[str, Any] = {}
    if pixel_size_nm is not None:
        if not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
            raise ValueError(f"{path}: pixel_size_nm must be a positive number, got {pixel_size_nm}")
        res = _rational(1e7 / pixel_size_nm, path)
        kwargs.update(resolution=(res, res), resolutionunit="CENTIMETER")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, image, photometric=photometric, extrasamples=extrasamples,
                         compression="zlib", **kwargs)
    return path


def _rational(value: float, path: Path) -> tuple[int, int]:
    """``value`` as the closest TIFF RATIONAL (two uint32) so that resolutions round-trip."""
    limit = 2**32 - 1
    if not 0 < value < limit:
        raise ValueError(f"{path}: resolution {value} pixels/cm does not fit a TIFF rational")
    fraction = Fraction(value).limit_denominator(max(1, int(limit // (value + 1))))
    return fraction.numerator, fraction.denominator


# --- decoding ---------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    """Raise ImageReadError unless ``path`` is a non-empty file with a supported suffix."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported file type {path.suffix or '(no suffix)'!r}; "
                                   f"supported: {', '.join(IMAGE_SUFFIXES)}")
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")


def is_tiff(path: Path | bytes) -> bool:
    """Sniff the TIFF signature of a file (or of its bytes already read), so that a mis-named file still
    goes to the right decoder."""
    if isinstance(path, bytes):
        return path[:4] in _TIFF_MAGIC
    with path.open("rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def _decode(path: Path, *, want_pixel_size: bool,
            palette_as_colour: bool) -> tuple[np.ndarray, float | None]:
    """Pixels of the first page (channels last) and, for TIFF, the pixel size in nm."""
    _check_file(path)
    try:
        tiff = is_tiff(path)
    except OSError as exc:
        raise ImageReadError(path, f"cannot open ({exc})") from exc
    if tiff:
        return _decode_tiff(path, want_pixel_size=want_pixel_size,
                            palette_as_colour=palette_as_colour)
    return _decode_pillow(path, palette_as_colour=palette_as_colour), None


def _decode_tiff(path: Path, *, want_pixel_size: bool,
                 palette_as_colour: bool) -> tuple[np.ndarray, float | None]:
    """Read a TIFF with tifffile; fall back to Pillow for codecs tifffile lacks (LZW, JPEG
    without the optional imagecodecs package)."""
    try:
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            if not n_pages:
                raise ImageReadError(path, "not a readable TIFF (no image pages)")
            page = tif.pages.first
            pixel_size = tiff_pixel_size_nm(tif) if want_pixel_size else None
            try:
                pixels = page.asarray()
                if "S" in page.axes and page.axes.index("S") < page.axes.index("X"):
                    pixels = np.moveaxis(pixels, page.axes.index("S"), -1)  # planar -> HxWxC
            except Exception as exc:  # noqa: BLE001 - codec errors come in many types
                logger.debug("%s: tifffile could not decode (%s), trying Pillow", path, exc)
                try:
                    pixels = _decode_pillow(path, palette_as_colour=palette_as_colour)
                except ImageReadError:
                    raise ImageReadError(path, f"cannot decode TIFF pixels ({exc})") from exc
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, struct.error, ...
        raise ImageReadError(path, f"not a readable TIFF ({exc})") from exc
    if n_pages > 1:
        _warn(path, f"{n_pages} pages, using the first")
    return _squeeze(pixels), pixel_size


def _decode_pillow(path: Path, *, palette_as_colour: bool) -> np.ndarray:
    """Read PNG/JPEG (or a TIFF tifffile could not decode) keeping 16-bit gray as uint16."""
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                _warn(path, f"{img.n_frames} frames, using the first")
            img.load()
            is_png = path.suffix.lower() == ".png"
            if is_png and img.mode in ("RGB", "RGBA") and _png_bit_depth(path) == 16:
                _warn(path, "16-bit colour PNG: Pillow reduces it to 8 bits per channel")
            return _pillow_to_array(img, palette_as_colour=palette_as_colour)
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError(path, "not a recognised image (corrupt or wrong suffix)") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise ImageReadError(path, f"cannot decode image ({exc})") from exc


def _pillow_to_array(img: Image.Image, *, palette_as_colour: bool) -> np.ndarray:
    """A Pillow image as a numpy array in the narrowest lossless dtype."""
    mode = img.mode
    if mode == "P":
        if not palette_as_colour:
            return np.asarray(img)
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "PA", "La", "RGBa", "RGBX"):
        img = img.convert("RGBA" if mode in ("PA", "La", "RGBa") else "RGB")
    array = np.asarray(img)
    if mode == "I":  # 16-bit data opened as 32-bit integers (PNG holds at most 16 bits)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
            return array
        return array.astype(np.uint16)
    return array.astype(array.dtype.newbyteorder("=")) if not array.dtype.isnative else array


def _png_bit_depth(path: Path) -> int:
    """Bit depth from a PNG's IHDR chunk (byte 24), which Pillow does not report for colour."""
    with path.open("rb") as fh:
        header = fh.read(26)
    return header[24] if len(header) >= 26 else 8


def _squeeze(pixels: np.ndarray) -> np.ndarray:
    """Drop a singleton channel axis (HxWx1 -> HxW)."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        return pixels[..., 0]
    return pixels


def _as_intensity(pixels: np.ndarray, path: Path, *, gray: bool) -> np.ndarray:
    """HxW (or HxWx3 for true colour with ``gray=False``) intensity image in a supported dtype."""
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (2, 3, 4)):
        raise ImageReadError(path, f"unsupported pixel layout {pixels.shape} (expected HxW or HxWxC)")
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * np.uint8(255)
    elif np.issubdtype(pixels.dtype, np.floating) and pixels.dtype != np.float32:
        pixels = pixels.astype(np.float32)
    elif not np.issubdtype(pixels.dtype, np.number) or np.issubdtype(pixels.dtype, np.complexfloating):
        raise ImageReadError(path, f"unsupported sample type {pixels.dtype}")
    if pixels.ndim == 2:
        return pixels
    if pixels.shape[-1] == 2:  # gray + alpha
        return np.ascontiguousarray(pixels[..., 0])
    rgb = pixels[..., :3]  # alpha dropped
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    if not gray:
        return np.ascontiguousarray(rgb)
    _warn(path, "colour channels differ, converted to gray with luminance weights")
    return _luminance(rgb)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luminance of an HxWx3 image, in the input's dtype (integers rounded)."""
    y = rgb @ _LUMA
    if np.issubdtype(rgb.dtype, np.integer):
        info = np.iinfo(rgb.dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(rgb.dtype)
    return y.astype(rgb.dtype)


def _warn(path: Path, message: str) -> None:
    warnings.warn(f"{path}: {message}", MicrographWarning, stacklevel=2)


def decode_image(data: bytes, extension: str) -> np.ndarray:
    """Encoded image bytes -> ``H x W`` array in the stored dtype (uint8, uint16, float32, ...).

    PNG/JPEG through Pillow (16-bit gray stays uint16), TIFF through tifffile (first page).
    Colour is reduced to gray: equal channels collapse, others take BT.601 luminance.
    """
    ext = extension.lower().lstrip(".")
    if ext in ("tif", "tiff"):
        array = tifffile.imread(io.BytesIO(data), key=0)
    elif ext in ("png", "jpg", "jpeg"):
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "L", "I", "F"):
                array = np.asarray(img)
                if img.mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
                    array = array.astype(np.uint16)
            else:
                array = np.asarray(img.convert("L"))
    else:
        raise ValueError(f"not an image extension: {extension!r}")
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            array = rgb[..., 0]
        else:
            array = (rgb @ np.array([0.299, 0.587, 0.114])).astype(rgb.dtype)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"decoded image has unsupported shape {array.shape}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array
