"""segment.class_maps, segment.pairs, segment.augment and segment.data (the dataset), on tiny synthetic files."""
from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pretrain.intensity import scale_intensity
from pretrain.io import ImageReadError, read_raw, write_tiff
from segment import data as sd
from segment.augment import MicrographCLAHE, train_transform
from segment.class_maps import CLASS_MAPS, ClassMap, MaskError, MaskKind, get_class_map
from segment.data import SegmentationDataset
from segment.pairs import few_shot, find_pairs, select_by_name

BLUE, RED = (0, 0, 255), (255, 0, 0)


def _super_overlay(dtype: type = np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """An RGBA overlay on a gray image (as NASA Super) and its expected classes."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 10)).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[0, :3] = (254, 254, 254)  # almost white: gray, so matrix (near-blue: tests/test_reliability_inputs.py)
    rgb[1, :3] = (255, 255, 255)
    expected = np.zeros((12, 10), np.uint8)
    rgb[2:6, 2:6], expected[2:6, 2:6] = BLUE, 1
    rgb[8:10, 5:9], expected[8:10, 5:9] = RED, 2
    alpha = np.full((12, 10, 1), 255, np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    if dtype == np.uint16:
        rgba = rgba.astype(np.uint16) * 257
    return rgba, expected


def _gray(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


# --- class maps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_super_overlay_encodes_from_file(tmp_path: Path, dtype: type) -> None:
    rgba, expected = _super_overlay(dtype)
    path = write_tiff(tmp_path / f"x_{np.dtype(dtype).name}_mask.tif", rgba)
    label = CLASS_MAPS["super"].encode(read_raw(path), path)
    assert label.dtype == np.uint8 and label.shape == (12, 10)
    np.testing.assert_array_equal(label, expected)


def test_sixteen_bit_mask_is_compared_in_sixteen_bit_units() -> None:
    rgba, _ = _super_overlay(np.uint16)
    rgba[0, 0, :3] = BLUE  # 255 in a 16-bit file is a dark pixel, not pure blue: an unknown colour
    with pytest.raises(MaskError, match=r"\(0, 0, 255\) x 1 px.*16-bit"):
        CLASS_MAPS["super"].encode(rgba)


def test_ebc_index_mask_and_merged_oxide(tmp_path: Path) -> None:
    raw = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    path = write_tiff(tmp_path / "e#1 (2).tif", raw)
    np.testing.assert_array_equal(get_class_map("ebc").encode(read_raw(path), path), raw)
    np.testing.assert_array_equal(get_class_map("ebc_oxide").encode(raw), [[0, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(get_class_map("binary").encode(np.array([[0, 255, 1]], np.uint8)),
                                  [[0, 1, 1]])


def test_unknown_index_values_are_reported_with_counts(tmp_path: Path) -> None:
    raw = np.zeros((6, 6), np.uint8)
    raw[0, :3], raw[5, 5] = 7, 9
    path = tmp_path / "bad mask.tif"
    with pytest.raises(MaskError) as err:
        get_class_map("ebc").encode(raw, path)
    message = str(err.value)
    assert str(path) in message and "7 x 3 px" in message and "9 x 1 px" in message
    assert "4 of 36 pixels" in message
    assert isinstance(err.value, ValueError)


def test_unknown_colours_without_default() -> None:
    cm = ClassMap(["a", "b"], "color", colors=[(0, 0, 0), "#ff0000"])
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(MaskError, match=r"\(1, 2, 3\) x 1 px"):
        cm.encode(rgb, "m.png")


def test_mask_kind_mismatch_is_a_clear_error() -> None:
    with pytest.raises(MaskError, match="RGB or RGBA"):
        CLASS_MAPS["super"].encode(np.zeros((4, 4), np.uint8), "a.tif")
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 2] = 255
    with pytest.raises(MaskError, match="single-channel"):
        CLASS_MAPS["ebc"].encode(rgb, "a.tif")
    gray_rgb = np.repeat(np.array([[0, 2]], np.uint8)[..., None], 3, axis=2)  # index saved as RGB
    np.testing.assert_array_equal(CLASS_MAPS["ebc"].encode(gray_rgb), [[0, 2]])


def test_user_class_map_from_config_dict() -> None:
    spec = OmegaConf.create({"names": ["bg", "pore", "grain"], "values": [0, [1, 2], 5], "default": 0})
    cm = get_class_map(spec)
    assert cm.kind is MaskKind.INDEX and cm.values == [[0], [1, 2], [5]]
    np.testing.assert_array_equal(cm.encode(np.array([[0, 1, 2, 5, 99]], np.uint16)), [[0, 1, 1, 2, 0]])
    assert get_class_map(cm.to_dict()) == cm
    colour = get_class_map({"names": ["other", "phase"], "colors": [None, [0, 255, 0]], "default": 0})
    assert colour.kind is MaskKind.COLOR and len(colour.overlay_colors) == 2
    assert CLASS_MAPS["super"].overlay_colors[1:] == [BLUE, RED]


@pytest.mark.parametrize("spec, match", [
    ("nope", "presets"),
    ({"names": ["a"], "values": [[0]], "colour": 1}, "unknown keys"),
    ({"names": ["a", "b"], "kind": "rgb", "values": [[0], [1]]}, "kind"),
    ({"names": ["a", "b"], "values": [[0], [0]]}, "value 0"),
    ({"names": ["a", "b"], "colors": [None, (0, 0, 300)]}, "0..255"),
    ({"names": ["a", "b"], "colors": [None, (0, 0, 255)]}, "no colour"),
])
def test_bad_class_map_specs(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_class_map(spec)  # type: ignore[arg-type]


# --- pairing -------------------------------------------------------------------------------------


def test_nasa_layout_with_awkward_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train_annot").mkdir()
    for name in ("a#1 (2)", "b c"):
        write_tiff(tmp_path / "train" / f"{name}.tif", _gray((8, 8)))
    Image.fromarray(_super_overlay()[0]).save(tmp_path / "train_annot" / "a#1 (2)_mask.png")
    write_tiff(tmp_path / "train_annot" / "b c.tif", np.zeros((8, 8), np.uint8))  # EBC style
    write_tiff(tmp_path / "train_annot" / "orphan_mask.tif", np.zeros((8, 8), np.uint8))
    with caplog.at_level(logging.WARNING, logger="segment.pairs"):
        pairs = find_pairs(tmp_path, "train")
    assert [(i.name, m.name) for i, m in pairs] == [("a#1 (2).tif", "a#1 (2)_mask.png"),
                                                    ("b c.tif", "b c.tif")]
    assert "orphan_mask.tif" in caplog.text


def test_plain_layout_split_folders_and_flat(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / "images" / split / "sub").mkdir(parents=True)
        (tmp_path / "masks" / split / "sub").mkdir(parents=True)
        write_tiff(tmp_path / "images" / split / "sub" / "a#1 (2).tif", _gray((8, 8)))
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / split / "sub" / "a#1 (2).png")
    pairs = find_pairs(tmp_path, "val", layout="plain")
    assert len(pairs) == 1 and pairs[0][1] == tmp_path / "masks" / "val" / "sub" / "a#1 (2).png"
    with pytest.raises(FileNotFoundError, match=r"split folders \['train', 'val'\]"):
        find_pairs(tmp_path, "test")

    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "masks").mkdir()
    write_tiff(flat / "images" / "x.tif", _gray((8, 8)))
    write_tiff(flat / "masks" / "x_mask.tif", np.zeros((8, 8), np.uint8))
    assert [i.name for i, _ in find_pairs(flat, "train")] == ["x.tif"]
    with pytest.raises(FileNotFoundError, match="only provides split 'train'"):
        find_pairs(flat, "val")


def test_missing_mask_and_missing_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train_annot").mkdir()
    write_tiff(tmp_path / "train" / "lonely #3.tif", _gray((8, 8)))
    with pytest.raises(FileNotFoundError) as err:
        find_pairs(tmp_path, "train")
    message = str(err.value)
    assert str(tmp_path / "train" / "lonely #3.tif") in message
    assert str(tmp_path / "train_annot" / "lonely #3") in message  # where it looked
    with pytest.raises(FileNotFoundError, match=r"test.*holds: train/, train_annot/"):
        find_pairs(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        find_pairs(tmp_path / "absent", "train")


def _fake_pairs(n: int) -> list[tuple[Path, Path]]:
    return [(Path(f"/d/img{i:02d}.tif"), Path(f"/d/img{i:02d}_mask.tif")) for i in range(n)]


def test_few_shot_is_deterministic_nested_and_checked() -> None:
    pairs = _fake_pairs(10)
    one, three = few_shot(pairs, 3, seed=1), few_shot(list(reversed(pairs)), 3, seed=1)
    assert one == three and len(one) == 3
    assert set(few_shot(pairs, 2, seed=1)) <= set(one)
    assert len({tuple(few_shot(pairs, 3, seed=s)) for s in range(5)}) > 1
    assert few_shot(pairs, None, seed=0) == pairs
    with pytest.raises(ValueError, match="only 10"):
        few_shot(pairs, 11, seed=0)
    assert select_by_name(pairs, ["img03", "img01.tif"]) == [pairs[3], pairs[1]]
    with pytest.raises(ValueError, match="no image named 'zz'"):
        select_by_name(pairs, ["zz"])


# --- augmentation --------------------------------------------------------------------------------


def _block_mask(shape: tuple[int, int], block: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, (shape[0] // block + 1, shape[1] // block + 1)).astype(np.uint8)
    return np.kron(coarse, np.ones((block, block), np.uint8))[: shape[0], : shape[1]]


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds one class."""
    pad = np.pad(mask, 1, mode="edge")
    same = np.ones(mask.shape, bool)
    for dy in range(3):
        for dx in range(3):
            same &= pad[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
    return same


@pytest.mark.parametrize("strength, shape", [("light", (40, 48)), ("light", (20, 24)),
                                             ("default", (40, 48)), ("default", (20, 24))])
def test_geometric_augmentation_keeps_image_and_mask_aligned(strength: str, shape: tuple[int, int]) -> None:
    full = train_transform(32, strength=strength, seed=0)
    geometric = A.Compose([t for t in full.transforms if isinstance(t, A.DualTransform)],
                          mask_interpolation=full.mask_interpolation, seed=0)
    mask = _block_mask(shape)
    image = mask.astype(np.float32) / 2
    for _ in range(10):
        out = geometric(image=image, mask=mask)
        m, x = out["mask"], out["image"]
        assert m.shape == (32, 32) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1, 2}
        inner = _interior(m)
        assert inner.mean() > 0.3
        np.testing.assert_allclose(x[inner], m[inner] / 2, atol=1e-5)
        if strength == "light":
            np.testing.assert_array_equal(x, m / 2)  # no resampling at all


@pytest.mark.parametrize("strength", ["none", "light", "default"])
def test_full_augmentation_outputs(strength: str) -> None:
    transform = train_transform(16, strength=strength, seed=3)
    mask = _block_mask((30, 30), block=4)
    image = np.random.default_rng(0).random((30, 30), dtype=np.float32)
    for _ in range(20):
        out = transform(image=image, mask=mask)
        assert out["image"].shape[:2] == (16, 16) and out["image"].dtype == np.float32
        assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) <= {0, 1, 2}
        assert -1e-6 <= out["image"].min() and out["image"].max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="strength"):
        train_transform(16, strength="strong")


