"""Micrograph reading and writing shared by pretraining and segmentation.

One place decides how a file on disk becomes pixels: TIFF (8/16-bit, float32, gray/RGB/RGBA,
multi-page) through tifffile, PNG/JPEG through Pillow, native dtypes kept (16-bit data is never
silently rescaled, unlike OpenCV's default read). The physical pixel size is taken from SEM vendor
metadata (FEI/Thermo, Zeiss), ImageJ calibration or the TIFF resolution tags.
Every failure is an :class:`ImageReadError` whose message names the file and the reason.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "INTENSITY_MODES",
    "INTENSITY_PERCENTILES",
    "INTENSITY_SAMPLE_PIXELS",
    "INTENSITY_SPREADS",
    "ImageContentError",
    "ImageReadError",
    "MicrographWarning",
    "Micrograph",
    "list_images",
    "read_micrograph",
    "read_raw",
    "read_pixel_size_nm",
    "canonical_intensity",
    "check_finite",
    "check_not_constant",
    "intensity_range",
    "intensity_sample_stride",
    "intensity_window",
    "parse_intensity",
    "scale_intensity",
    "to_float",
    "write_tiff",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""File suffixes this module reads (matched case-insensitively)."""

INTENSITY_MODES = ("percentile", "zscore", "robust", "dtype")
"""How :func:`scale_intensity` maps raw pixels to [0, 1] (``DataConfig.intensity``, model.json,
encoder.json): a per-image window from percentiles, mean/std or median/MAD, or the dtype's range."""
INTENSITY_SPREADS = 3.0
"""``"zscore"``/``"robust"``: the window is centre +- this many spreads (std, or 1.4826 MAD), so
the default model normalisation ``(x - 0.5) / 0.25`` gives ``2/3`` of a z-score, clipped at 3 spreads."""
INTENSITY_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Percentiles mapped to 0 and 1 by the ``"percentile"`` mode (pretrain records them in encoder.json
as ``"percentile_0.5_99.5"``)."""
INTENSITY_SAMPLE_PIXELS = 1 << 22
"""Images with more pixels get their percentiles from an ``[::s, ::s]`` subsample of at most about
this many pixels (:func:`intensity_sample_stride`)."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as Pillow's "L" conversion
# Length of one resolution unit in nanometres (TIFF ResolutionUnit; 4 and 5 are tifffile extensions).
_RESUNIT_NM = {2: 25.4e6, 3: 1e7, 4: 1e6, 5: 1e3}
_DEFAULT_DPI = (1.0, 72.0, 96.0)  # what software writes when it knows no scale: not a calibration
_LENGTH_UNIT_NM = {
    "pm": 1e-3, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "microns": 1e3,
    "mm": 1e6, "cm": 1e7, "m": 1e9,
}


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
    if not _is_tiff(path):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise ImageReadError(path, "not a readable TIFF (no image pages)")
            return _tiff_pixel_size_nm(tif)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, struct.error, ...
        raise ImageReadError(path, f"cannot read TIFF metadata ({exc})") from exc


def to_float(image: np.ndarray) -> np.ndarray:
    """``image`` as float32 in [0, 1]: integers divided by their dtype's maximum, floats clipped."""
    image = np.asarray(image)
    if image.dtype == bool:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        scaled = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
        return np.maximum(scaled, 0.0, out=scaled)  # negative values of signed types -> 0
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise TypeError(f"to_float: unsupported dtype {image.dtype}")


# --- intensity scaling --------------------------------------------------------------------------


def canonical_intensity(spec: str) -> str:
    """An intensity setting in canonical form: ``"dtype"``, ``"zscore"``, ``"robust"``,
    ``"percentile"`` (the default percentiles; pretrain's ``"percentile_0.5_99.5"`` is the same) or
    ``"percentile_LO_HI"``.

    Raises ValueError naming the accepted values.
    """
    text = str(spec).strip().lower()
    mode, percentiles = parse_intensity(text)
    if mode != "percentile":
        return mode
    return "percentile" if percentiles == INTENSITY_PERCENTILES else text


