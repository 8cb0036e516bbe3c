"""Training-instability scenarios: small CPU GPTs that go unstable, and their healthy twins.

Modules: ``data`` (byte corpus from the stdlib's sources), ``model`` (nanoGPT-style GPT),
``failure`` (the one definition of failure), ``catalog`` (the scenarios), ``train`` (the loop).
"""

from __future__ import annotations
