"""Which 2-D weights the probe (and the interventions) look at.

A :class:`WeightTarget` is one (out, in) matrix: a whole ``nn.Linear`` weight, the transposed
weight of a Hugging Face ``Conv1D`` (stored (in, out)), or one third of a fused QKV weight
(nanoGPT / GPT-2 ``c_attn``, ``nn.MultiheadAttention.in_proj_weight``). ``matrix()`` returns a
view that shares storage with the parameter, so ``target.matrix().copy_(new)`` under
``torch.no_grad()`` writes the parameter in place.

Names follow docs/contract.md: a target is its parameter's name, fused parts get a
``[q]``/``[k]``/``[v]`` suffix. Groups: ``attention`` (Q, K, V, O), ``mlp`` (the other weights
inside the repeated blocks), ``embedding``, ``head``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from torch import Tensor, nn

from .exceptions import ConfigError, SelectorError

__all__ = [
    "ALL_2D",
    "ATTENTION",
    "WeightTarget",
    "find_blocks",
    "find_targets",
    "glob_matches",
    "select",
    "with_attention_modules",
]

ATTENTION = "attention"
MLP = "mlp"
EMBEDDING = "embedding"
HEAD = "head"
ALL_2D = "all_2d"

# Leaf module names that are attention projections wherever they appear.
_ATTENTION_LEAVES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "out_proj",
        "query",
        "key",
        "value",
        "wq",
        "wk",
        "wv",
        "wo",
        "c_attn",
        "qkv",
        "qkv_proj",
        "Wqkv",
    }
)
# Leaf names of an LM head (only when the module is not inside the repeated blocks).
_HEAD_LEAVES = frozenset({"lm_head", "head", "output", "embed_out"})
_FUSED_PARTS = ("q", "k", "v")
# Leaf names of fused QKV projections (split into [q], [k], [v] by thirds of the output dim).
_FUSED_LEAVES = frozenset({"c_attn", "qkv", "qkv_proj", "Wqkv"})


@dataclass(frozen=True, eq=False)
class WeightTarget:
    """One (out, in) matrix the probe measures and interventions may rewrite.

    Equality and hashing are by identity (``eq=False``): a parameter tensor has no useful
    ``==`` and ``slice`` is unhashable before Python 3.12. ``name`` is unique within one
    :func:`find_targets` result and is the key to use in maps.
    """

    name: str
    module_name: str
    parameter: nn.Parameter
    rows: slice | None
    transposed: bool
    groups: frozenset[str]

    def matrix(self) -> Tensor:
        """The (out, in) view of the parameter's data (shares storage, writable in place).

        Detached so that reading it builds no autograd graph and writing it (under
        ``torch.no_grad()``) is allowed on a leaf that requires grad. For a DTensor
        parameter (FSDP2) taking fused rows of the sharded dimension all-gathers the
        parameter: the probe reads shards through ``quantities.sharded`` instead.
        """
        w = self.parameter.detach()
        if self.transposed:
            w = w.t()  # HF Conv1D stores (in, out)
        if self.rows is not None:
            w = w[self.rows]  # a slice of the fused output dimension: still a view
        return w

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) from the parameter's shape: no view is taken, so asking costs nothing
        for a DTensor either (slicing the rows of a sharded one is an all-gather)."""
        stored_rows, stored_cols = self.parameter.shape
        rows, cols = (stored_cols, stored_rows) if self.transposed else (stored_rows, stored_cols)
        if self.rows is not None:
            rows = len(range(*self.rows.indices(rows)))
        return int(rows), int(cols)

    @property
    def parameter_name(self) -> str:
        """The parameter's name without a fused-part suffix."""
        return self.name.split("[", 1)[0]


