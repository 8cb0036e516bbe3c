"""The probe: attach to a model, call ``probe.step(loss)`` after ``optimizer.step()``.

On most steps ``step`` records the loss (a detached device tensor, no sync) and returns. On a
sampled step it computes every quantity due (on the device), makes one device->host copy of
all results (:mod:`.gather`), and writes one batch to the transport. Hooks exist only around
sampled steps: they are armed at the end of the step before, and removed when the sampled step
is processed. Construction is :mod:`.assembly`'s; the per-rank policy is :mod:`.distributed`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from .assembly import (
    as_call,
    build_quantities,
    check_quantity_names,
    find_sites,
    find_weight_targets,
    is_compiled,
    make_transport,
    power_iterations,
    real_optimizer,
    resolve_blocks,
    schedule_for,
)
from .attention import LOOKED_FOR, SiteSearch, attention_modules
from .config import ProbeConfig
from .control import CommandRunner, SetProbeCommand, command_id
from .distributed import (
    PER_BATCH_WIRE_NAMES,
    broadcast_from_rank0,
    computed_on_rank,
    rank_and_world,
    shared_run_id,
)
from .exceptions import ConfigError, ConfigTypeError, QuantityError
from .gather import Loss, gather
from .hooks import ATTENTION, BLOCKS, INPUTS, ProbeHooks
from .http_transport import HttpTransport
from .interventions import LearningRateScale
from .quantities import REGISTRY, Histogram, Quantity, StepContext, Values
from .quantities.attention_logit_max import AttentionLogitMax
from .quantities.sharded import is_dtensor
from .recovery.link import RecoveryLink
from .recovery.snapshots import StateSource
from .sink import FileSink, Sink
from .targets import WeightTarget, with_attention_modules
from .transport import CloseReport, SinkTransport, Transport, TransportStats
from .wire import encode_batch

__all__ = ["Probe"]

logger = logging.getLogger("rankguard.probe")

_STATE_VERSION = 1
_LOGGED_COMMAND_FAILURES = 10


class Probe:
    """Spectral early-warning probe for one model.

    Distributed: construct it on every rank, after DDP wrapping or FSDP2 ``fully_shard``
    (the probe keeps references to the parameters it finds). Under DDP rank 0 computes and
    ships; under FSDP2 (DTensor parameters) every rank computes the same quantities at the
    same steps, because sharded weight spectra are collectives, and rank 0 ships.

    Args:
        model: the model being trained (as it is: a ``torch.compile`` wrapper, DDP, an
            accelerate-prepared model, a LightningModule).
        optimizer: its optimizer (optional; the ``scale_lr`` command acts on it, through
            step hooks that exist only while a backoff is in force). A wrapper exposing
            ``.optimizer`` (accelerate, Lightning, DeepSpeed) is unwrapped; one the command
            could not act on is refused here, not when a command arrives.
        run: the run's name.
        config: what to compute and how often (:class:`ProbeConfig`; default: its defaults).
        server: URL of the rankguard server (None: local JSON Lines file only).
        token: bearer token for the server.
        blocks: the repeated blocks for the Jacobian alignment, by name or module (None: the
            model's largest ModuleList of same-class children).
        probe_batch: fixed input of the Jacobian probe forward: a tensor (``model(x)``), a
            tuple of args or a dict of kwargs, replayed through the model. None: the blocks'
            own calls (first ``jacobian_sequences`` sequences) captured on sampled steps,
            where the blocks are really called.
        sink: where batches go when there is no server (default: a :class:`FileSink` under
            ``log_dir``, the same file a live run spills to).
        transport: replaces the default transport (HTTP when ``server`` is given) — tests.
        lr_scheduler: the run's LR scheduler(s) (one or a list), restored by a rollback.
        scaler: the run's ``torch.amp.GradScaler``, restored by a rollback.
        start_step: the step the first ``probe.step()`` records (a trainer's own numbering:
            Hugging Face's first optimizer step is 1; a resumed run's is where it resumes),
            so the hooks of a sampled step are armed for the right forward.
        **options: any :class:`ProbeConfig` field (``every=10``, ``targets=[...]``,
            ``schedules={"stable_rank": 5}``, ...), applied on top of ``config``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Any | None = None,
        *,
        run: str,
        config: ProbeConfig | None = None,
        server: str | None = None,
        token: str | None = None,
        blocks: Sequence[str | nn.Module] | None = None,
        probe_batch: Tensor | tuple[Any, ...] | Mapping[str, Any] | None = None,
        sink: Sink | None = None,
        transport: Transport | None = None,
        start_step: int = 0,
        lr_scheduler: Any = None,
        scaler: Any = None,
        **options: Any,
    ) -> None:
        # checked before any hook is installed: a bad argument leaves the model untouched
        _check_arguments(model, run, config)
        if transport is None and server is not None and sink is not None:
            raise ConfigError("sink: give either server= or sink=, not both")
        self.config = cfg = (config or ProbeConfig()).with_options(options)
        check_quantity_names(cfg)
        self.optimizer = real_optimizer(optimizer) if optimizer is not None else None
        # what a rollback restores (validated here, before any hook exists)
        source = StateSource.of(model, self.optimizer, lr_scheduler, scaler)
        self.model, self.run_name = model, run
        self.server, self.token = server, token
        self.targets: list[WeightTarget] = find_weight_targets(model, cfg)
        self.blocks = resolve_blocks(model, blocks)
        search = find_sites(model, self.targets, cfg)
        self.sites = search.sites
        if cfg.attention is None:  # the user's globs win; otherwise attention is what it does
            self.targets = with_attention_modules(self.targets, attention_modules(self.sites))
        self.params: list[tuple[str, nn.Parameter]] = list(model.named_parameters())
        self.rank, self.world_size = rank_and_world()
        # FSDP2: parameters are DTensor shards, so weight quantities are collectives
        # (all-reduces of vectors) that every rank must run, in the same order.
        self.sharded = any(is_dtensor(p) for _, p in self.params)
        self._said: set[tuple[str, str | None]] = set()
        self._events: list[dict[str, Any]] = []
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ConfigError(f"start_step: expected an int >= 0, got {start_step!r}")
        self._step = start_step
        wanted = cfg.quantities if cfg.quantities is not None else tuple(REGISTRY)
        self.quantities: list[Quantity] = build_quantities(
            cfg, self.blocks, wanted, explicit=cfg.quantities is not None
        )
        self._say_what_is_missing(wanted, search)
        self._weights, self._inputs = power_iterations(cfg)
        self.compiled = cfg.compiled if cfg.compiled is not None else is_compiled(model)
        self._hooks = ProbeHooks(
            model,
            self.targets,
            self.sites,
            self.blocks,
            max_rows=cfg.max_rows,
            max_sequences=cfg.max_sequences,
            block_sequences=cfg.jacobian_sequences,
            strict=cfg.strict,
            persistent=self.compiled,
        )
        self.probe_batch = as_call(probe_batch)
        self.run_id = shared_run_id(self.world_size)
        self._losses: list[Loss] = []
        self._latest: dict[tuple[str, str], float] = {}
        self._failed: set[str] = set()
        self._armed = False  # hooks or quantity copies are held for the next step
        self._closed = False
        if transport is None:
            # before the per-rank filter: every rank registers the run's quantities
            transport = make_transport(
                cfg,
                rank=self.rank,
                registration=self.registration(),
                server=server,
                token=token,
                sink=sink,
            )
        self.transport: Transport = transport
        self.quantities = self._on_this_rank(self.quantities)
        rc = cfg.recovery
        self._lr_scale = (
            None
            if self.optimizer is None
            else LearningRateScale(self.optimizer, **(rc.lr_options() if rc is not None else {}))
        )
        self._link = RecoveryLink(
            rc,
            source,
            weights=list({id(t.parameter): t.parameter for t in self.targets}.values()),
            sites=self.sites,
            lr_scale=self._lr_scale,
            send=self.transport.send,
            rank=self.rank,
            world_size=self.world_size,
        )
        self._commands = CommandRunner(
            targets=self.targets,
            reconfigure=self._reconfigure,
            lr_scale=self._lr_scale,
            rollback=None if self._link.recovery is None else self._link.rollback,
            qk_heads=self._link.heads,
        )
        self._close_report: CloseReport | None = None
        self._command_failures = 0
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

    @property
    def should_stop(self) -> bool:
        """True once recovery gave up on an incident with ``stop_on_exhausted`` set: a loop
        (or an integration) that reads it ends the run."""
        return self._link.should_stop

    @property
    def skip_windows(self) -> list[tuple[int, int]]:
        """The batches (probe steps, inclusive) whose updates rollbacks discarded:
        :class:`~rankguard.probe.recovery.SkipWindowSampler` leaves them out on a replay."""
        return self._link.skip_windows

    @property
    def train_step(self) -> int:
        """The training step of the next ``probe.step()`` (the schedule's step): the probe's
        own step minus the steps rollbacks undid."""
        return self._link.train_step(self._step)

    def recovery_summary(self) -> dict[str, Any]:
        """What recovery did so far: rollbacks, skipped updates, backoffs, snapshots."""
        return self._link.summary()

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
        if due:
            self._sample(s, due)
        elif self._armed:  # armed for a step the caller skipped (step= jumped)
            self._disarm()
        # Commands act after this step's sample, so the sample shows the weights the
        # optimizer produced and the next one shows the intervention's effect.
        self._link.judge(s, loss)
        self._apply_commands(s)
        self._link.after_step(s, boundary=self._is_boundary(s))
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
        self._link.close(self._step - 1)
        self._hooks.remove()
        if self._lr_scale is not None:
            self._lr_scale.remove()  # the optimizer steps with the user's LR again
        try:
            if self._losses or self._events:
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

    def _say_what_is_missing(self, wanted: Sequence[str], search: SiteSearch) -> None:
        """Says once, at construction, which wanted quantities this model cannot give."""
        built = {q.name for q in self.quantities}
        if "jacobian_alignment" in wanted and "jacobian_alignment" not in built:
            self._unavailable(
                "jacobian_alignment",
                "the model has no repeated blocks (a ModuleList or Sequential of >= 2 modules "
                "of one class); pass blocks=[...]",
            )
        if self.sharded:
            for name in ("jacobian_alignment", "attention_logit_max"):
                if name in built:
                    self._unavailable(
                        name, "it replays modules, which needs unsharded parameters (FSDP2)"
                    )
            self.quantities = [
                q
                for q in self.quantities
                if q.name not in ("jacobian_alignment", "attention_logit_max")
            ]
        if "attention_logit_max" not in wanted:
            return
        if not search.sites:
            self._unavailable("attention_logit_max", f"no attention found; looked for {LOOKED_FOR}")
        for site in search.sites:
            if not site.replay:
                self._unavailable(
                    "attention_logit_max",
                    "found by name only (no attention call the probe can replay); "
                    "attention_logit_bound reports an upper bound from its projections",
                    site.name,
                )

    def _unavailable(self, quantity: str, reason: str, target: str | None = None) -> None:
        """A warning and a ``quantity_unavailable`` event, once per (quantity, target)."""
        if (quantity, target) in self._said:
            return
        self._said.add((quantity, target))
        where = f" for {target}" if target else ""
        logger.warning("rankguard: %s cannot be computed%s: %s", quantity, where, reason)
        payload = {"quantity": quantity, "target": target, "reason": reason}
        step = self._step if getattr(self, "transport", None) is not None else None
        self._events.append({"kind": "quantity_unavailable", "step": step, "payload": payload})

    def _on_this_rank(self, quantities: Sequence[Quantity]) -> list[Quantity]:
        return computed_on_rank(
            quantities,
            rank=self.rank,
            sharded=self.sharded,
            activations_per_rank=self.config.activations_per_rank,
        )

    def _is_boundary(self, s: int) -> bool:
        return self.world_size == 1 or s % (self.config.command_every or self.config.every) == 0

    def _apply_commands(self, s: int) -> None:
        """Applies queued commands (the server's, and the first response's ``local:`` ones)
        at this step boundary, identically on every rank."""
        if not self._is_boundary(s):
            return
        commands = self._link.take_orders(self.transport.take_commands())
        if self.world_size > 1:
            commands = broadcast_from_rank0(commands)
        for raw in commands:
            try:  # whatever the server sent, nothing of it raises into the training loop
                self._apply_command(raw, s)
            except Exception as exc:
                self._log_command_failure(f"a command could not be handled: {exc!r}")

    def _apply_command(self, raw: Any, s: int) -> None:
        ack = self._commands.apply(raw, s)
        key = command_id(raw)
        if ack["state"] == "failed":
            self._log_command_failure(f"command {key or '(no id)'} failed: {ack['error']}")
        if self.rank != 0 or not key:  # one without a usable id cannot be acknowledged
            return
        if key.startswith("local:"):  # the first response's own order: an event, no ack
            self._link.applied(raw, ack, s)
        else:
            self.transport.ack(key, ack)

    def _log_command_failure(self, message: str) -> None:
        # An operator's failed command is worth a line; a flood of them is not worth more.
        self._command_failures += 1
        if self._command_failures <= _LOGGED_COMMAND_FAILURES:
            logger.warning("rankguard: %s", message)
        if self._command_failures == _LOGGED_COMMAND_FAILURES:
            logger.warning("rankguard: further failed commands are acknowledged, not logged")

    def _reconfigure(self, command: SetProbeCommand) -> dict[str, Any]:
        """Applies a ``set_probe`` command: cadence and which quantities run. A quantity it
        enables is built, scheduled and assigned to ranks exactly as at construction."""
        unknown = [n for n in (*command.enable, *command.disable) if n not in REGISTRY]
        if unknown:
            raise ConfigError(
                f"args.enable/disable: unknown quantity name(s) {unknown!r}; "
                f"valid: {sorted(REGISTRY)}"
            )
        if command.every is not None:
            self.config = dataclasses.replace(self.config, every=command.every)
            for q in self.quantities:
                q.schedule = schedule_for(self.config, type(q))
        running = {q.name for q in self.quantities}
        wanted = [name for name in dict.fromkeys(command.enable) if name not in running]
        added = self._on_this_rank(
            build_quantities(self.config, self.blocks, wanted, explicit=False)
        )
        self._failed.difference_update(q.name for q in added)
        self.quantities = [q for q in (*self.quantities, *added) if q.name not in command.disable]
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
        # compiled: every hook any quantity needs, from the first sample on, so the set of
        # hooks the compiled graph saw never changes (one graph with them, one without)
        kinds = self._hook_kinds(self.quantities if self.compiled else due)
        grads = self.params if any(q.needs_grads for q in due) else ()
        self._hooks.arm(kinds, grads)

    def _hook_kinds(self, quantities: Sequence[Quantity]) -> list[str]:
        kinds = []
        if any(q.needs_inputs for q in quantities):
            kinds.append(INPUTS)
        if any(q.needs_attention for q in quantities) and self.sites:
            kinds.append(ATTENTION)
        if any(q.needs_blocks for q in quantities) and self.blocks and self.probe_batch is None:
            kinds.append(BLOCKS)
        return kinds

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
            report=self._unavailable,
        )
        self._check_hooks_fired(due, ctx)
        outputs: list[Values | Histogram] = []
        for q in due:
            try:
                outputs.extend(q.compute(ctx))
            except Exception as exc:
                self._fail(q, s, exc)
        per_head = next((q.per_head for q in due if isinstance(q, AttentionLogitMax)), {})
        if per_head or self._hooks.captures.qk:
            self._link.observe(per_head, self._hooks.captures.qk)
        self._hooks.captures.clear()
        self._emit(outputs, s)

    def _check_hooks_fired(self, due: Sequence[Quantity], ctx: StepContext) -> None:
        """A backward ran (gradient hooks fired) but no forward hook did: the model's forward
        ran without them, as compiled code does when it was compiled before they existed."""
        captures = ctx.captures
        if not captures.grad_norms or captures.inputs or captures.calls or captures.blocks:
            return
        for q in due:
            if q.needs_inputs or q.needs_attention or q.needs_blocks:
                ctx.unavailable(
                    q.name,
                    "the model's forward ran without the probe's hooks (compiled by "
                    "torch.compile before they were registered?); pass compiled=True",
                )

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
            self._said.add((q.name, None))  # the warning above says it
            payload = {"quantity": q.name, "target": None, "reason": f"failed: {exc}"}
            self._events.append({"kind": "quantity_unavailable", "step": s, "payload": payload})
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
            self._events.clear()

    def _emit_unsafe(self, outputs: Sequence[Values | Histogram], s: int) -> None:
        points, histograms = gather(outputs, self._losses, s, self.rank)
        for p in points:
            if p.step == s or p.quantity == "loss":
                self._latest[(p.quantity, p.target)] = p.value
        self._link.sampled(s, points)
        if self.rank != 0:  # other ranks ship only what differs per rank: their activations
            points = [p for p in points if p.quantity in PER_BATCH_WIRE_NAMES]
            histograms = [h for h in histograms if h["quantity"] in PER_BATCH_WIRE_NAMES]
        if points or histograms or self._events:
            self.transport.send(encode_batch(points, histograms, events=self._events))


def _check_arguments(model: object, run: object, config: object) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(run, str) or not run.strip():
        raise ConfigError(f"run: expected a non-empty run name, got {run!r}")
    if config is not None and not isinstance(config, ProbeConfig):
        raise ConfigTypeError(f"config: expected a ProbeConfig or None, got {config!r}")
