"""pretrain.io: reading micrographs and masks in their native dtype, pixel sizes, errors."""
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pretrain.intensity import (
    canonical_intensity,
    intensity_range,
    intensity_sample_stride,
    scale_intensity,
    to_float,
)
from pretrain.io import (
    ImageReadError,
    Micrograph,
    MicrographWarning,
    list_images,
    read_micrograph,
    read_pixel_size_nm,
    read_raw,
    write_tiff,
)

RNG = np.random.default_rng(0)


def _gray(dtype: type, shape: tuple[int, int] = (12, 16)) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gray_tiff_round_trip_is_pixel_exact(tmp_path: Path, dtype: type) -> None:
    image = _gray(dtype)
    path = write_tiff(tmp_path / "a.tif", image, pixel_size_nm=2.5)
    m = read_micrograph(path)
    assert isinstance(m, Micrograph)
    assert m.image.dtype == dtype and m.bit_depth == np.dtype(dtype).itemsize * 8
    np.testing.assert_array_equal(m.image, image)
    assert m.path == path and m.pixel_size_nm == pytest.approx(2.5)
    assert not list(tmp_path.glob("*.tmp")), "atomic write left its temporary file"


def test_float32_tiff_kept(tmp_path: Path) -> None:
    image = RNG.random((8, 9), dtype=np.float32)
    m = read_micrograph(write_tiff(tmp_path / "f.tiff", image))
    assert m.image.dtype == np.float32 and m.bit_depth == 32
    np.testing.assert_array_equal(m.image, image)


def test_rgb_with_equal_channels_collapses(tmp_path: Path) -> None:
    gray = _gray(np.uint16)
    path = tmp_path / "rgb.TIF"  # upper-case suffix is accepted
    tifffile.imwrite(path, np.stack([gray] * 3, axis=-1), photometric="rgb", compression="zlib")
    m = read_micrograph(path)
    assert m.image.shape == gray.shape and m.image.dtype == np.uint16
    np.testing.assert_array_equal(m.image, gray)


def test_true_colour_to_gray_warns_and_keeps_dtype(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # pure-ish red: luminance 0.299 * 200 = 59.8
    path = write_tiff(tmp_path / "c.tif", rgb)
    with pytest.warns(MicrographWarning, match="c.tif"):
        m = read_micrograph(path)
    assert m.image.shape == (4, 5) and m.image.dtype == np.uint8
    assert (m.image == 60).all()
    colour = read_micrograph(path, gray=False)
    np.testing.assert_array_equal(colour.image, rgb)


def test_read_raw_keeps_rgba(tmp_path: Path) -> None:
    rgba = _gray(np.uint8, (6, 7, 4))
    path = write_tiff(tmp_path / "m.tif", rgba)
    raw = read_raw(path)
    assert raw.shape == (6, 7, 4)
    np.testing.assert_array_equal(raw, rgba)


def test_multipage_warns_and_returns_first_page(tmp_path: Path) -> None:
    stack = _gray(np.uint8, (3, 5, 6))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with pytest.warns(MicrographWarning, match=r"stack\.tif.*3 pages"):
        m = read_micrograph(path)
    np.testing.assert_array_equal(m.image, stack[0])
    with pytest.warns(MicrographWarning):
        np.testing.assert_array_equal(read_raw(path), stack[0])


def test_planar_rgb_tiff_is_channels_last(tmp_path: Path) -> None:
    rgb = _gray(np.uint8, (5, 6, 3))
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_raw(path), rgb)


def test_16bit_png_kept_uint16(tmp_path: Path) -> None:
    image = _gray(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(image).save(path)
    m = read_micrograph(path)
    assert m.image.dtype == np.uint16 and m.bit_depth == 16 and m.pixel_size_nm is None
    np.testing.assert_array_equal(m.image, image)


def test_jpeg_reads_as_gray_uint8(tmp_path: Path) -> None:
    image = np.full((16, 16), 128, np.uint8)
    path = tmp_path / "photo.jpeg"
    Image.fromarray(image).convert("RGB").save(path, quality=95)
    m = read_micrograph(path)
    assert m.image.shape == (16, 16) and m.image.dtype == np.uint8
    assert abs(int(m.image.mean()) - 128) <= 2


def test_palette_png_raw_gives_indices(tmp_path: Path) -> None:
    index = RNG.integers(0, 3, (6, 6)).astype(np.uint8)
    img = Image.frombytes("P", index.shape[::-1], index.tobytes())
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    path = tmp_path / "idx.png"
    img.save(path)
    np.testing.assert_array_equal(read_raw(path), index)


def test_pixel_size_from_resolution_tags(tmp_path: Path) -> None:
    path = tmp_path / "cal.tif"
    tifffile.imwrite(path, _gray(np.uint8), resolution=(4e6, 4e6), resolutionunit="CENTIMETER")
    assert read_pixel_size_nm(path) == pytest.approx(2.5)
    inch = tmp_path / "inch.tif"  # 2.5 nm/px = 10,160,000 px/inch
    tifffile.imwrite(inch, _gray(np.uint8), resolution=(10_160_000, 10_160_000), resolutionunit="INCH")
    assert read_pixel_size_nm(inch) == pytest.approx(2.5)


@pytest.mark.parametrize("kwargs", [
    {},  # tifffile default: (1, 1) with unit NONE
    {"resolution": (72, 72), "resolutionunit": "INCH"},  # software default, not a calibration
])
def test_no_pixel_size_without_calibration(tmp_path: Path, kwargs: dict) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _gray(np.uint8), **kwargs)
    assert read_pixel_size_nm(path) is None
    assert read_micrograph(path).pixel_size_nm is None


