"""Aggregation of a study folder: the per-cell results (:func:`aggregate`, through :mod:`segment.results`),
the Markdown tables (overview, per training set, paired comparisons), the IoU-vs-training-images figure,
and :func:`summarize`, which writes ``results.csv``, ``results.md`` and ``iou_vs_train_images.png``.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from launch.study_run import STATUS_FILE
from pretrain.checkpointing import STATE_FILE, list_checkpoints
from pretrain.outputs import atomic_path, atomic_write_text
from segment import results


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
