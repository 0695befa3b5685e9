"""Collect the results of a fine-tuning sweep into one CSV and one Markdown table.

    python -m segment.results SWEEP [--csv FILE] [--md FILE] [--sets test,shifted]
    (or python launch/collect.py SWEEP ...)

Reads every ``RUN/eval/summary.csv`` (written by ``segment.finetune`` / ``segment.evaluate``: one row per
test set) and ``RUN/best/model.json`` (best epoch and its validation scores) under SWEEP. The factors of
a run (model, weights, data, seed) come from ``SWEEP/grid.tsv`` when the run is one of its cells
(``launch/slurm/sweep.sh`` writes it), else from the run's ``config.yaml``.

Outputs (default in SWEEP):
- ``results.csv``: one row per run and test set: the factors, the run folder, every summary column
  (fractions, as in summary.csv) and ``best_epoch``, ``val_*`` from model.json;
- ``results.md``: per data set, one table row per (test set, model, weights): mean ± sample standard
  deviation over seeds of the NASA IoU, the per-class IoU and the mIoU, in %, with the number of seeds;
  then the grid cells without results (not run, running or failed).
The Markdown is printed too. Exit status 0, or 1 when no results were found.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

from pretrain.outputs import atomic_write_text, markdown_table, write_csv

FACTORS = ("model", "weights", "data", "seed")
GRID_FILE = "grid.tsv"


# ------------------------------------------------------------------------------------ reading
def read_grid(sweep: Path) -> dict[str, dict[str, str]]:
    """``grid.tsv`` -> {cell: row}; empty when the sweep has no grid."""
    path = sweep / GRID_FILE
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["cell"]: row for row in csv.DictReader(f, delimiter="\t")}


def _number(value: str) -> Any:
    """A CSV cell as int, float (empty -> NaN) or the string itself."""
    if value is None or value == "":
        return math.nan
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def factors_from_config(run: Path) -> dict[str, Any]:
    """Model, weights, data and seed from the run's resolved ``config.yaml`` (runs outside a grid)."""
    out: dict[str, Any] = {"model": "", "weights": "", "data": "", "seed": ""}
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        return out
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
    except Exception as e:  # a damaged file costs the factors, not the results
        print(f"warning: cannot read {cfg_path}: {e}", file=sys.stderr)
        return out
    model = cfg.get("model") or {}
    data = cfg.get("data") or {}
    weights = model.get("encoder_weights") or {}
    out["model"] = model.get("name", "")
    out["weights"] = ",".join(f"{k}:{Path(str(v)).name}" for k, v in sorted(weights.items())) or "none"
    out["data"] = data.get("synthetic") or Path(str(data.get("root", ""))).name
    out["seed"] = (cfg.get("train") or {}).get("seed", "")
    return out


