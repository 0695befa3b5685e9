"""Run folders are data: resuming never unpickles code, damaged checkpoints are found and skipped,
and a resumed run keeps its history's types (issue 12, items 1, 4 and 12)."""
from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import segment.finetune as ft
from pretrain.safe_state import CorruptCheckpointError, UnsafeCheckpointError, digest_files, no_code_execution
from segment.config import register_configs
from segment.finetune_log import read_history

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.name=cs_unet_test", "data=synthetic_super", "data.synthetic_size=64", "data.crop_size=64",
        "data.samples_per_epoch=6", "train.batch_size=2", "train.epochs=2", "overlays=1", "evaluate=false"]


def make_cfg(out: Path, *extra: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("finetune", overrides=[*TINY, f"out={out}", *extra])
    return OmegaConf.to_object(cfg)


class Payload:
    """Unpickling this runs code: it creates the marker file (what a crafted pickle would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a crafted pickle in torch's own format, as an attacker would."""
    torch.save({"step": Payload(marker)}, path)


def redigest(run: Path) -> None:
    """Update the recorded digests, as an attacker who knows the format would."""
    for state_file in run.glob("checkpoints/step_*/trainer_state.json"):
        meta = json.loads(state_file.read_text())
        meta["files"] = digest_files(state_file.parent, exclude=(state_file.name,))
        state_file.write_text(json.dumps(meta))


class StopAfter4(ft.Preemption):
    def requested(self, step):
        return step >= 4 or super().requested(step)


def interrupted_run(run: Path, monkeypatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(ft, "Preemption", StopAfter4)
        assert ft.train(make_cfg(run))["stopped"] == "signal"


# -------------------------------------------------------------------------------- item 1: no code
def test_crafted_pickle_in_a_run_folder_is_refused_and_nothing_executes(tmp_path, monkeypatch):
    run, marker = tmp_path / "run", tmp_path / "EXECUTED"
    interrupted_run(run, monkeypatch)
    planted = sorted(run.rglob("custom_checkpoint_0.pkl"))
    assert planted
    for path in planted:
        plant(path, marker)
    redigest(run)  # the digests match: only the content check can stop it
    with pytest.raises(UnsafeCheckpointError) as err:
        ft.train(make_cfg(run))
    assert not marker.exists(), "code from the run folder was executed"
    assert "custom_checkpoint_0.pkl" in str(err.value) and "refusing to load" in str(err.value)


def test_every_torch_load_inside_the_guard_is_weights_only(tmp_path):
    marker, path = tmp_path / "EXECUTED", tmp_path / "state.pt"
    plant(path, marker)
    with no_code_execution(), pytest.raises(UnsafeCheckpointError, match="state.pt"):
        torch.load(path, weights_only=False)  # what accelerate and DeepSpeed ask for
    assert not marker.exists()
    torch.save({"step": 3, "w": torch.ones(2)}, path)
    with no_code_execution():
        assert torch.load(path, weights_only=False)["step"] == 3  # plain data still loads
    path.write_bytes(path.read_bytes()[:40])
    with no_code_execution(), pytest.raises(CorruptCheckpointError, match="state.pt"):
        torch.load(path)


# ------------------------------------------------------------------------ item 4: damaged checkpoints
def test_damaged_latest_finetune_checkpoint_falls_back_to_the_earlier_one(tmp_path, caplog):
    run = tmp_path / "run"
    assert ft.train(make_cfg(run))["global_step"] == 6
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["step_0000003", "step_0000006"]  # the latest and one to fall back to
    damaged = run / "checkpoints" / "step_0000006" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        result = ft.train(make_cfg(run, "train.epochs=3"))
    assert result["global_step"] == 9  # resumed at step 3 (epoch 1) and trained epochs 2 and 3 again
    assert str(damaged) in caplog.text and "step_0000003" in caplog.text
    epochs = [r["epoch"] for r in read_history(run / "history.csv")]
    assert epochs == [1, 2, 3]


def test_no_intact_checkpoint_is_an_error_naming_the_file(tmp_path):
    run = tmp_path / "run"
    ft.train(make_cfg(run))
    for state in run.glob("checkpoints/step_*/optimizer.bin"):
        state.write_bytes(b"\0" * state.stat().st_size)  # same size, other content
    with pytest.raises(CorruptCheckpointError, match="optimizer.bin"):
        ft.train(make_cfg(run, "train.epochs=3"))


def test_damaged_latest_pretrain_checkpoint_falls_back(tmp_path, caplog):
    from accelerate.state import AcceleratorState

    from pretrain.checkpointing import list_checkpoints
    from pretrain.main import resolve_out_override  # noqa: F401  (registers the Hydra schemas)
    from pretrain.config import CONFIG_DIR
    from pretrain.train import train

    tiny = ["encoder.name=test_resnet", "data.synthetic.n_per_kind=4", "data.synthetic.size=64",
            "data.synthetic.shard_size=2", "data.views.global_size=32", "data.views.local_size=16",
            "data.views.n_local=2", "data.num_workers=0", "method.options.out_dim=64", "method.options.hidden_dim=32",
            "method.options.bottleneck_dim=16", "optim.batch_size=4", "optim.epochs=2", "optim.steps_per_epoch=2",
            "checkpoint.every=2", "checkpoint.keep=2", "knn.every=0", "log.progress=false", "export.every=0"]

    def run(*extra: str) -> dict:
        AcceleratorState._reset_state(reset_partial_state=True)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("pretrain", overrides=[f"out={tmp_path / 'run'}", *tiny, *extra]))
        try:
            return train(cfg)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)

    run("stop_at_step=4")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    damaged = tmp_path / "run" / "checkpoints" / "step_0000004" / "custom_checkpoint_0.pkl"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING):
        result = run()
    assert result["resumed_from"] == 2 and result["step"] == 4
    assert str(damaged) in caplog.text


