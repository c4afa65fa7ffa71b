"""KL coefficient controllers for the reward penalty -beta * KL(pi || pi_ref).

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
section 2.2: beta is either fixed, or adapted so that the observed KL tracks a
target, with a proportional controller

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

``state_dict()`` returns plain dicts of floats, so controller state can be stored
in a JSON checkpoint manifest next to the adapters.
"""

from __future__ import annotations

__all__ = ["AdaptiveKLController", "FixedKLController", "KLController", "make_kl_controller"]


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ignore the observation (signature shared with AdaptiveKLController)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:g})"


class AdaptiveKLController:
    """Proportional controller driving the KL towards ``target`` (Ziegler et al. 2019, 2.2).

    Args:
        init_kl_coef: initial beta.
        target: desired KL per sequence (in the same units the caller passes to
            ``update``, typically the batch mean of the summed per-token KL).
        horizon: number of samples (``n_steps``) over which a full-size (20%)
            correction is applied; larger means slower adaptation.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta after observing ``current_kl`` over ``n_steps`` samples."""
        # Clipping the error bounds the per-update change, so one outlier batch
        # (e.g. a reward-hacking spike) can't blow up or collapse beta.
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value:g}, target={self.target:g}, horizon={self.horizon:g})"


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    kl_coef: float, target: float | None = None, horizon: float = 10000
) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller if ``target`` is given, else a fixed one."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
