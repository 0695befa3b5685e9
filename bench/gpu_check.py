"""The device check of issue 16: one run that says whether this product is ready for the GPUs it is on.

    bench/gpu_check.sh [--dry-run] [--out DIR]      (the shell wrapper picks the venv's python)

Prints one table: card, torch/CUDA versions, the precision ``precision=auto`` picks; DINO Swin-T 224 px
images/s, peak memory and data-wait fraction through the real loop (``pretrain/main.py``) under DDP and
DeepSpeed ZeRO-2, and ZeRO-3 when there is more than one GPU; the CS-UNet lite fine-tuning step against
the smp Unet peer (same timm CNN encoder, same batch), and sliding-window prediction of a 4096 x 4096
micrograph in pixels/s by ``segment.infer.Predictor`` against MONAI's ``sliding_window_inference`` (same
model, tile, overlap, Gaussian weights, batch). Peers run in the same process, turn about with ours.
Sized to finish in under 8 minutes on one recent GPU; writes ``gpu_check.json`` and ``gpu_check.md``
into ``--out``.

``--dry-run``: the same code paths on the CPU with tiny models (timm ``swin_test`` at 32 px, 4 steps,
DeepSpeed ZeRO-2 in one process, ``cs_unet_test``/smp Unet at 64 px, prediction at 256 px): part of
``make test`` (tests/test_gpu_check.py); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout that is not pip-installed


def sizes(dry: bool) -> dict:
    if dry:
        return dict(encoder="swin_test", global_size=32, local_size=16, n_local=2, batch=4, steps=4, log_every=2,
                    workers=0, n_per_kind=6, image=64, shard=2, knn=["knn.every=2", "knn.synthetic_per_class=2",
                                                                  "knn.crop_size=48", "knn.crops_per_image=2"],
                    head=["method.options.out_dim=64", "method.options.hidden_dim=32",
                          "method.options.bottleneck_dim=16"],
                    seg_model="cs_unet_test", seg_encoder="tu-resnet18", seg_size=64, seg_batch=2,
                    predict_size=256, tile=64, predict_batch=4, repeats=2, run_timeout=600)
    workers = max(1, min(8, (os.cpu_count() or 2) // max(1, torch.cuda.device_count()) - 1))
    return dict(encoder="swin_t", global_size=224, local_size=96, n_local=6, batch=64, steps=30, log_every=5,
                workers=workers, n_per_kind=512, image=256, shard=16, knn=["knn.every=0"], head=[],
                seg_model="cs_unet_lite", seg_encoder="tu-resnet18", seg_size=512, seg_batch=8,
                predict_size=4096, tile=512, predict_batch=8, repeats=5, run_timeout=140)


# --------------------------------------------------------------------------------- pretraining
def pretrain_run(name: str, extra: list[str], s: dict, out: Path, gpus: int, corpus: Path | None) -> dict:
    """One ``pretrain/main.py`` run; images/s (median of the logged windows after the first), peak GiB,
    mean data-wait fraction, final loss, wall time."""
    run = out / f"pretrain_{name}"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time, never a resume of an old one
    overrides = [
        f"out={run}", f"pretrain/encoder={s['encoder']}", f"data.views.global_size={s['global_size']}",
        f"data.views.local_size={s['local_size']}", f"data.views.n_local={s['n_local']}",
        f"data.num_workers={s['workers']}", f"optim.batch_size={s['batch']}", "optim.epochs=1",
        f"optim.steps_per_epoch={s['steps']}", f"log.every={s['log_every']}", "log.progress=false",
        "log.tensorboard=false", "checkpoint.every=0", "precision=auto", *s["knn"], *s["head"], *extra,
    ]
    if corpus is not None:
        overrides.append(f"data.shards={corpus}")
    else:
        overrides += [f"data.synthetic.n_per_kind={s['n_per_kind']}", f"data.synthetic.size={s['image']}",
                      f"data.synthetic.shard_size={s['shard']}"]
    if gpus > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "pretrain/main.py", *overrides]
    else:
        cmd = [sys.executable, "pretrain/main.py", *overrides]
    # the repo first, then whatever the caller had on PYTHONPATH (packages carried to a bare machine)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=s["run_timeout"])
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:  # a hang (e.g. ranks out of step under ZeRO-3) must not eat the check
        text = "".join(b.decode(errors="replace") if isinstance(b, bytes) else (b or "") for b in (e.stdout, e.stderr))
        text, code = text + f"\nTIMEOUT after {s['run_timeout']} s", -1
    wall = time.perf_counter() - t0
    (out / f"pretrain_{name}.log").write_text(text)
    print(f"[gpu_check] pretrain {name}: rc {code}, {wall:.0f} s", flush=True)
    if code != 0:
        return {"name": name, "error": text[-1500:], "wall_s": wall}
    with (run / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("images_per_s")]
    later = rows[1:] or rows
    memory = [float(r["max_memory_gb"]) for r in rows if r.get("max_memory_gb")]
    return {"name": name, "images_per_s": statistics.median(float(r["images_per_s"]) for r in later),
            "peak_gb": max(memory) if memory else None,
            "data_wait": statistics.mean(float(r["data_wait"]) for r in later),
            "loss": float(rows[-1]["loss"]), "wall_s": wall, "steps": int(rows[-1]["step"]),
            "corpus": str(run / "corpus" / "shards") if corpus is None else str(corpus)}


# ------------------------------------------------------------------------------- segmentation
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def finetune_steps(s: dict, device: torch.device, amp: torch.dtype | None) -> dict:
    """Seconds per AdamW training step (CE loss, autocast as the precision): CS-UNet vs smp Unet, in turns."""
    import segmentation_models_pytorch as smp

    from pretrain.throughput import adamw
    from segment.models import create_model

    torch.manual_seed(0)
    n, size = s["seg_batch"], s["seg_size"]
    x = torch.rand(n, 1, size, size, device=device)
    y = torch.randint(0, 3, (n, size, size), device=device)
    models = {
        s["seg_model"]: create_model(s["seg_model"], num_classes=3, in_chans=1, img_size=size),
        f"smp Unet ({s['seg_encoder']})": smp.Unet(encoder_name=s["seg_encoder"], encoder_weights=None, in_channels=1,
                                                   classes=3),
    }
    steps = {}
    for name, model in models.items():
        model.to(device)
        opt = adamw(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            model.train()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    _sync(device)
    for _ in range(s["repeats"]):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def predict_rates(s: dict, device: torch.device, amp: torch.dtype | None) -> dict:
    """Pixels/s of a whole ``predict_size``² micrograph: Predictor vs MONAI sliding_window_inference."""
    from monai.inferers import sliding_window_inference

    from segment.infer import Predictor
    from segment.models import create_model
    from segment.tiling import class_labels

    torch.manual_seed(0)
    size, tile, batch = s["predict_size"], s["tile"], s["predict_batch"]
    model = create_model(s["seg_model"], num_classes=3, in_chans=1, img_size=tile).to(device).eval()
    image = torch.rand(1, size, size)
    predictor = Predictor(model, tile_size=tile, overlap=0.5, gaussian=True, batch_size=batch, device=device,
                          amp_dtype=amp)

    def ours():
        predictor.predict_labels(image)

    @torch.inference_mode()
    def monai():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = sliding_window_inference(image[None].to(device), (tile, tile), batch, model, overlap=0.5,
                                           mode="gaussian", sigma_scale=0.125, sw_device=device, device=device)
        class_labels(out[0]).cpu()  # the same reduction as ours: the ratio is the tile loop

    rates: dict[str, list[float]] = {"Predictor": [], "MONAI sliding_window_inference": []}
    fns = {"Predictor": ours, "MONAI sliding_window_inference": monai}
    for fn in fns.values():
        fn()
    for _ in range(max(1, s["repeats"] // 2)):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            rates[name].append(size * size / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


# ----------------------------------------------------------------------------------------- main
def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _peer_row(title: str, result: dict[str, float] | None, error: str | None, show) -> str:
    """``| title | ours X vs peer Y (ours/peer r) |`` from ``{ours: x, peer: y}``, or the failure's last line."""
    if not result:
        return f"| {title} | FAILED: {(error or 'no result').splitlines()[-1]} |"
    (a, va), (b, vb) = result.items()
    return f"| {title} | {a} {show(va)} vs {b} {show(vb)} (ours/peer {va / vb:.2f}) |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, same code paths")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    args = ap.parse_args(argv)

    from pretrain.accelerate_setup import auto_precision

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    s = sizes(dry)
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if not dry else 1
    device = torch.device("cuda" if not dry else "cpu")
    precision, why = auto_precision()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    card = (f"{gpus} x {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
            if not dry else f"CPU dry run ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    t_start = time.perf_counter()

    rows = []
    first = pretrain_run("ddp", [], s, args.out, gpus, None)
    rows.append(first)
    corpus = Path(first["corpus"]) if "corpus" in first else None
    rows.append(pretrain_run("zero2", ["distributed.deepspeed=zero2"], s, args.out, gpus, corpus))
    if gpus > 1:
        rows.append(pretrain_run("zero3", ["distributed.deepspeed=zero3"], s, args.out, gpus, corpus))
    if not dry:  # ZeRO-3 + SimCLR + the k-NN probe: the gathered-forward path on CUDA (a hang needs > 1 GPU)
        rows.append(pretrain_run("zero3_simclr", ["distributed.deepspeed=zero3", "pretrain/method=simclr",
                                                  "method.options={}", "knn.every=10", "data.views.n_local=0"],
                                 s, args.out, gpus, corpus))
    results, errors = {}, {}
    for key, fn in (("finetune", finetune_steps), ("predict", predict_rates)):
        t0 = time.perf_counter()
        try:
            results[key] = fn(s, device, amp)
        except Exception as e:  # noqa: BLE001 - one failed item must not hide the others' numbers
            import traceback

            errors[key] = traceback.format_exc()[-1500:]
            print(f"[gpu_check] {key} FAILED: {e!r}", flush=True)
            continue
        print(f"[gpu_check] {key}: {time.perf_counter() - t0:.0f} s", flush=True)

    what = "tiny swin_test 32 px" if dry else "DINO Swin-T 224 px (2x224 + 6x96 crops)"
    lines = [
        f"# gpu_check{' --dry-run' if dry else ''}",
        "",
        "| item | value |", "|---|---|",
        f"| card | {card} |",
        f"| torch / CUDA / cuDNN | {torch.__version__} / {torch.version.cuda} / {torch.backends.cudnn.version()} |",
        f"| precision=auto | {why} |",
        f"| Python / timm / DeepSpeed / accelerate | {platform.python_version()} / {_version('timm')} / "
        f"{_version('deepspeed')} / {_version('accelerate')} |",
    ]
    for r in rows:
        kind = "SimCLR Swin-T 224 px (2 views)" if r["name"] == "zero3_simclr" else what
        label = f"{kind}, {r['name']}, batch {s['batch']}/GPU x {gpus}"
        if "error" in r:
            lines.append(f"| {label} | FAILED (log: pretrain_{r['name']}.log) |")
            continue
        mem = f"{r['peak_gb']:.1f} GiB peak" if r["peak_gb"] is not None else "peak n/a (CPU)"
        lines.append(f"| {label} | {r['images_per_s']:.1f} img/s, {mem}, data wait {r['data_wait']:.2f}, "
                     f"loss {r['loss']:.3f} after {r['steps']} steps |")
    lines.append(_peer_row(f"fine-tune step, {s['seg_batch']} x {s['seg_size']}²", results.get("finetune"),
                           errors.get("finetune"), lambda t: f"{t * 1000:.0f} ms"))
    lines.append(_peer_row(f"predict {s['predict_size']}², tile {s['tile']}, overlap 0.5, {s['seg_model']}",
                           results.get("predict"), errors.get("predict"), lambda r: f"{r / 1e6:.2f} Mpx/s"))
    lines.append(f"| wall time | {time.perf_counter() - t_start:.0f} s |")
    table = "\n".join(lines)
    print(table)
    (args.out / "gpu_check.md").write_text(table + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps(
        {"dry_run": dry, "card": card, "precision": precision, "pretrain": rows,
         "finetune_s": results.get("finetune", {}), "predict_px_s": results.get("predict", {}), "errors": errors}, indent=1))
    return 1 if errors or any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
