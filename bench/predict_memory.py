"""Peak memory and wall time of whole-micrograph inference: our band-wise streaming predictor
(`segment.stream.predict_stream`) against MONAI's `sliding_window_inference`, on CPU.

    python bench/predict_memory.py [--size 8192] [--model unet_lite] [--tile 256] [--overlap 0.5]
                                   [--batch 8] [--classes 3] [--repeats 3] [--threads 2] [--zoom 0.5]

Input: a size x size uint8 synthetic superalloy micrograph (1024-pixel `pretrain.synthetic_materials`
tiles), written as an uncompressed TIFF, as SEMs write them. Both sides use the same model with
the same random weights (seed 0), tile, overlap, Gaussian blending (sigma = tile / 8), batch and
thread count, and both go from the file to a uint8 label map: ours memory-maps the TIFF and
keeps accumulators for one band of tile rows; MONAI gets the whole normalised image as a tensor
(tifffile.imread, as its users would) and returns K x H x W float32 logits, then argmax. Each run
is a fresh subprocess, so its peak RSS (`ru_maxrss` from `os.wait4`) is its own; the table gives
the median over `--repeats` runs, the RSS before inference (imports, model, one warm-up batch), and the agreement of
the two label maps. `--model conv` is a two-layer CNN for quick runs where the model's cost
would otherwise dominate the time (memory is unaffected by the model). `--zoom` (a model trained
with `data.zoom`): ours resamples band by band (`segment.zoom.RowResampler`); MONAI's side resizes the
whole tensor (`segment.zoom.resize_image`, i.e. `F.interpolate`) before tiling and its logits back after, as one would around it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.5, 0.25


def build_model(name: str, classes: int, tile: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "conv":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 3, padding=1)).eval()
    from segment.models import create_model

    return create_model(name, num_classes=classes, in_chans=1, img_size=tile).eval()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# ----------------------------------------------------------------------------- children
def child(args: argparse.Namespace) -> None:
    import tifffile
    import torch
    from monai.inferers import sliding_window_inference

    from pretrain.intensity import to_float
    from segment.infer import Predictor
    from segment.sources import open_source
    from segment.stream import predict_stream
    from segment.tiling import class_labels
    from segment.zoom import resize_image, resize_logits, zoomed_hw

    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.classes, args.tile)
    with torch.inference_mode():  # one warm-up batch: the framework's one-time allocations
        model(torch.zeros(args.batch, 1, args.tile, args.tile))
    baseline = rss_mb()  # both sides: same imports, same model, same warm-up
    t0 = time.perf_counter()
    if args.child == "stream":
        predictor = Predictor(model, tile_size=args.tile, overlap=args.overlap, gaussian=True,
                              batch_size=args.batch, mean=(MEAN,), std=(STD,), zoom=args.zoom)
        with open_source(args.image) as src:
            labels = predict_stream(predictor, src, progress=False)
    else:
        x = torch.from_numpy(to_float(tifffile.imread(args.image)))[None, None]
        x = (x - MEAN) / STD
        hw = tuple(x.shape[-2:])
        with torch.inference_mode():
            # the whole-image way around MONAI: resize, tile, resize the logits back (no-ops at zoom 1)
            x = resize_image(x[0], zoomed_hw(hw, args.zoom))[None]
            out = sliding_window_inference(x, (args.tile, args.tile), args.batch, model, overlap=args.overlap,
                                           mode="gaussian", sigma_scale=0.125, device="cpu", sw_device="cpu")
            out = resize_logits(out[0], hw)[None]
            labels = class_labels(out[0]).numpy()
        del out, x
    seconds = time.perf_counter() - t0
    np.save(args.labels, labels)
    print(json.dumps(dict(seconds=seconds, baseline_mb=baseline, self_peak_mb=rss_mb())), flush=True)


def run_child(method: str, args: argparse.Namespace, image: Path, labels: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--image", str(image), "--labels", str(labels),
           "--model", args.model, "--classes", str(args.classes), "--tile", str(args.tile),
           "--overlap", str(args.overlap), "--batch", str(args.batch), "--threads", str(args.threads),
           "--zoom", str(args.zoom)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves: its own resource usage
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{method} child failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return result


# ----------------------------------------------------------------------------- parent
def make_image(path: Path, size: int) -> None:
    import tifffile

    from pretrain.synthetic_materials import superalloy

    block = 1024
    image = np.empty((size, size), np.uint8)
    for i, y in enumerate(range(0, size, block)):
        for j, x in enumerate(range(0, size, block)):
            h, w = min(block, size - y), min(block, size - x)
            image[y : y + h, x : x + w] = superalloy((block, block), seed=100 * i + j)[0][:h, :w]
    tifffile.imwrite(path, image)  # uncompressed, contiguous: memory-mappable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--model", default="unet_lite", help="registry name, or 'conv' (tiny CNN)")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--zoom", type=float, default=1.0, help="model zoom (data.zoom): both sides resize the image "
                   "by it and the logits back (MONAI's peer: whole-image F.interpolate around it)")
    p.add_argument("--child", choices=["stream", "monai"], help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--labels", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="predict_memory_") as tmp:
        image = Path(tmp) / "micrograph.tif"
        t0 = time.perf_counter()
        make_image(image, args.size)
        print(f"input: {args.size}x{args.size} uint8 TIFF ({image.stat().st_size / 2**20:.0f} MiB), "
              f"made in {time.perf_counter() - t0:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {"stream": [], "monai": []}
        for r in range(args.repeats):
            for method in runs:  # back to back, alternating, so drifts in machine load hit both
                res = run_child(method, args, image, Path(tmp) / f"{method}.npy")
                runs[method].append(res)
                print(f"  run {r + 1} {method}: {res['seconds']:.1f} s, peak RSS {res['peak_mb']:.0f} MiB "
                      f"(before inference {res['baseline_mb']:.0f} MiB)", flush=True)
        a, b = np.load(Path(tmp) / "stream.npy"), np.load(Path(tmp) / "monai.npy")
        agree = float((a == b).mean())

    def med(method: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[method])

    k = args.classes
    full_map = k * args.size * args.size * 4 / 2**20
    print()
    print(f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads), model {args.model}, "
          f"{k} classes, tile {args.tile}, overlap {args.overlap}, Gaussian, batch {args.batch}, zoom {args.zoom:g}, "
          f"median of {args.repeats}; a K x H x W float32 map is {full_map:.0f} MiB")
    print()
    print("| method | wall time (s) | peak RSS (MiB) | RSS before inference (MiB) | peak - before (MiB) |")
    print("|---|---:|---:|---:|---:|")
    names = {"stream": "segment.stream (ours, band-wise)", "monai": "MONAI sliding_window_inference"}
    for m in runs:
        peak, base = med(m, "peak_mb"), med(m, "baseline_mb")
        print(f"| {names[m]} | {med(m, 'seconds'):.1f} | {peak:.0f} | {base:.0f} | {peak - base:.0f} |")
    print()
    ratio_peak = med("monai", "peak_mb") / med("stream", "peak_mb")
    ratio_delta = (med("monai", "peak_mb") - med("monai", "baseline_mb")) / max(
        med("stream", "peak_mb") - med("stream", "baseline_mb"), 1e-9)
    ratio_time = med("monai", "seconds") / med("stream", "seconds")
    print(f"MONAI / ours: peak RSS x{ratio_peak:.2f}, inference memory (peak - before) x{ratio_delta:.2f}, "
          f"wall time x{ratio_time:.2f}; label maps agree on {100 * agree:.3f} % of pixels")


if __name__ == "__main__":
    main()
