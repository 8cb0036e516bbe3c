"""The model matrix's fixtures: one sampled training step of a zoo model with the probe on,
and what the test's own hooks saw in that step's forward."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # zoo.py, reference.py beside the tests
