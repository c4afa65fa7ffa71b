"""KL coefficient controllers for the reward penalty -beta * KL(pi || pi_ref).

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
section 2.2, adapt beta so that the observed KL tracks a target with

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_samples / horizon

i.e. an integral controller on log beta whose horizon is counted in *samples*
(10,000 in their code, old TRL and OpenRLHF). With the few hundred rows per
iteration of a short run each step moves beta by well under 1%, so the KL runs
far past its target before beta reacts (docs/kl-control.md).

`AdaptiveKLController` is a proportional-integral (PI) controller on log beta,
counted in *iterations* (Astrom & Murray, "Feedback Systems", 2008, ch. 10,
velocity form), with the error in log space:

    e_t = clip(log(KL_t / KL_target), lo_t, E_MAX)         (E_MAX = 2; KL_t <= 0 reads lo_t;
                                                            lo_t = -0.05 until the KL first reaches
                                                            the target, -1 from then on)
    d_t = clip(e_t / horizon + K_p * (e_t - e_{t-1}), -log 2, log 2),   e_0 = 0
    log beta_{t+1} = log beta_t + d_t,   beta_{t+1} = clip(beta_{t+1}, 1e-4, 10)

The integral part is Ziegler's controller with the horizon in iterations (a
constant error e moves beta by a factor exp(e) per `horizon` iterations); the
proportional part reacts at once to a change of the error, which damps the
overshoot of an integral-only controller on a lagging plant (the policy needs
several updates to answer a new beta). Log space keeps beta positive and makes
halving and doubling it symmetric.

Above the target, up to KL = e^2 T (7.4x), the controller answers in proportion.
Beta at most doubles or halves in one iteration, and stays at or under 10: every
change of beta rescales the token rewards, and the value head on the policy's
trunk must follow; without these limits the noise of a KL measured on a few dozen
responses can drive beta up by orders of magnitude within a few iterations. Below
the target, until the KL has first reached it, beta falls by at most 5% per
`horizon` iterations (anti-windup): right after the start the KL is ~0 only
because the policy has not moved yet, and a full-size negative error there would
wind beta down before the policy takes off, which then overshoots the target.
From then on the clip is [-1, 2], nearly symmetric around the target, so the noise
of the KL averages out instead of biasing the KL below its target.

The defaults (kl_horizon 3, kl_kp 1.5) keep the KL over the second half of a run
within [0.5 T, 1.5 T] on the default task for T = 1 to 8, with the value head on the
policy's LoRA and its loss divided by the returns' variance (value_loss_norm: true,
the default); without that division the value head cannot follow the large
coefficients a small T needs and the target can be lost. The measurements behind
these choices are in docs/kl-control.md and bench/RESULTS.md ("Does kl_target
hold?", `python -m bench.kl_control`). `runaway_warning` says what to do when a run
loses its target.

``state_dict()`` returns plain dicts of floats, so controller state can be stored
in a JSON checkpoint manifest next to the adapters and a resumed run continues
exactly.
"""

from __future__ import annotations

import math

__all__ = ["AdaptiveKLController", "FixedKLController", "KLController", "make_kl_controller", "runaway_warning"]

E_START, E_MIN, E_MAX = -0.05, -1.0, 2.0  # clip of the log error: lower end before / after the KL first reached
# its target, upper end (module docstring)
BETA_MIN, BETA_MAX = 1e-4, 10.0  # beta is kept inside these: a dead penalty or a frozen policy both stall,
# and a large beta swamps the value head (module docstring)
STEP_MAX = math.log(2.0)  # beta at most doubles or halves per iteration (module docstring)


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int = 1) -> None:
        """Ignore the observation (signature shared with AdaptiveKLController)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:g})"


class AdaptiveKLController:
    """PI controller on log beta driving the per-sequence KL towards ``target`` (module docstring).

    Args:
        init_kl_coef: initial beta (> 0).
        target: desired KL per sequence (in the units the caller passes to ``update``,
            the batch mean of the summed per-token KL).
        horizon: integral time in iterations: a constant error e changes log beta by
            e per `horizon` updates (Ziegler et al.'s horizon, counted in updates).
        kp: proportional gain on the change of the error.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float = 3.0, kp: float = 1.5) -> None:
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be > 0 for an adaptive controller, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        if kp < 0:
            raise ValueError(f"kp must be >= 0, got {kp}")
        self.value = min(max(float(init_kl_coef), BETA_MIN), BETA_MAX)
        self.target, self.horizon, self.kp = float(target), float(horizon), float(kp)
        self.error = 0.0  # e_{t-1}
        self.reached = 0.0  # 1.0 once the KL has reached the target (a float: the state stays JSON floats)

    def update(self, current_kl: float, n_steps: int = 1) -> None:
        """Move beta after one iteration whose mean per-sequence KL was ``current_kl``.

        ``n_steps`` (the number of samples, as old TRL passed) is ignored: the horizon counts updates.
        """
        kl = float(current_kl)
        self.reached = max(self.reached, float(kl >= self.target))
        lo = E_MIN if self.reached else E_START
        error = E_MAX if kl > self.target * math.exp(E_MAX) else (
            lo if kl < self.target * math.exp(lo) else math.log(kl / self.target))
        step = min(max(error / self.horizon + self.kp * (error - self.error), -STEP_MAX), STEP_MAX)
        log_beta = math.log(self.value) + step
        self.value = min(max(math.exp(log_beta), BETA_MIN), BETA_MAX)
        self.error = error

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon, "kp": self.kp,
                "error": self.error, "reached": self.reached}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
        self.kp = float(state.get("kp", 0.0))  # checkpoints of the proportional-only controller
        self.error = float(state.get("error", 0.0))
        self.reached = float(state.get("reached", 1.0))  # an older checkpoint: well past the start

    def __repr__(self) -> str:
        return (f"AdaptiveKLController(value={self.value:g}, target={self.target:g}, horizon={self.horizon:g}, "
                f"kp={self.kp:g})")


KLController = FixedKLController | AdaptiveKLController


def runaway_warning(name: str, kl: float, kl_coef: float, target: float | None) -> str | None:
    """The warning for a policy whose KL the controller has lost: kl_coef at its cap and the KL still above
    1.5x its target. It happens with the value head on the policy's own LoRA, a small kl_target and
    value_loss_norm off: the large penalties swamp the value loss, whose gradient then moves the policy
    away; value_loss_norm: true or a separate critic (value_model: adapter) holds the target
    (docs/kl-control.md)."""
    if target is None or kl_coef < BETA_MAX or kl <= 1.5 * target:
        return None
    return (f"{name}: kl_coef is at its cap ({BETA_MAX:g}) and the KL ({kl:.2f}) is still above 1.5x kl_target "
            f"({target:g}): the controller has lost it; set value_loss_norm: true, or value_model: adapter (a critic "
            "that cannot move the policy), or a larger kl_target")


def make_kl_controller(kl_coef: float, target: float | None = None, horizon: float = 3.0,
                       kp: float = 1.5) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller if ``target`` is given, else a fixed one."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon, kp)
