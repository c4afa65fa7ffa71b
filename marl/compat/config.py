"""Old TRL's `PPOConfig` (TRL <= 0.11 field names), mapped onto marl's `PPOArgs`."""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from marl.config import PPOArgs
from marl.errors import MarlError

_KL_ESTIMATORS = {"kl": "k1", "abs": "abs", "mse": "mse"}  # old kl_penalty -> marl.ppo.advantages.kl_penalty
# Old options marl's PPO core does not implement: the only value accepted, and what to do instead.
_UNSUPPORTED = {
    "whiten_rewards": (False, "marl whitens the advantages (as old TRL did) but not the rewards"),
    "use_score_scaling": (False, "scale the scores before step (or use `marl ppo` with reward_scale)"),
    "use_score_norm": (False, "normalise the scores before step"),
    "early_stopping": (False, "lower ppo_epochs or learning_rate instead"),
    "push_to_hub_if_best_kwargs": ({}, "call trainer.push_to_hub(repo_id) yourself"),
}


@dataclass
class PPOConfig:
    """Old TRL's `PPOConfig` (field names and defaults of TRL 0.11), mapped onto marl's `PPOArgs`.

    `to_ppo_args()` gives the same settings under marl's names. Fields marked "no effect" are
    accepted so old code runs. An unknown field, or an old option marl's PPO does not implement
    (`whiten_rewards`, score scaling, early stopping, `kl_penalty="full"`), is a `MarlError`.
    """

    # tracking (written to the tracker's config; log_with also takes marl's "jsonl")
    exp_name: str = field(default_factory=lambda: Path(sys.argv[0]).stem)
    seed: int = 0
    log_with: str | None = None  # or a list of trackers
    task_name: str | None = None
    model_name: str | None = None
    query_dataset: str | None = None
    reward_model: str | None = None
    tracker_project_name: str = "trl"
    tracker_kwargs: dict = field(default_factory=dict)
    accelerator_kwargs: dict = field(default_factory=dict)
    project_kwargs: dict = field(default_factory=dict)
    push_to_hub_if_best_kwargs: dict = field(default_factory=dict)
    # the PPO step
    learning_rate: float = 1.41e-5
    batch_size: int = 128
    mini_batch_size: int = 128
    forward_batch_size: int | None = None  # deprecated alias of mini_batch_size, as in old TRL
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 4
    max_grad_norm: float | None = None
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: str = "kl"
    target: float = 6.0
    horizon: float = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    score_clip: float | None = None
    whiten_rewards: bool = False
    use_score_scaling: bool = False
    use_score_norm: bool = False
    early_stopping: bool = False
    target_kl: float = 1.0  # only read by early_stopping
    gradient_checkpointing: bool = False  # recompute decoder layers in the update's backward (less memory)
    # no effect here
    steps: int = 20000  # your loop decides how many steps
    remove_unused_columns: bool = True  # the dataloader keeps every column
    ratio_threshold: float = 10.0  # no mini-batch is skipped; the PPO clip bounds the ratio's effect
    compare_steps: int = 1
    optimize_cuda_cache: bool | None = None
    optimize_device_cache: bool = False
    dataset_num_proc: int | None = None

    def __new__(cls, *args, **kwargs):
        # The generated __init__ would raise a bare TypeError; this sees the same kwargs first.
        known = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "see docs/migrating-from-trl.md for the fields"
                raise MarlError(f"PPOConfig has no field {key!r}: {hint}")
        return super().__new__(cls)

    def __post_init__(self):
        self.total_ppo_epochs = math.ceil(self.steps / self.batch_size)  # as old TRL: the examples' loop bound
        if self.forward_batch_size is not None:
            self.mini_batch_size = self.forward_batch_size
        for name, (supported, instead) in _UNSUPPORTED.items():
            if getattr(self, name) != supported:
                raise MarlError(f"PPOConfig({name}={getattr(self, name)!r}) is not supported by marl: {instead}")
        if self.kl_penalty not in _KL_ESTIMATORS:
            raise MarlError(f"PPOConfig(kl_penalty={self.kl_penalty!r}): use one of {', '.join(_KL_ESTIMATORS)}")
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise MarlError(f"PPOConfig({name}={getattr(self, name)}) must be a positive integer")
        backward = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % backward:
            raise MarlError(f"PPOConfig: batch_size ({self.batch_size}) must be a multiple of mini_batch_size * "
                            f"gradient_accumulation_steps ({backward})")

    def to_ppo_args(self) -> PPOArgs:
        """The same settings under marl's names (the keys `marl ppo --config` takes)."""
        args = PPOArgs(
            seed=self.seed, learning_rate=self.learning_rate, prompts_per_policy=self.batch_size,
            # old TRL's mini_batch_size is one backward pass; marl's is one optimizer step
            mini_batch_size=self.mini_batch_size * self.gradient_accumulation_steps,
            gradient_accumulation_steps=self.gradient_accumulation_steps, ppo_epochs=self.ppo_epochs,
            max_grad_norm=math.inf if self.max_grad_norm is None else self.max_grad_norm,
            kl_coef=self.init_kl_coef, kl_target=self.target if self.adap_kl_ctrl else None,
            kl_horizon=self.horizon / self.batch_size,  # old TRL's horizon counts samples, marl's iterations
            gamma=self.gamma, gae_lambda=self.lam, clip_coef=self.cliprange,
            vf_clip_coef=self.cliprange_value, vf_coef=self.vf_coef, ent_coef=0.0, whiten_advantages=True,
            reward_clip=self.score_clip, report_to="none", kl_estimator=_KL_ESTIMATORS[self.kl_penalty],
            value_model="head", value_loss_norm=False,  # old TRL: the value head on the policy's trunk, its loss as is
            gradient_checkpointing=self.gradient_checkpointing,
        )
        return args

    def to_dict(self) -> dict:
        """Every field, non-scalars as strings (for a tracker's hyperparameter table)."""
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- the model
