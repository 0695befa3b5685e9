"""launch.study: grid expansion, resume of an interrupted study, failure isolation, aggregation."""
from __future__ import annotations

import csv
import json
import sys
import math
import statistics
from pathlib import Path

import pytest

import launch.study as st
import launch.study_grid as sg
import launch.study_run as sr
import launch.study_tables as stt
from pretrain.checkpointing import STATE_FILE, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "study" / "smoke.yaml"
DEFAULT = REPO / "configs" / "study" / "default.yaml"


# ------------------------------------------------------------------------------------ grid
def test_smoke_grid_expands_as_configured():
    cells = sg.expand(sg.load_study(SMOKE))
    assert len(cells) == 2 * 1 * 2 * 2  # models x inits x training sets x seeds
    assert [c.name for c in cells] == [
        f"{m}__random__{t}__s{s}" for s in (0, 1) for t in ("synth2", "synth1") for m in ("cs_unet_test", "unet_test")]
    c = cells[0]
    assert c.overrides[-1] == "train.seed=0" and "model.name=cs_unet_test" in c.overrides
    assert "data.n_train=2" in c.overrides and "data.crop_size=64" in c.overrides
    assert [c.name for c in sg.select(cells, "unet_test__*__s1")] == ["unet_test__random__synth2__s1",
                                                                      "unet_test__random__synth1__s1"]
    assert len(sg.select(cells, "synth1")) == 4  # no wildcard: substring
    assert [c.name for c in sg.select(cells, "unet_test__random__synth1__s0")] == ["unet_test__random__synth1__s0"]
    assert len(sg.select(cells, "unet_test__random")) == 8  # substring of cs_unet_test cells too


def test_default_grid_expands_and_composes(tmp_path):
    study = sg.load_study(DEFAULT, ["encoders.cnn=/enc/cnn", "encoders.swin=/enc/swin"])
    cells = sg.expand(study)
    assert len(cells) == 3 * 2 * 6 * 3 == 108
    names = {c.name for c in cells}
    assert "cs_unet_lite__pretrained__super3__s2" in names and "swin_unet_lite__random__ebc1_1img__s0" in names
    assert len(study["seeds"]) >= 3
    by = {c.name: c for c in cells}
    cfg = sr.compose_cell(by["cs_unet_lite__pretrained__ebc1_1img__s1"], tmp_path)
    assert cfg.model.name == "cs_unet_lite" and dict(cfg.model.encoder_weights) == {"cnn": "/enc/cnn", "swin": "/enc/swin"}
    assert list(cfg.data.train_names) == ["010417#4_S2480009.tif"] and cfg.train.seed == 1
    assert cfg.out == str(tmp_path / "cs_unet_lite__pretrained__ebc1_1img__s1")
    cfg = sr.compose_cell(by["unet_lite__pretrained__super1__s0"], tmp_path)
    assert dict(cfg.model.encoder_weights) == {"cnn": "/enc/cnn"}  # only the branch the model has
    assert "super4_ood" in cfg.data.extra_tests
    cfg = sr.compose_cell(by["swin_unet_lite__random__super2__s0"], tmp_path)
    assert dict(cfg.model.encoder_weights) == {} and cfg.model.name == "swin_unet_lite"


def test_paper_preset_expands_and_composes(tmp_path):
    study = sg.load_study(REPO / "configs" / "study" / "paper.yaml", ["encoders.cnn=/enc/r50", "encoders.swin=/enc/swt"])
    cells = sg.expand(study)
    assert len(cells) == 108 and cells[0].seed == 0 and cells[-1].seed == 2
    by = {c.name: c for c in cells}
    cfg = sr.compose_cell(by["cs_unet__pretrained__super3__s0"], tmp_path)
    assert cfg.model.name == "cs_unet" and dict(cfg.model.encoder_weights) == {"cnn": "/enc/r50", "swin": "/enc/swt"}
    assert cfg.data.crop_size == 512 and cfg.train.precision.value == "bf16" and cfg.train.patience == 30


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs" / "study").glob("*.yaml")))
def test_every_preset_expands_and_each_model_composes(preset, tmp_path):
    """A typo in any preset (a bad override, an unknown key) fails here, not hours into a study."""
    study = sg.load_study(REPO / "configs" / "study" / f"{preset}.yaml",
                          ["encoders.cnn=/enc/cnn", "encoders.swin=/enc/swin"])
    cells = sg.expand(study)
    assert cells and len({c.name for c in cells}) == len(cells)
    for model in dict.fromkeys(c.model for c in cells):
        cell = next(c for c in cells if c.model == model)
        cfg = sr.compose_cell(cell, tmp_path)
        assert cfg.out == str(tmp_path / cell.name)
        assert cfg.data.zoom == (0.5 if "data.zoom=0.5" in cell.overrides else 1.0)


