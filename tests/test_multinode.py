"""Several nodes on this machine: each "node" a launcher of one process, gloo over localhost."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

# Node processes must not inherit a launcher's variables from whatever runs the tests.
LAUNCHER_VARIABLES = ("MIXER_RUN_DIR", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    return {**env, "COLUMNS": "200", **extra}


def start_torchrun_nodes(cwd: Path, launch: list[str], args: list[str], nodes: int = 2,
                         node_args: dict[int, list[str]] | None = None, env: dict[str, str] | None = None,
                         program: tuple[str, ...] = ("-m", "mixer_cli.cli")) -> list[subprocess.Popen]:
    """`torchrun --nnodes=N --nproc-per-node=1 <launch> <program> <args> <node_args[n]>` once per node n,
    in turn; `{node}` in `launch` is the node's number."""
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                              "--nproc-per-node=1", *[a.format(node=n) for a in launch], *program, *args,
                              *(node_args or {}).get(n, [])],
                             cwd=cwd, env=node_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
            for n in range(nodes)]


def rendezvous(run_id: str) -> list[str]:
    """torchrun's c10d rendezvous on localhost, as on a cluster: the nodes agree on their ranks."""
    return ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={run_id}"]


def static_launch(run_id: str | None = None) -> list[str]:
    """torchrun's static rendezvous on localhost: node 0 holds the store."""
    return ["--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
            *([f"--rdzv-id={run_id}"] if run_id else [])]


def finish(procs: list[subprocess.Popen], timeout: float) -> tuple[list[str], float]:
    """Every process's output, and the seconds from the first one's end to the last one's."""
    def wait(p: subprocess.Popen) -> tuple[str, float]:
        out = p.communicate(timeout=timeout)[0]
        return out, time.monotonic()

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            outputs, ended = zip(*pool.map(wait, procs))
    finally:
        for p in procs:
            p.kill()
    return list(outputs), max(ended) - min(ended)


@pytest.mark.slow
def test_a_static_torchrun_launch_is_refused_on_every_node_before_anything_is_written(tmp_path, tiny_run):
    # --master-addr and --node-rank with no --rdzv-id: the nodes share no id to name one run directory
    procs = start_torchrun_nodes(tmp_path, static_launch(),
                                 ["pretrain", *tiny_run, "trainer=torchrun", "trainer.steps=1", f"run_root={tmp_path}"])
    outputs, _ = finish(procs, timeout=120)
    refusal = ("the ranks of this run cannot agree on a run directory: start them with torchrun --rdzv-id=ID "
               "(or --standalone), under SLURM, or with trainer.devices=N")
    for p, out in zip(procs, outputs):
        assert p.returncode != 0 and "(exitcode: 2)" in out
        # its own line, or the other rank's when that one refused first (core/peers.py): the same decision
        assert {f"error: {refusal}", f"error: rank 0 failed: {refusal}; this rank ends too",
                f"error: rank 1 failed: {refusal}; this rank ends too"} & set(out.splitlines()), out[-2000:]
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.slow
def test_when_one_rank_fails_the_others_end_within_seconds_and_discard_the_run(tmp_path, tiny_run):
    # Node 1 cannot start (its own config); node 0 goes on to make the run directory and join the
    # process group, where it would wait for node 1 for ever
    args = ["pretrain", *tiny_run, "trainer=torchrun", "trainer.steps=50", f"run_root={tmp_path}"]
    procs = start_torchrun_nodes(tmp_path, static_launch("job1"), args, node_args={1: ["data.global_batch=999"]})
    outputs, apart = finish(procs, timeout=60)
    failure = "global batch 999 does not split over 2 devices; use a multiple of 2 (data.global_batch=...)"
    assert f"error: {failure}" in outputs[1].splitlines()
    assert f"error: rank 1 failed: {failure}; this rank ends too" in outputs[0].splitlines()
    assert "(exitcode: 2)" in outputs[0] and procs[0].returncode != 0
    assert apart < 15  # seconds; before, node 0 waited in the process group's set-up until killed
    assert not list(tmp_path.glob("pretrain/*"))  # node 0's run directory, discarded as a failure's


