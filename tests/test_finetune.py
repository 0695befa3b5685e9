"""Fine-tuning end to end on tiny synthetic data: outputs, resume after interruption, config errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

import segment.finetune as ft
from segment import finetune_model
from segment.config import register_configs
from segment.finetune_data import load_data
from segment.finetune_log import read_history
from segment.finetune_model import build_model, export_intensity

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = [
    "model.name=cs_unet_test",
    "data=synthetic_super",
    "data.synthetic_size=64",
    "data.crop_size=64",
    "data.samples_per_epoch=6",
    "train.batch_size=2",
    "train.epochs=2",
    "overlays=1",
]


def make_cfg(out: Path, *extra: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("finetune", overrides=[*TINY, f"out={out}", *extra])
    return OmegaConf.to_object(cfg)


def test_finetune_writes_run_folder(tmp_path):
    result = ft.train(make_cfg(tmp_path / "run"))
    run = tmp_path / "run"
    for f in ["config.yaml", "history.csv", "report.md", "best/model.safetensors", "best/model.json",
              "last/model.json", "checkpoints/step_0000006/trainer_state.json", "eval/summary.md",
              "figures/curves.png"]:
        assert (run / f).is_file(), f
    assert result["global_step"] == 2 * 3  # 6 samples / batch 2 = 3 steps per epoch
    assert 0.0 <= result["best"] <= 1.0
    assert set(result["test"]) >= {"test", "shifted"}  # in-distribution and the shifted folder
    from segment.checkpoint import load_model

    model, meta = load_model(run)
    assert meta["class_names"] == ["matrix", "secondary", "tertiary"]
    assert meta["intensity"] == "percentile"  # data.intensity default, read back by Predictor.from_checkpoint
    assert meta["overlap"] == 0.5  # train.tile_overlap, what evaluate and predict use unless told otherwise
    assert len(read_history(run / "history.csv")) == 2


def test_resume_after_interruption_continues_from_saved_step(tmp_path, monkeypatch):
    class StopAfter(ft.Preemption):
        """The real handler, 'receiving' SIGTERM after 4 steps."""

        def requested(self, step):
            return step >= 4 or super().requested(step)

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(ft, "Preemption", StopAfter)
        first = ft.train(make_cfg(run))
    assert first == {"stopped": "signal", "global_step": 4}
    saved = json.loads((run / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)

    second = ft.train(make_cfg(run))
    assert second["global_step"] == 6  # continued from step 4, did not restart
    rows = read_history(run / "history.csv")
    assert [r["epoch"] for r in rows] == [1, 2]


def test_unknown_config_key_is_an_error(tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg(tmp_path, "train.epochz=3")
    assert "epochz" in str(e.value) + str(e.value.__cause__)


def test_bad_value_type_is_an_error(tmp_path):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as e:
        make_cfg(tmp_path, "train.epochs=many")
    assert "epochs" in str(e.value) + str(e.value.__cause__)


def test_bad_enum_value_is_an_error(tmp_path):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        make_cfg(tmp_path, "train.loss=focal")
    assert "loss" in str(e.value) + str(e.value.__cause__)


def test_bad_intensity_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="data.intensity: intensity must be"):
        make_cfg(tmp_path, "data.intensity=minmax")
    assert make_cfg(tmp_path, "data.intensity=dtype").data.intensity == "dtype"


def test_encoder_intensity_mismatch_warns(tmp_path, monkeypatch, caplog):
    export = tmp_path / "export"
    export.mkdir()
    (export / "encoder.safetensors").write_bytes(b"")
    (export / "encoder.json").write_text(json.dumps({"timm_name": "resnet18", "intensity": "percentile_0.5_99.5"}))
    assert export_intensity(export) == export_intensity(export / "encoder.safetensors") == "percentile_0.5_99.5"
    assert export_intensity(tmp_path / "plain.pth") is None
    monkeypatch.setattr(finetune_model, "load_model_encoders", lambda *a, **k: {})  # no real weights here
    for intensity, warns in (("percentile", False), ("dtype", True)):
        caplog.clear()
        cfg = make_cfg(tmp_path / "run", f"+model.encoder_weights.cnn={export}", f"data.intensity={intensity}")
        with caplog.at_level("WARNING", logger="segment.finetune_model"):
            build_model(cfg, 3)
        assert any("pretrained with intensity" in r.getMessage() for r in caplog.records) == warns


def test_preempt_flag_file_checkpoints_and_exits(tmp_path):
    """A SLURM trap writes RUN/PREEMPT: the run checkpoints at the next step, exits, and removes the flag."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "PREEMPT").touch()
    cfg = make_cfg(run, "train.epochs=4")
    # the flag is left by a *previous* job and cleared at start; one written during training stops it
    import threading

    def write_flag_soon():
        import time

        for _ in range(600):
            if (run / "history.csv").exists():
                (run / "PREEMPT").touch()
                return
            time.sleep(0.05)

    threading.Thread(target=write_flag_soon, daemon=True).start()
    result = ft.train(cfg)
    assert result["stopped"] == "signal"
    assert 3 < result["global_step"] < 12
    assert not (run / "PREEMPT").exists()


