"""pretrain.synthetic: exact labels, realistic class fractions, shift knobs, NASA-layout writers."""
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as connected, regionprops

from pretrain.io import list_images, read_micrograph, read_pixel_size_nm, read_raw
from pretrain.synthetic import _image_seed, main, overlay_mask, write_nasa_set, write_unlabeled
from pretrain.synthetic_imaging import TEST_SHIFT, Shift
from pretrain.synthetic_materials import CLASS_NAMES, GENERATORS, coating, superalloy

SIZE = (128, 128)
CLEAN = Shift(noise=0.0, blur=0.0, drift=0.0)


def _decode_overlay(mask: np.ndarray) -> np.ndarray:
    """NASA Super mask -> label: pure blue = 1, pure red = 2, anything else = 0."""
    rgb = mask[..., :3].astype(int)
    top = np.iinfo(mask.dtype).max
    blue = (rgb[..., 0] == 0) & (rgb[..., 1] == 0) & (rgb[..., 2] == top)
    red = (rgb[..., 0] == top) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)
    return np.where(blue, 1, np.where(red, 2, 0)).astype(np.uint8)


def _high_freq(image: np.ndarray) -> float:
    image = image.astype(float)
    return float((image - ndi.gaussian_filter(image, 1.5)).std())


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_deterministic_per_seed(kind: str) -> None:
    generate = GENERATORS[kind]
    image, label = generate(SIZE, 7)
    again, label_again = generate(SIZE, 7)
    other, _ = generate(SIZE, 8)
    assert image.dtype == label.dtype == np.uint8 and image.shape == label.shape == SIZE
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(label, label_again)
    assert not np.array_equal(image, other)
    assert len(CLASS_NAMES[kind]) == 3


def test_superalloy_class_fractions() -> None:
    for seed in range(4):
        _, label = superalloy((256, 256), seed)
        fractions = np.bincount(label.ravel(), minlength=3) / label.size
        assert 0.40 <= fractions[1] <= 0.55, (seed, fractions)
        assert 0.01 <= fractions[2] <= 0.04, (seed, fractions)
        # Tertiary dots sit in the matrix channels: none touches a secondary precipitate.
        grown = ndi.binary_dilation(label == 2)
        assert not (grown & (label == 1)).any()
        sizes = [r.area for r in regionprops(connected(label == 2))]
        assert max(sizes) < 100  # small dots, not blobs


def test_coating_class_fractions_and_thin_cracks() -> None:
    for seed in range(4):
        _, label = coating((256, 256), seed)
        fractions = np.bincount(label.ravel(), minlength=3) / label.size
        assert 0.05 <= fractions[1] <= 0.25, (seed, fractions)
        assert 0.001 <= fractions[2] <= 0.01, (seed, fractions)
        crack = label == 2
        # Thin: a 3x3 erosion removes nearly all of it. Inside the oxide: the band around it.
        assert ndi.binary_erosion(crack, np.ones((3, 3))).sum() < 0.1 * crack.sum()
        rows, cols = np.nonzero(crack)
        in_band = label > 0
        first = in_band.argmax(axis=0)
        last = in_band.shape[0] - 1 - in_band[::-1].argmax(axis=0)
        assert ((rows >= first[cols]) & (rows <= last[cols])).all()
        assert (label[ndi.binary_dilation(crack)] == 1).any()
        # The oxide is one horizontal band: each column crosses it once.
        assert all(np.count_nonzero(np.diff((label[:, c] > 0).astype(int)) != 0) <= 2
                   for c in range(0, 256, 16))


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_label_edges_are_image_edges(kind: str) -> None:
    """Exactness: without blur/noise, intensity jumps exactly where the label changes."""
    image, label = GENERATORS[kind]((192, 192), 3, CLEAN)
    image = image.astype(int)
    change = label[:, 1:] != label[:, :-1]
    step = np.abs(image[:, 1:] - image[:, :-1])
    assert np.median(step[change]) >= 8
    assert np.median(step[~change]) <= 2
    # A label moved by one pixel no longer lines up with the image.
    shifted = np.roll(label, 1, axis=1)
    moved = shifted[:, 1:] != shifted[:, :-1]
    assert np.median(step[moved & ~change]) <= 2


def test_precipitate_contrast_and_invert() -> None:
    for seed in range(2):
        image, label = superalloy(SIZE, seed)
        assert image[label == 1].mean() < image[label == 0].mean() - 8  # gamma' darker (SE, etched)
        inverted, label_inv = superalloy(SIZE, seed, Shift(invert=True))
        np.testing.assert_array_equal(label, label_inv)
        assert inverted[label == 1].mean() > inverted[label == 0].mean() + 8
    image, label = coating(SIZE, 0)
    assert image[label == 1].mean() < image[label == 0].mean() - 20  # dark oxide band


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_shift_knobs_move_statistics(kind: str) -> None:
    generate = GENERATORS[kind]
    base, label = generate(SIZE, 1)
    flat, flat_label = generate(SIZE, 1, Shift(contrast=0.5))
    np.testing.assert_array_equal(label, flat_label)  # imaging knobs leave geometry alone
    assert flat.std() < 0.7 * base.std()
    assert _high_freq(generate(SIZE, 1, Shift(noise=3.0))[0]) > 1.5 * _high_freq(base)
    assert _high_freq(generate(SIZE, 1, Shift(blur=3.0, noise=0.0))[0]) < _high_freq(
        generate(SIZE, 1, Shift(noise=0.0))[0])
    assert generate(SIZE, 1, Shift(brightness=0.1))[0].mean() > base.mean() + 15
    assert generate(SIZE, 1, Shift(gamma=2.0))[0].mean() < base.mean() - 15
    steady = generate(SIZE, 1, Shift(drift=0.0))[0].astype(float)
    drift = {k: ndi.gaussian_filter(generate(SIZE, 1, Shift(drift=k))[0] - steady, 8).std()
             for k in (1.0, 3.0)}
    assert drift[3.0] > 2 * drift[1.0] > 0


