"""segment.uncertainty (bootstrap intervals of the folder statistics) and their place in segment.predict."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.draw import disk
from torch import nn

from pretrain.io import write_tiff
from segment.infer import Predictor
from segment.batch import predict_paths
from segment.predict import main
from segment.records import PredictOptions
from segment.quantify import Scale, pool_summaries, quantify_labels, size_stats
from segment.uncertainty import (
    CI_COLUMNS,
    Bootstrap,
    Units,
    _pooled_percentiles,
    folder_intervals,
    image_units,
    interval,
    resample_counts,
    statistics,
    tile_grid,
    tile_table,
    tile_units,
)

NAMES = ["matrix", "secondary", "tertiary"]
COLORS = [[0, 0, 0], [0, 0, 255], [255, 0, 0]]
STATS = ("area_fraction", "number_density", "ecd_mean", "ecd_median", "ecd_d10", "ecd_d90")


def discs(shape, specs):
    """uint8 label map with class-``k`` discs ``(cy, cx, r, k)``."""
    lab = np.zeros(shape, np.uint8)
    for cy, cx, r, k in specs:
        rr, cc = disk((cy, cx), r, shape=shape)
        lab[rr, cc] = k
    return lab


def random_labels(seed, shape=(96, 112), n=12):
    rng = np.random.default_rng(seed)
    specs = [(rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(3, 9), 1) for _ in range(n)]
    specs += [(rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(1.5, 3), 2) for _ in range(n)]
    return discs(shape, specs)


def summaries_of(labels_list, scale=Scale(2.0)):
    return [quantify_labels(lab, NAMES, [1, 2], scale=scale, image=f"im{i}")[0] for i, lab in enumerate(labels_list)]


# ----------------------------------------------------------------------------- pure functions
def test_constant_statistic_gives_a_zero_width_interval():
    """Five identical images: every resample is the same folder, so every statistic's interval is
    the estimate itself, by each method."""
    lab = discs((80, 80), [(20, 20, 6, 1), (50, 55, 9, 1), (60, 15, 3, 2), (10, 60, 2, 2)])
    images = summaries_of([lab] * 5)
    for method in ("percentile", "bca", "t"):
        ci = folder_intervals(images, Bootstrap(resamples=300, method=method))
        pooled = {p.name: p.row() for p in pool_summaries([s for per in images for s in per])}
        for name in ("secondary", "tertiary"):
            for stat in STATS:
                est = float(pooled[name][stat])
                assert ci[name][f"{stat}_ci_low"] == pytest.approx(est, rel=1e-12), (method, name, stat)
                assert ci[name][f"{stat}_ci_high"] == pytest.approx(est, rel=1e-12), (method, name, stat)
        assert ci["matrix"]["area_fraction_ci_low"] == ci["matrix"]["area_fraction_ci_high"]
        assert "number_density_ci_low" not in ci["matrix"]  # a phase has a fraction only


def test_estimates_equal_the_pooled_rows_and_lie_in_their_intervals():
    images = summaries_of([random_labels(s) for s in range(8)])
    pooled = {p.name: p.row() for p in pool_summaries([s for per in images for s in per])}
    ci = folder_intervals(images, Bootstrap(resamples=500))
    for name in NAMES:
        units = image_units([s for per in images for s in per if s.name == name])
        est = statistics(units, np.ones((1, units.n), np.int64))
        for stat, value in est.items():
            assert value[0] == pytest.approx(float(pooled[name][stat]), rel=1e-5), (name, stat)
            assert ci[name][f"{stat}_ci_low"] <= value[0] <= ci[name][f"{stat}_ci_high"], (name, stat)
        assert ci[name]["ci_over"] == "images" and ci[name]["ci_units"] == 8 and ci[name]["ci_level"] == 0.95
        assert set(ci[name]) <= set(CI_COLUMNS)


@pytest.mark.parametrize("row_loop", [False, True], ids=["chunks", "rows"])
def test_pooled_percentiles_equal_numpy_on_the_resampled_particles(row_loop, monkeypatch):
    import segment.uncertainty as uncertainty

    monkeypatch.setattr(uncertainty, "_ROW_LOOP_ABOVE", 0 if row_loop else 10**9)
    rng = np.random.default_rng(3)
    values = rng.gamma(2.0, 3.0, 40).round(1)  # ties included
    unit = rng.integers(0, 5, 40)
    w = resample_counts(5, 200, rng)
    got = _pooled_percentiles(w, values, unit, [0.1, 0.5, 0.9])
    for r in range(len(w)):
        pooled = np.repeat(values, w[r, unit])
        want = np.percentile(pooled, [10, 50, 90]) if pooled.size else np.full(3, np.nan)
        np.testing.assert_allclose(got[r], want, rtol=1e-12, equal_nan=True)
    assert (w.sum(1) == 5).all()


def test_seeded_reproducibility():
    images = summaries_of([random_labels(s) for s in range(8)])
    a = folder_intervals(images, Bootstrap(resamples=400, seed=7))
    b = folder_intervals(images, Bootstrap(resamples=400, seed=7))
    c = folder_intervals(images, Bootstrap(resamples=400, seed=8))
    assert a == b
    assert a["secondary"]["area_fraction_ci_low"] != c["secondary"]["area_fraction_ci_low"]
    d = folder_intervals(images, Bootstrap(resamples=400, seed=7), key="ALL [nm]")  # each group its own draws
    assert d["secondary"]["area_fraction_ci_low"] != a["secondary"]["area_fraction_ci_low"]


def test_undefined_statistic_gets_no_interval():
    """Border-free secondary particles in one image of five: most resamples have none, so the size
    statistics get no interval; the fraction and the density still do."""
    with_one = discs((60, 60), [(30, 30, 8, 1)])
    empty = discs((60, 60), [(0, 0, 6, 1)])  # only a border particle
    ci = folder_intervals(summaries_of([with_one, empty, empty, empty, empty]), Bootstrap(resamples=300))
    assert math.isnan(ci["secondary"]["ecd_mean_ci_low"]) and math.isnan(ci["secondary"]["ecd_d90_ci_high"])
    assert ci["secondary"]["area_fraction_ci_low"] < ci["secondary"]["area_fraction_ci_high"]
    assert ci["secondary"]["number_density_ci_high"] > 0


def test_t_and_bca_intervals_on_a_mean():
    """Per-image fractions with a known spread: the t interval is estimate +- t(n-1) s/sqrt(n) within
    the bootstrap's noise; BCa and percentile agree with it roughly for symmetric data."""
    rng = np.random.default_rng(0)
    n = 30
    frac = rng.normal(0.4, 0.05, n)
    units = Units(pixels=frac * 10_000, total_pixels=np.full(n, 10_000), area=np.full(n, 1e4), count=np.zeros(n),
                  ecd=np.zeros(0), ecd_unit=np.zeros(0, int), particles=False)
    est = float(frac.mean())
    boot = statistics(units, resample_counts(n, 4000, np.random.default_rng(1)))["area_fraction"]
    jack = statistics(units, 1 - np.eye(n, dtype=int))["area_fraction"]
    from scipy.stats import t

    half = t.ppf(0.975, n - 1) * frac.std(ddof=1) / math.sqrt(n)
    lo, hi = interval(boot, est, method="t", n=n)
    assert (lo, hi) == pytest.approx((est - half, est + half), abs=0.1 * half)
    for method in ("percentile", "bca"):
        lo, hi = interval(boot, est, method=method, n=n, jackknife=jack)
        assert lo < est < hi and (hi - lo) == pytest.approx(2 * half, rel=0.2), method
    assert all(math.isnan(v) for v in interval(np.r_[boot[:90], np.full(10, np.nan)], est))  # 10 % undefined
    with pytest.raises(ValueError):
        Bootstrap(method="normal")