# ------------------------------------------------------------------------- item 12: history types
def test_history_keeps_its_column_types_after_a_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupted_run(run, monkeypatch)
    ft.train(make_cfg(run))
    lines = (run / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["3", "6"]
    assert all(type(v) is int for r in read_history(run / "history.csv") for k, v in r.items() if k in ("epoch", "step"))


def test_a_shard_member_that_is_a_pickle_is_never_unpickled(tmp_path):
    """webdataset's default decoders unpickle `.pyd` and torch-load `.pth` members: shards are data."""
    import io
    import pickle
    import tarfile

    import numpy as np
    from PIL import Image

    from pretrain.data import iterate_samples, make_loader

    marker = tmp_path / "EXECUTED"
    png = io.BytesIO()
    Image.fromarray(np.arange(24 * 24, dtype=np.uint8).reshape(24, 24)).save(png, format="PNG")
    members = {"s0.png": png.getvalue(), "s0.json": b'{"label_index": 0}',
               "s0.pyd": pickle.dumps(Payload(marker)), "s0.pickle": pickle.dumps(Payload(marker))}
    pth = io.BytesIO()
    torch.save(Payload(marker), pth)
    members["s0.pth"] = pth.getvalue()
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (image, label, key), = list(iterate_samples(shards))
    assert tuple(image.shape) == (1, 24, 24) and label == 0 and key == "s0"
    from pretrain.views import EvalView

    loader = make_loader(shards, views=EvalView(16), batch_size=1, steps_per_epoch=1, num_workers=0, seed=0)
    assert len(list(loader)) == 1
    assert not marker.exists(), "a shard member was unpickled"


def test_training_checkpoints_honour_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        ft.train(make_cfg(tmp_path / "run", "train.epochs=1"))
    finally:
        os.umask(old)
    found = list((tmp_path / "run" / "checkpoints").rglob("*"))
    assert found
    for path in found:
        want = 0o750 if path.is_dir() else 0o640
        assert stat.S_IMODE(path.stat().st_mode) == want, path
