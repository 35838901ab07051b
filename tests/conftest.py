import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


@pytest.fixture
def gen():
    """A fresh, seeded torch generator per test: random inputs, but reproducible failures."""
    return torch.Generator().manual_seed(1234)