def test_per_model_init_skips_models_not_listed():
    study = {"models": ["unet_lite", "cs_unet_test"], "seeds": [0],
             "inits": {"random": [], "micronet": {"unet_lite": ["+model.encoder_weights.cnn=x"]}},
             "trainsets": {"a": ["data=super1"]}}
    cells = sg.expand(study)
    assert [c.name for c in cells] == ["unet_lite__random__a__s0", "unet_lite__micronet__a__s0",
                                       "cs_unet_test__random__a__s0"]
    assert "model=unet_lite" in cells[0].overrides and "model.name=cs_unet_test" in cells[2].overrides


def test_optional_inits_expand_only_where_their_encoder_files_exist(tmp_path):
    have = tmp_path / "resnet18_imagenet.pth"
    have.write_bytes(b"x")
    study = {"models": ["unet_lite", "cs_unet_lite"], "seeds": [0], "trainsets": {"a": ["data=super1"]},
             "inits": {"random": [], "user": {"unet_lite": [f"+model.encoder_weights.cnn={have}"],
                                               "cs_unet_lite": [f"+model.encoder_weights.cnn={have}",
                                                                "+model.encoder_weights.swin="]}},
             "optional_inits": ["user"]}
    assert [c.name for c in sg.expand(study)] == ["unet_lite__random__a__s0", "unet_lite__user__a__s0",
                                                  "cs_unet_lite__random__a__s0"]  # no swin file: no cs_unet/user
    study["optional_inits"] = []  # not optional: the cell exists (and would fail loudly when run)
    assert len(sg.expand(study)) == 4


# ------------------------------------------------------------------------------------ running
def test_killed_study_resumes_without_rerunning_finished_cells(tmp_path, monkeypatch):
    out = tmp_path / "study"
    study = sg.load_study(SMOKE, ["seeds=[0]"])
    cells = sg.select(sg.expand(study), "synth1")  # 2 cells: cs_unet_test and unet_test
    assert len(cells) == 2
    calls: list[str] = []
    real = st.train_cell

    def first_then_killed(cfg):
        calls.append(Path(cfg.out).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the study is killed during its second cell
        return real(cfg)

    monkeypatch.setattr(st, "train_cell", first_then_killed)
    sg.write_grid(cells, out)
    with pytest.raises(KeyboardInterrupt):
        st.run_study(cells, out)
    first = out / cells[0].name
    assert sr.is_done(first) and not sr.is_done(out / cells[1].name)
    mtime = (first / "best" / "model.safetensors").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(st, "train_cell", lambda cfg: (calls.append(Path(cfg.out).name), real(cfg))[1])
    report = st.run_study(cells, out)
    assert calls == [cells[1].name]  # only the unfinished cell was trained
    assert report["skipped"] == [cells[0].name] and report["done"] == [cells[1].name]
    assert (first / "best" / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / cells[1].name / sr.STATUS_FILE).read_text())["status"] == "done"

    calls.clear()
    assert st.run_study(cells, out)["skipped"] == [c.name for c in cells] and calls == []
    rows, md = stt.summarize(out, study["ood_sets"])
    assert len(rows) == 2 * 2  # 2 cells x (test, shifted)
    assert {r["kind"] for r in rows if r["set"] == "shifted"} == {"ood"}
    assert all(r["n_train"] == 1 for r in rows) and all(r["wall_min"] >= 0 for r in rows)
    assert (out / "results.csv").is_file() and (out / "iou_vs_train_images.png").stat().st_size > 0
    assert "cs_unet_test | random | – | 1 |" in md
    assert not any(out.rglob(sr.CLAIM_FILE))  # claims are released


