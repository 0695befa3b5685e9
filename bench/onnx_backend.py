"""ONNX Runtime CPU backend (``segment.predict --backend onnx``) against PyTorch eager and MONAI.

    python bench/onnx_backend.py [--checkpoint runs/study_intensity/unet_lite__zscore__super1__s0/best]
        [--data ../shared/data/nasa/Super1] [--size 4096] [--repeats 1] [--batch 4] [--threads 2]
        [--skip-agreement] [--skip-speed] [--out bench/results/onnx_backend.md]

1. Agreement (in process): every test image of ``--data`` through the product's band-wise path
   (``segment.stream.predict_stream``, as ``segment.predict`` runs it) with the PyTorch model and
   with the ONNX file ``segment.export`` wrote; pixel agreement of the two masks, and the NASA IoU
   of each against the hand labels.
2. Speed at ``--size``^2: a mosaic of the test images (8-bit, flipped copies) written as an
   uncompressed TIFF; three methods on the same tiles (the checkpoint's tile, overlap 0.5, Gaussian
   sigma = tile / 8, batch ``--batch``, ``--threads`` threads each): ONNX Runtime and PyTorch eager
   through ``predict_stream`` (bounded memory), and MONAI's ``sliding_window_inference`` on the
   whole normalised image (K x H x W map). Each run is a fresh subprocess (peak RSS from
   ``os.wait4``), the methods interleaved run by run (order rotated) so that load drifts hit all;
   ratios from the same invocation, medians over ``--repeats``. Model loading, the ONNX session and
   one warm-up batch come before the clock; reading, scaling, tiling, blending and argmax are timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "runs" / "study_intensity" / "unet_lite__zscore__super1__s0" / "best"
DATA = ROOT.parent / "shared" / "data" / "nasa" / "Super1"
METHODS = ("onnx", "torch", "monai")
CHILDREN = (*METHODS, "export")
NAMES = {"onnx": "ONNX Runtime (segment.predict --backend onnx)", "torch": "PyTorch eager (segment.predict)",
         "monai": "MONAI sliding_window_inference (PyTorch eager)"}


# ----------------------------------------------------------------------------- agreement
def agreement(args: argparse.Namespace, onnx_path: Path) -> list[str]:
    import torch

    from segment.class_maps import get_class_map
    from segment.evaluate import read_truth
    from segment.infer import Predictor
    from segment.metrics import confusion_matrix, nasa_iou
    from segment.onnx_backend import onnx_predictor
    from segment.pairs import find_pairs
    from segment.sources import open_source
    from segment.stream import predict_stream

    torch.set_num_threads(args.threads)
    settings = dict(batch_size=args.batch)
    backends = {"torch": Predictor.from_checkpoint(args.checkpoint, **settings),
                "onnx": onnx_predictor(args.checkpoint, onnx_path, threads=args.threads, **settings)}
    class_map = get_class_map(backends["torch"].meta["class_map"])
    lines = ["| image | pixels | agreement % | differing pixels | NASA IoU torch | NASA IoU onnx |",
             "|---|---:|---:|---:|---:|---:|"]
    same = total = 0
    for image, mask in find_pairs(args.data, "test"):
        truth = read_truth(mask, class_map)
        labels = {}
        for name, predictor in backends.items():
            with open_source(image, gray=True) as src:
                labels[name] = predict_stream(predictor, src, progress=False)
        eq = int((labels["torch"] == labels["onnx"]).sum())
        same, total = same + eq, total + truth.size
        iou = {n: 100 * nasa_iou(confusion_matrix(lab, truth, len(class_map.names))) for n, lab in labels.items()}
        lines.append(f"| {image.name} | {truth.size} | {100 * eq / truth.size:.4f} | {truth.size - eq} | "
                     f"{iou['torch']:.2f} | {iou['onnx']:.2f} |")
        print(lines[-1], flush=True)
    lines.append(f"| all {len(lines) - 2} | {total} | **{100 * same / total:.4f}** | {total - same} | | |")
    return lines


# ----------------------------------------------------------------------------- speed children
def rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export(args: argparse.Namespace) -> None:
    """Child: write the ONNX file (a subprocess, so that the parent never holds torch and the
    speed children's peak RSS, inherited across fork, is their own)."""
    from segment.checkpoint import load_model
    from segment.export import export_onnx

    model, meta = load_model(args.checkpoint)
    t0 = time.perf_counter()
    report = export_onnx(model, args.onnx, tile_hw=(meta["tile_size"],) * 2, in_chans=len(meta["mean"]),
                         mean=meta["mean"], std=meta["std"], metadata={"model": meta["model"]})
    print(json.dumps(dict(report=str(report), seconds=time.perf_counter() - t0)), flush=True)


def child(args: argparse.Namespace) -> None:
    if args.child == "export":
        return export(args)
    import tifffile
    import torch

    from segment.infer import Predictor
    from segment.onnx_backend import onnx_predictor
    from segment.sources import open_source
    from segment.stream import predict_stream
    from segment.tiling import class_labels, tile_origins

    torch.set_num_threads(args.threads)
    settings = dict(batch_size=args.batch)
    if args.child == "onnx":
        predictor = onnx_predictor(args.checkpoint, args.onnx, threads=args.threads, **settings)
    else:
        predictor = Predictor.from_checkpoint(args.checkpoint, **settings)
    th, tw = predictor.tile_hw
    with torch.inference_mode():  # warm-up batch: one-time allocations and kernel choices, both sides
        predictor.predict_tiles(torch.zeros(args.batch, predictor.in_chans, th, tw))
    baseline = rss_mb()
    t0 = time.perf_counter()
    if args.child in ("onnx", "torch"):
        with open_source(args.image, gray=True) as src:
            labels = predict_stream(predictor, src, progress=False)
    else:
        from monai.inferers import sliding_window_inference

        raw = tifffile.imread(args.image)
        x = predictor.normalize(predictor.scale(raw))[None]
        with torch.inference_mode():
            out = sliding_window_inference(x, (th, tw), args.batch, predictor.model, overlap=predictor.overlap,
                                           mode="gaussian", sigma_scale=0.125, device="cpu", sw_device="cpu")
            labels = class_labels(out[0]).numpy()
        del out, x
    seconds = time.perf_counter() - t0
    tiles = len(tile_origins(labels.shape, (th, tw), predictor.step_fraction))
    np.save(args.labels, labels)
    print(json.dumps(dict(seconds=seconds, baseline_mb=baseline, tiles=tiles)), flush=True)


def run_child(method: str, args: argparse.Namespace, image: Path, onnx_path: Path, labels: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--image", str(image), "--labels", str(labels),
           "--onnx", str(onnx_path), "--checkpoint", str(args.checkpoint), "--batch", str(args.batch),
           "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if code:
        raise RuntimeError(f"{method} child failed ({code}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024
    return result


def make_mosaic(path: Path, size: int, data: Path) -> None:
    """``size`` x ``size`` uint8 gray mosaic of the test images (flipped copies), uncompressed TIFF."""
    import tifffile

    from pretrain.intensity import to_float
    from pretrain.io import read_micrograph

    tiles = []
    for p in sorted((data / "test").iterdir()):
        g = to_float(read_micrograph(p, gray=True).image)
        tiles.append((np.clip(g, 0, 1) * 255).round().astype(np.uint8))
    th, tw = tiles[0].shape
    image = np.empty((size, size), np.uint8)
    for i, y in enumerate(range(0, size, th)):
        for j, x in enumerate(range(0, size, tw)):
            t = tiles[(i + j) % len(tiles)]
            t = t[::-1] if i % 2 else t
            t = t[:, ::-1] if j % 2 else t
            h, w = min(th, size - y), min(tw, size - x)
            image[y : y + h, x : x + w] = t[:h, :w]
    tifffile.imwrite(path, image)


def speed(args: argparse.Namespace, onnx_path: Path, tmp: Path) -> list[str]:
    methods = [m for m in args.methods.split(",") if m != "monai" or _has_monai()]
    if methods[0] != "onnx" or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods: onnx first, then any of {METHODS}; got {args.methods}")
    image = tmp / "mosaic.tif"
    make_mosaic(image, args.size, args.data)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            res = run_child(m, args, image, onnx_path, tmp / f"{m}.npy")
            runs[m].append(res)
            print(f"  run {r + 1} {m}: {res['seconds']:.1f} s, {res['tiles']} tiles, peak RSS {res['peak_mb']:.0f} MiB",
                  flush=True)
    labels = {m: np.load(tmp / f"{m}.npy") for m in methods}

    def med(m: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[m])

    px = args.size**2
    lines = [f"{args.size}x{args.size} uint8 mosaic of the test images, {runs['onnx'][0]['tiles']} tiles; CPU "
             f"({platform.processor() or platform.machine()}), {args.threads} threads each, batch {args.batch}, "
             f"median of {args.repeats}", "",
             "| method | seconds | pixels/s | tiles/s | peak RSS (MiB) | peak - before (MiB) | "
             "ONNX speed-up | masks = ONNX's |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        s = med(m, "seconds")
        lines.append(f"| {NAMES[m]} | {s:.1f} | {px / s:,.0f} | {med(m, 'tiles') / s:.2f} | {med(m, 'peak_mb'):.0f} | "
                     f"{med(m, 'peak_mb') - med(m, 'baseline_mb'):.0f} | {s / med('onnx', 'seconds'):.2f}x | "
                     f"{100 * (labels[m] == labels['onnx']).mean():.4f} % |")
    return lines


def _has_monai() -> bool:
    try:
        import monai  # noqa: F401  (optional peer)
    except ImportError:
        print("monai is not installed: no MONAI row", flush=True)
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--data", type=Path, default=DATA, help="NASA-layout folder; its test/ split is used")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-agreement", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "onnx_backend.md")
    p.add_argument("--methods", default=",".join(METHODS), help="speed: which of onnx,torch,monai (onnx required)")
    p.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--labels", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    from pretrain.outputs import atomic_write_text

    with tempfile.TemporaryDirectory(prefix="onnx_backend_") as tmp_name:
        tmp = Path(tmp_name)
        onnx_path = tmp / "model.onnx"
        exported = run_child("export", args, Path(), onnx_path, Path())
        head = [f"# ONNX Runtime backend: {args.checkpoint}", "",
                f"Export (segment.export, {exported['seconds']:.0f} s): {exported['report']}", ""]
        print("\n".join(head), flush=True)
        parts = []
        if not args.skip_speed:  # first: the parent imports torch only for the agreement
            parts += ["## Speed", "", *speed(args, onnx_path, tmp), ""]
        if not args.skip_agreement:
            parts += ["## Mask agreement, test images of " + str(args.data), "", *agreement(args, onnx_path), ""]
    text = "\n".join(head + parts)
    print(text)
    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