def glob_matches(name: str, pattern: str) -> bool:
    """``fnmatch`` on a target name; a pattern also matches the name exactly, and a pattern
    naming the parameter (no ``[q]`` suffix) matches all of its fused parts, because ``[`` in
    a glob opens a character class and users should not need to escape it."""
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    base = name.split("[", 1)[0]
    return base != name and (base == pattern or fnmatch.fnmatchcase(base, pattern))


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks: the largest ``nn.ModuleList``/``nn.Sequential`` (by
    parameter count) of at least two children that all share one class. Empty if none."""
    best: list[tuple[str, nn.Module]] = []
    best_size = -1
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.named_children())
        if len(children) < 2 or len({type(c) for _, c in children}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            prefix = f"{name}." if name else ""
            best = [(f"{prefix}{child_name}", child) for child_name, child in children]
            best_size = size
    return best


def _is_conv1d(module: nn.Module) -> bool:
    # Hugging Face transformers' Conv1D (GPT-2): a linear layer with weight (in, out).
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and hasattr(module, "nf")
    )


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _in_attention(module_name: str) -> bool:
    parts = module_name.split(".")
    if _leaf(module_name) in _ATTENTION_LEAVES:
        return True
    # a projection whose path runs through an attention module (attn.c_proj,
    # self_attn.o_proj, attention.output.dense)
    return any("attn" in p.lower() or "attention" in p.lower() for p in parts[:-1])


def _inside(module_name: str, prefixes: Sequence[str]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def _raw_targets(model: nn.Module) -> list[tuple[WeightTarget, str]]:
    """Every candidate 2-D weight with its kind ('linear', 'embedding'), detected groups
    still to be filled in. Tied parameters appear once (first name wins)."""
    collector = _Collector(model)
    for module_name, module in model.named_modules():
        collector.add_module(module_name, module)
    return collector.targets()


class _Collector:
    """The candidate targets of one model, in module order, with their groups; a tied
    parameter (embedding and LM head) is one target carrying both roles."""

    def __init__(self, model: nn.Module) -> None:
        self._param_names: dict[int, str] = {}
        for pname, p in model.named_parameters():
            self._param_names.setdefault(id(p), pname)
        self._blocks = [name for name, _ in find_blocks(model)]
        self._embedding_params = {
            id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
        }
        self._out: list[tuple[WeightTarget, str]] = []
        self._seen: set[tuple[int, str]] = set()
        self._extra_groups: dict[tuple[int, str], set[str]] = {}

    def add_module(self, module_name: str, module: nn.Module) -> None:
        if isinstance(module, nn.MultiheadAttention):
            if module.in_proj_weight is not None:
                d = module.in_proj_weight.shape[0] // 3
                for i, part in enumerate(_FUSED_PARTS):
                    self._add(
                        module_name,
                        module.in_proj_weight,
                        "linear",
                        rows=slice(i * d, (i + 1) * d),
                        part=part,
                        attention=True,
                    )
            else:
                for part in _FUSED_PARTS:
                    weight = getattr(module, f"{part}_proj_weight")
                    self._add(module_name, weight, "linear", attention=True)
            # out_proj is an nn.Linear child: found on its own, grouped as attention by its leaf
        elif isinstance(module, nn.Linear):
            self._add_linear(module_name, module.weight, transposed=False)
        elif _is_conv1d(module):
            self._add_linear(module_name, cast(Tensor, module.weight), transposed=True)
        elif isinstance(module, nn.Embedding):
            self._add(module_name, module.weight, EMBEDDING)

    def targets(self) -> list[tuple[WeightTarget, str]]:
        """The targets found, each with every role its parameter plays."""
        merged: list[tuple[WeightTarget, str]] = []
        for target, kind in self._out:
            key = (id(target.parameter), target.name.partition("[")[2][:-1])
            extra = self._extra_groups.get(key)
            if extra:
                target = dataclasses.replace(target, groups=target.groups | extra)
            merged.append((target, kind))
        return merged

    def _add_linear(self, module_name: str, weight: Tensor, *, transposed: bool) -> None:
        # a fused QKV projection is split in thirds of its output dimension
        out_dim = weight.shape[1] if transposed else weight.shape[0]
        if _leaf(module_name) in _FUSED_LEAVES and weight.dim() == 2 and out_dim % 3 == 0:
            d = out_dim // 3
            for i, part in enumerate(_FUSED_PARTS):
                self._add(
                    module_name,
                    weight,
                    "linear",
                    rows=slice(i * d, (i + 1) * d),
                    part=part,
                    transposed=transposed,
                    attention=True,
                )
        else:
            self._add(module_name, weight, "linear", transposed=transposed)

    def _add(
        self,
        module_name: str,
        param: Tensor,
        kind: str,
        *,
        rows: slice | None = None,
        part: str | None = None,
        transposed: bool = False,
        attention: bool = False,
    ) -> None:
        if not isinstance(param, nn.Parameter) or param.dim() != 2:
            return
        key = (id(param), part or "")
        groups = self._groups(module_name, param, kind, attention)
        if key in self._seen:
            # a tied weight (embedding and LM head): one target carrying both roles
            self._extra_groups.setdefault(key, set()).update(groups & {EMBEDDING, HEAD})
            return
        self._seen.add(key)
        pname = self._param_names.get(id(param))
        if pname is None:  # not a parameter of this model (should not happen)
            return
        target = WeightTarget(
            name=f"{pname}[{part}]" if part else pname,
            module_name=module_name,
            parameter=param,
            rows=rows,
            transposed=transposed,
            groups=frozenset(groups),
        )
        self._out.append((target, kind))

    def _groups(self, module_name: str, param: Tensor, kind: str, attention: bool) -> set[str]:
        in_block = _inside(module_name, self._blocks)
        if kind == EMBEDDING:
            return {EMBEDDING}
        if id(param) in self._embedding_params or (
            not in_block and _leaf(module_name) in _HEAD_LEAVES
        ):
            return {HEAD}
        if attention or _in_attention(module_name):
            return {ATTENTION}
        if in_block or not self._blocks:
            return {MLP}
        return set()


def _check_globs(argument: str, globs: Iterable[str] | str | None) -> list[str]:
    if globs is None:
        return []
    if isinstance(globs, str):
        return [globs]
    patterns = list(globs)
    for g in patterns:
        if not isinstance(g, str):
            raise ConfigError(
                f"{argument}: every entry must be an fnmatch glob string, got {g!r} "
                f"({type(g).__name__})"
            )
    return patterns


def find_targets(
    model: nn.Module,
    *,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str = (),
    embeddings: bool = False,
    head: bool = False,
    attention: Iterable[str] | str | None = None,
) -> list[WeightTarget]:
    """Every 2-D weight of the model's linear-like modules, as (out, in) targets.

    ``include``/``exclude`` are fnmatch globs over target names; an include glob that
    matches nothing is a :class:`ConfigError`. Embeddings and the LM head (a linear layer
    tied to an embedding, or named ``lm_head``/``head``/``output`` outside the blocks) are
    left out unless asked for. ``attention`` (globs) replaces the automatic detection of
    the ``attention`` group.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    include_globs = _check_globs("include", include)
    exclude_globs = _check_globs("exclude", exclude)
    attention_globs = _check_globs("attention", attention) if attention is not None else None

    candidates: list[WeightTarget] = []
    for target, _kind in _raw_targets(model):
        wanted = (EMBEDDING in target.groups and embeddings) or (HEAD in target.groups and head)
        if target.groups & {EMBEDDING, HEAD} and not wanted:
            continue
        candidates.append(target)

    if include_globs:
        unmatched = [
            g for g in include_globs if not any(glob_matches(t.name, g) for t in candidates)
        ]
        if unmatched:
            sample = ", ".join(t.name for t in candidates[:6])
            raise ConfigError(
                f"include: glob(s) {unmatched!r} matched no 2-D weight; target names look "
                f"like: {sample}{', ...' if len(candidates) > 6 else ''} (embeddings and the "
                f"LM head are only candidates with embeddings=True / head=True)"
            )
        candidates = [t for t in candidates if any(glob_matches(t.name, g) for g in include_globs)]
    if exclude_globs:
        candidates = [
            t for t in candidates if not any(glob_matches(t.name, g) for g in exclude_globs)
        ]

    if attention_globs is not None:
        unmatched = [
            g for g in attention_globs if not any(glob_matches(t.name, g) for t in candidates)
        ]
        if unmatched:
            raise ConfigError(
                f"attention: glob(s) {unmatched!r} matched none of the selected targets "
                f"({len(candidates)} selected)"
            )
        regrouped: list[WeightTarget] = []
        for t in candidates:
            is_attention = any(glob_matches(t.name, g) for g in attention_globs)
            groups = set(t.groups) - {ATTENTION}
            if is_attention:
                groups.discard(MLP)
                groups.add(ATTENTION)
            elif not groups & {EMBEDDING, HEAD}:
                groups.add(MLP)
            regrouped.append(dataclasses.replace(t, groups=frozenset(groups)))
        candidates = regrouped
    return candidates