def test_clahe_keeps_levels_of_narrow_float_images() -> None:
    narrow = (np.linspace(1000, 3000, 64 * 64).reshape(64, 64) / 65535).astype(np.float32)
    ours = MicrographCLAHE(clip_limit=(2, 2), p=1)(image=narrow)["image"]
    theirs = A.CLAHE(clip_limit=(2, 2), p=1)(image=narrow)["image"]
    assert ours.dtype == np.float32 and len(np.unique(ours)) > 100 > len(np.unique(theirs))
    full = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    full[::2] = full[::2, ::-1]
    ours = MicrographCLAHE(clip_limit=(2, 2), p=1)(image=full.astype(np.float32) / 255)["image"]
    np.testing.assert_allclose(ours, A.CLAHE(clip_limit=(2, 2), p=1)(image=full)["image"] / 255, atol=1e-6)


# --- dataset -------------------------------------------------------------------------------------


def _ebc_pairs(tmp_path: Path, n: int = 2, shape: tuple[int, int] = (20, 24)) -> list[tuple[Path, Path]]:
    pairs = []
    for i in range(n):
        image = write_tiff(tmp_path / f"img {i}#.tif", _gray(shape, seed=i))
        mask = write_tiff(tmp_path / f"img {i}#_mask.tif", _block_mask(shape, block=4, seed=i))
        pairs.append((image, mask))
    return pairs