def test_pixel_size_from_sem_vendor_metadata(tmp_path: Path) -> None:
    fei = tmp_path / "fei.tif"
    tifffile.imwrite(fei, _gray(np.uint8), extratags=[
        (34682, "s", 0, "[User]\nUser=x\n[Scan]\nPixelWidth=1.5e-09\nPixelHeight=1.5e-09\n", True)])
    assert read_pixel_size_nm(fei) == pytest.approx(1.5)
    zeiss = tmp_path / "zeiss.tif"
    tifffile.imwrite(zeiss, _gray(np.uint8), extratags=[
        (34118, "s", 0, b"0\r\n0\r\nAP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = 0.25 \xb5m\r\n", True)])
    assert read_pixel_size_nm(zeiss) == pytest.approx(250.0)


def test_pixel_size_from_imagej_calibration(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, _gray(np.uint8), imagej=True, resolution=(80, 80), metadata={"unit": "um"})
    assert read_pixel_size_nm(path) == pytest.approx(12.5)


def test_lzw_tiff_falls_back_to_pillow(tmp_path: Path) -> None:
    image = _gray(np.uint16)
    path = tmp_path / "lzw.tif"
    Image.fromarray(image).save(path, compression="tiff_lzw")
    np.testing.assert_array_equal(read_micrograph(path).image, image)


def _corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 40)
    return path