def with_attention_modules(
    targets: Sequence[WeightTarget], modules: Iterable[str]
) -> list[WeightTarget]:
    """The targets, with the projections of the given attention modules (found by what they
    do, whatever their names: their direct children) in the ``attention`` group, not ``mlp``."""
    parents = set(modules)
    out: list[WeightTarget] = []
    for t in targets:
        if t.module_name.rpartition(".")[0] in parents and MLP in t.groups:
            t = dataclasses.replace(t, groups=(t.groups - {MLP}) | {ATTENTION})
        out.append(t)
    return out


def select(targets: Sequence[WeightTarget], selector: str | Sequence[str]) -> list[WeightTarget]:
    """The targets named by a selector: ``'attention'``, ``'all_2d'`` or a sequence of fnmatch
    globs over target names. A selector (or any glob) that selects nothing is a
    :class:`SelectorError` (a ``ValueError``)."""
    if isinstance(selector, str):
        if selector == ALL_2D:
            chosen = list(targets)
        elif selector == ATTENTION:
            chosen = [t for t in targets if ATTENTION in t.groups]
        else:
            raise SelectorError(
                f"selector: unknown selector {selector!r}; valid: 'attention', 'all_2d', "
                f"or a list of fnmatch globs over target names"
            )
        if not chosen:
            raise SelectorError(f"selector: {selector!r} selected no target out of {len(targets)}")
        return chosen
    globs = list(selector)
    if not globs:
        raise SelectorError("selector: an empty glob list selects nothing")
    for g in globs:
        if not isinstance(g, str):
            raise SelectorError(f"selector: globs must be strings, got {g!r}")
    unmatched = [g for g in globs if not any(glob_matches(t.name, g) for t in targets)]
    if unmatched:
        sample = ", ".join(t.name for t in targets[:4])
        raise SelectorError(
            f"selector: glob(s) {unmatched!r} matched no target; names look like: {sample}"
        )
    return [t for t in targets if any(glob_matches(t.name, g) for g in globs)]
