"""Start-up reliability of the command lines (issue 12, items 2, 6, 7).

* item 2: no command writes into a user's data folder; a synthetic preset with a `data.root` that holds
  real images stops and names `data=folder` (the read-only preset for your own images);
* item 6: an output folder that cannot be made or written stops the command at once, with one line
  naming it (segment.finetune / pretrain out=, segment.evaluate / segment.predict --out);
* item 7: a misspelt override key, with or without `+`, is an error naming the nearest valid key.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import segment.finetune as ft
from segment.config import register_configs
from segment.finetune_data import SYNTHETIC_MARKER, prepare_synthetic, synthetic_to_generate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

TINY = ["model.name=cs_unet_test", "data.synthetic_size=64", "data.crop_size=32", "data.samples_per_epoch=2",
        "train.batch_size=2", "train.epochs=1", "evaluate=false", "overlays=0"]


def make_cfg(out: Path, *extra: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_object(compose("finetune", overrides=[*TINY, f"out={out}", *extra]))


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root (this checkout's code), as a user would run it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 (files) or "dir" of everything under FOLDER: equal iff untouched."""
    return {p.relative_to(folder).as_posix(): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def user_folder(tmp_path: Path) -> Path:
    """A user's labeled micrographs in the plain layout (images/ + masks/ with split subfolders)."""
    root = tmp_path / "my_micrographs"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for i in range(2):
            labels = (rng.random((48, 48)) > 0.5).astype(np.uint8)
            for sub, arr in (("images", labels * 200 + 20), ("masks", labels * 255)):
                (root / sub / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr.astype(np.uint8)).save(root / sub / split / f"{split}_{i}.png")
    return root


# ---------------------------------------------------------------- item 2: data folders are read only
def test_synthetic_preset_never_writes_into_a_user_folder(tmp_path):
    """The default preset (synthetic_super) with data.root=<user folder>: an error naming data=folder, the
    folder byte-identical (it used to get train/ val/ test/ ... generated into it)."""
    root = user_folder(tmp_path)
    before = snapshot(root)
    with pytest.raises(Exception) as err:
        ft.train(make_cfg(tmp_path / "run", f"data.root={root}"))
    assert snapshot(root) == before
    assert isinstance(err.value, ValueError) and "data=folder" in str(err.value) and str(root) in str(err.value)


def test_synthetic_preset_cli_error_names_the_preset(tmp_path):
    root = user_folder(tmp_path)
    before = snapshot(root)
    r = run_cli("-m", "segment.finetune", *TINY, f"data.root={root}", f"out={tmp_path / 'run'}")
    assert r.returncode != 0 and snapshot(root) == before
    last = r.stderr.strip().splitlines()[-1]
    assert "data=folder" in last and str(root) in last and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_folder_preset_trains_on_a_user_folder_read_only(tmp_path):
    """`data=folder` is the preset the error points to: it trains on the user's set and writes nothing there."""
    root = user_folder(tmp_path)
    before = snapshot(root)
    cfg = make_cfg(tmp_path / "run", "data=folder", f"data.root={root}", "data.class_map=binary")
    assert cfg.data.synthetic is None and cfg.data.extra_tests == {}
    result = ft.train(cfg)
    assert result["global_step"] == 1 and (tmp_path / "run" / "best" / "model.json").is_file()
    assert snapshot(root) == before


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def test_synthetic_set_is_generated_in_the_run_and_only_read_elsewhere(tmp_path):
    """In the run folder the set is generated once (marker written last); a finished set outside the run
    (another run's) is only read; a folder outside the run without the marker is never written."""
    cfg = make_cfg(tmp_path / "run1")
    root = Path(cfg.data.root)
    assert root.parent.parent == tmp_path / "run1" and synthetic_to_generate(cfg)
    prepare_synthetic(cfg, _OneProcess())
    assert (root / SYNTHETIC_MARKER).is_file() and (root / "train").is_dir()
    assert not synthetic_to_generate(cfg)  # a rerun reuses it

    other = make_cfg(tmp_path / "run2", f"data.root={root}")
    assert other.data.extra_tests["shifted"] == f"{root}:different_test"  # the set's own shifted folder
    before = snapshot(root)
    prepare_synthetic(other, _OneProcess())
    assert snapshot(root) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="outside the run folder"):
        prepare_synthetic(make_cfg(tmp_path / "run3", f"data.root={empty}"), _OneProcess())
    assert not any(empty.iterdir())


# ------------------------------------------------------------ item 6: unwritable output folders
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "not_a_folder"
    f.write_text("x")
    return f


