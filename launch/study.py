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
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import math
import os
import socket
import statistics
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from pretrain.checkpointing import STATE_FILE, list_checkpoints
from pretrain.cli_checks import check_config_keys
from pretrain.outputs import atomic_path, atomic_write_text, write_csv
from segment import results
from segment.config import FinetuneConfig, register_configs
from segment.finetune import train

log = logging.getLogger("launch.study")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEFAULT_CONFIG = CONFIGS / "study" / "default.yaml"
STATUS_FILE = "study.json"
CLAIM_FILE = "claim.json"
FAILURES = "failures.csv"




# ------------------------------------------------------------------------------------ grid
@dataclass
class Cell:
    model: str
    init: str
    trainset: str
    seed: int
    overrides: list[str] = field(default_factory=list)  # without out=
    family: str = ""
    images: Optional[int] = None

    @property
    def name(self) -> str:
        return f"{self.model}__{self.init}__{self.trainset}__s{self.seed}"


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


def load_study(path: str | Path, extra: list[str] | None = None) -> dict[str, Any]:
    cfg = OmegaConf.load(path)
    if extra:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra))
    return _plain(cfg)


def _models(spec: Any) -> dict[str, list[str]]:
    if isinstance(spec, list):
        out = {}
        for name in spec:
            group = CONFIGS / "model" / f"{name}.yaml"
            out[str(name)] = [f"model={name}"] if group.is_file() else [f"model.name={name}"]
        return out
    return {str(k): list(v or []) for k, v in (spec or {}).items()}


def expand(study: dict[str, Any]) -> list[Cell]:
    """The cells of the grid, in order seed, training set, model, init."""
    models = _models(study.get("models"))
    inits = study.get("inits") or {"random": []}
    trainsets = study.get("trainsets") or {}
    seeds = [int(s) for s in study.get("seeds", [0])]
    common = list(study.get("common") or [])
    optional = set(study.get("optional_inits") or [])
    if not models or not trainsets:
        raise ValueError("the study needs at least one model and one training set")
    cells = []
    for seed in seeds:  # seed outermost: a study stopped half-way has every comparison at its first seeds
        for ts, t_spec in trainsets.items():
            if isinstance(t_spec, dict):
                t_over, family, images = list(t_spec.get("overrides") or []), str(t_spec.get("family", "")), t_spec.get("images")
            else:
                t_over, family, images = list(t_spec or []), "", None
            for model, m_over in models.items():
                for init, i_spec in inits.items():
                    if isinstance(i_spec, dict):
                        if model not in i_spec:
                            continue  # this initialisation does not apply to this model
                        i_over = list(i_spec[model] or [])
                    else:
                        i_over = list(i_spec or [])
                    if init in optional and not _weights_present(i_over):
                        continue  # e.g. user-given encoder files that this machine does not have
                    cells.append(Cell(model, init, ts, seed,
                                      [*common, *m_over, *i_over, *t_over, f"train.seed={seed}"],
                                      family, int(images) if images is not None else None))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError("duplicate cell names: model, init and training-set names must be unique")
    return cells


def _weights_present(overrides: list[str]) -> bool:
    """True when every ``model.encoder_weights.<branch>=PATH`` in ``overrides`` names an existing file or folder."""
    paths = [tok.partition("=")[2] for tok in overrides if tok.lstrip("+").startswith("model.encoder_weights.")]
    return bool(paths) and all(p and Path(p).exists() for p in paths)


def select(cells: list[Cell], pattern: Optional[str]) -> list[Cell]:
    """Cells named PATTERN, else matching it (fnmatch; without wildcards: substring)."""
    if not pattern:
        return cells
    if any(c.name == pattern for c in cells):
        return [c for c in cells if c.name == pattern]
    pat = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
    return [c for c in cells if fnmatch.fnmatchcase(c.name, pat)]


def is_done(run: Path) -> bool:
    return (run / "eval" / "summary.csv").is_file()


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def claim(run: Path) -> bool:
    """Take the cell for this process, so that several study processes can share one folder.

    ``CELL/claim.json`` (host, pid) is created exclusively; False when another process holds it. A claim
    left by a dead process on this host is taken over; claims from other hosts are honoured (delete the
    file to free a cell whose job died elsewhere).
    """
    run.mkdir(parents=True, exist_ok=True)
    path = run / CLAIM_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder == me:
                return True
            if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release(run: Path) -> None:
    (run / CLAIM_FILE).unlink(missing_ok=True)