def test_magnification_enlarges_precipitates() -> None:
    def mean_area(shift: Shift) -> float:
        areas = [r.area for seed in range(3)
                 for r in regionprops(connected(superalloy((256, 256), seed, shift)[1] == 1))]
        return float(np.mean(areas))

    assert mean_area(Shift(magnification=1.5)) > 1.6 * mean_area(Shift())


def test_shift_validation() -> None:
    with pytest.raises(ValueError, match="noise"):
        Shift(noise=-1)
    with pytest.raises(ValueError, match="magnification"):
        Shift(magnification=0)
    with pytest.raises(ValueError, match="size"):
        superalloy((8, 8), 0)


def test_overlay_mask_never_confuses_gray_with_class_colours() -> None:
    image = np.array([[0, 255, 255], [0, 128, 255]], np.uint8)
    label = np.array([[0, 0, 1], [2, 0, 0]], np.uint8)
    mask = overlay_mask(image, label)
    assert mask.shape == (2, 3, 4) and (mask[..., 3] == 255).all()
    np.testing.assert_array_equal(_decode_overlay(mask), label)


def test_write_nasa_set_superalloy(tmp_path: Path) -> None:
    root = write_nasa_set(tmp_path / "super", "superalloy", n_train=2, n_val=1, n_test=1,
                          n_shifted=2, size=(64, 80), seed=5)
    expected = {"train": 2, "val": 1, "test": 1, "different_test": 2}
    folders = sorted([*expected, *(f"{s}_annot" for s in expected)])
    assert sorted(p.name for p in root.iterdir()) == folders
    for split_index, (split, n) in enumerate(expected.items()):
        images = list_images(root / split)
        assert len(images) == n and len(list_images(root / f"{split}_annot")) == n
        shift = TEST_SHIFT if split == "different_test" else Shift()
        for i, path in enumerate(images):
            image, label = superalloy((64, 80), _image_seed(5, split_index, i), shift)
            micrograph = read_micrograph(path)
            np.testing.assert_array_equal(micrograph.image, image)
            assert micrograph.pixel_size_nm == pytest.approx(5.0 / shift.magnification, rel=1e-6)
            mask = read_raw(root / f"{split}_annot" / f"{path.stem}_mask.tif")
            assert mask.shape == (64, 80, 4) and mask.dtype == np.uint8
            np.testing.assert_array_equal(_decode_overlay(mask), label)
            other = _decode_overlay(mask) == 0
            np.testing.assert_array_equal(mask[..., 0][other], image[other])  # gray kept underneath


def test_write_nasa_set_coating_index_masks(tmp_path: Path) -> None:
    root = write_nasa_set(tmp_path / "ebc", "coating", n_train=1, n_val=1, n_test=1, n_shifted=1,
                          size=64, seed=2)
    path = list_images(root / "train")[0]
    mask_path = root / "train_annot" / path.name  # image and mask share the name, as EBC
    _, label = coating(64, _image_seed(2, 0, 0))
    mask = read_raw(mask_path)
    assert mask.ndim == 2 and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, label)
    assert read_pixel_size_nm(path) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="unknown kind"):
        write_nasa_set(tmp_path / "x", "granite")


def test_write_unlabeled_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_unlabeled(tmp_path / "corpus", 2, size=32, seed=1)
    kinds = [p.relative_to(root).parent.as_posix() for p in list_images(root)]
    assert kinds == ["coating"] * 2 + ["superalloy"] * 2
    first = read_micrograph(list_images(root)[0]).image
    again = write_unlabeled(tmp_path / "again", 2, size=32, seed=1, kinds=("coating",))
    np.testing.assert_array_equal(read_micrograph(list_images(again)[0]).image, first)

    out = main(["--kind", "coating", "--out", str(tmp_path / "cli"), "--n-train", "1", "--n-val", "0",
                "--n-test", "1", "--n-shifted", "0", "--size", "32", "48"])
    assert "wrote coating set" in capsys.readouterr().out and str(out) in str(tmp_path / "cli")
    assert read_micrograph(list_images(out / "train")[0]).image.shape == (32, 48)
    assert len(list_images(out / "test_annot")) == 1 and not list_images(out / "val")
    main(["--kind", "all", "--out", str(tmp_path / "u"), "--unlabeled", "1", "--size", "32"])
    assert len(list_images(tmp_path / "u")) == 2
