"""Derived seeds: every random draw is a pure function of (seed, purpose, indices)."""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed for one purpose (e.g. 'train', round, client), stable across processes."""
    entropy = [seed & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *indices]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] >> 1)


def numpy_rng(seed: int, purpose: str, *indices: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, *indices))


def torch_generator(seed: int, purpose: str, *indices: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *indices))