@pytest.mark.parametrize("in_chans", [1, 3])
def test_dataset_items(tmp_path: Path, in_chans: int) -> None:
    pairs = _ebc_pairs(tmp_path)
    # intensity="dtype": the scaling that was the default before data.intensity existed
    ds = SegmentationDataset(pairs, "ebc", in_chans=in_chans, mean=(0.5,), std=(0.25,), intensity="dtype")
    assert len(ds) == 2 and ds.paths == [p[0] for p in pairs]
    item = ds[1]
    assert item["image"].shape == (in_chans, 20, 24) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (20, 24) and item["mask"].dtype == torch.long and item["index"] == 1
    expected = (torch.from_numpy(_gray((20, 24), seed=1)).float() / 255 - 0.5) / 0.25
    for c in range(in_chans):
        torch.testing.assert_close(item["image"][c], expected)
    np.testing.assert_array_equal(ds.labels[1], item["mask"].numpy())
    assert ds.class_counts().sum() == 2 * 20 * 24

    crops = SegmentationDataset(pairs[:1], "ebc", in_chans=in_chans, samples_per_epoch=5,
                                transform=train_transform(16, strength="light", seed=0))
    assert len(crops) == 5
    items = [crops[i] for i in range(5)]
    assert {it["index"] for it in items} == {0}
    assert all(it["image"].shape == (in_chans, 16, 16) and it["mask"].shape == (16, 16) for it in items)


