"""The probe's quantities on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankguard.probe import Probe
from rankguard.probe.quantities.spectral import PowerIteration
from rankguard.probe.sink import MemorySink

pytestmark = pytest.mark.gpu


def cuda_train(model, probe, steps: int, *, sync_check: bool = False) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 32, (4, 8), device="cuda", generator=g)
        logits = model(idx)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sampled = any(q.should_compute(probe.step_count) for q in probe.quantities)
        if sync_check and not sampled:
            torch.cuda.set_sync_debug_mode("error")
        try:
            probe.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("lanczos", [False, True])
def test_power_iteration_on_cuda(lanczos: bool) -> None:
    w = torch.randn(256, 128, device="cuda")
    pi = PowerIteration(iterations=4, cold_iterations=50, lanczos=lanczos)
    pi.triplet("w", w)  # cold
    torch.cuda.set_sync_debug_mode("error")  # a warm estimate never waits on the device
    try:
        for _ in range(5):
            tri = pi.triplet("w", w)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    s = torch.linalg.svdvals(w.double())
    assert tri.sigma.device.type == "cuda"
    assert abs(tri.sigma.item() - s[0].item()) / s[0].item() <= 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_quantity_on_cuda(make_gpt, tmp_path, dtype: torch.dtype) -> None:
    model = make_gpt().to("cuda", dtype)
    probe = Probe(model, run="gpu", every=2, jacobian_every=2, sink=MemorySink(), strict=True)
    cuda_train(model, probe, 3)
    latest = probe.latest()
    w = model.transformer.h[0].mlp["c_fc"].weight.detach().float()
    s = torch.linalg.svdvals(w)
    sr = latest[("stable_rank", "transformer.h.0.mlp.c_fc.weight")]
    assert sr == pytest.approx((s.square().sum() / s[0] ** 2).item(), rel=0.01)
    assert ("jacobian_alignment", "transformer.h.0->transformer.h.1") in latest
    assert ("attention_logit_max", "transformer.h.0.attn") in latest
    assert ("sa_sign_diversity", "transformer.h.1.attn.c_attn.weight[v]") in latest
    probe.close()


def test_no_host_sync_on_non_sampled_steps(make_gpt) -> None:
    model = make_gpt().to("cuda")
    probe = Probe(model, run="gpu", every=5, sink=MemorySink(), strict=True)
    cuda_train(model, probe, 12, sync_check=True)
    assert ("loss", "global") in probe.latest()
    probe.close()
