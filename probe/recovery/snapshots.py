"""Snapshots of the whole training state in host memory, and the ring of known-good ones.

A :class:`TrainingSnapshot` holds, for one step boundary: every parameter and buffer of the
model, every tensor of the optimizer's state and its parameter groups' settings, the state
of the LR scheduler(s) and of the GradScaler the probe was given, the RNG states (Python,
NumPy when imported, torch CPU and CUDA) and the step. Restoring it writes everything back
in place, bit-identical.

Cost, by device:

- CPU: one memcpy of the state into host buffers allocated once per ring slot and reused.
- CUDA: the buffers are pinned, and the parameters and optimizer state are copied on a side
  stream (``non_blocking``), so the copy overlaps the next forward and backward, which only
  read them; the next writer (the optimizer step, a restore, an intervention) first makes its
  stream wait for the copy (:meth:`TrainingSnapshot.fence`: a stream wait, never a host
  sync). Buffers, which a forward may write (running statistics), are copied on the current
  stream, ordered before it.
- FSDP2 (DTensor): each rank copies and restores its own shards; no collective.

Memory: (``keep`` + 1) x (model + optimizer state) of host memory (one slot holds the
snapshot being confirmed); ``nbytes`` says how much.
"""

from __future__ import annotations

import copy
import logging
import random
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, ConfigTypeError
from ..quantities.sharded import is_dtensor

__all__ = ["SnapshotRing", "StateSource", "TrainingSnapshot"]

logger = logging.getLogger("rankguard.probe")

# where one saved tensor came from: ("param", name), ("buffer", name) or
# ("optim", parameter index, state key)
Key = tuple[Any, ...]


@dataclass
class StateSource:
    """What a snapshot covers (the probe builds it from ``Probe(model, optimizer,
    lr_scheduler=..., scaler=...)``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    schedulers: Sequence[Any] = ()
    scaler: Any = None

    @classmethod
    def of(cls, model: nn.Module, optimizer: Any, lr_scheduler: Any, scaler: Any) -> StateSource:
        """From the probe's arguments: ``lr_scheduler`` one scheduler, a list, or None; each
        (and ``scaler``) needs ``state_dict``/``load_state_dict``."""
        schedulers = (
            []
            if lr_scheduler is None
            else list(lr_scheduler)
            if isinstance(lr_scheduler, list | tuple)
            else [lr_scheduler]
        )
        for name, items in (("lr_scheduler", schedulers), ("scaler", [scaler] if scaler else [])):
            for item in items:
                if not (hasattr(item, "state_dict") and hasattr(item, "load_state_dict")):
                    raise ConfigTypeError(
                        f"{name}: expected an object with state_dict() and load_state_dict(), "
                        f"got {type(item).__name__}"
                    )
        return cls(model, optimizer, schedulers, scaler)

    def optimizer_params(self) -> list[Tensor]:
        if self.optimizer is None:
            return []
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def live_tensors(self) -> Iterator[tuple[Key, Tensor, bool]]:
        """(key, local tensor, written by forward) for everything a snapshot copies."""
        for name, param in self.model.named_parameters():
            yield ("param", name), _local(param), False
        for name, buffer in self.model.named_buffers():
            yield ("buffer", name), _local(buffer), True
        if self.optimizer is None:
            return
        for i, p in enumerate(self.optimizer_params()):
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    yield ("optim", i, key), _local(value), False


def _local(t: Tensor) -> Tensor:
    """The tensor this rank owns: the local shard of a DTensor, else the tensor itself."""
    if is_dtensor(t):
        return t.detach().to_local()  # type: ignore[attr-defined, no-any-return]
    return t.detach()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy" in state:
        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    """A deep copy detached from the live objects (tensors cloned to the CPU)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    return copy.deepcopy(value)


