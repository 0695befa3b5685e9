"""bench/equal_time.py: the job plan, the commands and the table, on fabricated results (no training)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("equal_time", Path(__file__).resolve().parents[1] / "bench" / "equal_time.py")
et = importlib.util.module_from_spec(spec)
sys.modules["equal_time"] = et  # dataclasses look their module up while the class is built
spec.loader.exec_module(et)


def test_plan_is_seed_major_with_the_peer_beside_each_product():
    jobs = et.plan(["super3", "ebc1"], [0, 1], {"unet_lite": ["model=unet_lite"]})
    assert [j.name for j in jobs[:4]] == ["plain_baseline__super3__s0", "unet_lite__super3__s0",
                                          "plain_baseline__ebc1__s0", "unet_lite__ebc1__s0"]
    cmd = jobs[1].command(Path("/o"), 15)
    assert "train.max_minutes=15" in cmd and "train.steps=1000000" in cmd and "model=unet_lite" in cmd
    assert "data.zoom=0.5" in jobs[3].command(Path("/o"), 15)
    plain = jobs[0].command(Path("/o"), 15)
    assert plain[plain.index("--minutes") + 1] == "15" and plain[plain.index("--threads") + 1] == "1"


def test_bad_product_spec_is_refused():
    with pytest.raises(Exception, match="NAME="):
        et.parse_product("unet_lite")  # no overrides part: not NAME=...
    with pytest.raises(Exception, match="NAME="):
        et.parse_product("plain_baseline=model=unet_lite")


def _fake(out: Path, seed: int, plain: float, product: float) -> None:
    p = out / f"plain_baseline__super3__s{seed}"
    p.mkdir(parents=True)
    (p / "result.json").write_text(json.dumps({"steps": 190, "minutes": 15.0, "tests": {
        "Super3:test": {"nasa_iou_mean": plain, "iou_per_class": {"tertiary": 0.7}},
        "Super4:test": {"nasa_iou_mean": plain - 0.2, "iou_per_class": {"tertiary": 0.1}}}}))
    q = out / f"unet_lite__super3__s{seed}"
    (q / "eval").mkdir(parents=True)
    (q / "history.csv").write_text("epoch,step,minutes\n1,20,1.5\n10,185,15.01\n")
    (q / "eval" / "summary.csv").write_text(
        "set,nasa_iou_mean,iou_tertiary\n" f"test,{product},0.75\n" f"super4_ood,{product - 0.1},0.2\n")


def test_collect_reads_both_formats_and_reports_mean_and_spread(tmp_path):
    _fake(tmp_path, 0, 0.90, 0.94)
    _fake(tmp_path, 1, 0.92, 0.96)
    jobs = et.plan(["super3"], [0, 1, 2], {"unet_lite": []})  # seed 2 unfinished: left out, n=2
    text = et.collect(jobs, tmp_path)
    assert "| super3 | Super3:test (in) | 91.0 ± 1.4 (tertiary 70.0 ± 0.0; n=2, steps 190/190) |" \
           " 95.0 ± 1.4 (tertiary 75.0 ± 0.0; n=2, steps 185/185) |" in text
    assert "| super3 | Super4:test (ood) | 71.0 ± 1.4" in text and "85.0 ± 1.4" in text


def test_cells_run_side_by_side_and_one_after_another(tmp_path, monkeypatch):
    """Every runner of a cell starts before any of them ends; the next cell starts after the whole cell."""
    def command(self, out, minutes):
        code = ("import json, pathlib, sys, time; t0 = time.time(); time.sleep(0.5); p = pathlib.Path(sys.argv[1]); "
                "p.parent.mkdir(parents=True, exist_ok=True); p.write_text(json.dumps([t0, time.time()]))")
        return [sys.executable, "-c", code, str(self.result(out))]

    monkeypatch.setattr(et.Job, "command", command)
    jobs = et.plan(["super3"], [0, 1], {"unet_lite": [], "cs": []})
    et.run_jobs(jobs, tmp_path, 0.01)
    span = {j.name: json.loads(j.result(tmp_path).read_text()) for j in jobs}
    cell0 = [span[j.name] for j in jobs if j.seed == 0]
    cell1 = [span[j.name] for j in jobs if j.seed == 1]
    assert len(cell0) == len(cell1) == 3
    assert max(s for s, _ in cell0) < min(e for _, e in cell0)  # side by side
    assert max(e for _, e in cell0) <= min(s for s, _ in cell1)  # one cell after the other
    info = json.loads((tmp_path / jobs[0].name / "job.json").read_text())
    assert info["rc"] == 0 and len(info["side_by_side"]) == 3
    et.run_jobs(jobs, tmp_path, 0.01)  # all finished: nothing reruns
    assert {j.name: json.loads(j.result(tmp_path).read_text()) for j in jobs} == span