def test_cells_claimed_by_another_live_process_are_left_to_it(tmp_path, monkeypatch):
    """Two study processes can share one folder: a cell claimed by a live process is skipped, a claim left
    by a dead process is taken over, and the claim is released when the cell ends."""
    import socket
    import subprocess

    out = tmp_path / "study"
    cells = sg.select(sg.expand(sg.load_study(SMOKE, ["seeds=[0]"])), "synth1")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for cell, pid in zip(cells, (other.pid, dead.pid)):
            (out / cell.name).mkdir(parents=True)
            (out / cell.name / sr.CLAIM_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
        calls: list[str] = []
        monkeypatch.setattr(st, "train_cell", lambda cfg: (calls.append(Path(cfg.out).name), fake_train(cfg))[1])
        report = st.run_study(cells, out)
        assert report["held"] == [cells[0].name] and report["done"] == [cells[1].name] and calls == [cells[1].name]
        assert (out / cells[0].name / sr.CLAIM_FILE).is_file() and not (out / cells[1].name / sr.CLAIM_FILE).exists()
        assert sr.claim(out / cells[1].name) and not sr.claim(out / cells[0].name)
    finally:
        other.kill()


def test_shared_files_survive_concurrent_writers(tmp_path):
    """Study processes sharing a folder rewrite grid.tsv and the results at the same moments; each
    write goes through its own temp file, so none fails and the file is always complete (CI once caught
    two workers racing on one fixed temp name)."""
    from concurrent.futures import ThreadPoolExecutor

    cells = sg.expand(sg.load_study(SMOKE))
    out = tmp_path / "study"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: sg.write_grid(cells, out), range(64)))
    assert len((out / "grid.tsv").read_text().splitlines()) == len(cells) + 1
    assert sorted(p.name for p in out.iterdir()) == ["grid.tsv"]  # no temp files left behind


def test_signal_stops_the_study_and_rerun_resumes_the_cell_from_its_checkpoint(tmp_path, monkeypatch):
    """SIGTERM (here: the real Preemption handler told to fire at step 2) ends the study, not just the cell."""
    import segment.finetune as ft

    out = tmp_path / "study"
    cells = sg.select(sg.expand(sg.load_study(SMOKE, ["seeds=[0]"])), "synth1")
    for c in cells:
        c.overrides.append("train.epochs=2")  # 2 steps per epoch -> 4 steps

    class StopAt2(ft.Preemption):
        def requested(self, step):
            return step >= 2 or super().requested(step)

    with monkeypatch.context() as m:
        m.setattr(ft, "Preemption", StopAt2)
        report = st.run_study(cells, out)
    assert report["interrupted"] == [cells[0].name] and report["done"] == []
    assert not (out / cells[1].name).exists()  # the study stopped; the next cell was not started
    (_, latest), = list_checkpoints(out / cells[0].name)[-1:]
    saved = json.loads((latest / STATE_FILE).read_text())
    assert saved["global_step"] == 2

    results = []
    real = st.train_cell
    monkeypatch.setattr(st, "train_cell", lambda cfg: (results.append(real(cfg)), results[-1])[1])
    report = st.run_study(cells, out)
    assert report["done"] == [c.name for c in cells]
    assert results[0]["global_step"] == 4 and len(ft.read_history(out / cells[0].name / "history.csv")) == 2


def test_failed_cell_is_recorded_and_study_continues(tmp_path, monkeypatch):
    out = tmp_path / "study"
    cells = sg.select(sg.expand(sg.load_study(SMOKE)), "synth1__s0")
    seen = []

    def trainer(cfg):
        seen.append(Path(cfg.out).name)
        if len(seen) == 1:
            raise RuntimeError("out of memory")
        return fake_train(cfg)

    monkeypatch.setattr(st, "train_cell", trainer)
    report = st.run_study(cells, out)
    assert report["failed"] == [cells[0].name] and report["done"] == [cells[1].name]
    with (out / sr.FAILURES).open() as f:
        rec = list(csv.DictReader(f))
    assert rec[0]["cell"] == cells[0].name and "out of memory" in rec[0]["error"]
    assert st._failed_cells(out, [c.name for c in cells]) == [cells[0].name]


def fake_train(cfg):
    """A stand-in for segment.finetune.train: writes eval/summary.csv only."""
    run = Path(cfg.out)
    write_summary(run, [{"set": "test", "nasa_iou_mean": 0.5, "miou": 0.4}])
    return {"minutes": 0.1, "train_images": ["a.tif"]}