def parse_intensity(spec: str, percentiles: tuple[float, float] = INTENSITY_PERCENTILES,
                     ) -> tuple[str, tuple[float, float]]:
    """An intensity setting -> ``(mode, percentiles)``, mode one of :data:`INTENSITY_MODES`;
    ``"percentile_LO_HI"`` (pretrain's encoder.json form) overrides ``percentiles``."""
    text = str(spec).strip().lower()
    if text in INTENSITY_MODES:
        return text, (float(percentiles[0]), float(percentiles[1]))
    if text.startswith("percentile_"):
        parts = text[len("percentile_"):].split("_")
        try:
            lo, hi = (float(v) for v in parts)
        except ValueError:
            lo, hi = -1.0, -1.0
        if 0.0 <= lo < hi <= 100.0:
            return "percentile", (lo, hi)
    raise ValueError(f"intensity must be 'percentile' (per-image {INTENSITY_PERCENTILES[0]:g}/"
                     f"{INTENSITY_PERCENTILES[1]:g} percentile stretch), 'percentile_LO_HI', 'zscore' "
                     f"(per-image mean +- {INTENSITY_SPREADS:g} std), 'robust' (median +- "
                     f"{INTENSITY_SPREADS:g} x 1.4826 MAD) or 'dtype' (divide by the dtype's maximum), "
                     f"got {spec!r}")


def intensity_sample_stride(height: int, width: int, max_pixels: int = INTENSITY_SAMPLE_PIXELS) -> int:
    """Row and column stride ``s`` so that ``image[::s, ::s]`` has at most about ``max_pixels``."""
    return max(1, math.ceil(math.sqrt(height * width / max_pixels)))


def intensity_range(image: np.ndarray, percentiles: tuple[float, float] = INTENSITY_PERCENTILES,
                    ) -> tuple[float, float]:
    """Values of ``image`` at ``percentiles``: ``(lo, hi)`` for :func:`scale_intensity`.

    Integer images up to 16 bits use nearest-rank percentiles from a histogram (O(pixels), no
    sort), other dtypes ``np.nanpercentile``. Images (``H x W`` or ``H x W x C``) larger than
    :data:`INTENSITY_SAMPLE_PIXELS` are subsampled ``[::s, ::s]`` first
    (:func:`intensity_sample_stride`). When the percentiles coincide the range widens to the
    sample's min/max; a constant image gives ``lo == hi``.
    """
    image = np.asarray(image)
    if image.size == 0:
        raise ValueError("empty image")
    if image.ndim >= 2:
        stride = intensity_sample_stride(image.shape[0], image.shape[1])
        if stride > 1:
            image = image[::stride, ::stride]
    flat = image.reshape(-1)
    if flat.dtype == bool:
        flat = flat.view(np.uint8)
    q = np.asarray(percentiles, dtype=np.float64) / 100.0
    if flat.dtype in (np.uint8, np.uint16):
        cdf = np.cumsum(np.bincount(flat, minlength=256))
        ranks = np.clip(np.ceil(q * flat.size).astype(np.int64), 1, flat.size)
        lo, hi = (float(v) for v in np.searchsorted(cdf, ranks))
    else:
        lo, hi = (float(v) for v in np.nanpercentile(flat.astype(np.float64), 100.0 * q))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("image has no finite values")
    if hi <= lo:
        finite = flat if flat.dtype.kind in "biu" else flat[np.isfinite(flat)]
        lo, hi = float(finite.min()), float(finite.max())
    return lo, hi


def intensity_window(image: np.ndarray, intensity: str = "percentile",
                     percentiles: tuple[float, float] = INTENSITY_PERCENTILES) -> tuple[float, float] | None:
    """The per-image window ``(lo, hi)`` that :func:`scale_intensity` maps to ``(0, 1)``; None for
    ``"dtype"`` (a fixed map). Computed on the subsample :func:`intensity_range` takes, so a
    streamed image gets the same window from the same pixels (``segment.stream``).

    ``"percentile"``: :func:`intensity_range`. ``"zscore"``: mean +- :data:`INTENSITY_SPREADS` std.
    ``"robust"``: median +- :data:`INTENSITY_SPREADS` x 1.4826 MAD (the std when half the pixels
    share one value, so MAD is 0). A constant image gives ``lo == hi``.
    """
    mode, percentiles = parse_intensity(intensity, percentiles)
    if mode == "dtype":
        return None
    if mode == "percentile":
        return intensity_range(image, percentiles)
    image = np.asarray(image)
    if image.size == 0:
        raise ValueError("empty image")
    if image.ndim >= 2:
        stride = intensity_sample_stride(image.shape[0], image.shape[1])
        image = image[::stride, ::stride]
    flat = image.reshape(-1).astype(np.float64)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        raise ValueError("image has no finite values")
    if mode == "zscore":
        centre, spread = float(flat.mean()), float(flat.std())
    else:
        centre = float(np.median(flat))
        spread = 1.4826 * float(np.median(np.abs(flat - centre)))
        if spread <= 0:
            spread = float(flat.std())
    return centre - INTENSITY_SPREADS * spread, centre + INTENSITY_SPREADS * spread


