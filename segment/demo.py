"""`make demo`: the product end to end on embedded synthetic micrographs, sized for 2 CPU cores.

Generates a synthetic superalloy set (with a domain-shifted test folder), fine-tunes the CPU-sized
CS-UNet on it, evaluates in- and out-of-distribution and writes `report.md`. Usage:
`python -m segment.demo [out=runs/demo] [any finetune override ...]`.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

DEMO_OVERRIDES = [
    "model=cs_unet_lite",
    "data=synthetic_super",
    "data.crop_size=128",
    "data.synthetic_size=256",
    "train.epochs=12",
    "train.batch_size=8",
    "train.max_minutes=6",
    "optim.lr=1e-3",
]


def main(argv: list[str] | None = None) -> dict:
    from segment.config import register_configs
    from segment.finetune import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("out=") for a in args):
        args.append("out=runs/demo")
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("finetune", overrides=DEMO_OVERRIDES + args)
    t0 = time.time()
    result = train(OmegaConf.to_object(cfg))
    out = Path(result["out"])
    print(f"\nDemo finished in {(time.time() - t0) / 60:.1f} min.")
    summary = out / "eval" / "summary.md"
    if summary.is_file():
        print(summary.read_text())
    print(f"Report: {out / 'report.md'}  (figures in {out / 'figures'} and {out / 'eval' / 'overlays'})")
    return result


if __name__ == "__main__":
    main()