def test_one_image_interval_is_over_tiles():
    """A 64x64 map: 4 x 4 tiles of 16 px, class 1 fills the left half (tile fractions 1 or 0), particles
    assigned by centroid; the tile path reproduces the image's statistics and says it is over tiles."""
    assert [e.tolist() for e in tile_grid(64, 64)] == [[0, 16, 32, 48, 64]] * 2
    assert len(tile_grid(3000, 1000)[0]) - 1 == 12 and len(tile_grid(3000, 1000)[1]) - 1 == 4
    lab = np.zeros((64, 64), np.uint8)
    lab[:, :32] = 1
    for cy, cx in ((8, 40), (24, 56), (40, 40), (56, 56), (8, 56)):  # tertiary dots in the right half
        rr, cc = disk((cy, cx), 3, shape=lab.shape)
        lab[rr, cc] = 2
    (summaries,), = [summaries_of([lab], scale=Scale())]
    _, table = quantify_labels(lab, NAMES, [1, 2])
    tiles = tile_table(lab, table, NAMES, [1, 2])
    assert sum(tiles["total_pixels"]) == 64 * 64 and len(tiles["total_pixels"]) == 16
    sec = np.asarray(tiles["classes"]["secondary"]["pixels"]).reshape(4, 4)
    assert (sec[:, :2] == 256).all() and (sec[:, 2:] == 0).all()
    assert sorted(tiles["classes"]["tertiary"]["ecd_tile"]) == [2, 3, 7, 10, 15]
    for s in summaries:
        units = tile_units(tiles, s)
        est = statistics(units, np.ones((1, 16), np.int64))
        row = s.row()
        for stat, value in est.items():
            assert value[0] == pytest.approx(float("nan" if row[stat] == "" else row[stat]), rel=1e-9, nan_ok=True), (s.name, stat)
    ci = folder_intervals([summaries], Bootstrap(resamples=500), tiles=tiles)
    assert ci["secondary"]["ci_over"].startswith("tiles (4x4") and ci["secondary"]["ci_units"] == 16
    lo, hi = ci["secondary"]["area_fraction_ci_low"], ci["secondary"]["area_fraction_ci_high"]
    assert 0.2 < lo < 0.5 < hi < 0.8  # half the tiles full, half empty: a wide interval around 0.5
    assert ci["tertiary"]["ecd_mean_ci_low"] == pytest.approx(ci["tertiary"]["ecd_mean_ci_high"])  # equal dots
    assert folder_intervals([summaries])["secondary"]["ci_over"].startswith("none")  # no tiles: no interval