def test_zoom_trains_on_the_model_grid_and_evaluates_on_the_native_one(tmp_path):
    """data.zoom=0.5: training crops come from half-size images, model.json records the zoom, and
    validation/evaluation/predict see native-size images (the Predictor resizes and resizes back)."""
    import numpy as np

    from segment.data import SegmentationDataset
    from segment.infer import Predictor

    import segment.data

    zooms = []  # the zoom each dataset finetune builds is given: training 0.5, validation native
    real_init = segment.data.SegmentationDataset.__init__

    def spy(self, *args, **kwargs):
        zooms.append(kwargs.get("zoom", 1.0))
        real_init(self, *args, **kwargs)

    run = tmp_path / "run"
    cfg = make_cfg(run, "data.zoom=0.5", "data.synthetic_size=96", "data.crop_size=32", "data.pixel_size_nm=5")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(segment.data.SegmentationDataset, "__init__", spy)
        result = ft.train(cfg)
    assert zooms == [0.5, 1.0]
    assert set(result["test"]) >= {"test", "shifted"} and 0.0 <= result["best"] <= 1.0
    meta = json.loads((run / "best" / "model.json").read_text())
    assert meta["zoom"] == 0.5 and meta["tile_size"] == 32
    assert meta["model_pixel_size_nm"] == 10.0  # 5 nm/px micrographs seen at half size
    predictor = Predictor.from_checkpoint(run / "best")
    assert predictor.zoom == 0.5
    data = load_data(cfg)
    native = SegmentationDataset(data.val_pairs, data.class_map)
    zoomed = SegmentationDataset(data.val_pairs, data.class_map, zoom=0.5)
    image, label = native.load(0)
    assert image.shape == label.shape == (96, 96) and zoomed.load(0)[0].shape == zoomed.load(0)[1].shape == (48, 48)
    assert set(np.unique(zoomed.load(0)[1])) <= set(np.unique(label))  # nearest neighbour: no new classes
    labels, _ = predictor.predict_image(image)
    assert labels.shape == (96, 96)
    assert "zoom 0.5" in (run / "eval" / "summary.md").read_text()


def test_bad_zoom_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="data.zoom: zoom must be a positive number"):
        make_cfg(tmp_path, "data.zoom=0")
    with pytest.raises(ValueError, match="data.pixel_size_nm must be a positive number"):
        make_cfg(tmp_path, "data.pixel_size_nm=-2")


def test_step_budget_is_exact_and_the_schedule_ends_with_it(tmp_path):
    run = tmp_path / "run"
    result = ft.train(make_cfg(run, "train.steps=5", "evaluate=false"))  # 3 steps per epoch: 2 epochs, the last partial
    assert result["global_step"] == 5 and result["stopped"] == "steps"
    rows = read_history(run / "history.csv")
    assert [r["step"] for r in rows] == [3, 5] and "val_miou" in rows[-1]  # the partial epoch is validated
    assert rows[-1]["lr"] < 0.05 * 5e-4  # the cosine reached its end with the budget, not with train.epochs


