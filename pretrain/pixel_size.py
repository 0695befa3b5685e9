"""Physical pixel size from TIFF metadata: SEM vendor tags (FEI/Thermo, Zeiss), ImageJ calibration,
or the resolution tags with a physical unit (software default dpi values are not calibrations)."""
from __future__ import annotations

import logging
import math
from typing import Callable

import tifffile

__all__ = ["tiff_pixel_size_nm"]

logger = logging.getLogger(__name__)

# Length of one resolution unit in nanometres (TIFF ResolutionUnit; 4 and 5 are tifffile extensions).
_RESUNIT_NM = {2: 25.4e6, 3: 1e7, 4: 1e6, 5: 1e3}
_DEFAULT_DPI = (1.0, 72.0, 96.0)  # what software writes when it knows no scale: not a calibration
_LENGTH_UNIT_NM = {
    "pm": 1e-3, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "microns": 1e3,
    "mm": 1e6, "cm": 1e7, "m": 1e9,
}


def tiff_pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    """First valid pixel size among the sources, in the order of :func:`pretrain.io.read_pixel_size_nm`."""
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
