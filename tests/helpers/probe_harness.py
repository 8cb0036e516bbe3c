"""A real probe on a tiny GPT talking real HTTP to a test server, for the adversarial tests:
build it, compare the weights with a reference, wait for command polls."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from helpers.hostile_server import HostileServer
from helpers.models import TinyGPT
from rankguard.probe import Probe

torch.set_num_threads(1)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter (the reference a test compares against)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def unchanged(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, reference[name]) for name, p in model.named_parameters())


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@contextmanager
def probe_on(
    server: HostileServer, tmp_path: Path, **options: Any
) -> Iterator[tuple[Probe, TinyGPT]]:
    """A probe on a fresh TinyGPT shipping to ``server``, polling commands every 10 ms;
    closed (1 s) on exit."""
    torch.manual_seed(0)
    model = TinyGPT()
    settings: dict[str, Any] = {
        "run": "adversarial",
        "server": server.url,
        "token": "rg_given-token",
        "log_dir": str(tmp_path / "logs"),
        "command_poll_interval": 0.01,
        "every": 1000,  # the tests are about I/O, not quantities
    }
    settings.update(options)
    probe = Probe(model, **settings)
    try:
        yield probe, model
    finally:
        probe.close(timeout=1.0)


def wait_for_polls(server: HostileServer, n: int = 2, timeout: float = 20.0) -> None:
    """Returns once ``n`` more claim requests arrived: the poll before the last one has
    been answered and handled by the probe's transport."""
    start = len(server.seen("/commands/claim"))
    try:
        server.wait_for(lambda: len(server.seen("/commands/claim")) >= start + n, timeout)
    except AssertionError:
        now = time.monotonic()
        last = [(f"{r.at - now:.1f}s", r.path.rsplit("/", 2)[-2:]) for r in server.requests[-8:]]
        raise AssertionError(f"fewer than {n} command polls in {timeout} s; last: {last}") from None
