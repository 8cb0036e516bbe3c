"""Intervention tests run single-threaded (the CI machine's cores are shared)."""

from __future__ import annotations

import pytest
import torch
from intervention_helpers import TinyModel

torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel()
