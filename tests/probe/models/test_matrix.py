"""Every quantity on every model of the matrix against a dense reference.

One sampled training step per model (SGD at lr 0, so the weights the probe reads after the
step are the ones the forward used; dropout off), then: weight spectra vs ``svdvals`` (1%),
the activation quantities vs an SVD of the inputs the test's own hooks saw, gradient norms,
the attention logits vs the model's own scores (1%; Hugging Face models through their eager
attention function), and the block Jacobians vs a dense autograd Jacobian + SVD (σ₁ within 2%,
alignment within 0.02 absolute: it is a cosine). Where a block's spectrum has no gap (BERT's
tiny random blocks: σ₂ within 0.5% of σ₁) the top vectors are not defined well enough for any
number of cheap iterations; there the probe must say so through ``jacobian_residual``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers.dense import block_svd, causal_scores, hf_eager_scores
from helpers.zoo import ENTRIES, Entry
from torch import Tensor, nn

from rankguard.probe import Probe
from rankguard.probe.transport import MemoryTransport

torch.set_num_threads(1)

# dynamo's own notice while tracing Hugging Face's loss (it reads .grad of a non-leaf)
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)

OPTIONS: dict[str, Any] = {
    "every": 1,
    "jacobian_every": 1,
    "cold_iterations": 300,  # tiny random matrices have flat spectra: converge fully
    "jacobian_tolerance": 1e-4,
    "jacobian_cold_iterations": 150,
    "strict": True,
}


@dataclass
class Sampled:
    model: nn.Module
    probe: Probe
    batch: dict[str, Tensor]  # the last micro-batch of the sampled step
    inputs: dict[str, Tensor] = field(default_factory=dict)  # module name -> (N, in) rows
    grads: dict[str, Tensor] = field(default_factory=dict)
    autocast: torch.dtype | None = None

    def latest(self, quantity: str) -> dict[str, float]:
        """This quantity's latest values by target (a compiled model's ``_orig_mod.`` prefix
        taken off, so names match the model's own)."""
        out = {}
        for (q, t), v in self.probe.latest().items():
            if q == quantity:
                out[t.replace("_orig_mod.", "")] = v
        return out

    def cast(self) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast)

    def quantity(self, name: str) -> Any:
        return next(q for q in self.probe.quantities if q.name == name)


