"""One policy's training state as one record: what PBT copies, what a checkpoint saves and restores, and what
a sweep's setting reaches.

`PolicyState` holds a policy's settings, optimizer, KL controller, reward moments, random generator and
lineage; its LoRA weights and value head live on the shared model, under its name. Everything that trains one
policy (marl.ppo.learner) reads and changes it here.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from marl import dist
from marl.config import PPOArgs, ResolvedPolicy
from marl.model import MultiAdapterModel
from marl.ppo.checkpoint import load_optimizer, save_optimizer
from marl.ppo.kl import AdaptiveKLController, KLController, make_kl_controller
from marl.ppo.optim import make_optimizer
from marl.ppo.reward_norm import RunningMoments


@dataclass
class PolicyState:
    """One policy's training state (its weights are the model's adapter and heads of the same name).

    Args:
        settings: its effective settings (`PPOArgs.policy`), changed by PBT's explore step.
        optimizer: over its own LoRA, value head and critic parameters only.
        kl: its KL controller (fixed or adaptive, `kl_target`).
        moments: running mean and std of its raw reward scores (`reward_norm: running`).
        generator: its prompt sampling and minibatch order (seeded by its seed and the process rank).
        lineage: what happened to it: `{"step", "from", "settings"}` for every PBT exploit it took.
    """

    settings: ResolvedPolicy
    optimizer: torch.optim.Optimizer
    kl: KLController
    moments: RunningMoments
    generator: torch.Generator
    lineage: list[dict] = field(default_factory=list)

    @classmethod
    def new(cls, model: MultiAdapterModel, cfg: PPOArgs, settings: ResolvedPolicy) -> PolicyState:
        """A fresh state for policy `settings.name`, whose adapter is already on `model`."""
        return cls(settings, make_optimizer(settings.optim, model.trainable_parameters(settings.name),
                                            settings.learning_rate),
                   make_kl_controller(settings.kl_coef, settings.kl_target, cfg.kl_horizon, cfg.kl_kp),
                   RunningMoments(), torch.Generator().manual_seed(settings.seed + 1000 * dist.rank()))

    @property
    def name(self) -> str:
        return self.settings.name

    def copy_from(self, source: PolicyState) -> None:
        """Take `source`'s optimizer state, KL controller and reward moments (PBT's exploit; the weights are the
        model's to copy). The optimizers must be over parameters of the same shapes in the same order; the
        generator stays this policy's own, so the two go on drawing different prompts."""
        self.optimizer.load_state_dict(copy.deepcopy(source.optimizer.state_dict()))
        self.kl = copy.deepcopy(source.kl)
        self.moments.load_state_dict(source.moments.state_dict())

    def apply(self, settings: ResolvedPolicy) -> None:
        """Train with new `settings` from now on (PBT's explore step): the optimizer's learning rate, the KL
        controller's target (a controller of the other kind, fixed or adaptive, starting from today's
        coefficient), and every setting read per iteration (temperature, reward weights, ...)."""
        for group in self.optimizer.param_groups:
            group["lr"] = settings.learning_rate
        if settings.kl_target is not None and isinstance(self.kl, AdaptiveKLController):
            self.kl.target = float(settings.kl_target)
        elif settings.kl_target != getattr(self.kl, "target", None):
            horizon, kp = getattr(self.kl, "horizon", 3.0), getattr(self.kl, "kp", 1.5)
            self.kl = make_kl_controller(self.kl.value, settings.kl_target, horizon, kp)
        self.settings = settings

    # ---- checkpoints (the layout marl's PPO checkpoints have always had: optim_<name>.* and state.json)

    def save(self, folder: Path) -> dict:
        """Write the optimizer to `folder`/optim_<name>.*; return the rest, JSON: settings, KL controller,
        reward moments, lineage."""
        save_optimizer(self.optimizer, folder / f"optim_{self.name}")
        return {"settings": dataclasses.asdict(self.settings), "kl": self.kl.state_dict(),
                "reward_norm": self.moments.state_dict(), "lineage": self.lineage}

    def load(self, folder: Path, saved: dict) -> None:
        """Restore what `save` wrote. A policy PBT changed (it has a lineage) takes its saved settings back; the
        others keep the config's. Keys an older checkpoint lacks (reward_norm, lineage) keep their values."""
        self.lineage = list(saved.get("lineage") or [])
        if self.lineage:
            known = {f.name for f in dataclasses.fields(self.settings)}
            self.apply(dataclasses.replace(self.settings, **{k: v for k, v in saved["settings"].items()
                                                             if k in known and k != "name"}))
        kl = saved["kl"]
        if ("target" in kl) != isinstance(self.kl, AdaptiveKLController):  # PBT changed fixed <-> adaptive
            self.kl = make_kl_controller(kl["value"], kl.get("target"))
        self.kl.load_state_dict(kl)
        load_optimizer(self.optimizer, folder / f"optim_{self.name}")
        if saved.get("reward_norm") is not None:
            self.moments.load_state_dict(saved["reward_norm"])