# ----------------------------------------------------------------------------- segment.predict
class Threshold(nn.Module):
    """Class 1 where the normalised intensity is positive, else 0; exact and deterministic."""

    def forward(self, x):
        return torch.cat([-x, x, torch.full_like(x, -100.0)], dim=1) * 10


@pytest.fixture
def predictor():
    return Predictor(Threshold(), tile_size=64, batch_size=4, mean=(0.5,), std=(0.25,))


def options(**kw):
    return PredictOptions(class_names=NAMES, colors=COLORS, progress=False, **kw)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def bright_discs(seed, shape=(90, 100)):
    return np.where(random_labels(seed, shape, n=6) == 1, 230, 25).astype(np.uint8)


def test_predict_summary_has_interval_columns_readme_and_figure(tmp_path, predictor):
    paths = []
    for i in range(3):
        write_tiff(tmp_path / "in" / f"i{i}.tif", bright_discs(i), pixel_size_nm=4.0)
        paths.append(tmp_path / "in" / f"i{i}.tif")
    r = predict_paths(predictor, paths, tmp_path / "out", options(particle_classes=[1]),
                      bootstrap=Bootstrap(resamples=500, seed=3))
    assert r.ok
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert list(rows[0])[-len(CI_COLUMNS):] == list(CI_COLUMNS)
    per_image = [row for row in rows if row["image"] != "ALL"]
    assert len(per_image) == 9 and all(row["area_fraction_ci_low"] == "" for row in per_image)
    sec = next(row for row in rows if row["image"] == "ALL" and row["class"] == "secondary")
    assert (sec["ci_level"], sec["ci_over"], sec["ci_units"]) == ("0.95", "images", "3")
    for stat in STATS:
        assert float(sec[f"{stat}_ci_low"]) <= float(sec[stat]) <= float(sec[f"{stat}_ci_high"]), stat
    matrix = next(row for row in rows if row["image"] == "ALL" and row["class"] == "matrix")
    assert matrix["area_fraction_ci_low"] and matrix["number_density_ci_low"] == ""
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "95 % t interval with the bootstrap standard error, B = 500 resamples, seed 3" in readme
    assert "pixel-weighted" in readme
    figure = tmp_path / "out" / "figures" / "fractions.png"
    assert figure.is_file() and Image.open(figure).size[0] > 400


