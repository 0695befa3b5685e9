"""Equal wall time: the product's fine-tuning against the plain peer, trained side by side for the same minutes.

    nice -n 5 python bench/equal_time.py --minutes 15 --seeds 0 1 2 --cases super3 super1 ebc1 \
        --product unet_lite="model=unet_lite" --out runs/equal_time
    python bench/equal_time.py --out runs/equal_time --collect-only      # the table of what has finished

For each seed (outer loop, so a stopped run leaves whole seeds) and case, `bench/plain_baseline.py` and each
`--product` (a name and its `segment.finetune` overrides) train on the case's one training set for
`--minutes` of wall time each, as separate processes with one thread, all runners of one cell at once (the
peer and every product side by side, so all see the same machine load; the next cell starts when the whole
cell is done). The
product runs with its defaults except the model, the data preset, `train.max_minutes` (its step budget set
out of reach, so the clock is the budget and the cosine follows it) and the seed. Both are scored with the
product's NASA IoU code on the case's test split and its out-of-distribution set. A finished job (its
result file exists) is not rerun, so rerunning resumes. Writes OUT/results.csv (one row per job and test
set) and OUT/summary.md (mean ± sample std over seeds).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from pretrain.outputs import atomic_write_text, write_csv  # noqa: E402

DATA = Path(os.environ.get("MSEG_DATA", REPO.parent / "shared" / "data"))

# case -> training set, out-of-distribution test set (ROOT:SPLIT under DATA), the product's data overrides,
# the class whose IoU is shown beside NASA IoU
CASES = {
    "super3": ("nasa/Super3", "nasa/Super4:test", ["data=super3"], "tertiary"),
    "super1": ("nasa/Super1", "nasa/Super4:test", ["data=super1"], "tertiary"),
    "ebc1": ("nasa/EBC1", "nasa/EBC3:test", ["data=ebc1", "data.zoom=0.5"], "oxide"),
}
PLAIN = "plain_baseline"


@dataclass(frozen=True)
class Job:
    runner: str  # PLAIN or a product name
    case: str
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.runner}__{self.case}__s{self.seed}"

    def result(self, out: Path) -> Path:
        folder = out / self.name
        return folder / "result.json" if self.runner == PLAIN else folder / "eval" / "summary.csv"

    def command(self, out: Path, minutes: float) -> list[str]:
        train, ood, data, _ = CASES[self.case]
        folder = out / self.name
        if self.runner == PLAIN:
            return [sys.executable, str(REPO / "bench" / "plain_baseline.py"), str(DATA / train),
                    "--minutes", str(minutes), "--seed", str(self.seed), "--threads", "1",
                    "--test", str(DATA / ood), "--out", str(folder / "result.json")]
        return [sys.executable, "-m", "segment.finetune", *self.overrides, *data,
                f"train.max_minutes={minutes}", "train.steps=1000000", f"train.seed={self.seed}",
                f"out={folder}", "overlays=1"]


def plan(cases: list[str], seeds: list[int], products: dict[str, list[str]]) -> list[Job]:
    """Seed-major job list; the peer first in each cell, then the products."""
    return [job for seed in seeds for case in cases
            for job in [Job(PLAIN, case, seed)] + [Job(n, case, seed, tuple(o)) for n, o in products.items()]]


def run_jobs(jobs: list[Job], out: Path, minutes: float) -> None:
    """Run the unfinished jobs cell by cell: every runner of one (case, seed) cell at once, each a process with
    one thread, and the next cell only when the whole cell has finished, so that the peer and the products of
    a cell share the machine's load from start to end. A failed job is reported, not fatal."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cells = dict.fromkeys((j.case, j.seed) for j in jobs)
    for cell in cells:
        todo = [j for j in jobs if (j.case, j.seed) == cell and not j.result(out).is_file()]
        running = []
        for job in todo:
            folder = out / job.name
            folder.mkdir(parents=True, exist_ok=True)
            cmd = job.command(out, minutes)
            (folder / "command.txt").write_text(shlex.join(cmd) + "\n")
            with open(folder / "log.txt", "a") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((job, proc, time.time(), os.getloadavg()))
            print(f"started {job.name}", flush=True)
        for job, proc, t0, load0 in running:
            proc.wait()
            info = dict(rc=proc.returncode, wall_min=(time.time() - t0) / 60, load_start=load0,
                        load_end=os.getloadavg(), side_by_side=[j.name for j, *_ in running])
            atomic_write_text(out / job.name / "job.json", json.dumps(info) + "\n")
            status = "done" if proc.returncode == 0 and job.result(out).is_file() else f"FAILED (rc {proc.returncode})"
            print(f"{status}: {job.name} after {info['wall_min']:.1f} min", flush=True)


