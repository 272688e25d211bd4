"""Several nodes on this machine: each "node" a launcher of one process, gloo over localhost."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def start_torchrun_nodes(cwd: Path, launch: list[str], args: list[str], nodes: int = 2) -> list[subprocess.Popen]:
    """`torchrun --nnodes=N --nproc-per-node=1 <launch> -m mixer_cli.cli <args>` once per node."""
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                              "--nproc-per-node=1", *[a.format(node=n) for a in launch], "-m", "mixer_cli.cli", *args],
                             cwd=cwd, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for n in range(nodes)]


def finish(procs: list[subprocess.Popen], timeout: float) -> tuple[list[str], float]:
    """Every process's output, and the seconds from the first end to the last."""
    outputs, ended = [], []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
            ended.append(time.monotonic())
    finally:
        for p in procs:
            p.kill()
    return outputs, max(ended) - min(ended)


@pytest.mark.slow
def test_a_static_torchrun_launch_is_refused_on_every_node_before_anything_is_written(tmp_path, tiny_run):
    # --master-addr and --node-rank with no --rdzv-id: the nodes share no id to name one run directory
    port = free_port()
    procs = start_torchrun_nodes(tmp_path, ["--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"],
                                 ["pretrain", *tiny_run, "trainer=torchrun", "trainer.steps=1", f"run_root={tmp_path}"])
    outputs, _ = finish(procs, timeout=120)
    for p, out in zip(procs, outputs):
        assert p.returncode != 0
        assert ("error: the ranks of this run cannot agree on a run directory: start them with torchrun "
                "--rdzv-id=ID (or --standalone), under SLURM, or with "
                "trainer.devices=N") in out.splitlines()
    assert not (tmp_path / "pretrain").exists()