def sampled_step(entry: Entry, variant: str = "eager", **options: Any) -> Sampled:
    """One sampled step. ``variant``: ``eager``; ``compile`` (the probe attached to the
    ``torch.compile`` wrapper, dynamo's eager backend); ``bf16`` (the forward under bf16
    autocast); ``accumulation`` (two micro-batches, one optimizer step, one probe.step)."""
    torch.manual_seed(0)
    model = entry.build().train()
    g = torch.Generator().manual_seed(1)
    batches = [entry.batch(g) for _ in range(2 if variant == "accumulation" else 1)]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    attached = torch.compile(model, backend="eager") if variant == "compile" else model
    probe = Probe(
        attached, opt, run=entry.name, transport=MemoryTransport(), **{**OPTIONS, **options}
    )
    run = Sampled(model, probe, batches[-1], autocast=torch.bfloat16 if variant == "bf16" else None)
    modules = {n.replace("_orig_mod.", ""): m for n, m in attached.named_modules()}
    handles = []
    for name in {t.module_name.replace("_orig_mod.", "") for t in probe.targets}:

        def keep(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            run.inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

        handles.append(modules[name].register_forward_pre_hook(keep))
    for batch in batches:
        with run.cast():
            loss = entry.loss(attached, batch)
        (loss / len(batches)).backward()
    run.grads = {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    opt.step()
    for h in handles:
        h.remove()
    probe.step(loss)
    return run


def eval_block_calls(run: Sampled) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Each block's call in an eval-mode forward of the same batch (the test's own hooks)."""
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []
    for name, block in run.probe.blocks:

        def keep(
            mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
        ) -> None:
            calls.setdefault(name, (args, kwargs))

        handles.append(block.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        run.model.eval()
        with torch.no_grad():  # fp32: the probe's Jacobian is fp32 whatever the autocast
            run.model(**{k: v for k, v in run.batch.items() if k != "labels"})
    finally:
        run.model.train()
        for h in handles:
            h.remove()
    return calls


def name(target: Any) -> str:
    return str(target.name).replace("_orig_mod.", "")


MATRIX = [pytest.param((m, "eager"), id=f"{m}-eager") for m in sorted(ENTRIES)] + [
    pytest.param((m, v), id=f"{m}-{v}", marks=[pytest.mark.slow] if v == "compile" else [])
    for m in ("gpt2", "llama")
    for v in ("compile", "bf16", "accumulation")
]


@pytest.fixture(scope="module", params=MATRIX)
def run(request: pytest.FixtureRequest) -> Sampled:
    model, variant = request.param
    return sampled_step(ENTRIES[model], variant)


def test_weight_spectra_match_svdvals(run: Sampled) -> None:
    spectral, stable = run.latest("spectral_norm"), run.latest("stable_rank")
    assert set(spectral) == {name(t) for t in run.probe.targets}
    for t in run.probe.targets:
        s = torch.linalg.svdvals(t.matrix().double())
        assert spectral[name(t)] == pytest.approx(s[0].item(), rel=1e-2), t.name
        ratio = (s.square().sum() / s[0] ** 2).item()
        assert stable[name(t)] == pytest.approx(ratio, rel=1e-2), t.name


def test_activation_quantities_match_an_svd_of_the_inputs(run: Sampled) -> None:
    rsr, phi, diversity = (
        run.latest(q)
        for q in ("representation_stable_rank", "singularity_alignment", "sa_sign_diversity")
    )
    for t in run.probe.targets:
        z = run.inputs[t.module_name.replace("_orig_mod.", "")].double()  # ≤ max_rows: all
        assert z.shape[0] <= run.probe.config.max_rows
        _, sz, vz = torch.linalg.svd(z, full_matrices=False)
        _, sw, vw = torch.linalg.svd(t.matrix().double(), full_matrices=False)
        assert rsr[name(t)] == pytest.approx((sz.square().sum() / sz[0] ** 2).item(), rel=1e-2)
        gap_w, gap_z = (sw[0] - sw[1]) / sw[0], (sz[0] - sz[1]) / sz[0]
        if gap_w > 0.02 and gap_z > 0.02:  # top vectors are defined (a spectral gap)
            assert phi[name(t)] == pytest.approx(abs(float(vw[0] @ vz[0])), abs=2e-2), t.name
        if gap_w > 0.02:
            p = (z @ vw[0] > 0).double().mean().item()
            assert diversity[name(t)] == pytest.approx(2 * min(p, 1 - p), abs=1.5 / z.shape[0])


def test_gradient_quantities(run: Sampled) -> None:
    total = math.sqrt(sum(g.double().square().sum().item() for g in run.grads.values()))
    assert run.latest("grad_norm")["global"] == pytest.approx(total, rel=1e-4)
    assert all(v == 0.0 for v in run.latest("update_ratio").values())  # lr 0: no update
    assert run.latest("non_finite") == {"loss": 0.0, "grad": 0.0, "weight": 0.0}


def reference_scores(run: Sampled, entry: Entry) -> dict[str, Tensor]:
    inputs = {k: v for k, v in run.batch.items() if k != "labels"}
    run.model.eval()
    try:
        with torch.no_grad(), run.cast():
            if entry.hf:
                with hf_eager_scores(run.model) as scores:
                    run.model(**inputs)
                return scores
            scores = {}
            sites = {s.name.replace("_orig_mod.", ""): s for s in run.probe.sites}
            handles = []
            for name, site in sites.items():

                def keep(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                    x = args[0]
                    m = sites[name].module
                    if hasattr(m, "c_attn"):  # nanoGPT: fused q, k, v
                        q, k, _ = m.c_attn(x).split(x.shape[-1], dim=2)
                    else:  # the hand-written block's own q and k
                        q, k = m.q(x), m.k(x)
                    heads = getattr(m, "n_head", None) or m.h
                    scores[name] = causal_scores(q, k, heads)

                handles.append(site.module.register_forward_pre_hook(keep))
            run.model(**inputs)
            for h in handles:
                h.remove()
            return scores
    finally:
        run.model.train()


def test_attention_logits_are_the_models_own(run: Sampled) -> None:
    entry = ENTRIES[run.probe.run_name]
    reference = reference_scores(run, entry)
    assert reference and set(run.latest("attention_logit_max")) == set(reference)
    assert not run.latest("attention_logit_bound")  # every site's attention was intercepted
    per_head = {
        k.replace("_orig_mod.", ""): v
        for k, v in run.quantity("attention_logit_max").per_head.items()
    }
    for site, ref in reference.items():
        torch.testing.assert_close(per_head[site].double(), ref, rtol=1e-2, atol=1e-6)
        assert run.latest("attention_logit_max")[site] == pytest.approx(ref.max().item(), rel=1e-2)


def test_jacobian_matches_a_dense_jacobian(run: Sampled) -> None:
    names = [n for n, _ in run.probe.blocks]
    assert run.quantity("jacobian_alignment").chain  # lr 0, no dropout: a fixed probe batch
    calls = eval_block_calls(run)
    dense = {n: block_svd(block, *calls[n]) for n, block in run.probe.blocks}
    names = [n.replace("_orig_mod.", "") for n in names]
    dense = {n.replace("_orig_mod.", ""): v for n, v in dense.items()}
    sigma, align = run.latest("jacobian_spectral_norm"), run.latest("jacobian_alignment")
    gain, residual = run.latest("jacobian_alignment_gain"), run.latest("jacobian_residual")
    tolerance = run.probe.config.jacobian_tolerance
    gap = {n: ((dense[n][1][0] - dense[n][1][1]) / dense[n][1][0]).item() for n in names}
    for block in names:
        assert sigma[block] == pytest.approx(dense[block][1][0].item(), rel=2e-2), block
    for a, b in itertools.pairwise(names):
        expected = abs(float(dense[b][2] @ dense[a][0]))
        pair = f"{a}->{b}"
        if min(gap[a], gap[b]) >= 0.05:  # well-defined top vectors: converged and right
            assert max(residual[a], residual[b]) <= tolerance, pair
            assert align[pair] == pytest.approx(expected, abs=2e-2), pair
        elif abs(align[pair] - expected) > 2e-2:  # little gap: right, or the residual says not
            assert max(residual[a], residual[b]) > tolerance, pair
        assert gain[pair] == pytest.approx(align[pair] * sigma[a], rel=1e-4)
