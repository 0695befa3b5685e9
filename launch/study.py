"""Run a study: models x encoder initialisations x training sets x seeds, then aggregate.

    python -m launch.study [--config configs/study/default.yaml] [--out runs/study]
                            [--only PATTERN] [--dry-run] [--collect-only]

Each cell is one ``segment.finetune.train`` call (composed in-process with Hydra from
``configs/finetune.yaml`` and the cell's overrides) into ``OUT/<model>__<init>__<trainset>__s<seed>``.
A cell whose ``eval/summary.csv`` exists is skipped, so rerunning an interrupted study resumes it (a
cell killed mid-training resumes from its own checkpoint, as fine-tuning does). A failing cell is
recorded in ``OUT/failures.csv`` and ``CELL/study.json`` and the study goes on.

Then the per-cell results are collected with :mod:`segment.results` (the study writes ``OUT/grid.tsv``
in its format: cell, model, weights = initialisation, data = training set, seed) into
- ``OUT/results.csv``: one row per cell and test set (+ ``init``, ``trainset``, ``kind``, ``n_train``,
  ``wall_min``);
- ``OUT/results.md``: mean ± sample std over seeds per training set / test set / model / init;
- ``OUT/iou_vs_train_images.png``: NASA IoU against the number of training images, one line per
  model/init (and data family), one panel per test-set kind (in / out of distribution).

Study config (YAML, OmegaConf interpolation allowed; see configs/study/):
  models:    {name: [finetune overrides]}    (or a list of names: ``model=NAME`` / ``model.name=NAME``)
  inits:     {name: [overrides]} or {name: {model: [overrides]}} (models not listed: no such cell)
  optional_inits: [init names whose cells exist only where all their encoder_weights paths exist]
  trainsets: {name: [overrides]} or {name: {overrides: [...], family: super, images: 10}}
  seeds:     [0, 1, 2]
  common:    [overrides for every cell]
  ood_sets:  [test-set names counted as out of distribution]
  comparisons: [{factor: init|model, a: LEVEL, b: LEVEL}]  (paired-by-seed differences in results.md)

This module is the CLI and runs the cells (:func:`run_study`); the grid is :mod:`launch.study_grid`, a
cell's folder (config, claim, status) :mod:`launch.study_run`, the aggregation :mod:`launch.study_tables`.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from launch.study_grid import DEFAULT_CONFIG, Cell, expand, load_study, select, write_grid
from launch.study_run import FAILURES, STATUS_FILE, claim, compose_cell, is_done, release
from launch.study_tables import summarize
from pretrain.outputs import atomic_write_text
from segment.finetune import train

log = logging.getLogger("launch.study")


def train_cell(cfg) -> dict[str, Any]:
    return train(cfg)


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def run_study(cells: list[Cell], out: Path, *, dry_run: bool = False,
              trainer: Callable[[Any], dict] | None = None) -> dict[str, list[str]]:
    """Run the cells not finished yet, in order; a cell stopped by a signal ends the study (rerun resumes).

    Cells held by another study process (:func:`claim`) are left to it. Returns the cell names by outcome:
    done, skipped (finished before), failed, interrupted, held (by another process), todo (dry run).
    """
    trainer = trainer or train_cell
    report: dict[str, list[str]] = {"done": [], "skipped": [], "failed": [], "todo": [], "interrupted": [],
                                    "held": []}
    for i, cell in enumerate(cells, 1):
        run = out / cell.name
        if is_done(run):
            report["skipped"].append(cell.name)
            log.info("[%d/%d] %s: finished, skipped", i, len(cells), cell.name)
            continue
        if dry_run:
            compose_cell(cell, out)  # validates the overrides
            report["todo"].append(cell.name)
            print(f"[{i}/{len(cells)}] would run {cell.name}: {' '.join(cell.overrides)}")
            continue
        if not claim(run):
            report["held"].append(cell.name)
            log.info("[%d/%d] %s: held by another study process, skipped", i, len(cells), cell.name)
            continue
        log.info("[%d/%d] %s: training", i, len(cells), cell.name)
        t0 = time.time()
        try:
            cfg = compose_cell(cell, out)
            result = trainer(cfg)
            if result.get("stopped") == "signal":  # SIGTERM/SIGINT or RUN/PREEMPT: stop the whole study
                log.warning("%s interrupted at step %s; rerun the study to resume", cell.name, result.get("global_step"))
                report["interrupted"].append(cell.name)
                break
            if not is_done(run):
                raise RuntimeError("training ended without eval/summary.csv")
            run.mkdir(parents=True, exist_ok=True)
            _write_json(run / STATUS_FILE, dict(status="done", wall_s=time.time() - t0,
                                                train_minutes=result.get("minutes"),
                                                steps=result.get("global_step"), stopped=result.get("stopped"),
                                                train_images=result.get("train_images"),
                                                overrides=cell.overrides))
            report["done"].append(cell.name)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # record and go on with the next cell
            log.error("%s failed: %s", cell.name, e)
            err = f"{type(e).__name__}: {e}"
            run.mkdir(parents=True, exist_ok=True)
            _write_json(run / STATUS_FILE, dict(status="failed", error=err, traceback=traceback.format_exc(),
                                                wall_s=time.time() - t0, overrides=cell.overrides))
            new = not (out / FAILURES).is_file()
            with (out / FAILURES).open("a", newline="") as f:
                w = csv.writer(f, lineterminator="\n")
                if new:
                    w.writerow(["time", "cell", "error"])
                w.writerow([time.strftime("%Y-%m-%d %H:%M:%S"), cell.name, err])
            report["failed"].append(cell.name)
        finally:
            release(run)
    return report


def _failed_cells(out: Path, names: list[str]) -> list[str]:
    failed = []
    for n in names:
        s = out / n / STATUS_FILE
        if not is_done(out / n) and s.is_file():
            try:
                if json.loads(s.read_text()).get("status") == "failed":
                    failed.append(n)
            except (OSError, ValueError):
                pass
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="study YAML (default: %(default)s)")
    p.add_argument("--out", type=Path, help="study folder (default: the config's out, else runs/study)")
    p.add_argument("--only", help="run only the cell named PATTERN, else the cells matching it (fnmatch, or substring)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, compose their configs, train nothing")
    p.add_argument("--collect-only", action="store_true", help="only aggregate the finished cells")
    p.add_argument("set", nargs="*", help="study-config overrides, KEY=VALUE (e.g. seeds=[0])")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    study = load_study(args.config, args.set)
    out = Path(args.out or study.get("out") or "runs/study")
    all_cells = expand(study)
    cells = select(all_cells, args.only)
    print(f"study {args.config}: {len(all_cells)} cells, {len(cells)} selected, out {out}")
    if args.dry_run:
        report = run_study(cells, out, dry_run=True)
        print(f"{len(report['skipped'])} finished, {len(report['todo'])} to run")
        return 0
    write_grid(all_cells, out)
    report: dict[str, list[str]] = {"failed": [], "interrupted": []}
    if not args.collect_only:
        report = run_study(cells, out)
        print(f"done {len(report['done'])}, skipped (finished) {len(report['skipped'])}, "
              f"failed {len(report['failed'])}, interrupted {len(report['interrupted'])}, "
              f"held by other processes {len(report['held'])}")
    rows, md = summarize(out, study.get("ood_sets") or [], _failed_cells(out, [c.name for c in all_cells]),
                         study.get("comparisons") or [])
    print(md, end="")
    print(f"{len(rows)} rows -> {out / 'results.csv'}, {out / 'results.md'}, {out / 'iou_vs_train_images.png'}")
    return 1 if report["failed"] or report["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
