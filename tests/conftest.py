import os

import pytest
import torch

from mixer_cli import config

# Tests must not depend on (or pollute) a user's cache; the demo data is written here once per session.
os.environ.setdefault("MIXER_CACHE", os.path.join(os.path.dirname(__file__), "..", ".venv", "mixer-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_command_per_process(monkeypatch):
    """The CLI runs one command per process, so its first run directory has no counter suffix; tests
    that call it in-process start each command afresh in the same way."""
    monkeypatch.setattr(config, "_runs_made", 0)
    monkeypatch.setenv(config.SESSION_ENV, "")  # as unset; recorded, so what a run sets is undone after the test