def test_one_image_predict_interval_over_tiles_survives_resume(tmp_path, predictor):
    """One image: the ALL rows' interval is over tiles; a resumed run (record read back) writes the same
    summary, and so does one whose record predates the tile counts (taken again from the mask)."""
    write_tiff(tmp_path / "in" / "one.tif", bright_discs(5, (128, 128)), pixel_size_nm=4.0)
    paths = [tmp_path / "in" / "one.tif"]
    out = tmp_path / "out"
    first = predict_paths(predictor, paths, out, options(particle_classes=[1]))
    summary = (out / "summary.csv").read_bytes()
    sec = next(row for row in read_csv(out / "summary.csv") if row["image"] == "ALL" and row["class"] == "secondary")
    assert sec["ci_over"].startswith("tiles (4x4 of ~32x32 px") and sec["ci_units"] == "16"
    assert float(sec["area_fraction_ci_low"]) < float(sec["area_fraction"]) < float(sec["area_fraction_ci_high"])
    assert first.images[0].tiles is not None

    again = predict_paths(predictor, paths, out, options(particle_classes=[1]))
    assert again.skipped == ["one"] and (out / "summary.csv").read_bytes() == summary

    record_path = out / "records" / "one.json"
    record = json.loads(record_path.read_text())
    del record["tiles"]  # as written before issue 17
    record_path.write_text(json.dumps(record))
    old = predict_paths(predictor, paths, out, options(particle_classes=[1]))
    assert old.skipped == ["one"] and (out / "summary.csv").read_bytes() == summary
    assert (out / "figures" / "fractions.png").is_file()


def test_mixed_units_get_one_interval_per_group(tmp_path, predictor):
    """Calibrated and uncalibrated images are pooled apart (ALL [nm], ALL [px]); each group gets its
    own interval: over 2 images and, for the lone PNG, over its tiles."""
    write_tiff(tmp_path / "a.tif", bright_discs(1), pixel_size_nm=4.0)
    write_tiff(tmp_path / "b.tif", bright_discs(2), pixel_size_nm=4.0)
    Image.fromarray(bright_discs(3)).save(tmp_path / "c.png")
    predict_paths(predictor, [tmp_path / n for n in ("a.tif", "b.tif", "c.png")], tmp_path / "out", options())
    rows = {(r["image"], r["class"]): r for r in read_csv(tmp_path / "out" / "summary.csv")}
    assert rows[("ALL [nm]", "secondary")]["ci_over"] == "images" and rows[("ALL [nm]", "secondary")]["ci_units"] == "2"
    assert rows[("ALL [px]", "secondary")]["ci_over"].startswith("tiles")


def test_cli_interval_options(tmp_path):
    from segment.checkpoint import save_model
    from segment.models import create_model

    torch.manual_seed(0)
    kwargs = dict(num_classes=3, in_chans=1, img_size=64)
    ckpt = save_model(tmp_path / "ckpt", create_model("unet_test", **kwargs),
                      dict(model="unet_test", model_kwargs=kwargs, class_names=NAMES, colors=COLORS, tile_size=64,
                           in_chans=1, mean=[0.5], std=[0.25]))
    for i in range(2):
        Image.fromarray(bright_discs(i, (64, 64))).save(tmp_path / f"{i}.png")
    args = [str(ckpt), str(tmp_path / "*.png"), "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu",
            "--no-overlays"]
    assert main([*args, "--ci-resamples", "300", "--ci-seed", "4"]) == 0
    assert "95 % t interval with the bootstrap standard error, B = 300 resamples, seed 4" in (tmp_path / "o" / "README.md").read_text()
    assert main([*args, "--ci-method", "percentile"]) == 0
    assert "95 % percentile bootstrap, B = 2000" in (tmp_path / "o" / "README.md").read_text()
    with pytest.raises(SystemExit, match="resamples must be >= 100"):
        main([*args, "--ci-resamples", "10"])


def test_size_stats_agree_with_the_interval_estimates():
    """The pooled-quantile rule is numpy's: a resample that draws every image once gives size_stats."""
    images = summaries_of([random_labels(s) for s in range(3)])
    units = image_units([per[2] for per in images])
    est = statistics(units, np.ones((1, 3), np.int64))
    want = size_stats(units.ecd)
    for k in ("ecd_mean", "ecd_median", "ecd_d10", "ecd_d90"):
        assert est[k][0] == pytest.approx(want[k], rel=1e-12)
