"""segment.ood: features, k-NN + entropy score, threshold, the per-tile entropy, predict's OOD outputs."""
import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.synthetic_imaging import TEST_SHIFT
from pretrain.synthetic_materials import superalloy
from segment.checkpoint import save_model
from segment.infer import Predictor
from segment.models import create_model
import copy

from segment.ood import EntropyTiles, OODSummary, fit, image_entropy, load, native_tile, tile_features, tile_grid
from segment.batch import predict_paths
from segment.predict import main
from segment.records import PredictOptions
from segment.sources import ArraySource

NAMES = ["matrix", "secondary", "tertiary"]
COLORS = [[0, 0, 0], [0, 0, 255], [255, 0, 0]]
KW = dict(num_classes=3, in_chans=1, img_size=64)
META = dict(model="unet_test", model_kwargs=KW, class_names=NAMES, colors=COLORS, tile_size=64, in_chans=1,
            mean=[0.5], std=[0.25], intensity="zscore")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(folder, name, image):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / name)
    return folder / name


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny random-init model, its OOD summary fitted on synthetic superalloy images."""
    root = tmp_path_factory.mktemp("ood")
    torch.manual_seed(0)
    ckpt = save_model(root / "best", create_model("unet_test", **KW), META)
    predictor = Predictor.from_checkpoint(ckpt, batch_size=4)
    train = [write(root / "train", f"t{i}.png", superalloy((128, 128), seed=i)[0]) for i in range(4)]
    val = [write(root / "val", f"v{i}.png", superalloy((128, 128), seed=10 + i)[0]) for i in range(3)]
    summary = fit(predictor, predictor.model, train, val, k=3)
    return ckpt, predictor, summary


def test_tile_grid_covers_the_image_flush():
    assert tile_grid((300, 256), 128) == ([0, 86, 172], [0, 128])
    assert tile_grid((50, 600), 256) == ([0], [0, 172, 344])


def test_entropy_tiles_equal_a_direct_computation():
    torch.manual_seed(1)
    h, w, tile = 150, 130, 64
    logits = torch.randn(3, h, w) * 2
    ent = EntropyTiles((h, w), tile)
    for y0, y1 in ((0, 7), (7, 70), (70, 71), (71, 150)):  # uneven blocks, as the stream hands them out
        ent(y0, logits[:, y0:y1])
    p = torch.softmax(logits, 0)
    full = (-(p * p.log()).sum(0)).numpy()
    ys, xs = tile_grid((h, w), tile)
    expected = np.array([[full[y : y + tile, x : x + tile].mean() for x in xs] for y in ys])
    np.testing.assert_allclose(ent.means(), expected, rtol=1e-6)
    assert ent.image_mean() == pytest.approx(full.mean(), rel=1e-6)


def test_shifted_image_scores_higher_than_in_distribution(fitted):
    _, predictor, summary = fitted
    ident, shifted = superalloy((128, 128), seed=99)[0], superalloy((128, 128), seed=99, shift=TEST_SHIFT)[0]
    knn = {}
    for name, image in (("id", ident), ("shift", shifted)):
        _, feats = tile_features(predictor, predictor.model, ArraySource(image))
        knn[name] = summary.knn(feats).mean()
    assert knn["shift"] > 1.5 * knn["id"]
    assert summary.knn_scale > 0 and summary.entropy_scale > 0 and np.isfinite(summary.threshold)
    assert summary.meta["bank_tiles"] == 4 * 4 and summary.meta["val_tiles"] == 3 * 4  # 128 px: 2 x 2 tiles of 64


def test_features_and_entropy_see_the_image_as_the_zoomed_model_does(fitted):
    """A model trained at zoom 0.5 (EBC1) sees a 2x-enlarged image as the zoom-1 model sees the
    original: same tile features, same per-tile entropy, on a grid of 2 x 64 image pixels."""
    _, predictor, _ = fitted
    image = superalloy((128, 192), seed=5)[0]
    big = np.repeat(np.repeat(image, 2, 0), 2, 1)  # area-shrinking it by 2 gives `image` back exactly
    half = copy.copy(predictor)
    half.zoom = 0.5
    assert native_tile(64, 0.5) == 128 and native_tile(256, 1.0) == 256
    origins, feats = tile_features(predictor, predictor.model, ArraySource(image))
    origins_z, feats_z = tile_features(half, half.model, ArraySource(big))
    assert origins_z == [(2 * y, 2 * x) for y, x in origins] and len(origins) == 2 * 3
    np.testing.assert_allclose(feats_z, feats, rtol=1e-3, atol=1e-3)
    ent, ent_z = image_entropy(predictor, ArraySource(image), 64), image_entropy(half, ArraySource(big), 64)
    assert ent_z.means().shape == ent.means().shape == (2, 3)
    np.testing.assert_allclose(ent_z.means(), ent.means(), rtol=0.05, atol=1e-3)


def test_summary_round_trip_no_pickle(tmp_path, fitted):
    _, _, summary = fitted
    summary.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["ood.json", "ood.safetensors"]
    back = load(tmp_path / "s")
    np.testing.assert_array_equal(back.bank, summary.bank)
    assert (back.threshold, back.k, back.tile, back.knn_scale) == (summary.threshold, 3, 64, summary.knn_scale)
    feats = np.random.default_rng(0).normal(size=(5, summary.bank.shape[1]))
    np.testing.assert_allclose(back.knn(feats), summary.knn(feats), rtol=1e-5)
    meta = json.loads((tmp_path / "s" / "ood.json").read_text())
    meta["format"] = 99
    (tmp_path / "s" / "ood.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="ood.json"):
        load(tmp_path / "s")
    with pytest.raises(ValueError, match="nothing_here"):
        load(tmp_path / "nothing_here")


def test_knn_is_zero_on_the_bank_itself():
    bank = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    s = OODSummary(bank, np.zeros(8), np.ones(8), k=1)
    np.testing.assert_allclose(s.knn(bank), 0, atol=1e-3)
    assert (s.knn(bank + 5) > 1).all()


def test_predict_writes_scores_flags_and_warns(tmp_path, fitted, caplog):
    ckpt, predictor, summary = fitted
    paths = [write(tmp_path / "in", "same.png", superalloy((128, 160), seed=77)[0]),
             write(tmp_path / "in", "shifted.png", superalloy((128, 160), seed=77, shift=TEST_SHIFT)[0])]
    options = PredictOptions(class_names=NAMES, colors=COLORS, progress=False)
    with caplog.at_level(logging.INFO, logger="segment.predict"):
        result = predict_paths(predictor, paths, tmp_path / "out", options, ood=summary)
    rows = {r["image"]: r for r in read_csv(tmp_path / "out" / "images.csv")}
    assert float(rows["shifted"]["ood_score"]) > float(rows["same"]["ood_score"])
    assert rows["shifted"]["flagged"] == "1" and rows["same"]["flagged"] == "0"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "out of distribution" in
               r.getMessage()]
    assert len(warning) == 1 and "shifted" in warning[0] and "same" not in warning[0].split(":")[-1]
    assert any("OOD score" in r.getMessage() and "FLAGGED" in r.getMessage() for r in caplog.records)
    tiles = read_csv(tmp_path / "out" / "ood" / "shifted.csv")
    assert len(tiles) == 2 * 3 and {"knn_distance", "mean_entropy", "ood_score", "flagged"} <= set(tiles[0])
    assert np.mean([float(t["ood_score"]) for t in tiles]) == pytest.approx(float(rows["shifted"]["ood_score"]),
                                                                            rel=1e-4)
    assert (tmp_path / "out" / "ood" / "shifted.png").stat().st_size > 1000
    assert result.images[1].ood["flagged"]
    # resumed: the scores come back from the records
    again = predict_paths(predictor, paths, tmp_path / "out", options, ood=summary)
    assert again.skipped == ["same", "shifted"] and again.images[1].ood == result.images[1].ood


def test_cli_uses_the_checkpoint_summary(tmp_path, fitted):
    ckpt, _, summary = fitted
    write(tmp_path / "in", "a.png", superalloy((100, 100), seed=5)[0])
    folder = tmp_path / "ckpt_with_ood"
    folder.mkdir()
    for f in ckpt.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    summary.save(folder)
    args = [str(folder), str(tmp_path / "in"), "--no-progress", "--no-overlays"]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 0
    assert read_csv(tmp_path / "o1" / "images.csv")[0]["ood_score"] != ""
    assert main([*args, "--out", str(tmp_path / "o2"), "--no-ood"]) == 0
    assert read_csv(tmp_path / "o2" / "images.csv")[0]["ood_score"] == ""
    with pytest.raises(SystemExit, match="--ood"):
        main([*args, "--out", str(tmp_path / "o3"), "--ood", str(tmp_path / "in")])


def test_finetune_fits_the_summary_into_best(tmp_path, fitted, caplog):
    from segment.finetune_data import Data
    from segment.finetune_state import fit_ood

    ckpt, _, _ = fitted
    best = tmp_path / "best"
    best.mkdir()
    for f in ckpt.iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith("ood"):
            (best / f.name).write_bytes(f.read_bytes())
    train = [(write(tmp_path / "tr", f"t{i}.png", superalloy((64, 128), seed=i)[0]), None) for i in range(2)]
    val = [(write(tmp_path / "va", "v.png", superalloy((64, 128), seed=9)[0]), None)]
    fit_ood(best, Data(class_map=None, train_pairs=train, val_pairs=val), "cpu")
    assert load(best).meta["train_images"] == 2 and load(best).meta["val_tiles"] == 2
    with caplog.at_level(logging.WARNING):
        fit_ood(tmp_path / "no_best", Data(class_map=None, train_pairs=train, val_pairs=val), "cpu")
    assert "no OOD summary" in caplog.text  # logged, not raised: the trained model matters more


def test_cli_onnx_backend_scores_with_the_pytorch_features(tmp_path, fitted):
    pytest.importorskip("onnxruntime")
    ckpt, _, summary = fitted
    write(tmp_path / "in", "a.png", superalloy((100, 100), seed=5)[0])
    summary.save(tmp_path / "summary")
    args = [str(ckpt), str(tmp_path / "in"), "--no-progress", "--no-overlays", "--ood", str(tmp_path / "summary")]
    assert main([*args, "--out", str(tmp_path / "pt")]) == 0
    assert main([*args, "--out", str(tmp_path / "ox"), "--backend", "onnx"]) == 0
    pt, ox = (read_csv(tmp_path / d / "images.csv")[0] for d in ("pt", "ox"))
    assert float(ox["ood_knn"]) == pytest.approx(float(pt["ood_knn"]), rel=1e-6)  # same features
    assert float(ox["mean_entropy"]) == pytest.approx(float(pt["mean_entropy"]), rel=1e-3)
