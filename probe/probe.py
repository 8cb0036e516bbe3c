"""The probe: attach to a model, call ``probe.step(loss)`` after ``optimizer.step()``.

On most steps ``step`` records the loss (a detached device tensor, no sync) and returns. On a
sampled step it computes every quantity due (on the device), makes one device->host copy of
all results, and writes one batch to the sink. Hooks exist only around sampled steps: they are
armed at the end of the step before, and removed when the sampled step is processed.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from .config import ProbeConfig
from .control import CommandRunner, SetProbeCommand
from .exceptions import ConfigError, ConfigTypeError, QuantityError
from .hooks import CallCapture, HookSet, ProbeHooks, find_attention_sites
from .http_transport import HttpTransport
from .interventions import LearningRateScale
from .quantities import REGISTRY, Histogram, Quantity, StepContext, Values
from .quantities.jacobian_alignment import JacobianAlignment
from .quantities.sharded import is_dtensor
from .quantities.spectral import PowerIteration
from .schedules import Every
from .sink import FileSink, Sink, safe_file_name
from .targets import WeightTarget, find_blocks, find_targets
from .transport import (
    CloseReport,
    NullTransport,
    SinkTransport,
    Transport,
    TransportStats,
)
from .wire import Point, encode_batch, encode_histogram

__all__ = ["Probe"]

logger = logging.getLogger("rankguard.probe")

_STATE_VERSION = 1


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - exotic builds
        pass
    return 0, 1


class Probe:
    """Spectral early-warning probe for one model.

    Distributed: construct it on every rank, after DDP wrapping or FSDP2 ``fully_shard``
    (the probe keeps references to the parameters it finds). Under DDP rank 0 computes and
    ships; under FSDP2 (DTensor parameters) every rank computes the same quantities at the
    same steps, because sharded weight spectra are collectives, and rank 0 ships.

    Args:
        model: the model being trained.
        optimizer: its optimizer (optional; the ``scale_lr`` command acts on it, through
            step hooks that exist only while a backoff is in force).
        run: the run's name.
        server: URL of the rankguard server (None: local JSON Lines file only).
        token: bearer token for the server.
        every: cadence of the cheap quantities (steps 0, every, 2·every, ...).
        targets: fnmatch globs over weight target names to include (None: all 2-D weights).
        exclude: globs to leave out.
        embeddings, head: include the embedding matrices / the LM head.
        attention: globs naming the attention targets (None: detected).
        blocks: the repeated blocks for the Jacobian alignment, by name or module (None: the
            model's largest ModuleList of same-class children).
        log_dir: folder of the local sink file.
        quantities: names to compute (None: all), or a mapping name -> every.
        jacobian_every: cadence of the Jacobian alignment (default 10·every).
        probe_batch: fixed input of the Jacobian probe forward: a tensor (``model(x)``), a
            tuple of args or a dict of kwargs. None: the first ``max_sequences`` sequences of
            the first forward the probe sees.
        strict: re-raise a failing quantity or hook (tests); otherwise log once and disable.
        sink: where batches go when there is no server (default: a :class:`FileSink` under
            ``log_dir``, the same file a live run spills to).
        transport: replaces the default transport (HTTP when ``server`` is given) — tests.
        command_every: under DDP or FSDP2, the cadence (in steps) at which rank 0's commands are
            broadcast to every rank; each check is one collective, so it defaults to
            ``every``. A single process reads its local inbox on every step (no I/O).
        command_poll_interval: seconds between the transport thread's command polls (the
            latency between an order and its arrival in the inbox).
        activations_per_rank: under DDP or FSDP2, ranks other than 0 also ship the activation
            quantities of their own batch (those computed from layer inputs or attention
            projections: SA sign diversity, singularity alignment, representation stable rank,
            attention logit max), labelled with their rank. Weight and gradient quantities
            and the loss stay rank 0's (identical on every rank, or alerted on from rank 0).
        schedules: per-quantity cadence overrides, name -> every.
        exact: exact SVD for the weight spectra (checks; syncs on CUDA).
        max_rows, max_sequences, jacobian_sequences, power_iterations, lanczos: bounds,
            iteration counts and the warm estimate (see :class:`ProbeConfig`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        run: str,
        server: str | None = None,
        token: str | None = None,
        every: int = 50,
        targets: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] = (),
        embeddings: bool = False,
        head: bool = False,
        attention: str | Sequence[str] | None = None,
        blocks: Sequence[str | nn.Module] | None = None,
        log_dir: str | Path = "rankguard_logs",
        quantities: Iterable[str] | Mapping[str, int] | None = None,
        jacobian_every: int | None = None,
        probe_batch: Tensor | tuple[Any, ...] | Mapping[str, Any] | None = None,
        strict: bool = False,
        sink: Sink | None = None,
        transport: Transport | None = None,
        command_every: int | None = None,
        command_poll_interval: float = 1.0,
        schedules: Mapping[str, int] | None = None,
        exact: bool = False,
        max_rows: int = 256,
        max_sequences: int = 2,
        jacobian_sequences: int = 1,
        power_iterations: int = 3,
        lanczos: bool = False,
        activations_per_rank: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(run, str) or not run.strip():
            raise ConfigError(f"run: expected a non-empty run name, got {run!r}")
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise ConfigTypeError(
                "optimizer: expected a torch.optim.Optimizer or None, got "
                f"{type(optimizer).__name__}"
            )
        # checked before any hook is installed: a bad argument leaves the model untouched
        if command_every is not None and command_every <= 0:
            raise ConfigError(f"command_every: expected an integer >= 1, got {command_every!r}")
        if not isinstance(activations_per_rank, bool):
            raise ConfigTypeError(
                f"activations_per_rank: expected True or False, got {activations_per_rank!r}"
            )
        names, overrides = _split_quantities(quantities)
        overrides.update(schedules or {})
        self.config = ProbeConfig(
            every=every,
            jacobian_every=jacobian_every,
            quantities=names,
            schedules=overrides,
            # globs are validated and normalised to tuples by ProbeConfig.__post_init__
            include=targets,  # type: ignore[arg-type]
            exclude=exclude,  # type: ignore[arg-type]
            embeddings=embeddings,
            head=head,
            attention=attention,  # type: ignore[arg-type]
            log_dir=str(log_dir),
            strict=strict,
            exact=exact,
            max_rows=max_rows,
            max_sequences=max_sequences,
            jacobian_sequences=jacobian_sequences,
            power_iterations=power_iterations,
            lanczos=lanczos,
        )
        cfg = self.config
        unknown = [n for n in (*(cfg.quantities or ()), *cfg.schedules) if n not in REGISTRY]
        if unknown:
            raise ConfigError(
                f"quantities: unknown quantity name(s) {unknown!r}; valid: {sorted(REGISTRY)}"
            )

        self.model = model
        self.optimizer = optimizer
        self.run_name = run
        self.server = server
        self.token = token
        self.targets: list[WeightTarget] = find_targets(
            model,
            include=cfg.include,
            exclude=cfg.exclude,
            embeddings=cfg.embeddings,
            head=cfg.head,
            attention=cfg.attention,
        )
        if not self.targets:
            raise ConfigError(
                "targets: no 2-D weight found to probe (nn.Linear, HF Conv1D, "
                "nn.MultiheadAttention; embeddings/head only with embeddings=True/head=True); "
                f"targets={cfg.include!r}, exclude={list(cfg.exclude)!r}"
            )
        self.blocks = _resolve_blocks(model, blocks)
        self.sites = find_attention_sites(model)
        self.params: list[tuple[str, nn.Parameter]] = list(model.named_parameters())
        self.rank, self.world_size = _dist_rank_world()

        self.quantities: list[Quantity] = []
        wanted = cfg.quantities if cfg.quantities is not None else tuple(REGISTRY)
        for name in wanted:
            cls = REGISTRY[name]
            n = cfg.schedules.get(name)
            if n is None:
                n = cfg.jacobian_every if cls.default_cadence == "jacobian_every" else cfg.every
            schedule = Every(int(n))  # type: ignore[arg-type]
            if cls is JacobianAlignment:
                if len(self.blocks) < 2:
                    if cfg.quantities is not None:
                        raise ConfigError(
                            "blocks: jacobian_alignment needs at least 2 blocks; found "
                            f"{[b for b, _ in self.blocks]!r} (pass blocks=[...] explicitly)"
                        )
                    continue  # the default set: silently without it
                self.quantities.append(
                    JacobianAlignment(
                        schedule=schedule,
                        iterations=cfg.jacobian_iterations,
                        cold_iterations=cfg.jacobian_cold_iterations,
                    )
                )
            else:
                self.quantities.append(cls(schedule=schedule))
        self._weights = PowerIteration(
            iterations=cfg.power_iterations,
            cold_iterations=cfg.cold_iterations,
            lanczos=cfg.lanczos,
            exact=cfg.exact,
        )
        self._inputs = PowerIteration(
            iterations=cfg.power_iterations,
            cold_iterations=cfg.cold_iterations,
            lanczos=cfg.lanczos,
        )
        self._hooks = ProbeHooks(
            model,
            self.targets,
            self.sites,
            max_rows=cfg.max_rows,
            max_sequences=cfg.max_sequences,
            strict=cfg.strict,
        )
        self._batch_hooks = HookSet()
        self._batch_calls: dict[str, CallCapture] = {}
        self.probe_batch = _as_call(probe_batch)
        if self.probe_batch is None and any(
            isinstance(q, JacobianAlignment) for q in self.quantities
        ):
            # the first forward's first sequences become the fixed probe batch
            self._hooks.capture_call(
                model,
                self._batch_calls,
                "model",
                handles=self._batch_hooks,
                sequences=cfg.jacobian_sequences,
            )

        self.activations_per_rank = activations_per_rank
        self.command_every = command_every or cfg.every
        self.command_poll_interval = command_poll_interval
        self.run_id = _shared_run_id(self.world_size)
        self._step = 0
        self._losses: list[tuple[int, Tensor | float, float]] = []
        self._latest: dict[tuple[str, str], float] = {}
        self._failed: set[str] = set()
        self._armed = False  # hooks or quantity copies are held for the next step
        self._closed = False
        self.transport: Transport = (
            transport if transport is not None else self._default_transport(sink)
        )
        self._lr_scale = LearningRateScale(optimizer) if optimizer is not None else None
        self._commands = CommandRunner(
            targets=self.targets, reconfigure=self._reconfigure, lr_scale=self._lr_scale
        )
        self._close_report: CloseReport | None = None
        # FSDP2: parameters are DTensor shards, so weight quantities are collectives
        # (all-reduces of vectors) that every rank must run, in the same order.
        self.sharded = any(is_dtensor(p) for _, p in self.params)
        if self.rank != 0 and not self.sharded:
            # DDP: weight quantities are identical on every rank: rank 0 ships them. The
            # other ranks take part in the command broadcast and, if asked, compute the
            # activation quantities of their own batch.
            self.quantities = [
                q for q in self.quantities if activations_per_rank and _per_batch(type(q))
            ]
        self._arm(self._step)

    # -- public API -------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """The step the next ``probe.step()`` call will record."""
        return self._step

    @property
    def sink_path(self) -> Path | None:
        """The local JSON Lines file (offline sink or spill file), if there is one."""
        if isinstance(self.transport, HttpTransport):
            return self.transport.spill_path
        if isinstance(self.transport, SinkTransport) and isinstance(self.transport.sink, FileSink):
            return self.transport.sink.path
        return None

    def stats(self) -> TransportStats:
        """Delivery counters: sent, spilled, replayed, dropped, commands received, acks."""
        return self.transport.stats()

    def command_log(self) -> dict[str, dict[str, Any]]:
        """Every command this rank has handled, by id, with its acknowledgement."""
        return self._commands.acks

    def registration(self) -> dict[str, Any]:
        """The run registration (``POST /runs`` body; first line of the sink file)."""
        config = self.config.to_json()
        config["quantities"] = [q.name for q in self.quantities]
        config["weight_targets"] = [t.name for t in self.targets]
        config["blocks"] = [b for b, _ in self.blocks]
        return {
            "id": self.run_id,
            "name": self.run_name,
            "config": config,
            "world_size": self.world_size,
            "parameters": [{"name": n, "shape": list(p.shape)} for n, p in self.params],
        }

    def step(self, loss: Tensor | float | None = None, *, step: int | None = None) -> None:
        """Call once per training step, after ``optimizer.step()``.

        Cheap unless the step is sampled. ``loss`` may be a tensor (kept on its device, no
        sync) or a float; NaN/Inf are recorded as they are. ``step`` overrides the internal
        counter (which then continues from ``step + 1``).
        """
        if self._closed:
            return
        s = self._step if step is None else int(step)
        # The loss is rank 0's to ship. Under DDP the other ranks have nothing to emit it with,
        # so they must not keep it (it would pile up, one tensor per step, until close);
        # under FSDP2 every rank emits at each sample, so the list stays short there.
        if loss is not None and (self.rank == 0 or self.sharded):
            value = loss.detach() if isinstance(loss, Tensor) else float(loss)
            self._losses.append((s, value, time.time()))
        due = [q for q in self.quantities if q.should_compute(s)]
        if self._batch_calls and self.probe_batch is None:
            self.probe_batch = self._batch_calls["model"]
            self._batch_hooks.remove_all()
        if due:
            self._sample(s, due)
        elif self._armed:  # armed for a step the caller skipped (step= jumped)
            self._disarm()
        # Commands act after this step's sample, so the sample shows the weights the
        # optimizer produced and the next one shows the intervention's effect.
        self._apply_commands(s)
        self._step = s + 1
        self._arm(self._step)

    def latest(self) -> Mapping[tuple[str, str], float]:
        """The most recent value of every (quantity, target) sampled so far."""
        return dict(self._latest)

    def close(self, timeout: float = 10.0) -> CloseReport:
        """Flushes the losses recorded since the last sample, removes every hook (on the model
        and on the optimizer: a learning-rate backoff ends with the probe) and closes the
        transport, waiting at most ``timeout`` seconds for the server. Returns (and logs) what
        could not be delivered and where it is kept. Idempotent."""
        if self._close_report is not None:
            return self._close_report
        self._closed = True
        self._disarm()
        if self._lr_scale is not None:
            self._lr_scale.remove()  # the optimizer steps with the user's LR again
        self._batch_hooks.remove_all()
        try:
            if self._losses:
                self._emit([], self._step - 1)
        finally:
            report = self.transport.close(timeout=timeout)
            self._close_report = report
        if not report.delivered_all and self.server is None and report.spill_path:
            logger.info("rankguard: run %s written to %s", self.run_name, report.spill_path)
        return report

    def __enter__(self) -> Probe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """The step counter, every quantity's warm-start state and the learning-rate
        backoff in force (for exact resume)."""
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "run_id": self.run_id,
            "weights": self._weights.state_dict(),
            "inputs": self._inputs.state_dict(),
            "quantities": {q.name: q.state_dict() for q in self.quantities},
            "lr_scale": self._lr_scale.state_dict() if self._lr_scale is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ConfigError(
                f"state_dict: version {version!r} is not supported (expected {_STATE_VERSION})"
            )
        self._step = int(state["step"])
        self._weights.load_state_dict(state.get("weights", {}))
        self._inputs.load_state_dict(state.get("inputs", {}))
        saved = state.get("quantities", {})
        for q in self.quantities:
            if q.name in saved:
                q.load_state_dict(saved[q.name])
        if self._lr_scale is not None and state.get("lr_scale") and not self._closed:
            self._lr_scale.load_state_dict(state["lr_scale"])
        self._disarm()
        if not self._closed:
            self._arm(self._step)

    # -- internals --------------------------------------------------------------------------

    def _default_transport(self, sink: Sink | None) -> Transport:
        if self.rank != 0 and not self.activations_per_rank:
            return NullTransport()
        suffix = f"-rank{self.rank}" if self.rank else ""  # one spill file per shipping rank
        path = (
            Path(self.config.log_dir)
            / f"{safe_file_name(self.run_name)}-{self.run_id[:8]}{suffix}.jsonl"
        )
        if self.server is not None:
            if sink is not None:
                raise ConfigError("sink: give either server= or sink=, not both")
            return HttpTransport(
                self.server,
                token=self.token,
                registration=self.registration(),
                spill_path=path,
                poll_interval=self.command_poll_interval,
                poll_commands=self.rank == 0,  # rank 0 claims commands and relays them
            )
        return SinkTransport(
            sink if sink is not None else FileSink(path, registration=self.registration())
        )

    def _apply_commands(self, s: int) -> None:
        """Applies queued commands at this step boundary, identically on every rank."""
        if self.world_size > 1:
            if s % self.command_every != 0:
                return
            commands = _broadcast_from_rank0(self.transport.take_commands())
        else:
            commands = self.transport.take_commands()
        for raw in commands:
            ack = self._commands.apply(raw, s)
            if ack["state"] == "failed":
                logger.warning("rankguard: command %s failed: %s", raw.get("id"), ack["error"])
            if self.rank == 0:
                self.transport.ack(str(raw.get("id")), ack)

    def _reconfigure(self, command: SetProbeCommand) -> dict[str, Any]:
        """Applies a ``set_probe`` command: cadence and which quantities run."""
        unknown = [n for n in (*command.enable, *command.disable) if n not in REGISTRY]
        if unknown:
            raise ConfigError(
                f"args.enable/disable: unknown quantity name(s) {unknown!r}; "
                f"valid: {sorted(REGISTRY)}"
            )
        if command.every is not None:
            self.config.every = command.every
            for q in self.quantities:
                if q.name not in self.config.schedules and q.default_cadence == "every":
                    q.schedule = Every(command.every)
        if self.rank == 0 or self.sharded:  # the ranks that compute quantities
            running = {q.name for q in self.quantities}
            for name in command.enable:
                if name not in running and not (
                    REGISTRY[name] is JacobianAlignment and len(self.blocks) < 2
                ):
                    self.quantities.append(REGISTRY[name](schedule=Every(self.config.every)))
                    self._failed.discard(name)
            self.quantities = [q for q in self.quantities if q.name not in command.disable]
        return {"every": self.config.every, "quantities": [q.name for q in self.quantities]}

    def _arm(self, step: int) -> None:
        """Registers the hooks the quantities due at ``step`` need (none if nothing is due)
        and lets each of them keep what the step starts from (``Quantity.arm``)."""
        due = [q for q in self.quantities if q.should_compute(step)]
        if not due:
            return
        self._armed = True
        for q in due:
            try:
                q.arm(step, self.targets)
            except Exception as exc:
                self._fail(q, step, exc)
        if any(q.needs_inputs for q in due):
            self._hooks.arm_inputs()
        if any(q.needs_attention for q in due) and self.sites:
            self._hooks.arm_attention()
        if any(q.needs_grads for q in due):
            self._hooks.arm_grads(self.params)

    def _disarm(self) -> None:
        """Removes the armed hooks and drops what the quantities kept for the next sample."""
        self._armed = False
        self._hooks.disarm()
        for q in self.quantities:
            q.disarm()

    def _sample(self, s: int, due: Sequence[Quantity]) -> None:
        # the forward/backward of this step are over: remove the hooks before any probe
        # forward (Jacobian) can run through them; the quantities' compute consumes the rest
        self._hooks.disarm()
        self._armed = False
        ctx = StepContext(
            step=s,
            model=self.model,
            targets=self.targets,
            config=self.config,
            weights=self._weights,
            inputs_spectrum=self._inputs,
            captures=self._hooks.captures,
            params=self.params,
            losses=[v for _, v, _ in self._losses],
            sites=self.sites,
            blocks=self.blocks,
            probe_batch=self.probe_batch,
        )
        outputs: list[Values | Histogram] = []
        for q in due:
            try:
                outputs.extend(q.compute(ctx))
            except Exception as exc:
                self._fail(q, s, exc)
        self._hooks.captures.clear()
        self._emit(outputs, s)

    def _fail(self, q: Quantity, s: int, exc: Exception) -> None:
        if self.config.strict:
            raise QuantityError(f"quantity {q.name!r} failed at step {s}: {exc}") from exc
        if q.name not in self._failed:
            self._failed.add(q.name)
            logger.warning(
                "rankguard: quantity %r failed at step %d and is disabled: %s",
                q.name,
                s,
                exc,
                exc_info=exc,
            )
        self.quantities = [x for x in self.quantities if x is not q]

    def _emit(self, outputs: Sequence[Values | Histogram], s: int) -> None:
        """One device->host copy for everything of this step, then one batch to the sink."""
        try:
            self._emit_unsafe(outputs, s)
        except Exception as exc:
            if self.config.strict:
                raise
            if "emit" not in self._failed:
                self._failed.add("emit")
                logger.warning("rankguard: writing step %d failed: %s", s, exc, exc_info=exc)
        finally:
            self._losses.clear()

    def _emit_unsafe(self, outputs: Sequence[Values | Histogram], s: int) -> None:
        wall = time.time()
        chunks: list[Tensor] = []
        for o in outputs:
            t = o.values if isinstance(o, Values) else o.counts
            chunks.append(_local(t.detach()).reshape(-1).to(torch.float32))
        loss_tensors = [_local(v) for _, v, _ in self._losses if isinstance(v, Tensor)]
        chunks.extend(v.reshape(-1)[:1].to(torch.float32) for v in loss_tensors)
        host = _to_host(chunks)
        pos = 0
        points: list[Point] = []
        histograms: list[dict[str, Any]] = []
        rank = self.rank
        for o in outputs:
            if isinstance(o, Values):
                vals = host[pos : pos + len(o.targets)]
                pos += len(o.targets)
                for target, value in zip(o.targets, vals, strict=True):
                    points.append(Point(o.quantity, target, s, value, rank, wall))
            else:
                n = o.counts.numel()
                counts = host[pos : pos + n]
                pos += n
                histograms.append(
                    encode_histogram(o.quantity, o.target, s, o.edges, counts, rank=rank)
                )
        for loss_step, loss_value, loss_wall in self._losses:
            if isinstance(loss_value, Tensor):
                v = host[pos]
                pos += 1
            else:
                v = loss_value
            points.append(Point("loss", "global", loss_step, v, rank, loss_wall))
        for p in points:
            if p.step == s or p.quantity == "loss":
                self._latest[(p.quantity, p.target)] = p.value
        if rank != 0:  # other ranks ship only what differs per rank: their batch's activations
            points = [p for p in points if p.quantity in _PER_BATCH_WIRE_NAMES]
            histograms = [h for h in histograms if h["quantity"] in _PER_BATCH_WIRE_NAMES]
        if points or histograms:
            self.transport.send(encode_batch(points, histograms))