@pytest.mark.parametrize("module", ["segment.finetune", "pretrain.main"])
def test_unwritable_out_fails_at_start_with_one_line(tmp_path, module):
    """out= below a file: one line naming the folder before Hydra makes it (was Hydra's traceback)."""
    out = a_file(tmp_path) / "run"
    t0 = time.monotonic()
    r = run_cli("-m", module, f"out={out}", timeout=120)
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert str(out) in last and "cannot write" in last, r.stderr[-2000:]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_at_start(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        r = run_cli("-m", "segment.finetune", f"out={out}", timeout=120)
    finally:
        out.chmod(0o700)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(out) in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_predict_check_out_before_loading_the_model(tmp_path, monkeypatch, capsys, command):
    """--out below a file stops with SystemExit naming it before the model is loaded (it used to fail
    when the first result was written, after loading the model and predicting)."""
    import segment.evaluate as ev
    import segment.predict as pr
    from segment.infer import Predictor

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(Predictor, "from_checkpoint", no_model)
    out = a_file(tmp_path) / "results"
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "a.png")
    if command == "evaluate":
        argv = [str(tmp_path / "ckpt"), "--set", f"t={tmp_path}:test", "--out", str(out)]
        main = ev.main
    else:
        argv = [str(tmp_path / "ckpt"), str(images), "--out", str(out)]
        main = pr.main
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert str(out) in str(err.value.code) and "cannot write" in str(err.value.code)
    assert not out.exists()


def test_writable_dir_creates_the_folder_and_leaves_no_probe(tmp_path):
    from pretrain.cli_checks import writable_dir

    out = writable_dir(tmp_path / "a" / "b", "out")
    assert out.is_dir() and list(out.iterdir()) == []


# ------------------------------------------------------------------ item 7: misspelt override keys
@pytest.mark.parametrize("module, override, nearest", [
    ("segment.finetune", "+train.epoch=3", "train.epochs"),
    ("segment.finetune", "train.epoch=3", "train.epochs"),
    ("pretrain.main", "+optim.epoch=3", "optim.epochs"),
    ("pretrain.main", "optim.epoch=3", "optim.epochs"),
])
def test_misspelt_override_names_the_nearest_key(module, override, nearest):
    """`+` used to add the typo silently (`--cfg job` printed it, rc 0); without `+` Hydra advised adding one."""
    r = run_cli("-m", module, override, "--cfg", "job", timeout=120)
    assert r.returncode != 0, r.stdout[-1000:]
    last = r.stderr.strip().splitlines()[-1]
    assert override.lstrip("+").partition("=")[0] in last and nearest in last and "Traceback" not in r.stderr


def test_study_cell_with_a_misspelt_plus_key_is_an_error(tmp_path):
    """Study presets compose through the API, where Hydra's `+` adds any key: compose_cell checks them."""
    from launch.study_grid import Cell
    from launch.study_run import compose_cell

    cell = Cell(model="unet_lite", init="random", trainset="s", seed=0,
                overrides=["model=unet_lite", "data=synthetic_super", "+train.epoch=3"])
    with pytest.raises(ValueError, match=r"train\.epoch.*train\.epochs"):
        compose_cell(cell, tmp_path)


def test_open_dicts_and_groups_stay_valid():
    """Keys under dict/Any fields and group choices pass the checks; section typos are found anywhere."""
    from pretrain.cli_checks import check_config_keys, check_overrides
    from pretrain.config import PretrainConfig
    from segment.config import FinetuneConfig

    check_overrides(["model=unet", "data=folder", "+model.encoder_weights.cnn=/x", "+model.kwargs.drop_rate=0.1",
                     "+data.extra_tests.ood=/d:test", "data.class_map.kind=index", "~data.extra_tests.shifted",
                     "hydra.run.dir=/r", "out=/r", "--cfg", "job"], FinetuneConfig)
    check_overrides(["pretrain/encoder=resnet_test", "+method.options.out_dim=64", "+encoder.kwargs.a=1",
                     "data.shards=[a,b]", "data.synthetic.size=64"], PretrainConfig)
    with pytest.raises(SystemExit, match="optim.lr"):
        check_overrides(["train.lr=0.1"], FinetuneConfig)
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("finetune", overrides=["+model.kwargs.a=1", "+model.encoder_weights.swin=/w"])
        check_config_keys(cfg, FinetuneConfig)
        bad = compose("finetune", overrides=["+data.zooom=0.5"])
    with pytest.raises(ValueError, match=r"data\.zooom.*data\.zoom"):
        check_config_keys(bad, FinetuneConfig)