def _garbage_png(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not an image at all")
    return path


def _truncated_png(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.png"
    Image.fromarray(_gray(np.uint8, (64, 64))).save(path)
    path.write_bytes(path.read_bytes()[:60])
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.tif"
    path.touch()
    return path


def _bmp(tmp_path: Path) -> Path:
    path = tmp_path / "image.bmp"
    Image.fromarray(_gray(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("make, reason", [
    (_corrupt, "TIFF"),
    (_garbage_png, "not a recognised image"),
    (_truncated_png, "cannot decode"),
    (_empty, "empty"),
    (_bmp, "unsupported file type"),
    (lambda tmp: tmp / "missing.png", "not found"),
])
@pytest.mark.parametrize("reader", [read_micrograph, read_raw, read_pixel_size_nm])
def test_bad_files_raise_image_read_error_naming_the_file(tmp_path: Path, make, reason, reader) -> None:
    path = make(tmp_path)
    if reader is read_pixel_size_nm and reason in ("not a recognised image", "cannot decode"):
        assert reader(path) is None  # metadata reader does not decode PNG pixels
        return
    with pytest.raises(ImageReadError, match=reason) as info:
        reader(path)
    assert path.name in str(info.value) and info.value.path == path
    assert isinstance(info.value, ValueError)


def test_to_float_scales_by_dtype() -> None:
    np.testing.assert_allclose(to_float(np.array([0, 255], np.uint8)), [0.0, 1.0])
    np.testing.assert_allclose(to_float(np.array([0, 65535, 32768], np.uint16)),
                               [0.0, 1.0, 32768 / 65535])
    np.testing.assert_allclose(to_float(np.array([-0.5, 0.25, 2.0], np.float64)), [0.0, 0.25, 1.0])
    np.testing.assert_allclose(to_float(np.array([-5, 2**31 - 1], np.int32)), [0.0, 1.0])
    assert to_float(np.zeros(3, np.uint16)).dtype == np.float32


def test_scale_intensity_8_bit() -> None:
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = scale_intensity(ramp)
    assert out.dtype == np.float32 and out.shape == ramp.shape and out.min() == 0 and out.max() == 1
    lo, hi = intensity_range(ramp)
    assert (lo, hi) == (1.0, 254.0)  # nearest-rank 0.5th / 99.5th percentiles of 256 levels
    np.testing.assert_allclose(out, np.clip((ramp - 1.0) / 253.0, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(scale_intensity(ramp, "dtype"), to_float(ramp))
    # a darker, lower-contrast copy (another microscope's settings) maps to nearly the same values
    dim = (ramp // 2 + 20).astype(np.uint8)
    assert np.abs(scale_intensity(dim) - out).max() < 0.01


def test_scale_intensity_16_bit_hot_pixel() -> None:
    ramp = np.linspace(1000, 3000, 1000).astype(np.uint16).reshape(20, 50)
    ramp[0, 0] = 65535  # hot pixel: clipped to 1, does not set the scale
    out = scale_intensity(ramp)
    assert out.min() == 0 and out.max() == 1 and 0.45 < float(np.median(out)) < 0.55
    lo, hi = intensity_range(ramp)
    assert 1000 <= lo < 1020 and 2980 < hi <= 3000
    np.testing.assert_array_equal(scale_intensity(ramp, value_range=(lo, hi)), out)
    assert float(np.median(scale_intensity(ramp, "dtype"))) < 0.05  # dtype scaling stays dark


def test_scale_intensity_constant_and_mostly_constant() -> None:
    for image in (np.full((4, 4), 128, np.uint8), np.full((3, 5), 7, np.uint16),
                  np.full((2, 2), 0.25, np.float32)):
        out = scale_intensity(image)
        assert out.dtype == np.float32 and not np.isnan(out).any() and (out == 0).all()
    assert (scale_intensity(np.ones((4, 4)), value_range=(1.0, 1.0)) == 0).all()
    # percentiles coincide (one bright pixel in 400): widened to min/max instead of zeros
    sparse = np.zeros((20, 20), np.uint8)
    sparse[3, 4] = 200
    out = scale_intensity(sparse)
    assert out[3, 4] == 1 and out.sum() == 1


def test_scale_intensity_float_images() -> None:
    rng = np.random.default_rng(0)
    floats = rng.normal(size=(64, 64)).astype(np.float32)
    out = scale_intensity(floats)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    lo, hi = np.percentile(floats.astype(np.float64), [0.5, 99.5])
    np.testing.assert_allclose(out, np.clip((floats - lo) / (hi - lo), 0, 1), atol=1e-5)
    # the stretch is invariant to linear changes of the input (brightness/contrast, bit depth)
    np.testing.assert_allclose(scale_intensity(3.0 * floats + 10.0), out, atol=1e-5)
    # "dtype" mode on floats clips, as to_float
    np.testing.assert_array_equal(scale_intensity(floats, "dtype"), np.clip(floats, 0, 1))


def test_scale_intensity_large_images_use_a_strided_sample() -> None:
    assert intensity_sample_stride(2048, 2048) == 1 and intensity_sample_stride(4096, 4096) == 2
    image = np.random.default_rng(1).integers(0, 4096, (4100, 4100)).astype(np.uint16)
    assert intensity_range(image) == intensity_range(image[::3, ::3])  # stride 3 for 16.8M pixels


def test_intensity_modes_and_errors() -> None:
    assert canonical_intensity("percentile") == "percentile"
    assert canonical_intensity("percentile_0.5_99.5") == "percentile"  # pretrain's encoder.json
    assert canonical_intensity(" DTYPE ") == "dtype"
    assert canonical_intensity("percentile_1_99") == "percentile_1_99"
    ramp = np.arange(1000, dtype=np.float32).reshape(20, 50)
    np.testing.assert_array_equal(scale_intensity(ramp, "percentile_1_99"),
                                  scale_intensity(ramp, "percentile", (1.0, 99.0)))
    for bad in ("minmax", "percentile_99_1", "percentile_x_y", ""):
        with pytest.raises(ValueError, match="intensity must be"):
            scale_intensity(ramp, bad)


def test_list_images_sorted_recursive_case_insensitive(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.tif", "sub/c.JPG", "sub/deep/d.tiff", "notes.txt", "x.bmp", "._a.tif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "a.tif", "b.PNG", "sub/c.JPG", "sub/deep/d.tiff"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.tif", "b.PNG"]
    with pytest.raises(NotADirectoryError, match="nowhere"):
        list_images(tmp_path / "nowhere")


@pytest.mark.real_data
def test_real_nasa_files(shared_data: Path) -> None:
    super4 = shared_data / "nasa" / "Super4"
    deep = super4 / "test" / "45kx_SE_15kV-etched_0.tif"
    m = read_micrograph(deep)
    assert m.image.shape == (512, 512) and m.image.dtype == np.uint16 and m.bit_depth == 16
    mask = read_raw(super4 / "test_annot" / "45kx_SE_15kV-etched_0_mask.tif")
    assert mask.shape == (512, 512, 4) and mask.dtype == np.uint16
    blue = (mask[..., 0] == 0) & (mask[..., 1] == 0) & (mask[..., 2] == 65535)
    assert 0.3 < blue.mean() < 0.6  # secondary gamma' fraction
    ebc = next(iter(sorted((shared_data / "nasa" / "EBC1" / "test_annot").glob("*.tif"))))
    index = read_raw(ebc)
    assert index.ndim == 2 and index.dtype == np.uint8 and set(np.unique(index)) <= {0, 1, 2}
    image = read_micrograph(shared_data / "nasa" / "EBC1" / "test" / ebc.name)
    assert image.image.shape == index.shape and image.image.dtype == np.uint8
