import os

import pytest
import torch

# Tests must not depend on (or pollute) a user's cache; the demo data is written here once per session.
os.environ.setdefault("MIXER_CACHE", os.path.join(os.path.dirname(__file__), "..", ".venv", "mixer-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
