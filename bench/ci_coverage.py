"""Coverage of segment.predict's 95 % bootstrap intervals by simulation (issue 17).

    nice -n 10 python bench/ci_coverage.py                   # pool 2000, 200 repetitions, B 2000, 256 px
    nice -n 10 python bench/ci_coverage.py --pool 500 --reps 50 --resamples 500   # a quick look

Method. For each generator a POOL of ``--pool`` label maps (``--size`` px, independent seeds) is made
and quantified exactly as ``segment.predict`` quantifies a predicted mask (``quantify_labels``:
8-connected particles, border-free size statistics, Gundersen number density); the label maps are the
truth, no model is involved. The pool is the population: its pooled statistics (``pool_summaries``'s
rules, computed with ``segment.uncertainty.statistics``) are the population values. Each repetition
draws a folder of n images from the pool without replacement (n = 20, 5) and computes the intervals the
product reports (``segment.uncertainty``: B resamples over images, shared by every statistic), or, for
n = 1, over the 4 x 4 tiles of one image (``tile_table``, 64 px tiles at 256 px). Coverage = share of
the ``--reps`` repetitions whose interval contains the population value (the Monte-Carlo standard
error at 95 % and 200 repetitions is 1.5 points); ``defined`` counts the repetitions with an interval
(a statistic undefined in > 2.5 % of the resamples gets none). Three interval rules from the same
resamples: percentile (the product's default), BCa (jackknife acceleration), and t (estimate +-
t(n-1) x bootstrap SE x sqrt(n/(n-1))).

Generators:

* ``superalloy``: ``pretrain.synthetic_materials.superalloy`` (classes matrix / secondary / tertiary; secondary
  and tertiary measured as particles; 5 nm/px). Each image draws its own microstructure parameters
  (secondary fraction uniform 42-53 %, exact per image; period 70-90 px; tertiary 1.5-3.5 %), so most
  of the variance is between images.
* ``boolean``: a stationary Boolean model defined here (union of discs, Poisson centres of fixed
  intensity over a window padded by the largest radius, radii uniform 3-8 px; area fraction
  1 - exp(-lambda E[pi r^2]) = 20 %, checked against the pool). Its parameters are fixed, so one image
  is a sample of the same random field as any other: the case the one-image tile interval is meant for.

Prints a markdown table and writes it to ``--out`` (default ``bench/results/ci_coverage.md``).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np

from segment.quantify import Scale, quantify_labels
from segment.uncertainty import (
    Bootstrap,
    image_units,
    interval,
    resample_counts,
    statistics,
    tile_table,
    tile_units,
)

REPO = Path(__file__).resolve().parents[1]
METHODS = ("percentile", "bca", "t")
BOOLEAN_FRACTION = 0.20
BOOLEAN_RADII = (3.0, 8.0)


def boolean_labels(size: int, seed: int) -> np.ndarray:
    """Stationary Boolean model: class 1 = union of discs with Poisson centres, radii U(3, 8) px."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    r0, r1 = BOOLEAN_RADII
    mean_area = math.pi * (r1**3 - r0**3) / (3 * (r1 - r0))  # pi E[r^2]
    lam = -math.log(1 - BOOLEAN_FRACTION) / mean_area
    lo, hi = -r1, size + r1
    n = rng.poisson(lam * (hi - lo) ** 2)
    lab = np.zeros((size, size), np.uint8)
    for y, x, r in zip(rng.uniform(lo, hi, n), rng.uniform(lo, hi, n), rng.uniform(r0, r1, n)):
        rr, cc = disk((y, x), r, shape=lab.shape)
        lab[rr, cc] = 1
    return lab


GENERATORS = {
    "superalloy": dict(names=["matrix", "secondary", "tertiary"], particles=[1, 2], pixel_nm=5.0,
                       classes=["secondary", "tertiary"]),
    "boolean": dict(names=["matrix", "particle"], particles=[1], pixel_nm=5.0, classes=["particle"]),
}


def make_pool(kind: str, n: int, size: int, seed: int) -> tuple[list, list]:
    """Per image: its ClassSummary list and its tile table."""
    spec = GENERATORS[kind]
    summaries, tiles = [], []
    for i in range(n):
        image_seed = int(np.random.SeedSequence([seed, 17, list(GENERATORS).index(kind), i]).generate_state(1)[0])
        if kind == "superalloy":
            from pretrain.synthetic_materials import superalloy

            lab = superalloy((size, size), seed=image_seed)[1]
        else:
            lab = boolean_labels(size, image_seed)
        s, table = quantify_labels(lab, spec["names"], spec["particles"], scale=Scale(spec["pixel_nm"]), image=str(i))
        summaries.append(s)
        tiles.append(tile_table(lab, table, spec["names"], spec["particles"]))
    return summaries, tiles


