"""The probe's own forwards are invisible: no user hook fires, no buffer or attribute changes,
and no KV cache is carried into a replay."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankguard.probe import Probe
from rankguard.probe.transport import MemoryTransport


class RunningStat(nn.Module):
    """BatchNorm-like: a running mean updated by every forward, whatever the mode, and a
    counter attribute."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.detach().reshape(-1, x.shape[-1]).mean(0))
        self.calls += 1
        return x - self.mean


class Block(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.stat = RunningStat(d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, -1).transpose(1, 2)
            for z in self.attn(self.stat(x)).split(d, -1)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(b, t, d))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def run(with_probe: bool) -> tuple[list[float], Counter[str], Model]:
    torch.manual_seed(0)
    model = Model()
    seen: Counter[str] = Counter()
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, a, o, name=name: seen.update([f"fwd:{name}"]))
        module.register_forward_pre_hook(lambda m, a, name=name: seen.update([f"pre:{name}"]))
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.update(["global"]))
    probe = (
        Probe(model, run="x", transport=MemoryTransport(), every=1, jacobian_every=1, strict=True)
        if with_probe
        else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    losses = []
    try:
        for _ in range(3):
            loss = model(torch.randn(2, 6, 16, generator=g)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if probe is not None:
                probe.step(loss)
            losses.append(loss.item())
    finally:
        handle.remove()
        if probe is not None:
            probe.close()
    return losses, seen, model


def test_the_probe_forwards_fire_no_user_hook_and_change_no_state() -> None:
    plain_losses, plain_seen, plain = run(with_probe=False)
    losses, seen, model = run(with_probe=True)
    assert losses == plain_losses
    assert seen == plain_seen  # module hooks and the global hook: the training forwards only
    for (name, a), (_, b) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert [b.stat.calls for b in model.blocks] == [b.stat.calls for b in plain.blocks] == [3, 3, 3]
    assert all(m.training for m in model.modules())


def test_invisible_restores_everything_even_on_error() -> None:
    from rankguard.probe.replay import invisible

    model = Model()
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    before = {n: b.clone() for n, b in model.named_buffers()}
    try:
        with invisible([model]):
            model(torch.randn(1, 4, 16))
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert calls == [] and all(m.training for m in model.modules())
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    model(torch.randn(1, 4, 16))
    assert calls == [1]  # the user's hook is back


class FakeCache:
    """Stands for a Hugging Face ``DynamicCache``: a class named ``*Cache``."""


class DynamicCache(FakeCache):
    pass


def test_a_kv_cache_is_never_kept_or_replayed() -> None:
    from rankguard.probe.hooks import CallCapture
    from rankguard.probe.replay import stateless

    cache = DynamicCache()
    capture = CallCapture.of(
        (torch.zeros(3, 4), cache), {"cache": cache, "use_cache": True, "mask": torch.ones(3, 4)}, 1
    )
    assert capture.args[1] is None and capture.kwargs["cache"] is None
    assert capture.kwargs["mask"].shape == (1, 4)
    args, kwargs = stateless((cache,), {"past_key_values": object(), "use_cache": True})
    assert args == (None,) and kwargs == {"past_key_values": None, "use_cache": False}