@dataclass
class TrainingSnapshot:
    """One step boundary's training state, in host memory. Build with :meth:`capture`."""

    step: int  # the probe step after whose optimizer update it was taken
    train_step: int  # the training step then (rollbacks rewind it; the probe's step does not)
    keys: list[Key]
    tensors: list[Tensor]  # host copies, same shapes and dtypes as the live ones
    devices: list[torch.device]  # where each live tensor lives (to recreate missing state)
    objects: dict[str, Any]
    good: bool = False
    event: Any = None  # CUDA event of the side-stream copy while it is in flight
    _saved_by: threading.Thread | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @classmethod
    @torch.no_grad()
    def capture(
        cls,
        source: StateSource,
        step: int,
        train_step: int,
        *,
        reuse: TrainingSnapshot | None = None,
        stream: Any = None,
    ) -> TrainingSnapshot:
        """Copies the state; ``reuse``: a snapshot whose host buffers may be overwritten (the
        ring's spare); ``stream``: the CUDA side stream for the parameters and optimizer."""
        live = list(source.live_tensors())
        keys = [k for k, _, _ in live]
        buffers = _reusable(reuse, live)
        pin = torch.cuda.is_available()
        tensors: list[Tensor] = []
        side = [(i, t) for i, (_, t, forward) in enumerate(live) if t.is_cuda and not forward]
        for i, (_, t, _) in enumerate(live):
            host = buffers[i] if buffers is not None else None
            if host is None:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            tensors.append(host)
        event = None
        if side and stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i, t in side:
                    tensors[i].copy_(t, non_blocking=True)
                    t.record_stream(stream)  # keep the memory alive until the copy is done
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
        on_side = {i for i, _ in side} if event is not None else set()
        for i, (_, t, _) in enumerate(live):
            if i not in on_side:
                tensors[i].copy_(t, non_blocking=t.is_cuda)
        return cls(
            step=step,
            train_step=train_step,
            keys=keys,
            tensors=tensors,
            devices=[t.device for _, t, _ in live],
            objects=_objects(source),
            event=event,
        )

    def fence(self) -> None:
        """Makes the current CUDA stream wait for the side-stream copy (no host sync)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def wait(self) -> None:
        """Blocks until the copy is complete and any disk write is done (restore, reuse)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self._saved_by is not None:
            self._saved_by.join()
            self._saved_by = None

    @torch.no_grad()
    def restore(self, source: StateSource) -> None:
        """Writes the state back, in place. Everything is checked first: a snapshot that no
        longer fits (a parameter changed shape, another optimizer) raises a
        :class:`ConfigError` and nothing is written. The snapshot itself is never modified,
        so a failed restore can be retried."""
        self.wait()
        model_part = {k: t for k, t in zip(self.keys, self.tensors, strict=True) if k[0] != "optim"}
        live_model = {k: t for k, t, _ in source.live_tensors() if k[0] != "optim"}
        if set(model_part) != set(live_model):
            missing = sorted(map(str, set(model_part) ^ set(live_model)))[:3]
            raise ConfigError(
                f"snapshot: the model's tensors changed since step {self.step}: {missing}"
            )
        for key, saved in model_part.items():
            live = live_model[key]
            if live.shape != saved.shape or live.dtype != saved.dtype:
                raise ConfigError(
                    f"snapshot: {key[1]!r} is now {tuple(live.shape)} {live.dtype}, was "
                    f"{tuple(saved.shape)} {saved.dtype} at step {self.step}"
                )
        params = source.optimizer_params()
        if len(params) != self.objects["optimizer_params"]:
            raise ConfigError(
                f"snapshot: the optimizer has {len(params)} parameters, had "
                f"{self.objects['optimizer_params']} at step {self.step}"
            )
        for key, saved in model_part.items():
            live_model[key].copy_(saved)
        self._restore_optimizer(source, params)
        for scheduler, state in zip(source.schedulers, self.objects["schedulers"], strict=True):
            scheduler.load_state_dict(copy.deepcopy(state))
        if source.scaler is not None and self.objects["scaler"] is not None:
            source.scaler.load_state_dict(copy.deepcopy(self.objects["scaler"]))
        _set_rng_state(self.objects["rng"])

    def _restore_optimizer(self, source: StateSource, params: list[Tensor]) -> None:
        optimizer = source.optimizer
        if optimizer is None:
            return
        saved: dict[int, dict[Any, tuple[Tensor, torch.device]]] = {}
        for key, tensor, device in zip(self.keys, self.tensors, self.devices, strict=True):
            if key[0] == "optim":
                saved.setdefault(key[1], {})[key[2]] = (tensor, device)
        scalars: dict[int, dict[Any, Any]] = self.objects["optimizer_scalars"]
        for i, p in enumerate(params):
            tensors, values = saved.get(i, {}), scalars.get(i, {})
            if not tensors and not values:
                optimizer.state.pop(p, None)  # no state yet at the snapshot's step
                continue
            state = optimizer.state[p]
            for key in [k for k in state if k not in tensors and k not in values]:
                del state[key]
            for key, (tensor, device) in tensors.items():
                live = state.get(key)
                if isinstance(live, Tensor) and _local(live).shape == tensor.shape:
                    _local(live).copy_(tensor)
                else:
                    state[key] = tensor.to(device, copy=True)
            for key, value in values.items():
                state[key] = copy.deepcopy(value)
        for group, settings in zip(
            optimizer.param_groups, self.objects["param_groups"], strict=True
        ):
            for name, value in settings.items():
                live = group.get(name)
                if isinstance(live, Tensor) and isinstance(value, Tensor):
                    live.copy_(value)
                else:
                    group[name] = copy.deepcopy(value)


def _reusable(
    reuse: TrainingSnapshot | None, live: list[tuple[Key, Tensor, bool]]
) -> list[Tensor | None] | None:
    """The spare snapshot's buffers, position by position, where shape and dtype match."""
    if reuse is None:
        return None
    reuse.wait()
    by_key = dict(zip(reuse.keys, reuse.tensors, strict=True))
    out: list[Tensor | None] = []
    for key, t, _ in live:
        old = by_key.get(key)
        out.append(
            old if old is not None and old.shape == t.shape and old.dtype == t.dtype else None
        )
    return out