def test_time_budget_stops_mid_epoch_and_validates(tmp_path):
    run = tmp_path / "run"
    result = ft.train(make_cfg(run, "train.max_minutes=0.0001", "optim.warmup_epochs=0", "evaluate=false"))
    assert result["global_step"] == 1 and result["stopped"].startswith("time budget")
    assert (run / "best" / "model.json").is_file()
    # the cosine follows the clock when it is the nearer budget: the run it stopped has annealed
    assert read_history(run / "history.csv")[-1]["lr"] < 0.05 * 5e-4


def test_default_budget_and_epoch_do_not_depend_on_the_number_of_images(tmp_path):
    from segment.config import DEFAULT_STEPS, STEPS_PER_EPOCH

    for n_train in (1, 8):
        cfg = make_cfg(tmp_path / "run", "train.epochs=null", "data.samples_per_epoch=null",
                       f"data.n_train={n_train}", "train.batch_size=4")
        assert ft.samples_per_epoch(cfg) == STEPS_PER_EPOCH * 4
        assert ft.total_steps(cfg, STEPS_PER_EPOCH) == DEFAULT_STEPS
    assert ft.total_steps(make_cfg(tmp_path / "run", "train.epochs=3"), 7) == 21  # epochs: the older form
    assert ft.total_steps(make_cfg(tmp_path / "run", "train.epochs=3", "train.steps=5"), 7) == 5  # steps win


def test_cosine_follows_the_nearer_of_the_step_and_time_budgets(tmp_path):
    cfg = make_cfg(tmp_path / "run", "train.steps=100", "optim.warmup_epochs=0")
    groups = [dict(is_encoder=False)]
    by_steps = ft.lr_lambdas(groups, cfg, 10)[0]
    assert by_steps(50) == pytest.approx(0.5)
    clock = [0.0]
    by_time = ft.lr_lambdas(groups, cfg, 10, lambda: clock[0])[0]
    assert by_time(50) == pytest.approx(0.5)  # the step budget is nearer its end
    clock[0] = 0.75
    assert by_time(50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))  # now the clock is
    clock[0] = 1.5
    assert by_time(10) == pytest.approx(0.0)


@pytest.mark.parametrize("override", ["train.steps=0", "train.max_minutes=0"])
def test_bad_budgets_are_refused(tmp_path, override):
    with pytest.raises(Exception, match=override.split("=")[0]):
        make_cfg(tmp_path / "run", override)


def test_a_cnn_trains_channels_last_and_its_checkpoints_load(tmp_path, caplog):
    """NHWC weights for a pure CNN (issue 16 item 8): training, checkpoints, resume and best/ all work."""
    import torch

    from segment.checkpoint import load_model

    run = tmp_path / "run"
    cfg = make_cfg(run, "model.name=unet_test", "evaluate=false", "train.epochs=1")
    model, _ = build_model(cfg, 3)
    assert ft.channels_last(model) and next(p for p in model.parameters() if p.ndim == 4).is_contiguous(
        memory_format=torch.channels_last)
    with caplog.at_level("INFO", logger="segment.finetune"):
        ft.train(cfg)
    assert "channels_last True" in caplog.text  # the run itself went NHWC, not only this test's model
    loaded, _ = load_model(run / "best")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    result = ft.train(make_cfg(run, "model.name=unet_test", "evaluate=false", "train.epochs=2"))  # resumes
    assert result["global_step"] == 6


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    import torch

    real = ft.build_model

    def poisoned(cfg, k):
        model, kwargs = real(cfg, k)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model, kwargs

    monkeypatch.setattr(ft, "build_model", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 1"):
        ft.train(make_cfg(tmp_path / "run", "evaluate=false"))
