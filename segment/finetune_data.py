"""Fine-tuning data: the synthetic preset's generated set and the train/val/test pairs of a run.

`load_data` pairs the images of `data.root` (`segment.pairs`) into the training pairs (few-shot or by
name), the validation pairs and the test sets; `prepare_synthetic` first writes a synthetic set into
the run folder when the config asks for one (never into a user's folder: `synthetic_to_generate`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from pretrain.io import IMAGE_SUFFIXES
from pretrain.outputs import atomic_write_text
from pretrain.synthetic import write_nasa_set
from segment.class_maps import get_class_map
from segment.config import FinetuneConfig
from segment.pairs import few_shot, find_pairs, select_by_name

log = logging.getLogger(__name__)

SYNTHETIC_MARKER = ".synthetic.json"  # written last into a generated set: {kind, size, seed}


def parse_set_spec(spec: str, default_split: str = "test") -> tuple[Path, str]:
    """`ROOT[:SPLIT]` -> (root, split)."""
    root, sep, split = spec.rpartition(":")
    if not sep or "/" in split:
        return Path(spec), default_split
    return Path(root), split


def _synthetic_stamp(cfg: FinetuneConfig) -> dict:
    return {"kind": cfg.data.synthetic, "size": cfg.data.synthetic_size, "seed": 0}


def _holds_images(root: Path) -> bool:
    """Whether folder ROOT holds any image file (stops at the first)."""
    for _, _, files in os.walk(root):
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


def synthetic_to_generate(cfg: FinetuneConfig) -> bool:
    """Whether a synthetic preset's set must be generated at `data.root` (False: a finished one is there).

    The generator writes only below the run folder (`out`), never into a user's folder: a `data.root`
    outside the run is only read, and only when it holds a finished set of the same settings
    (`SYNTHETIC_MARKER`); otherwise ValueError naming the preset to pick for your own images.
    """
    d = cfg.data
    root, out = Path(d.root).expanduser().resolve(), Path(cfg.out).expanduser().resolve()
    marker = root / SYNTHETIC_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == _synthetic_stamp(cfg):
        return False
    if out in root.parents:
        return True
    preset = f"the synthetic data preset (data.synthetic={d.synthetic}) generates its images into the run"
    own = (f"for your own images use data=folder data.root={root} data.class_map=... (images/ + masks/, or the "
           f"NASA layout train/ train_annot/ ...) or a benchmark preset (data=super1, data=ebc1, ...)")
    if marker.is_file():
        raise ValueError(f"data.root={root} holds a synthetic set made with other settings "
                         f"({marker.read_text().strip()}); {preset} folder: drop the data.root override")
    if root.is_dir() and _holds_images(root):
        raise ValueError(f"data.root={root} holds images, but {preset} and never writes into your folder; {own}")
    raise ValueError(f"data.root={root} is outside the run folder {out}: {preset} only; "
                     f"drop the data.root override, or {own}")


def prepare_synthetic(cfg: FinetuneConfig, accelerator: Accelerator) -> None:
    """Generate the synthetic NASA-layout set into the run (main process; others wait); the marker file,
    written last, makes a rerun reuse it. A `data.root` outside the run is never written
    (`synthetic_to_generate`)."""
    root = Path(cfg.data.root)
    if synthetic_to_generate(cfg) and accelerator.is_main_process:
        size = (cfg.data.synthetic_size, cfg.data.synthetic_size)
        log.info("writing synthetic %s data set to %s", cfg.data.synthetic, root)
        write_nasa_set(root, cfg.data.synthetic, size=size, seed=0)
        atomic_write_text(root / SYNTHETIC_MARKER, json.dumps(_synthetic_stamp(cfg)))
    accelerator.wait_for_everyone()


@dataclass
class Data:
    class_map: Any
    train_pairs: list
    val_pairs: list
    test_sets: dict[str, list] = field(default_factory=dict)


def load_data(cfg: FinetuneConfig) -> Data:
    d = cfg.data
    class_map = get_class_map(d.class_map)
    root = Path(d.root)
    train = find_pairs(root, d.train_split, layout=d.layout)
    train = select_by_name(train, list(d.train_names)) if d.train_names else few_shot(train, d.n_train, cfg.train.seed)
    val = find_pairs(root, d.val_split, layout=d.layout)
    tests: dict[str, list] = {}
    specs = {split: (root, split) for split in d.test_splits}
    specs.update({name: parse_set_spec(spec) for name, spec in d.extra_tests.items()})
    for name, (troot, tsplit) in specs.items():
        unpaired: list[Path] = []  # images without a mask: evaluated as failures (eval/failures.csv)
        try:
            pairs = find_pairs(troot, tsplit, layout=d.layout, unpaired=unpaired)
        except FileNotFoundError as e:  # a split folder that is not there
            log.warning("test set %r skipped: %s", name, e)
            continue
        tests[name] = sorted([*pairs, *((image, None) for image in unpaired)], key=lambda p: str(p[0]))
    log.info("data: %d train (%s), %d val, tests %s", len(train), ", ".join(p[0].name for p in train[:4]),
             len(val), {k: len(v) for k, v in tests.items()})
    return Data(class_map, train, val, tests)