def _objects(source: StateSource) -> dict[str, Any]:
    """Everything that is not a state tensor, deep-copied."""
    optimizer = source.optimizer
    scalars: dict[int, dict[Any, Any]] = {}
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        for i, p in enumerate(source.optimizer_params()):
            values = {
                k: copy.deepcopy(v)
                for k, v in optimizer.state.get(p, {}).items()
                if not isinstance(v, Tensor)
            }
            if values:
                scalars[i] = values
        groups = [
            {k: _plain(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
    return {
        "optimizer_params": len(source.optimizer_params()),
        "optimizer_scalars": scalars,
        "param_groups": groups,
        "schedulers": [copy.deepcopy(s.state_dict()) for s in source.schedulers],
        "scaler": None if source.scaler is None else copy.deepcopy(source.scaler.state_dict()),
        "rng": _rng_state(),
    }


class SnapshotRing:
    """The last ``keep`` known-good snapshots, plus the one being confirmed.

    A new snapshot is *pending* until :meth:`confirm` promotes it (the caller decides when:
    after enough healthy steps); promotion evicts the oldest known-good one beyond ``keep``.
    An incident discards the pending one (:meth:`discard_after`), so the ring only ever
    holds states that were followed by healthy steps. Evicted buffers are reused by the next
    capture, so the ring allocates at most ``keep + 1`` sets of host buffers.
    """

    def __init__(self, keep: int, *, snapshot_dir: str | None = None) -> None:
        if keep < 1:
            raise ConfigError(f"recovery.keep: expected an integer >= 1, got {keep!r}")
        self.keep = keep
        self.good: list[TrainingSnapshot] = []  # oldest first
        self.pending: TrainingSnapshot | None = None
        self._spare: TrainingSnapshot | None = None
        self._dir = Path(snapshot_dir) if snapshot_dir is not None else None

    @property
    def nbytes(self) -> int:
        held = [*self.good, *(s for s in (self.pending, self._spare) if s is not None)]
        return sum(s.nbytes for s in held)

    def take(
        self, source: StateSource, step: int, train_step: int, *, stream: Any = None
    ) -> TrainingSnapshot:
        """Captures a new pending snapshot (a pending one not yet confirmed is replaced)."""
        reuse: TrainingSnapshot | None
        if self.pending is not None:
            reuse, self.pending = self.pending, None
        else:
            reuse, self._spare = self._spare, None
        snapshot = TrainingSnapshot.capture(source, step, train_step, reuse=reuse, stream=stream)
        self.pending = snapshot
        return snapshot

    def confirm(self) -> TrainingSnapshot | None:
        """Promotes the pending snapshot to known-good; returns it."""
        snapshot, self.pending = self.pending, None
        if snapshot is None:
            return None
        snapshot.good = True
        self.good.append(snapshot)
        while len(self.good) > self.keep:
            self._retire(self.good.pop(0))
        if self._dir is not None:
            self._save(snapshot)
        return snapshot

    def newest_before(self, step: int) -> TrainingSnapshot | None:
        """The newest known-good snapshot taken before ``step``."""
        older = [s for s in self.good if s.step < step]
        return older[-1] if older else None

    def discard_after(self, step: int) -> None:
        """Forgets every snapshot taken at or after ``step`` (they follow a bad state)."""
        if self.pending is not None and self.pending.step >= step:
            self._retire(self.pending)
            self.pending = None
        keep = [s for s in self.good if s.step < step]
        for s in self.good:
            if s.step >= step:
                self._retire(s)
        self.good = keep

    def in_flight(self) -> TrainingSnapshot | None:
        return self.pending if self.pending is not None and self.pending.event is not None else None

    def _retire(self, snapshot: TrainingSnapshot) -> None:
        if self._dir is not None:
            (self._dir / f"snapshot-{snapshot.step}.pt").unlink(missing_ok=True)
        if self._spare is None or snapshot.nbytes > self._spare.nbytes:
            self._spare = snapshot  # its buffers serve the next capture

    def _save(self, snapshot: TrainingSnapshot) -> None:
        """Writes a known-good snapshot to disk on a background thread."""
        assert self._dir is not None
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"snapshot-{snapshot.step}.pt"
        snapshot.wait()  # the copy must be complete before another thread reads the buffers
        payload = {
            "step": snapshot.step,
            "train_step": snapshot.train_step,
            "keys": snapshot.keys,
            "tensors": snapshot.tensors,
            "objects": snapshot.objects,
        }

        def write() -> None:
            try:
                torch.save(payload, path)
            except Exception as exc:  # a full disk must not take training down
                logger.warning("rankguard: writing snapshot %s failed: %s", path, exc)

        thread = threading.Thread(target=write, name="rankguard-snapshot", daemon=True)
        thread.start()
        snapshot._saved_by = thread