def read_job(job: Job, out: Path) -> list[dict]:
    """One row per test set of a finished job: in/ood, NASA IoU, the case's class of interest, steps, minutes."""
    _, _, _, cls = CASES[job.case]
    rows = []
    base = dict(runner=job.runner, case=job.case, seed=job.seed)
    if job.runner == PLAIN:
        r = json.loads(job.result(out).read_text())
        for i, (name, t) in enumerate(r["tests"].items()):
            rows.append(dict(base, test=name, kind="in" if i == 0 else "ood", nasa_iou=t["nasa_iou_mean"],
                             cls_iou=t["iou_per_class"][cls], steps=r["steps"], train_min=r["minutes"]))
        return rows
    folder = out / job.name
    with open(folder / "history.csv") as f:
        hist = list(csv.DictReader(f))
    with open(job.result(out)) as f:
        for t in csv.DictReader(f):
            rows.append(dict(base, test=t["set"], kind="in" if t["set"] == "test" else "ood",
                             nasa_iou=float(t["nasa_iou_mean"]), cls_iou=float(t[f"iou_{cls}"]),
                             steps=int(hist[-1]["step"]), train_min=float(hist[-1]["minutes"])))
    return rows


def summarize(rows: list[dict], runners: list[str]) -> str:
    """Markdown: per case and kind, each runner's NASA IoU (class IoU) as mean ± sample std over seeds."""
    def cell(vals: list[float]) -> str:
        if not vals:
            return "–"
        m = 100 * statistics.mean(vals)
        return f"{m:.1f} ± {100 * statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{m:.1f}"

    lines = ["| case | test | " + " | ".join(runners) + " |", "|---|---|" + "---|" * len(runners)]
    keys = dict.fromkeys((r["case"], r["kind"]) for r in rows)
    for case, kind in keys:
        cells = []
        for runner in runners:
            sel = [r for r in rows if (r["case"], r["kind"], r["runner"]) == (case, kind, runner)]
            cls = CASES[case][3]
            steps = "/".join(str(r["steps"]) for r in sorted(sel, key=lambda r: r["seed"]))
            cells.append(f"{cell([r['nasa_iou'] for r in sel])} ({cls} {cell([r['cls_iou'] for r in sel])}; "
                         f"n={len(sel)}, steps {steps})" if sel else "–")
        test = next(r["test"] for r in rows if (r["case"], r["kind"]) == (case, kind))
        lines.append(f"| {case} | {test} ({kind}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collect(jobs: list[Job], out: Path) -> str:
    rows = [row for job in jobs if job.result(out).is_file() for row in read_job(job, out)]
    if rows:
        write_csv(out / "results.csv", list(rows[0]), rows)
    text = summarize(rows, list(dict.fromkeys(j.runner for j in jobs)))
    atomic_write_text(out / "summary.md", text)
    return text


def parse_product(spec: str) -> tuple[str, list[str]]:
    name, sep, overrides = spec.partition("=")
    if not sep or not name or name == PLAIN:
        raise argparse.ArgumentTypeError(f"--product wants NAME='finetune overrides', got {spec!r}")
    return name, shlex.split(overrides)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--product", type=parse_product, action="append",
                    help="NAME='segment.finetune overrides' (repeatable; default unet_lite='model=unet_lite')")
    ap.add_argument("--collect-only", action="store_true")
    args = ap.parse_args(argv)
    products = dict(args.product or [("unet_lite", ["model=unet_lite"])])
    jobs = plan(args.cases, args.seeds, products)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        run_jobs(jobs, args.out, args.minutes)
    print(collect(jobs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