def test_cli_dry_run_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(st, "train_cell", lambda cfg: pytest.fail("dry run trained"))
    assert st.main(["--config", str(SMOKE), "--out", str(tmp_path / "s"), "--dry-run", "--only", "unet_test__*"]) == 0
    text = capsys.readouterr().out
    assert "8 cells, 4 selected" in text and "would run unet_test__random__synth2__s0" in text
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ aggregation
def write_summary(run: Path, rows: list[dict], minutes: float | None = None, images: int | None = None):
    (run / "eval").mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with (run / "eval" / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    if minutes is not None:
        (run / sr.STATUS_FILE).write_text(json.dumps({"status": "done", "train_minutes": minutes,
                                                      "train_images": [f"{i}.tif" for i in range(images)]}))


def test_aggregation_of_hand_written_results(tmp_path):
    enc = tmp_path / "export"  # an encoder export carrying its pretraining's k-NN probe
    enc.mkdir()
    (enc / "encoder.json").write_text(json.dumps({"timm_name": "resnet18", "knn": {"top1_init": 0.8, "top1": 0.85}}))
    study = {"models": {"cs": [], "unet": []}, "inits": {"random": [], "pre": [f"+model.encoder_weights.cnn={enc}"]},
             "trainsets": {"super1": {"overrides": [], "images": 10}, "super3": {"overrides": [], "images": 1}},
             "seeds": [0, 1, 2]}
    cells = sg.expand(study)
    out = tmp_path / "study"
    sg.write_grid(cells, out)
    # hand-written results for cs/pre/super1 (3 seeds) and unet/random/super3 (2 seeds); others missing
    iou = {0: 0.90, 1: 0.92, 2: 0.97}
    for s, v in iou.items():
        write_summary(out / f"cs__pre__super1__s{s}",
                      [{"set": "test", "n_images": 4, "nasa_iou_mean": v, "iou_matrix": v - 0.1, "iou_tertiary": 0.5,
                        "miou": v - 0.2},
                       {"set": "super4_ood", "n_images": 5, "nasa_iou_mean": v - 0.2, "iou_matrix": 0.6,
                        "iou_tertiary": 0.1, "miou": 0.3}], minutes=10 + s, images=10)
    for s, v in {0: 0.5, 1: 0.7}.items():
        write_summary(out / f"unet__random__super3__s{s}",
                      [{"set": "test", "nasa_iou_mean": v, "iou_matrix": v, "iou_tertiary": 0.0, "miou": v}],
                      minutes=2.0, images=1)

    for s, steps in {0: 64, 1: 64, 2: 40}.items():  # seed 2 stopped by the time budget
        saved = out / f"cs__pre__super1__s{s}" / "checkpoints" / f"step_{steps:07d}"
        saved.mkdir(parents=True)
        (saved / STATE_FILE).write_text(json.dumps({"global_step": steps}))
    status = out / "cs__pre__super1__s2" / sr.STATUS_FILE
    status.write_text(json.dumps({**json.loads(status.read_text()), "stopped": "time budget of 3 min"}))

    rows, md = stt.summarize(out, ["super4_ood"])
    assert "Optimizer steps: 64 in 2 of 3 cells; fewer in 1 (early stopping or the time budget):" in md
    # the overview: a row per training set and test set, a column per model/init
    assert "| training set | images | test set | kind | cs / pre | unet / random |" in md
    assert "| super1 | 10 | test | in | 93.00 ± 3.61 | n/a |" in md
    assert "| super1 | 10 | super4_ood | ood | 73.00 ± 3.61 | n/a |" in md
    assert "| super3 | 1 | test | in | n/a | 60.00 ± 14.14 |" in md
    assert "- cs__pre__super1__s2: 40 steps (time budget of 3 min)" in md
    assert len(rows) == 3 * 2 + 2
    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 8
    r0 = next(r for r in csv_rows if r["run"] == "cs__pre__super1__s0" and r["set"] == "super4_ood")
    assert (r0["model"], r0["init"], r0["trainset"], r0["seed"], r0["kind"], r0["n_train"]) == \
        ("cs", "pre", "super1", "0", "ood", "10")
    assert float(r0["nasa_iou_mean"]) == pytest.approx(0.7) and float(r0["wall_min"]) == 10
    assert float(r0["knn_cnn"]) == 0.85

    vals = [100 * v for v in iou.values()]
    mean, sd = statistics.fmean(vals), statistics.stdev(vals)
    assert (round(mean, 2), round(sd, 2)) == (93.0, 3.61)
    lines = md.splitlines()
    assert "### super1 (10 training images)" in lines and "### super3 (1 training images)" in lines
    assert "| set" not in md and any(line.startswith("| test set | kind | model | init | encoder k-NN | seeds | NASA IoU |") for line in lines)
    assert ("| test | in | cs | pre | cnn 0.850 | 3 | 93.00 ± 3.61 | 83.00 ± 3.61 | 50.00 ± 0.00 | 73.00 ± 3.61 "
            "| 11.00 ± 1.00 |") in lines
    assert "| super4_ood | ood | cs | pre | cnn 0.850 | 3 | 73.00 ± 3.61 | 60.00 ± 0.00 | 10.00 ± 0.00 | 30.00 ± 0.00 | 11.00 ± 1.00 |" in lines
    assert "| test | in | unet | random | – | 2 | 60.00 ± 14.14 | 60.00 ± 14.14 | 0.00 ± 0.00 | 60.00 ± 14.14 | 2.00 ± 0.00 |" in lines
    assert math.isclose(statistics.stdev([50, 70]), 14.142, rel_tol=1e-3)
    # the cells without results are listed
    assert f"Cells without results ({24 - 5}): not run yet or interrupted:" in md
    assert "- unet__random__super3__s2" in lines
    assert (out / "results.md").read_text() == md
    assert (out / "iou_vs_train_images.png").stat().st_size > 0


def test_cells_linked_from_another_study_are_skipped_and_aggregated(tmp_path):
    """A follow-up study reuses identical cells of an earlier one through links (configs/study/zoom_ebc.yaml):
    they count as finished and their results are read through the link."""
    study = {"models": {"cs": []}, "inits": {"random": []}, "trainsets": {"super1": {"overrides": []}},
             "seeds": [0, 1]}
    cells = sg.expand(study)
    earlier, out = tmp_path / "earlier", tmp_path / "study"
    write_summary(earlier / cells[0].name, [{"set": "test", "nasa_iou_mean": 0.8}], minutes=1.0, images=10)
    sg.write_grid(cells, out)
    (out / cells[0].name).symlink_to(earlier / cells[0].name)
    report = st.run_study(cells, out, trainer=lambda cfg: (_ for _ in ()).throw(AssertionError("trained")),
                          dry_run=True)
    assert report["skipped"] == [cells[0].name]
    rows, missing = stt.aggregate(out)
    assert [(r["run"], r["nasa_iou_mean"]) for r in rows] == [(cells[0].name, pytest.approx(0.8))]
    assert missing == [cells[1].name]


def test_paired_effects_of_hand_written_results():
    def row(model, init, seed, v, s="test", kind="in"):
        return {"model": model, "init": init, "seed": seed, "trainset": "super3", "set": s, "kind": kind,
                "nasa_iou_mean": v}
    rows = [row("cs", "pre", 0, 0.90), row("cs", "pre", 1, 0.80), row("cs", "pre", 2, 0.85),
            row("cs", "rnd", 0, 0.85), row("cs", "rnd", 1, 0.82),  # seed 2 missing: not paired
            row("unet", "pre", 0, 0.70, "super4_ood", "ood"), row("unet", "rnd", 0, 0.75, "super4_ood", "ood"),
            row("unet", "rnd", 1, float("nan"))]
    eff = {(e["other"], e["set"]): e for e in stt.paired_effects(rows, "init", "pre", "rnd")}
    assert set(eff) == {("cs", "test"), ("unet", "super4_ood")}
    assert eff[("cs", "test")]["diffs"] == pytest.approx([0.05, -0.02])
    md = stt.effects_markdown(rows, [{"factor": "init", "a": "pre", "b": "rnd"}, {"factor": "model", "a": "cs", "b": "unet"}])
    assert "| super3 | test | in | cs | 2 | +1.50 ± 4.95 | 1/2 |" in md
    assert "| super3 | super4_ood | ood | unet | 1 | -5.00 | 0/1 |" in md
    assert "cs − unet" not in md  # no cs/unet pair shares a test set and init