def check_finite(image: np.ndarray, path: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`ImageContentError` naming ``path`` if a float ``image`` holds NaN or +-Inf.

    Integer images pass at no cost. NaN would otherwise flow through the intensity mapping into
    the model (and read as "the model produced NaN"); Inf would silently clip to 0 or 1.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "fc" or bool(np.isfinite(image).all()):
        return
    n_bad = int((~np.isfinite(image)).sum())
    n_nan = int(np.isnan(image).sum())
    n_inf = n_bad - n_nan
    parts = ", ".join(f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
    raise ImageContentError(path, f"{n_bad} of {image.size} pixels are not finite numbers ({parts}; "
                                  f"{image.dtype} image): replace them before use (e.g. with the "
                                  f"image's minimum) or crop them away")


def check_not_constant(image: np.ndarray, path: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`ImageContentError` naming ``path`` if every pixel of ``image`` has one value.

    A blank frame (failed acquisition, all-black export) has nothing to segment or learn from, and
    the intensity mapping turns it into zeros that a model would label confidently anyway.
    """
    image = np.asarray(image)
    if image.size and not bool((image != image.flat[0]).any()):
        raise ImageContentError(path, f"constant image (every one of its {image.size} pixels is "
                                      f"{image.flat[0].item()!r}): a blank or failed acquisition?")


def scale_intensity(image: np.ndarray, mode: str = "percentile",
                    percentiles: tuple[float, float] = INTENSITY_PERCENTILES, *,
                    value_range: tuple[float, float] | None = None,
                    path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Raw pixels -> float32 in [0, 1]; the one intensity mapping of pretraining and segmentation.

    Per-image modes (``"percentile"``, ``"zscore"``, ``"robust"``): ``(x - lo) / (hi - lo)`` clipped
    to [0, 1] with the window ``lo, hi`` = :func:`intensity_window` (a constant image gives zeros),
    the same for 8-bit, 16-bit and float data and insensitive to brightness/contrast offsets
    between microscopes. ``value_range=(lo, hi)`` skips the window computation (e.g. a window
    computed once for a whole image streamed in tiles). ``"percentile_LO_HI"`` (as pretrain's
    encoder.json writes it) sets the percentiles.
    ``mode="dtype"``: :func:`to_float` (integers divided by their dtype's maximum, floats clipped).
    Every path to a model passes here, so this is where NaN/Inf pixels are refused
    (:func:`check_finite`, an :class:`ImageContentError` naming ``path``).
    """
    kind, percentiles = parse_intensity(mode, percentiles)
    image = np.asarray(image)
    check_finite(image, path)
    if kind == "dtype":
        return to_float(image)
    lo, hi = value_range if value_range is not None else intensity_window(image, kind, percentiles)
    if not hi > lo:  # constant image (or a degenerate given range)
        return np.zeros(image.shape, np.float32)
    out = np.asarray(image, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


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


TMP_SUFFIX = ".tmp"
"""Temporary files and folders of :func:`atomic_path` / :func:`atomic_dir` are ``.NAME.XXXX.tmp``
beside their final name (what :func:`remove_stale_temps` looks for)."""


def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc/self/status``).

    Elsewhere it is set and restored at once (``os.umask``), which is racy only against another
    thread changing the umask at the same moment.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: ``0o666`` (files) or ``0o777``
    (folders) less the umask.

    ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700, which a rename would carry to outputs that
    colleagues on a shared drive then cannot read.
    """
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The one way this project writes a file so that it appears complete or not at all. The file gets
    the permissions the user's umask gives a new file (:func:`apply_umask`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (an older folder there is
    removed), on failure it is removed. The folder equivalent of :func:`atomic_path`; the folder and
    everything in it get the umask's modes (some writers, e.g. safetensors, create 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        for p in (tmp, *tmp.rglob("*")):
            if not p.is_symlink():
                apply_umask(p)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> None:
    """Move a completed temp folder to its final name, replacing an older one."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete the temporaries (``.*.tmp``) that a killed :func:`atomic_path`/:func:`atomic_dir`
    left anywhere under ``folder``; returns how many. Not while another process writes there."""
    n = 0
    for p in sorted(Path(folder).rglob(f".*{TMP_SUFFIX}"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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


def _is_tiff(path: Path) -> bool:
    """Sniff the TIFF signature, so that a mis-named file still goes to the right decoder."""
    with path.open("rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def _decode(path: Path, *, want_pixel_size: bool,
            palette_as_colour: bool) -> tuple[np.ndarray, float | None]:
    """Pixels of the first page (channels last) and, for TIFF, the pixel size in nm."""
    _check_file(path)
    try:
        is_tiff = _is_tiff(path)
    except OSError as exc:
        raise ImageReadError(path, f"cannot open ({exc})") from exc
    if is_tiff:
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
            pixel_size = _tiff_pixel_size_nm(tif) if want_pixel_size else None
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


# --- pixel size ---------------------------------------------------------------------------------


def _tiff_pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    """First valid pixel size among the sources, in the order of :func:`read_pixel_size_nm`."""
    sources: tuple[Callable[[tifffile.TiffFile], float | None], ...] = (
        _fei_pixel_size_nm, _zeiss_pixel_size_nm, _imagej_pixel_size_nm, _resolution_pixel_size_nm)
    for source in sources:
        try:
            value = source(tif)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
            logger.debug("%s: %s gave no pixel size (%r)", tif.filehandle.path, source.__name__, exc)
            continue
        if value is not None and math.isfinite(value) and value > 0:
            return float(value)
    return None


def _fei_pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    """FEI/Thermo Fisher SEM: ``[Scan] PixelWidth`` in metres."""
    meta = tif.fei_metadata
    if not meta:
        return None
    return float(meta["Scan"]["PixelWidth"]) * 1e9


def _zeiss_pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    """Zeiss SEM (CZ_SEM tag): ``ap_image_pixel_size`` = (name, value, unit)."""
    meta = tif.sem_metadata
    if not meta or "ap_image_pixel_size" not in meta:
        return None
    entry = meta["ap_image_pixel_size"]
    value, unit = entry[1], (entry[2] if len(entry) > 2 else "nm")
    return float(value) * _unit_nm(unit)


def _imagej_pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    """ImageJ calibration: XResolution in pixels per the description's ``unit``."""
    meta = tif.imagej_metadata
    if not meta or "unit" not in meta:
        return None
    unit = str(meta["unit"])
    if unit.lower() in ("pixel", "pixels", "inch", ""):
        return None
    return _unit_nm(unit) / _x_resolution(tif)


def _resolution_pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    """XResolution with a physical ResolutionUnit; default dpi values are ignored."""
    tags = tif.pages.first.tags
    if "XResolution" not in tags:
        return None
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default is inch
    if unit not in _RESUNIT_NM:
        return None
    per_unit = _x_resolution(tif)
    if unit == 2 and any(math.isclose(per_unit, dpi) for dpi in _DEFAULT_DPI):
        return None
    return _RESUNIT_NM[unit] / per_unit


def _x_resolution(tif: tifffile.TiffFile) -> float:
    """Pixels per resolution unit from the XResolution rational."""
    numerator, denominator = tif.pages.first.tags["XResolution"].value
    return numerator / denominator


def _unit_nm(unit: str) -> float:
    """Nanometres in one ``unit`` ('nm', 'µm', 'micron', ...)."""
    key = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    if key in _LENGTH_UNIT_NM:
        return _LENGTH_UNIT_NM[key]
    if key.lower() in _LENGTH_UNIT_NM:
        return _LENGTH_UNIT_NM[key.lower()]
    raise ValueError(f"unknown length unit {unit!r}")
