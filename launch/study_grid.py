"""The study's grid: the study config (:func:`load_study`), its cells (:func:`expand`, one :class:`Cell`
per model x init x training set x seed), ``--only`` (:func:`select`) and ``OUT/grid.tsv`` (:func:`write_grid`).
The config keys are described in :mod:`launch.study`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from pretrain.outputs import write_csv
from segment import results

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEFAULT_CONFIG = CONFIGS / "study" / "default.yaml"


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


def write_grid(cells: list[Cell], out: Path) -> None:
    """``OUT/grid.tsv`` in segment.results' format (weights = init, data = training set)."""
    write_csv(out / results.GRID_FILE, ["cell", "model", "weights", "data", "seed", "family", "images", "overrides"],
              ([c.name, c.model, c.init, c.trainset, c.seed, c.family, "" if c.images is None else c.images,
                " ".join(c.overrides)] for c in cells), delimiter="\t")
