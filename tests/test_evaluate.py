"""segment.evaluate on tiny synthetic image/mask files with hand-made models of known quality."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import segment.infer
from segment.evaluate import evaluate_sets, main, parse_set_arg
from segment.infer import Predictor

CLASS_MAP = {"names": ["bg", "a", "b"], "values": [[0], [1], [2]]}


class NearestLevel(nn.Module):
    """Per-pixel 'classifier': class k scores -(x - centre_k)^2 on the normalised intensity.

    Images are written as label * 127 (8 bit), i.e. normalised (mean 0.5, std 0.25) near -2, 0, 2,
    so centres (-2, 0, 2) are a perfect model; (-2, 0, 100) never predicts class 2 (-> class 1).
    """

    def __init__(self, centres=(-2.0, 0.0, 2.0)):
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres).view(1, -1, 1, 1))

    def forward(self, x):
        return -((x[:, :1] - self.centres) ** 2)


def write_pair(folder, name, labels):
    (folder / "test").mkdir(parents=True, exist_ok=True)
    (folder / "test_annot").mkdir(parents=True, exist_ok=True)
    Image.fromarray((labels * 127).astype(np.uint8)).save(folder / "test" / f"{name}.png")
    Image.fromarray(labels.astype(np.uint8)).save(folder / "test_annot" / f"{name}.png")
    return folder / "test" / f"{name}.png", folder / "test_annot" / f"{name}.png"


def striped():
    """16x16: rows 0-7 class 0 (128 px), rows 8-11 class 1 (64 px), rows 12-15 class 2 (64 px)."""
    labels = np.zeros((16, 16), np.uint8)
    labels[8:12] = 1
    labels[12:] = 2
    return labels


def two_class():
    labels = np.zeros((16, 20), np.uint8)
    labels[:, 10:] = 1
    return labels


def predictor(centres=(-2.0, 0.0, 2.0)):
    return Predictor(NearestLevel(centres), tile_size=8, overlap=0.5, batch_size=4)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_perfect_model_scores_one_and_writes_files(tmp_path):
    pairs = [write_pair(tmp_path / "data", "x1", striped()), write_pair(tmp_path / "data", "x2", two_class())]
    out = tmp_path / "eval"
    res = evaluate_sets(predictor(), {"ind": pairs}, CLASS_MAP, out, progress=False)
    r = res["ind"]
    assert r["n_images"] == 2 and r["failed"] == []
    assert r["nasa_iou_mean"] == 1.0 and r["nasa_iou_std"] == 0.0 and r["miou"] == 1.0
    for f in ["metrics.csv", "summary.csv", "summary.md", "overlays/ind/x1.png", "overlays/ind/x2.png"]:
        assert (out / f).is_file(), f
    rows = read_csv(out / "metrics.csv")
    assert [r_["image"] for r_ in rows] == ["x1.png", "x2.png"]
    assert float(rows[0]["nasa_iou"]) == 1.0
    assert rows[1]["iou_b"] == ""  # class b absent from truth and prediction: undefined, not 0
    md = (out / "summary.md").read_text()
    assert "| ind | 2 | 100.00 ± 0.00 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 |" in md
    with Image.open(out / "overlays/ind/x1.png") as im:
        assert im.format == "PNG" and im.width > 400


def test_known_imperfect_prediction_hand_checked(tmp_path):
    d = tmp_path / "d"
    pairs = [write_pair(d, "stripes", striped()), write_pair(d, "halves", two_class())]
    out = tmp_path / "eval"
    res = evaluate_sets(predictor((-2.0, 0.0, 100.0)), {"s": pairs}, CLASS_MAP, out, overlays=False,
                        progress=False)
    r = res["s"]
    # stripes: class-2 rows predicted as class 1 -> A = 192/256, NASA IoU = A / (2 - A) = 0.6
    # halves: no class 2 at all -> perfect, 1.0
    assert r["per_image_nasa_iou"] == pytest.approx([0.6, 1.0])
    assert r["nasa_iou_mean"] == pytest.approx(0.8) and r["nasa_iou_std"] == pytest.approx(0.2)
    rows = {row["image"]: row for row in read_csv(out / "metrics.csv")}
    s = rows["stripes.png"]
    assert float(s["nasa_iou"]) == pytest.approx(0.6)
    assert float(s["iou_bg"]) == 1.0 and float(s["iou_a"]) == pytest.approx(0.5) and float(s["iou_b"]) == 0.0
    assert float(s["miou"]) == pytest.approx(0.5)
    assert float(s["dice_a"]) == pytest.approx(2 / 3)
    # pooled over the set: a = (64 + 160) TP / (224 + 64 FP) ; b = 0 ; pixel accuracy (192 + 320) / 576
    pooled = r["pooled"]
    assert pooled["iou"]["a"] == pytest.approx(224 / 288) and pooled["iou"]["b"] == 0.0
    assert pooled["pixel_accuracy"] == pytest.approx(512 / 576)
    summary = read_csv(out / "summary.csv")[0]
    assert summary["set"] == "s" and summary["n_images"] == "2" and summary["n_failed"] == "0"
    assert float(summary["nasa_iou_mean"]) == pytest.approx(0.8)
    assert float(summary["iou_a"]) == pytest.approx(224 / 288)
    assert not (out / "overlays").exists()


def test_corrupt_image_is_skipped_and_reported(tmp_path):
    good = write_pair(tmp_path / "d", "good", striped())
    bad_img, bad_mask = write_pair(tmp_path / "d", "bad", striped())
    bad_img.write_bytes(b"this is not an image")
    size_img, size_mask = write_pair(tmp_path / "d", "size", striped())
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(size_img)  # mask 16x16, image 8x8
    out = tmp_path / "eval"
    sets = {"s": [good, (bad_img, bad_mask), (size_img, size_mask)], "empty": [(bad_img, bad_mask)]}
    res = evaluate_sets(predictor(), sets, CLASS_MAP, out, max_overlays=1, progress=False)
    assert res["s"]["n_images"] == 1 and res["s"]["nasa_iou_mean"] == 1.0
    assert [f["image"] for f in res["s"]["failed"]] == [str(bad_img), str(size_img)]
    assert "bad.png" in res["s"]["failed"][0]["error"]  # the read error names the file
    assert res["empty"]["n_images"] == 0 and math.isnan(res["empty"]["nasa_iou_mean"])
    md = (out / "summary.md").read_text()
    assert "Failed images" in md and "bad.png" in md and "| s | 1 (2 failed) |" in md
    assert len(read_csv(out / "metrics.csv")) == 1
    assert [p.name for p in (out / "overlays" / "s").iterdir()] == ["good.png"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("Super1=/data/Super1", ("Super1", "/data/Super1", "test")),
        ("ood=/data/Super2:different_test", ("ood", "/data/Super2", "different_test")),
        ("/data/Super2:val", ("Super2-val", "/data/Super2", "val")),
        ("x=rel/dir", ("x", "rel/dir", "test")),
    ],
)
def test_parse_set_arg(spec, expected):
    name, root, split = parse_set_arg(spec)
    assert (name, str(root), split) == expected


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    write_pair(tmp_path / "Set", "x1", striped())
    write_pair(tmp_path / "Set", "x2", two_class())
    meta = {"class_map": CLASS_MAP, "tile_size": 8, "mean": [0.5], "std": [0.25], "in_chans": 1,
            "class_names": CLASS_MAP["names"]}
    seen = {}

    def fake_load_model(path):
        seen["path"] = str(path)
        return NearestLevel(), meta

    monkeypatch.setattr(segment.infer, "load_model", fake_load_model)
    out = tmp_path / "eval"
    rc = main([str(tmp_path / "ckpt"), "--set", f"mine={tmp_path / 'Set'}", "--out", str(out), "--tta",
               "--device", "cpu", "--no-progress", "--max-overlays", "1"])
    assert rc == 0 and seen["path"] == str(tmp_path / "ckpt")
    printed = capsys.readouterr().out
    assert "| mine | 2 | 100.00 ± 0.00 |" in printed and "TTA 8 flips/rotations" in printed
    assert len(list((out / "overlays" / "mine").glob("*.png"))) == 1
    rc = main([str(tmp_path / "ckpt"), "--set", f"mine={tmp_path / 'Set'}", "--out", str(tmp_path / "eval_z"),
               "--device", "cpu", "--no-progress", "--no-overlays", "--zoom", "2"])
    assert rc == 0 and "zoom 2" in (tmp_path / "eval_z" / "summary.md").read_text()
    with pytest.raises(SystemExit):  # a class map of another size than the checkpoint's
        main([str(tmp_path / "ckpt"), "--set", f"mine={tmp_path / 'Set'}", "--out", str(out),
              "--class-map", "binary", "--device", "cpu"])


# ----------------------------------------------------------------------------- figures (segment.overlay)
def test_error_map_colour_key():
    from segment.overlay import ERROR_KEY, error_map, error_legend

    truth = np.array([[0, 0, 1, 1, 2]])
    pred = np.array([[0, 1, 1, 0, 1]])
    em = error_map(pred, truth)
    expected = ["correct background", "spurious (false positive)", "correct foreground",
                "missed (false negative)", "wrong class"]
    assert [tuple(c) for c in em[0]] == [ERROR_KEY[k] for k in expected]
    # binary for class 2 alone: the 1 -> 2 confusion is a miss, everything else background
    em2 = error_map(pred, truth, target=2)
    assert tuple(em2[0, 4]) == ERROR_KEY["missed (false negative)"]
    assert tuple(em2[0, 1]) == ERROR_KEY["correct background"]
    assert "wrong class" not in dict(error_legend(binary=True))


def test_colorize_and_overlay():
    from segment.overlay import colorize, overlay

    labels = np.array([[0, 1], [2, 1]])
    colors = [(0, 0, 0), (0, 0, 255), (255, 0, 0)]
    np.testing.assert_array_equal(colorize(labels, colors)[1, 0], [255, 0, 0])
    with pytest.raises(ValueError):
        colorize(np.array([[3]]), colors)
    img = np.full((2, 2), 0.5, np.float32)
    out = overlay(img, labels, colors, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [128, 128, 128])  # background left untinted
    np.testing.assert_array_equal(out[0, 1], [64, 64, 191])  # half gray (0.5), half blue: 0.75 * 255


def test_save_panel_writes_png_atomically(tmp_path):
    from segment.overlay import save_panel

    truth = striped()
    path = save_panel(tmp_path / "f" / "p.png", truth / 2.0, truth, two_class()[:, :16], ["bg", "a", "b"],
                      [(0, 0, 0), (0, 0, 255), (255, 0, 0)], "title")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["p.png"]  # no temp file left
