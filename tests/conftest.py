import os

import pytest
import torch

from mixer_cli.config import run_dirs

# Tests must not depend on (or pollute) a user's cache; the demo data is written here once per session.
os.environ.setdefault("MIXER_CACHE", os.path.join(os.path.dirname(__file__), "..", ".venv", "mixer-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def no_open_run(monkeypatch):
    """No run directory handed down from a launching process (ranks Lightning starts get one)."""
    monkeypatch.delenv(run_dirs.RUN_DIR_ENV, raising=False)


@pytest.fixture
def no_launcher(monkeypatch):
    """A plain local start: none of the variables torchrun, SLURM or Lightning set (a test sets its own)."""
    for v in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_ID",
              "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(v, "")  # recorded, so what a run sets is undone after the test
        monkeypatch.delenv(v)