def write_grid(cells: list[Cell], out: Path) -> None:
    """``OUT/grid.tsv`` in segment.results' format (weights = init, data = training set)."""
    write_csv(out / results.GRID_FILE, ["cell", "model", "weights", "data", "seed", "family", "images", "overrides"],
              ([c.name, c.model, c.init, c.trainset, c.seed, c.family, "" if c.images is None else c.images,
                " ".join(c.overrides)] for c in cells), delimiter="\t")


# ------------------------------------------------------------------------------------ running
def compose_cell(cell: Cell, out: Path):
    """The typed FinetuneConfig of a cell (raises on an unknown key or a bad value)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("finetune", overrides=[*cell.overrides, f"out={out / cell.name}"])
    check_config_keys(cfg, FinetuneConfig)  # Hydra's `+key=` adds even a misspelt key
    return OmegaConf.to_object(cfg)


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


# ------------------------------------------------------------------------------------ aggregation
def _train_info(run: Path) -> dict[str, Any]:
    """Of a finished run: training images (count), training wall minutes, optimizer steps and why training
    stopped (NaN / "" when unknown)."""
    info: dict[str, Any] = {"n_train": None, "wall_min": math.nan, "steps": math.nan, "stopped": ""}

    def read(path: Path) -> dict:
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    checkpoints = list_checkpoints(run)
    trainer = read(checkpoints[-1][1] / STATE_FILE) if checkpoints else read(run / "state" / "trainer.json")  # older runs
    status, meta = read(run / STATUS_FILE), read(run / "best" / "model.json")
    images = status.get("train_images") or meta.get("train_images")
    if images:
        info["n_train"] = len(images)
    minutes = status.get("train_minutes")
    if minutes is None and "elapsed" in trainer:
        minutes = float(trainer["elapsed"]) / 60
    if minutes is not None:
        info["wall_min"] = float(minutes)
    if "global_step" in trainer:
        info["steps"] = int(trainer["global_step"])
    info["stopped"] = str(status.get("stopped") or "")
    return info


def encoder_knn(overrides: str) -> dict[str, float]:
    """``{"knn_<branch>": top-1}`` from the ``encoder.json`` of each ``model.encoder_weights.<branch>=PATH``
    override (the k-NN probe that ``pretrain`` records in its exports); nothing for other weight files."""
    found: dict[str, float] = {}
    for token in overrides.split():
        key, _, value = token.lstrip("+").partition("=")
        if not key.startswith("model.encoder_weights.") or not value:
            continue
        path = Path(value)
        meta = path / "encoder.json" if path.is_dir() else path.with_name("encoder.json")
        try:
            top1 = (json.loads(meta.read_text()).get("knn") or {}).get("top1")
        except (OSError, ValueError):
            continue
        if top1 is not None:
            found[f"knn_{key.rsplit('.', 1)[1]}"] = float(top1)
    return found


def aggregate(out: Path, ood_sets: list[str] | tuple[str, ...] = ()) -> tuple[list[dict], list[str]]:
    """Rows (one per cell and test set) of the study in OUT, and the grid cells without results."""
    out = Path(out).resolve()
    rows, missing = results.collect(out)
    grid = results.read_grid(out)
    infos: dict[str, dict[str, Any]] = {}  # per cell, not per row: a cell has a row per test set
    knns: dict[str, dict[str, float]] = {}
    for r in rows:
        run = out / r["run"]
        g = grid.get(run.name, {})
        r["init"], r["trainset"] = r["weights"], r["data"]
        r["family"] = g.get("family", "")
        if r["run"] not in infos:
            infos[r["run"]] = _train_info(run)
        info = infos[r["run"]]
        n = info["n_train"]
        if n is None and g.get("images"):
            n = int(g["images"])
        r["n_train"] = n if n is not None else math.nan
        r["wall_min"], r["steps"], r["stopped"] = info["wall_min"], info["steps"], info["stopped"]
        r["kind"] = "ood" if r["set"] in ood_sets else "in"
        overrides = g.get("overrides", "")
        if overrides not in knns:
            knns[overrides] = encoder_knn(overrides)
        r.update(knns[overrides])
    return rows, missing


def _fmt_min(values: list[Any]) -> str:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def markdown(rows: list[dict], missing: list[str], failed: list[str] = ()) -> str:
    """Per training set: one row per (test set, model, init): mean ± std over seeds, IoU in %."""
    lines: list[str] = []
    by_ts: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_ts[str(r["trainset"])].append(r)
    for ts, trows in by_ts.items():
        classes = [k for k in results.columns(trows) if k.startswith("iou_")]
        n = {r["n_train"] for r in trows if isinstance(r["n_train"], int)}
        head = ["test set", "kind", "model", "init", "encoder k-NN", "seeds", "NASA IoU",
                *[f"IoU {k[4:]}" for k in classes], "mIoU", "train min"]
        title = f"### {ts}" + (f" ({', '.join(map(str, sorted(n)))} training images)" if n else "")
        lines += [title, "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + "|"]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in trows:
            groups[(str(r["set"]), str(r["model"]), str(r["init"]))].append(r)
        for (set_name, model, init), g in sorted(groups.items()):
            knn = ", ".join(f"{k[4:]} {g[0][k]:.3f}" for k in sorted(g[0]) if k.startswith("knn_")) or "–"
            cells = [set_name, g[0]["kind"], model, init, knn, str(len(g)),
                     results.mean_std([r.get("nasa_iou_mean") for r in g]),
                     *[results.mean_std([r.get(k) for r in g]) for k in classes],
                     results.mean_std([r.get("miou") for r in g]), _fmt_min([r.get("wall_min") for r in g])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if lines:
        lines += ["IoU in %, mean ± sample standard deviation over seeds (one value: one seed). NASA IoU: the "
                  "benchmark's class-pooled IoU averaged over the images of the test set; per-class IoU and mIoU "
                  "pooled over its pixels (segment.evaluate). kind: in / ood (out of distribution). encoder k-NN: "
                  "top-1 of the pretrained encoder(s) on the pretraining's k-NN holdout, per branch (from its "
                  "encoder.json). train min: training wall time in minutes.", ""]
    steps = {str(r["run"]): (r["steps"], str(r.get("stopped") or "")) for r in rows if isinstance(r.get("steps"), int)}
    if steps:
        counts = [n for n, _ in steps.values()]
        common = max(set(counts), key=counts.count)
        short = sorted((run, n, why) for run, (n, why) in steps.items() if n < common)
        lines += [f"Optimizer steps: {common} in {counts.count(common)} of {len(steps)} cells"
                  + (f"; fewer in {len(short)} (early stopping or the time budget):" if short else ".")
                  + ("" if short else " No cell stopped early."), ""]
        lines += [f"- {run}: {n} steps" + (f" ({why})" if why else "") for run, n, why in short] + ([""] if short else [])
    if failed:
        lines += [f"Failed cells ({len(failed)}; see failures.csv and CELL/study.json):", ""] + [f"- {c}" for c in failed] + [""]
    rest = [c for c in missing if c not in set(failed)]
    if rest:
        lines += [f"Cells without results ({len(rest)}): not run yet or interrupted:", ""] + [f"- {c}" for c in rest] + [""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    """NASA IoU vs number of training images: a panel per data family (row) and test-set kind (column: in /
    out of distribution); colour = model, line style = initialisation (solid for the first init listed
    in the rows, dashed, dotted, ... for the others); error bars = std over seeds."""
    import matplotlib  # matplotlib is slow to import: only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("in", "ood") if any(r["kind"] == k for r in rows)]
    if not kinds:
        return None
    families = sorted({str(r.get("family", "")) for r in rows})
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    inits = sorted({str(r["init"]) for r in rows}, key=lambda i: (i != "pretrained", i))
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    styles = {init: ("-", "--", ":", "-.")[i % 4] for i, init in enumerate(inits)}
    fig, axes = plt.subplots(len(families), len(kinds), figsize=(6 * len(kinds), 4.2 * len(families)),
                             squeeze=False)
    for fi, fam in enumerate(families):
        for ki, kind in enumerate(kinds):
            ax = axes[fi][ki]
            pts: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
            for r in rows:
                v, n = r.get("nasa_iou_mean"), r.get("n_train")
                if r["kind"] != kind or str(r.get("family", "")) != fam:
                    continue
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    continue
                if not isinstance(n, (int, float)) or not math.isfinite(n):
                    continue
                pts[(str(r["model"]), str(r["init"]))][float(n)].append(100 * v)
            for (model, init), by_n in sorted(pts.items()):
                xs = sorted(by_n)
                ys = [statistics.fmean(by_n[x]) for x in xs]
                es = [statistics.stdev(by_n[x]) if len(by_n[x]) > 1 else 0.0 for x in xs]
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colours[model], linestyle=styles[init],
                            label=f"{model} / {init}")
            ax.set_xscale("log")
            ticks = sorted({x for by_n in pts.values() for x in by_n})
            if ticks:
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
                ax.minorticks_off()
            ax.set_xlabel("training images")
            ax.set_ylabel("NASA IoU (%)")
            where = "in distribution" if kind == "in" else "out of distribution"
            ax.set_title(f"{fam}: {where}" if fam else where)
            ax.grid(alpha=0.3)
            if pts:
                ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def overview_markdown(rows: list[dict]) -> str:
    """One table: a row per (training set, test set), a column per model/init, NASA IoU mean ± std in %."""
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    combos = sorted({(str(r["model"]), str(r["init"])) for r in rows},
                    key=lambda c: (models.index(c[0]), c[1] != "random", c[1]))
    groups: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    order: dict[tuple, None] = {}
    for r in rows:
        key = (str(r["trainset"]), str(r["set"]), r["kind"], r["n_train"])
        order.setdefault(key)
        groups[key][(str(r["model"]), str(r["init"]))].append(r.get("nasa_iou_mean"))
    head = ["training set", "images", "test set", "kind", *[f"{m} / {i}" for m, i in combos]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * len(combos)) + "|"]
    for key in sorted(order, key=lambda k: (k[0], k[2] != "in", k[1])):
        ts, set_name, kind, n = key
        n_txt = f"{n:g}" if isinstance(n, (int, float)) and math.isfinite(n) else "?"
        lines.append("| " + " | ".join([ts, n_txt, set_name, kind, *[results.mean_std(groups[key][c]) for c in combos]]) + " |")
    return "\n".join(lines) + "\n"


def paired_effects(rows: list[dict], factor: str, a: str, b: str, metric: str = "nasa_iou_mean") -> list[dict]:
    """``a`` minus ``b`` for one factor (``init`` or ``model``), paired by seed with every other factor
    equal: per training set, test set and the other factor, the per-seed differences of ``metric``."""
    other = "model" if factor == "init" else "init"
    table: dict[tuple, dict[str, dict[Any, float]]] = defaultdict(lambda: {a: {}, b: {}})
    for r in rows:
        level, v = str(r[factor]), r.get(metric)
        if level in (a, b) and isinstance(v, (int, float)) and math.isfinite(v):
            table[(str(r["trainset"]), str(r["set"]), r["kind"], str(r[other]))][level][r["seed"]] = float(v)
    out = []
    for (ts, set_name, kind, lvl), by in table.items():
        seeds = sorted(set(by[a]) & set(by[b]), key=str)
        if seeds:
            out.append(dict(trainset=ts, set=set_name, kind=kind, other=lvl, diffs=[by[a][s] - by[b][s] for s in seeds]))
    return out


def effects_markdown(rows: list[dict], comparisons: list[dict]) -> str:
    """One table per comparison (``{factor: init, a: pretrained, b: random}``): mean ± std of the paired
    differences in NASA IoU points, and how many seeds ``a`` won."""
    lines: list[str] = []
    for c in comparisons:
        factor, a, b = c["factor"], str(c["a"]), str(c["b"])
        eff = paired_effects(rows, factor, a, b)
        if not eff:
            continue
        other = "model" if factor == "init" else "init"
        lines += [f"### {a} − {b} (NASA IoU points, paired by seed)", "",
                  f"| training set | test set | kind | {other} | seeds | Δ mean ± std | {a} better |",
                  "|---|---|---|---|---:|---:|---:|"]
        for e in sorted(eff, key=lambda e: (e["trainset"], e["kind"], e["set"], e["other"])):
            d = [100 * x for x in e["diffs"]]
            ms = f"{statistics.fmean(d):+.2f}" + (f" ± {statistics.stdev(d):.2f}" if len(d) > 1 else "")
            lines.append(f"| {e['trainset']} | {e['set']} | {e['kind']} | {e['other']} | {len(d)} | {ms} | "
                         f"{sum(x > 0 for x in d)}/{len(d)} |")
        lines.append("")
    return "\n".join(lines)


def summarize(out: Path, ood_sets: list[str] | tuple[str, ...] = (), failed: list[str] = (),
              comparisons: list[dict] | None = None) -> tuple[list[dict], str]:
    """Write results.csv, results.md (with the paired ``comparisons``) and iou_vs_train_images.png in OUT;
    returns rows and the Markdown."""
    out = Path(out)
    rows, missing = aggregate(out, ood_sets)
    md = markdown(rows, missing, failed)
    if rows:
        md = "## NASA IoU overview (%, mean ± std over seeds)\n\n" + overview_markdown(rows) + "\n## Per training set\n\n" + md
    if comparisons and rows:
        extra = effects_markdown(rows, comparisons)
        md = md + ("\n## Paired comparisons\n\n" + extra if extra else "")
    if rows:
        results.write_results_csv(rows, out / "results.csv")
        plot(rows, out / "iou_vs_train_images.png")
    atomic_write_text(out / "results.md", md)
    return rows, md


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