RECORD = Path(__file__).parent / "rank_record.py"  # the run, recording what each rank read


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), f"no {path.name}"
        time.sleep(0.1)


def slurm_task(node: int, job: str, port: int) -> dict[str, str]:
    """The variables SLURM gives task `node` of a job of 2 nodes x 1 task, on this machine."""
    return {"SLURM_JOB_ID": job, "SLURM_JOB_NAME": "mixer", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(node), "SLURM_LOCALID": "0", "SLURM_NODEID": str(node),
            "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port)}


def start_nodes(launcher: str, job: str, cwd: Path, program: tuple[str, ...], args: list[str],
                env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two nodes of one process each: torchrun's on each node (c10d rendezvous), or the tasks of a SLURM job."""
    if launcher == "torchrun":
        return start_torchrun_nodes(cwd, rendezvous(f"job{job}"), args, env=env, program=program)
    port = free_port()
    return [subprocess.Popen([sys.executable, *program, *args], cwd=cwd, env=node_env(**slurm_task(n, job, port),
                                                                                      **(env or {})),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "run_name"), [("torchrun", "torchrun-job41-"), ("slurm", "slurm41.0-")])
def test_two_nodes_train_one_run_on_their_own_shards_stop_together_and_resume(
        tmp_path, index_shards, tiny_run, launcher, run_name):
    index_shards(tmp_path / "train", n=40, shard_size=10)  # 4 shards
    index_shards(tmp_path / "eval", n=21, shard_size=21)
    args = [
        "data.source=shards", f"data.train_path={tmp_path / 'train'}", f"data.eval_path={tmp_path / 'eval'}",
        "data.num_classes=40", "data.img_size=16", "data.channels=3", "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.5,0.5,0.5]", "data.global_batch=8", "data.num_workers=2", "data.shuffle_buffer=5",
        "aug.pad_crop=0", *tiny_run, f"trainer={launcher}", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.epochs=40", "trainer.val_every_epochs=40", f"run_root={tmp_path / 'runs'}",
    ]
    procs = start_nodes(launcher, "41", tmp_path, (str(RECORD), str(tmp_path)), args, env={"MARK_AT_STEP": "3"})
    wait_for(tmp_path / "at_step", procs, timeout=120)
    for p in procs:  # as scancel does: every node's launcher (torchrun passes it on) or task
        p.send_signal(signal.SIGTERM)
    outputs, _ = finish(procs, timeout=60)
    (run,) = (tmp_path / "runs" / "pretrain").iterdir()  # one run directory for both nodes
    assert run.name.startswith(run_name)
    stopped = [line for line in outputs[0].splitlines() if line.startswith("stopped by SIGTERM")]
    assert stopped and stopped[0].endswith(f"continue with --resume {run}"), outputs[0][-3000:]
    step = torch.load(run / "last.ckpt", weights_only=False)["global_step"]
    assert step >= 3
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["train"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) >= step * 4  # each node: its half of every global batch of 8
    for start in range(0, len(ranks[0]), 20):  # each epoch (5 steps x 4 per node) split over the nodes
        mine, theirs = (set(r[start:start + 20]) for r in ranks)
        assert not mine & theirs and (len(mine) < 20 or mine | theirs == set(range(40)))

    procs = start_nodes(launcher, "42", tmp_path, ("-m", "mixer_cli.cli"), ["pretrain", "--resume", str(run)])
    outputs, _ = finish(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == results["planned_steps"] == 40 * 5 and results["devices"] == 2
    assert results["batch"] == "global batch 8 = 2 device(s) x 4 x 1 accumulation step(s)"
    assert results["num_samples"] == 21  # exact evaluation, split over the nodes
    assert [d.name for d in (tmp_path / "runs" / "pretrain").iterdir()] == [run.name]
