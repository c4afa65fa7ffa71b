"""Each policy's optimizer: torch's Adam (float32 moments) or bitsandbytes' 8-bit AdamW.

Per trained policy with LoRA parameters `A` (all in float32), the optimizer holds

    adam:        exp_avg, exp_avg_sq          8 A bytes   (+ weights 4 A and gradients 4 A: 16 A)
    adamw_8bit:  state1, state2 (uint8)       2 A bytes   (+ 8 A / 256 of float32 block maxima, absmax1/2)

`adamw_8bit` quantizes both moments blockwise (256 values per block, dynamic maps qmap1 / qmap2) for every
tensor of at least `MIN_8BIT_SIZE` elements; smaller ones (a value head, a rank-16 B of a 128-wide k_proj) keep
float32 moments. Both states round-trip bit-identically through `state_dict()` / `load_state_dict()` and
marl/ppo/checkpoint.py (bitsandbytes nests its quantized state: docs/known-issues.md #17); PBT copies one
policy's optimizer into another through a deep copy (`PolicyState.copy_from`: docs/known-issues.md #18).
Weight decay is 0 for both, so the two differ only in how the moments are stored.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from marl.errors import MarlError
from marl.names import OPTIMIZERS

MIN_8BIT_SIZE = 4096  # bitsandbytes' default: tensors with fewer elements keep float32 moments


def make_optimizer(kind: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer `kind` (`OPTIMIZERS`) over `params` at learning rate `lr`."""
    if kind not in OPTIMIZERS:
        raise MarlError(f"optim: {kind!r} must be one of {', '.join(OPTIMIZERS)}")
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MarlError("optim: adamw_8bit needs bitsandbytes (pip install bitsandbytes), or set optim: adam") from None
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0, min_8bit_size=MIN_8BIT_SIZE)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor of `opt`'s state (moments, block maxima; a map shared by several parameters
    counted once)."""
    seen, total = set(), 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    return total