def read_run(run: Path, sweep: Path, grid: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """The rows of one run: one per test set in its summary.csv."""
    cell = grid.get(run.name) if run.parent == sweep else None
    if cell is not None:
        base: dict[str, Any] = {k: cell.get(k, "") for k in FACTORS}
        base["seed"] = _number(base["seed"])
    else:
        base = factors_from_config(run)
    base["run"] = run.relative_to(sweep).as_posix()

    best: dict[str, Any] = {}
    meta_path = run / "best" / "model.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            best["best_epoch"] = meta.get("epoch", math.nan)
            for k, v in (meta.get("val") or {}).items():
                best[f"val_{k}"] = v
        except (OSError, ValueError) as e:
            print(f"warning: cannot read {meta_path}: {e}", file=sys.stderr)

    rows = []
    with (run / "eval" / "summary.csv").open(newline="") as f:
        for rec in csv.DictReader(f):
            row = dict(base)
            row.update({k: (v if k == "set" else _number(v)) for k, v in rec.items()})
            row.update(best)
            rows.append(row)
    return rows


def collect(sweep: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """All result rows under ``sweep`` (sorted) and the grid cells that have none."""
    sweep = sweep.resolve()
    grid = read_grid(sweep)
    rows: list[dict[str, Any]] = []
    done: set[str] = set()
    # rglob does not enter linked folders; a grid cell may be a link to a cell of another study
    linked = [sweep / cell / "eval" / "summary.csv" for cell in grid if (sweep / cell).is_symlink()]
    for summary in sorted({*sweep.rglob("eval/summary.csv"), *(f for f in linked if f.is_file())}):
        run = summary.parent.parent
        rows.extend(read_run(run, sweep, grid))
        done.add(run.name)
    rows.sort(key=lambda r: (str(r["data"]), str(r["set"]), str(r["model"]), str(r["weights"]),
                             _sort_key(r["seed"]), r["run"]))
    missing = [cell for cell in grid if cell not in done]
    return rows, missing


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


# ------------------------------------------------------------------------------------ writing
def columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Factors, run and set first, then every other column in order of first appearance."""
    first = [*FACTORS, "run", "set"]
    rest: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k not in first:
                rest.setdefault(k)
    return first + list(rest)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """``results.csv``: the rows in :func:`columns` order, cells as :func:`_cell` formats them
    (through :func:`pretrain.outputs.write_csv`)."""
    return write_csv(path, columns(rows), [{k: _cell(v) for k, v in r.items()} for r in rows])


def mean_std(values: list[float]) -> str:
    """Finite values in % as "mean ± sample std" ("mean" for one value, "n/a" for none)."""
    xs = [100 * v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def markdown(rows: list[dict[str, Any]], missing: list[str], sets: list[str] | None = None) -> str:
    """Per data set: mean ± std over seeds of NASA IoU, per-class IoU and mIoU (in %)."""
    lines: list[str] = []
    by_data: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if sets is None or r["set"] in sets:
            by_data[str(r["data"])].append(r)
    for data, drows in by_data.items():
        classes = [k for k in columns(drows) if k.startswith("iou_")]
        head = ["set", "model", "weights", "seeds", "NASA IoU", *[f"IoU {k[4:]}" for k in classes], "mIoU"]
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for r in drows:
            groups[(r["set"], str(r["model"]), str(r["weights"]))].append(r)
        table = [[set_name, model, weights, str(len(g)), mean_std([r.get("nasa_iou_mean") for r in g]),
                  *[mean_std([r.get(k) for r in g]) for k in classes], mean_std([r.get("miou") for r in g])]
                 for (set_name, model, weights), g in groups.items()]
        lines += [f"### {data}", "", markdown_table(head, table, ["l"] * 3 + ["r"] * (len(head) - 3)), ""]
    if lines:
        lines += ["IoU in %, mean ± sample standard deviation over seeds (one value: one seed). NASA IoU: "
                  "the benchmark's class-pooled IoU, averaged over the images of the set; per-class IoU "
                  "and mIoU pooled over the pixels of the set (segment.evaluate).", ""]
    if missing:
        lines += [f"Cells without results ({len(missing)}): not run yet, running, or failed "
                  "(see logs/ in the sweep folder):", ""] + [f"- {c}" for c in missing] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="sweep folder (or any folder holding fine-tuning runs)")
    p.add_argument("--csv", type=Path, help="CSV output (default SWEEP/results.csv)")
    p.add_argument("--md", type=Path, help="Markdown output (default SWEEP/results.md)")
    p.add_argument("--sets", help="comma-separated test sets for the Markdown table (default: all)")
    args = p.parse_args(argv)
    if not args.sweep.is_dir():
        p.error(f"{args.sweep} is not a folder")
    rows, missing = collect(args.sweep)
    md = markdown(rows, missing, args.sets.split(",") if args.sets else None)
    if not rows:
        print(md, end="")
        print(f"no eval/summary.csv under {args.sweep}", file=sys.stderr)
        return 1
    csv_path = args.csv or args.sweep / "results.csv"
    md_path = args.md or args.sweep / "results.md"
    write_results_csv(rows, csv_path)
    atomic_write_text(md_path, md)
    print(md, end="")
    print(f"{len(rows)} rows from {len({r['run'] for r in rows})} runs -> {csv_path}, {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