def _per_batch(cls: type[Quantity]) -> bool:
    """Whether a quantity is computed from the batch (layer inputs, attention projections),
    so that its value differs between data-parallel ranks."""
    return cls.needs_inputs or cls.needs_attention


_PER_BATCH_WIRE_NAMES = frozenset(
    name for cls in REGISTRY.values() if _per_batch(cls) for name in cls.wire_names()
)


def _local(t: Tensor) -> Tensor:
    """A plain tensor for a result computed with DTensor ops (FSDP2: gradient norms, update
    ratios, non-finite counts come out Partial or Replicate): ``full_tensor()`` reduces those
    few values, one all-reduce per output; every rank emits the same outputs at the step."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _shared_run_id(world_size: int) -> str:
    """A fresh run id, the same on every rank (rank 0's, broadcast once at construction)."""
    run_id = str(uuid.uuid4())
    if world_size > 1:
        run_id = _broadcast_from_rank0([run_id])[0]
    return run_id


def _broadcast_from_rank0(items: list[Any]) -> list[Any]:
    """Rank 0's list on every rank (one collective; every rank must call it at the same step)."""
    import torch.distributed as dist

    box: list[Any] = [items]
    dist.broadcast_object_list(box, src=0)
    return list(box[0])


def _to_host(chunks: Sequence[Tensor]) -> list[float]:
    if not chunks:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, c in enumerate(chunks):
        by_device.setdefault(c.device, []).append(i)
    out: list[float] = [math.nan] * sum(c.numel() for c in chunks)
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + c.numel())
    for idx in by_device.values():
        flat = torch.cat([chunks[i] for i in idx])
        values = flat.cpu().tolist()  # one device->host copy per sample step (per device)
        pos = 0
        for i in idx:
            n = chunks[i].numel()
            out[offsets[i] : offsets[i] + n] = values[pos : pos + n]
            pos += n
    return out


