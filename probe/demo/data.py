"""Byte-level corpus built from the Python standard library's own ``.py`` sources.

No downloads: every machine that runs Python has the corpus. The order is fixed (sorted
relative paths) and the size is capped, so the bytes are the same on every run on one
Python version. Vocabulary: the 256 byte values.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

VOCAB_SIZE = 256
DEFAULT_CORPUS_BYTES = 3_000_000
DEFAULT_VAL_FRACTION = 0.1


def _stdlib_sources(root: Path) -> list[Path]:
    # site-packages can hold anything the venv/host installed; test suites are excluded to keep
    # the text "ordinary library code" and to make the corpus less version-noisy.
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = [
        p
        for p in root.rglob("*.py")
        if not (skip & set(p.relative_to(root).parts[:-1])) and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@lru_cache(maxsize=4)
def corpus_bytes(max_bytes: int = DEFAULT_CORPUS_BYTES) -> bytes:
    """The first ``max_bytes`` of the concatenated stdlib sources (sorted by relative path)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in _stdlib_sources(root):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    out = b"".join(chunks)[:max_bytes]
    if len(out) < max_bytes:
        raise ValueError(
            f"max_bytes={max_bytes} exceeds the stdlib corpus at {root} ({len(out)} bytes)"
        )
    return out


@dataclass(frozen=True)
class ByteCorpus:
    """Train/val token tensors (uint8 stored as int64 for indexing) and a batch sampler."""

    train: torch.Tensor  # (N_train,) int64 in [0, 256)
    val: torch.Tensor  # (N_val,) int64

    @classmethod
    def load(
        cls, max_bytes: int = DEFAULT_CORPUS_BYTES, val_fraction: float = DEFAULT_VAL_FRACTION
    ) -> ByteCorpus:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        raw = corpus_bytes(max_bytes)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
        split = int(len(data) * (1.0 - val_fraction))
        return cls(train=data[:split], val=data[split:])

    def batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and the next-byte targets y (B, T)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = self.train if split == "train" else self.val
        if seq_len + 1 > len(data):
            raise ValueError(f"seq_len={seq_len} is longer than the {split} split ({len(data)})")
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        offsets = torch.arange(seq_len + 1)
        windows = data[starts[:, None] + offsets[None, :]]  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]
