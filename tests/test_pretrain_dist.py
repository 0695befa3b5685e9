"""Multi-process and DeepSpeed runs of pretrain/main.py through `accelerate launch`, on the CPU."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpointing import STATE_FILE, list_checkpoints

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TINY = [
    "encoder.name=test_resnet",
    "data.synthetic.n_per_kind=8", "data.synthetic.size=64", "data.synthetic.shard_size=2",
    "data.views.global_size=32", "data.views.local_size=16", "data.views.n_local=2", "data.num_workers=0",
    "method.options.out_dim=64", "method.options.hidden_dim=32", "method.options.bottleneck_dim=16",
    "optim.batch_size=4", "optim.steps_per_epoch=3", "optim.base_lr=0.01",
    "knn.every=0", "log.every=1", "log.progress=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], *, env_extra: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([*ACCELERATE, "--main_process_port", str(free_port()), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each worker in a session of its own)."""
    import psutil

    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        log, _ = proc.communicate()
        pytest.fail(f"timed out:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    return log


def test_two_cpu_processes_resample_all_shards_and_stay_in_sync(tmp_path):
    out = tmp_path / "run"
    proc = launch(["--multi_gpu", "--num_processes", "2", "pretrain/main.py", f"out={out}", *TINY,
                   "optim.epochs=2", "checkpoint.every=3"], env_extra={"ACCELERATE_USE_CPU": "true"},
                  start_new_session=True)
    log = finish(proc)
    ranks = [json.loads((out / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["step"] == ranks[1]["step"] == 6 and ranks[0]["samples"] == ranks[1]["samples"] == 6 * 4
    read = [set(r["shards_read"]) for r in ranks]
    # resample, then split: both ranks draw from all 8 shards (12 draws each), at disjoint positions
    assigned = [{Path(u).name for u in r["shards_assigned"]} for r in ranks]
    assert len(assigned[0]) == 8 and assigned[0] == assigned[1]
    assert read[0] and read[1] and read[0] <= assigned[0] and read[1] <= assigned[1] and len(read[0] | read[1]) > 4
    assert ranks[0]["student_checksum"] == ranks[1]["student_checksum"]  # DDP kept the students identical
    final = out / "checkpoints" / "step_0000006"
    assert (final / STATE_FILE).is_file() and {p.name for p in final.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert (out / "export" / "encoder.safetensors").is_file()
    assert log.count("pretraining completed") == 1  # rank 1 logs warnings only


def test_deepspeed_zero2_killed_after_a_checkpoint_resumes_from_it(tmp_path):
    out = tmp_path / "run"
    args = ["--config_file", "configs/accelerate/deepspeed_zero2.yaml", "--num_processes", "1", "pretrain/main.py",
            f"out={out}", *TINY, "optim.epochs=30", "checkpoint.every=2", "checkpoint.keep=1"]
    proc = launch(args, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not list_checkpoints(out):
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.fail(f"run ended before its first checkpoint:\n{proc.communicate()[0][-4000:]}")
    kill_tree(proc)  # SIGKILL: no chance to clean up
    first_log, _ = proc.communicate()
    assert "DEEPSPEED" in first_log, first_log[-3000:]
    (saved, path), = list_checkpoints(out)  # keep=1; a half-written one never counts
    assert (path / "pytorch_model" / "mp_rank_00_model_states.pt").is_file()

    stop = saved + 3
    log = finish(launch([*args, f"stop_at_step={stop}"], start_new_session=True))
    assert f"resumed from {path}" in log, log[-3000:]
    rank = json.loads((out / "ranks" / "rank_0.json").read_text())
    assert rank["start_step"] == saved and rank["step"] == stop
    steps = [int(line.split(",", 1)[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, stop + 1))
    (last, _), = list_checkpoints(out)
    assert last == stop
    assert json.loads((out / "export" / "encoder.json").read_text())["steps"] == stop


def test_usr1_to_one_non_zero_rank_stops_every_rank_at_one_checkpoint_and_the_rerun_resumes(tmp_path):
    """SIGUSR1 to rank 1 alone (the launcher and rank 0 get nothing): the ranks agree on it at the next
    poll, write one checkpoint together, exit 0, and a rerun resumes from it (issue 16 item 7)."""
    import psutil

    out = tmp_path / "run"
    args = ["--multi_gpu", "--num_processes", "2", "pretrain/main.py", f"out={out}", *TINY, "optim.epochs=100",
            "checkpoint.every=0", "checkpoint.poll_every=1"]
    cpu = {"ACCELERATE_USE_CPU": "true"}
    proc = launch(args, env_extra=cpu, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        rank1 = None
        while time.monotonic() < deadline and proc.poll() is None:
            if rank1 is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1":
                            rank1 = child
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            metrics = out / "metrics.csv"
            if rank1 is not None and metrics.is_file() and len(metrics.read_text().splitlines()) > 1:
                break  # both ranks are in the loop (step 1 is an all-reduce), handlers installed
            time.sleep(0.2)
        assert proc.poll() is None and rank1 is not None, "the run ended, or rank 1 was not found"
        rank1.send_signal(signal.SIGUSR1)
    except BaseException:
        kill_tree(proc)
        raise
    log = finish(proc)
    (stop, path), = list_checkpoints(out)
    assert log.count("received SIGUSR1") == 1, log[-3000:]  # rank 1 only
    assert log.count(f"pre-empted: checkpointed at step {stop};") == 2, log[-3000:]  # rank 0 and rank 1
    assert 1 <= stop < 300
    assert {p.name for p in path.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert json.loads((path / STATE_FILE).read_text())["world_size"] == 2
    ranks = [json.loads((out / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["start_step"], r["step"]) for r in ranks] == [(0, stop), (0, stop)]
    assert not (out / "export").exists(), "a pre-empted run does not export"

    log = finish(launch([*args, f"stop_at_step={stop + 1}"], env_extra=cpu, start_new_session=True))
    assert f"resumed from {path}" in log, log[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["start_step"], r["step"]) for r in ranks] == [(stop, stop + 1), (stop, stop + 1)]
    assert ranks[0]["student_checksum"] == ranks[1]["student_checksum"]