def _split_quantities(
    quantities: Iterable[str] | Mapping[str, int] | None,
) -> tuple[tuple[str, ...] | None, dict[str, int]]:
    if quantities is None:
        return None, {}
    if isinstance(quantities, str):
        return (quantities,), {}
    if isinstance(quantities, Mapping):
        return tuple(quantities), dict(quantities)
    try:
        return tuple(quantities), {}
    except TypeError:
        raise ConfigTypeError(
            f"quantities: expected names or a mapping name -> every, got {quantities!r}"
        ) from None


def _resolve_blocks(
    model: nn.Module, blocks: Sequence[str | nn.Module] | None
) -> list[tuple[str, nn.Module]]:
    if blocks is None:
        return find_blocks(model)
    modules = dict(model.named_modules())
    names_by_id = {id(m): n for n, m in modules.items()}
    out: list[tuple[str, nn.Module]] = []
    for b in blocks:
        if isinstance(b, str):
            if b not in modules:
                raise ConfigError(
                    f"blocks: no module named {b!r} in the model (names look like "
                    f"{[n for n in list(modules)[1:4]]!r})"
                )
            out.append((b, modules[b]))
        elif isinstance(b, nn.Module):
            name = names_by_id.get(id(b))
            if name is None:
                raise ConfigError(f"blocks: module {type(b).__name__} is not part of the model")
            out.append((name, b))
        else:
            raise ConfigTypeError(f"blocks: expected module names or modules, got {b!r}")
    return out


def _as_call(batch: Tensor | tuple[Any, ...] | Mapping[str, Any] | None) -> CallCapture | None:
    if batch is None:
        return None
    if isinstance(batch, Tensor):
        return CallCapture((batch.detach(),), {})
    if isinstance(batch, tuple):
        return CallCapture(tuple(batch), {})
    if isinstance(batch, Mapping):
        return CallCapture((), dict(batch))
    raise ConfigTypeError(
        f"probe_batch: expected a tensor, a tuple of args or a dict of kwargs, got "
        f"{type(batch).__name__}"
    )
