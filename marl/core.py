"""Old TRL's `trl.core` helpers that its PPO examples import, so `from trl.core import LengthSampler`
becomes `from marl.core import LengthSampler` (marl.compat.core)."""

from marl.compat.core import LengthSampler, set_seed

__all__ = ["LengthSampler", "set_seed"]