def units_of(summaries: list, tiles: list | None, name: str):
    per = [next(s for s in image if s.name == name) for image in summaries]
    if tiles is None:
        return image_units(per)
    return tile_units(tiles[0], per[0])


def run_case(kind: str, pool: list, pool_tiles: list, n: int, args, truth: dict) -> list[dict]:
    """Coverage of every (class, statistic) for folders of ``n`` images (``n == 1``: over tiles)."""
    spec = GENERATORS[kind]
    hits: dict = {}
    widths: dict = {}
    for rep in range(args.reps):
        rng = np.random.default_rng([args.seed, 1 + list(GENERATORS).index(kind), n, rep])
        pick = rng.choice(len(pool), size=n, replace=False)
        images = [pool[i] for i in pick]
        tiles = [pool_tiles[pick[0]]] if n == 1 else None
        counts = None
        for name in spec["classes"]:
            units = units_of(images, tiles, name)
            if counts is None:
                counts = resample_counts(units.n, args.resamples, rng)
            est = statistics(units, np.ones((1, units.n), np.int64))
            boot = statistics(units, counts)
            jack = statistics(units, 1 - np.eye(units.n, dtype=np.int64))
            for stat in est:
                key = (name, stat)
                e = float(est[stat][0])
                for method in METHODS:
                    lo, hi = interval(boot[stat], e, 0.95, method, units.n, jack[stat])
                    if math.isfinite(lo):
                        hits.setdefault((key, method), []).append(lo <= truth[key] <= hi)
                        if method == "percentile":
                            widths.setdefault(key, []).append((hi - lo) / abs(truth[key]) if truth[key] else np.nan)
    rows = []
    for name in spec["classes"]:
        for stat in ("area_fraction", "number_density", "ecd_mean", "ecd_median", "ecd_d10", "ecd_d90"):
            key = (name, stat)
            row = dict(generator=kind, case="1 image, 4x4 tiles" if n == 1 else f"{n} images", cls=name, stat=stat,
                       truth=truth[key], defined=len(hits.get((key, "percentile"), [])),
                       width=float(np.nanmedian(widths[key])) if widths.get(key) else float("nan"))
            for method in METHODS:
                h = hits.get((key, method), [])
                row[method] = 100.0 * np.mean(h) if h else float("nan")
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    ap.add_argument("--pool", type=int, default=2000, help="images in the population pool per generator")
    ap.add_argument("--reps", type=int, default=200, help="repetitions per case")
    ap.add_argument("--folders", type=int, nargs="+", default=[20, 5, 1], help="images per folder (1: tiles)")
    ap.add_argument("--size", type=int, default=256, help="image side (px)")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples B")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ci_coverage.md")
    args = ap.parse_args()
    Bootstrap(resamples=args.resamples)  # same validation as the product
    t0 = time.perf_counter()
    print(f"load {os.getloadavg()[0]:.2f}; pool {args.pool}, reps {args.reps}, B {args.resamples}, {args.size} px",
          flush=True)
    rows = []
    for kind in args.generators:
        t = time.perf_counter()
        pool, pool_tiles = make_pool(kind, args.pool, args.size, args.seed)
        truth = {}
        for name in GENERATORS[kind]["classes"]:
            units = units_of(pool, None, name)
            for stat, v in statistics(units, np.ones((1, units.n), np.int64)).items():
                truth[(name, stat)] = float(v[0])
        print(f"{kind}: pool of {args.pool} in {time.perf_counter() - t:.0f} s; population values "
              + ", ".join(f"{n} {s} {v:.4g}" for (n, s), v in truth.items()), flush=True)
        if kind == "boolean":
            print(f"  Boolean model area fraction: analytic {BOOLEAN_FRACTION:.4f}, pool "
                  f"{truth[('particle', 'area_fraction')]:.4f}", flush=True)
        for n in args.folders:
            t = time.perf_counter()
            rows += run_case(kind, pool, pool_tiles, n, args, truth)
            print(f"  {n} image(s): {time.perf_counter() - t:.0f} s", flush=True)
    lines = ["| generator | folder | class | statistic | population value | defined | percentile % | BCa % | t % "
             "| median width / value |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        flag = lambda v: f"**{v:.1f}**" if math.isfinite(v) and not 90 <= v <= 98 else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {r['generator']} | {r['case']} | {r['cls']} | {r['stat']} | {r['truth']:.4g} | "
                     f"{r['defined']} | {flag(r['percentile'])} | {flag(r['bca'])} | {flag(r['t'])} | {r['width']:.3f} |")
    table = "\n".join(lines)
    print(table)
    print(f"total {time.perf_counter() - t0:.0f} s; load {os.getloadavg()[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