def test_dataset_intensity_modes(tmp_path: Path) -> None:
    """16-bit image using a narrow band of levels plus a hot pixel: "dtype" keeps it dark and
    flat, "percentile" (the default, as pretraining) stretches it to [0, 1] ignoring the hot pixel."""
    raw = np.linspace(1000, 3000, 20 * 24).astype(np.uint16).reshape(20, 24)
    raw[0, 0] = 65535
    image = write_tiff(tmp_path / "a.tif", raw)
    mask = write_tiff(tmp_path / "a_mask.tif", np.zeros((20, 24), np.uint8))
    by_dtype = SegmentationDataset([(image, mask)], "ebc", intensity="dtype", mean=(0.0,), std=(1.0,))
    by_pct = SegmentationDataset([(image, mask)], "ebc", mean=(0.0,), std=(1.0,))
    assert by_pct.intensity == "percentile"
    np.testing.assert_allclose(by_dtype.images[0], raw / 65535, rtol=1e-6)
    np.testing.assert_array_equal(by_pct.images[0], scale_intensity(raw, "percentile"))
    stretched = by_pct[0]["image"][0]
    assert stretched.min() == 0 and stretched.max() == 1 and 0.4 < float(stretched.median()) < 0.6
    assert float(by_dtype[0]["image"][0].median()) < 0.05
    # pretrain's encoder.json spelling is understood; anything else is a clear error
    assert SegmentationDataset([(image, mask)], "ebc", intensity="percentile_0.5_99.5").intensity == "percentile"
    with pytest.raises(ValueError, match="intensity must be"):
        SegmentationDataset([(image, mask)], "ebc", intensity="minmax")


def test_dataset_reseeds_augmentation_per_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = SegmentationDataset(_ebc_pairs(tmp_path, n=1), "ebc", samples_per_epoch=4,
                             transform=train_transform(8, strength="light", seed=0))
    crops = {}
    for seed in (11, 12, 11):
        ds._seeded_worker = None
        monkeypatch.setattr(sd, "get_worker_info", lambda s=seed: type("W", (), {"seed": s})())
        crops.setdefault(seed, []).append(torch.stack([ds[i]["image"] for i in range(4)]))
    assert torch.equal(crops[11][0], crops[11][1]) and not torch.equal(crops[11][0], crops[12][0])


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    image = write_tiff(tmp_path / "a.tif", _gray((10, 12)))
    mask = write_tiff(tmp_path / "a_mask.tif", np.zeros((10, 11), np.uint8))
    with pytest.raises(ValueError) as err:
        SegmentationDataset([(image, mask)], "ebc")
    assert all(s in str(err.value) for s in (str(image), str(mask), "10x12", "10x11"))


def test_unreadable_image_and_bad_mask_name_the_file(tmp_path: Path) -> None:
    image = tmp_path / "broken (1).tif"
    image.write_bytes(b"II*\x00 definitely not a tiff")
    mask = write_tiff(tmp_path / "broken (1)_mask.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageReadError, match=r"broken \(1\)\.tif"):
        SegmentationDataset([(image, mask)], "ebc")
    good = write_tiff(tmp_path / "ok.tif", _gray((4, 4)))
    bad_mask = write_tiff(tmp_path / "ok_mask.tif", np.full((4, 4), 5, np.uint8))
    with pytest.raises(MaskError, match="ok_mask.tif"):
        SegmentationDataset([(good, bad_mask)], "ebc", cache=False)[0]


# --- real data -----------------------------------------------------------------------------------


def test_real_nasa_masks_encode(shared_data: Path) -> None:
    nasa = shared_data / "nasa"
    super_pairs = find_pairs(nasa / "Super1", "train")
    ebc_pairs = find_pairs(nasa / "EBC1", "train")
    assert len(super_pairs) == 10 and len(ebc_pairs) == 16
    mask = super_pairs[0][1]
    counts = np.bincount(CLASS_MAPS["super"].encode(read_raw(mask), mask).ravel(), minlength=3)
    secondary, tertiary = counts[1:] / counts.sum()
    assert 0.40 <= secondary <= 0.56 and 0.01 <= tertiary <= 0.04
    mask = ebc_pairs[0][1]
    counts = np.bincount(CLASS_MAPS["ebc"].encode(read_raw(mask), mask).ravel(), minlength=3)
    assert counts.size == 3 and 0 < counts[2] / counts.sum() < 0.01
