"""How a probe is put together from its configuration: the weights it watches, the blocks of
the Jacobian, the quantities and their schedules, the spectral estimators, and where its
batches go.

``Probe.__init__`` and the ``set_probe`` command build quantities through
:func:`build_quantities`, so a quantity enabled later runs on the schedule, with the settings
and on the ranks it would have had if it had been configured from the start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attention import SiteSearch, find_attention_sites
from .config import ProbeConfig
from .exceptions import ConfigError, ConfigTypeError
from .hooks import CallCapture
from .http_transport import HttpTransport
from .quantities import REGISTRY, PowerIteration, Quantity
from .quantities.jacobian_alignment import JacobianAlignment
from .schedules import Every
from .sink import FileSink, Sink, safe_file_name
from .targets import ATTENTION, WeightTarget, find_blocks, find_targets
from .transport import NullTransport, SinkTransport, Transport

__all__ = [
    "as_call",
    "build_quantities",
    "check_quantity_names",
    "find_sites",
    "find_weight_targets",
    "is_compiled",
    "make_transport",
    "power_iterations",
    "real_optimizer",
    "resolve_blocks",
    "schedule_for",
]


def check_quantity_names(config: ProbeConfig) -> None:
    """Every quantity the config names (to compute, or to schedule) exists."""
    unknown = [n for n in (*(config.quantities or ()), *config.schedules) if n not in REGISTRY]
    if unknown:
        raise ConfigError(
            f"quantities: unknown quantity name(s) {unknown!r}; valid: {sorted(REGISTRY)}"
        )


def schedule_for(config: ProbeConfig, cls: type[Quantity]) -> Every:
    """A quantity's schedule: its own entry in ``schedules``, else the config's cadence for
    its kind (``jacobian_every`` for the heavy Jacobian, ``every`` for the others)."""
    n = config.schedules.get(cls.name)
    if n is None and cls.default_cadence == "jacobian_every":
        n = config.jacobian_every  # an int once the config is constructed
    return Every(n if n is not None else config.every)


def build_quantities(
    config: ProbeConfig,
    blocks: Sequence[tuple[str, nn.Module]],
    names: Iterable[str],
    *,
    explicit: bool,
) -> list[Quantity]:
    """The quantities ``names``, each on its schedule (which of them a rank computes is
    :func:`~.distributed.computed_on_rank`'s call).

    The Jacobian alignment needs two blocks: without them it is an error when ``explicit``
    (the user asked for it by name), and is left out otherwise (the default set, or a
    ``set_probe`` enable).
    """
    built: list[Quantity] = []
    for name in names:
        cls = REGISTRY[name]
        schedule = schedule_for(config, cls)
        if cls is JacobianAlignment:
            if len(blocks) < 2:
                if explicit:
                    raise ConfigError(
                        "blocks: jacobian_alignment needs at least 2 blocks; found "
                        f"{[b for b, _ in blocks]!r} (pass blocks=[...] explicitly)"
                    )
                continue
            built.append(
                JacobianAlignment(
                    schedule=schedule,
                    iterations=config.jacobian_iterations,
                    cold_iterations=config.jacobian_cold_iterations,
                    tolerance=config.jacobian_tolerance,
                )
            )
        else:
            built.append(cls(schedule=schedule))
    return built


def power_iterations(config: ProbeConfig) -> tuple[PowerIteration, PowerIteration]:
    """The warm-started estimators of the weights' and of the sampled inputs' top singular
    triplets (``exact`` applies to the weights only)."""
    weights = PowerIteration(
        iterations=config.power_iterations,
        cold_iterations=config.cold_iterations,
        lanczos=config.lanczos,
        exact=config.exact,
    )
    inputs = PowerIteration(
        iterations=config.power_iterations,
        cold_iterations=config.cold_iterations,
        lanczos=config.lanczos,
    )
    return weights, inputs


def find_weight_targets(model: nn.Module, config: ProbeConfig) -> list[WeightTarget]:
    """The 2-D weights the config selects; none at all is a :class:`ConfigError`."""
    targets = find_targets(
        model,
        include=config.targets,
        exclude=config.exclude,
        embeddings=config.embeddings,
        head=config.head,
        attention=config.attention,
    )
    if not targets:
        raise ConfigError(
            "targets: no 2-D weight found to probe (nn.Linear, HF Conv1D, "
            "nn.MultiheadAttention; embeddings/head only with embeddings=True/head=True); "
            f"targets={config.targets!r}, exclude={list(config.exclude)!r}"
        )
    return targets


def find_sites(
    model: nn.Module, targets: Sequence[WeightTarget], config: ProbeConfig
) -> SiteSearch:
    """The attention sites: the parents of the weights the ``attention`` globs name (with
    ``attention_heads``), else detected by what the modules do, names as the fallback."""
    explicit = None
    if config.attention is not None:
        explicit = [(t.module_name, t.name) for t in targets if ATTENTION in t.groups]
    return find_attention_sites(model, explicit=explicit, heads=config.attention_heads)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` runs the model or any of its modules (a wrapper with
    ``_orig_mod``, or ``Module.compile()``)."""
    return any(
        hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


def real_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind any wrapper that exposes it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, DeepSpeed's), checked at
    construction to take the step hooks ``scale_lr`` needs: a command that could not act
    is refused now, not in the middle of an incident."""
    seen: set[int] = set()
    current = optimizer
    while id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            break
        current = inner
    if not hasattr(current, "param_groups"):
        raise ConfigTypeError(
            f"optimizer: expected a torch.optim.Optimizer (or a wrapper exposing one as "
            f".optimizer) or None, got {type(optimizer).__name__}"
        )
    if not hasattr(current, "_optimizer_step_pre_hooks") or not callable(
        getattr(current, "register_step_pre_hook", None)
    ):
        raise ConfigError(
            f"optimizer: {type(current).__name__} takes no step hooks, so the scale_lr "
            "command (and a rule's lr_backoff) could not act on it; pass a "
            "torch.optim.Optimizer, or optimizer=None to run without scale_lr"
        )
    return current  # type: ignore[no-any-return]


def resolve_blocks(
    model: nn.Module, blocks: Sequence[str | nn.Module] | None
) -> list[tuple[str, nn.Module]]:
    """The repeated blocks, by name or module (None: the model's largest ModuleList of
    same-class children)."""
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


def as_call(batch: Tensor | tuple[Any, ...] | Mapping[str, Any] | None) -> CallCapture | None:
    """The fixed probe batch of the Jacobian as a model call (None: captured later)."""
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


def make_transport(
    config: ProbeConfig,
    *,
    rank: int,
    registration: dict[str, Any],
    server: str | None,
    token: str | None,
    sink: Sink | None,
) -> Transport:
    """Where this rank's batches go: nowhere (a rank that ships nothing), the server (with a
    spill file), or a local sink (offline: by default the JSON Lines file the spill would be)."""
    if rank != 0 and not config.activations_per_rank:
        return NullTransport()
    suffix = f"-rank{rank}" if rank else ""  # one spill file per shipping rank
    name = f"{safe_file_name(registration['name'])}-{registration['id'][:8]}{suffix}.jsonl"
    path = Path(config.log_dir) / name
    if server is not None:
        return HttpTransport(
            server,
            token=token,
            registration=registration,
            spill_path=path,
            poll_interval=config.command_poll_interval,
            poll_commands=rank == 0,  # rank 0 claims commands and relays them
        )
    return SinkTransport(sink if sink is not None else FileSink(path, registration=registration))
