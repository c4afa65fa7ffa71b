"""Old TRL's multi-adapter RL API (TRL <= 0.11) on marl's own PPO core.

Code written against TRL's "multi adapter RL" guide runs with only its import changed:

    from marl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

- `AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=, reward_adapter=,
  quantization_config=)` wraps one `MultiAdapterModel`: a policy adapter ("default", as in old
  TRL) with a value head, the reward adapter with its score head, all on one (8/4-bit) base.
  More policies are added by name (`add_policy_adapter`, or peft-style `pretrained_model.add_adapter`).
- `PPOConfig` takes old TRL's field names and maps them onto marl's `PPOArgs`.
- `PPOTrainer.step(queries, responses, scores)` trains the model's *active* policy adapter with
  `MultiPolicyPPOTrainer.train_policy`; the reference is the same base with adapters disabled.

What differs from old TRL is listed in docs/migrating-from-trl.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from marl.config import PPOArgs
from marl.errors import MarlError
from marl.io import read_json
from marl.model import ADAPTER_META, MultiAdapterModel, resolve_adapter_path
from marl.ppo.advantages import masked_mean, masked_var
from marl.ppo.rollout import Rollout, reference_logprobs, response_mask
from marl.ppo.trainer import MultiPolicyPPOTrainer

# --------------------------------------------------------------------------- PPOConfig

_KL_ESTIMATORS = {"kl": "k1", "abs": "abs", "mse": "mse"}  # old kl_penalty -> marl.ppo.advantages.kl_penalty
# Old options marl's PPO core does not implement: the only value accepted, and what to do instead.
_UNSUPPORTED = {
    "whiten_rewards": (False, "marl whitens the advantages (as old TRL did) but not the rewards"),
    "use_score_scaling": (False, "scale the scores before step (or use `marl ppo` with reward_scale)"),
    "use_score_norm": (False, "normalise the scores before step"),
    "early_stopping": (False, "lower ppo_epochs or learning_rate instead"),
    "gradient_checkpointing": (False, "marl's PPO does not checkpoint activations; lower mini_batch_size"),
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
    log_with: str | list[str] | None = None
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
    # no effect here
    steps: int = 20000  # your loop decides how many steps
    remove_unused_columns: bool = True  # the dataloader keeps every column
    ratio_threshold: float = 10.0  # no mini-batch is skipped; the PPO clip bounds the ratio's effect
    compare_steps: int = 1
    optimize_cuda_cache: bool | None = None
    optimize_device_cache: bool = False
    gradient_checkpointing: bool = False
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
            kl_horizon=int(self.horizon), gamma=self.gamma, gae_lambda=self.lam, clip_coef=self.cliprange,
            vf_clip_coef=self.cliprange_value, vf_coef=self.vf_coef, ent_coef=0.0, whiten_advantages=True,
            reward_clip=self.score_clip, report_to="none", kl_estimator=_KL_ESTIMATORS[self.kl_penalty],
        )
        return args

    def to_dict(self) -> dict:
        """Every field, non-scalars as strings (for a tracker's hyperparameter table)."""
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- the model


class AutoModelForCausalLMWithValueHead(nn.Module):
    """Old TRL's value-head model: named LoRA policies (each with a value head) and a reward
    adapter (with its score head) on one shared `MultiAdapterModel`.

    Attributes:
        marl_model: the `MultiAdapterModel` underneath.
        policy_adapter_name: the policy `from_pretrained` made ("default" unless `adapter_name=`);
            `save_pretrained` writes it at the folder's root, as peft does.
        reward_adapter_name: the reward adapter's name, or None without one.
        reward_append_eos: append EOS to reward inputs that lack it (see `compute_reward_score`).
    """

    def __init__(self, marl_model: MultiAdapterModel, policy_adapter_name: str,
                 reward_adapter_name: str | None = None, reward_append_eos: bool = True):
        super().__init__()
        self.marl_model = marl_model
        self.policy_adapter_name = policy_adapter_name
        self.reward_adapter_name = reward_adapter_name
        self.reward_append_eos = reward_append_eos

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, peft_config=None, reward_adapter: str | None = None,
                        reward_adapter_name: str = "reward_adapter", quantization_config=None,
                        adapter_name: str = "default", reward_append_eos: bool = True,
                        reward_score_index: int | None = None,
                        trust_remote_code: bool = False, **kwargs) -> "AutoModelForCausalLMWithValueHead":
        """Load the base once, add the policy adapter `adapter_name` (from `peft_config`) with a value
        head, and the reward adapter (a local folder or Hub id) with its score head.

        A folder (or Hub repo) written by `save_pretrained` / `push_to_hub` reloads its policies and
        value heads onto the base named in its adapter_config.json. `quantization_config` is a
        `BitsAndBytesConfig` (8-bit, or 4-bit as NF4); other kwargs go to transformers' `from_pretrained`.
        A reward adapter whose score head has several outputs (old TRL's 2-label adapters) needs
        `reward_score_index`, the output that scores (the old example read 1).
        """
        name = str(pretrained_model_name_or_path)
        saved = _saved_policies(name)
        if saved is not None and peft_config is not None:
            raise MarlError(f"{name} holds saved policy adapters: drop peft_config to continue training them")
        if saved is None and peft_config is None:
            raise MarlError("marl trains LoRA adapters, not full models: pass peft_config=LoraConfig(...)")
        base_name = read_json(saved / "adapter_config.json").get("base_model_name_or_path") if saved else name
        if not base_name:
            raise MarlError(f"{name}/adapter_config.json names no base model (base_model_name_or_path)")
        load = _load_kwargs(quantization_config, kwargs)
        marl_model = MultiAdapterModel.from_pretrained(base_name, trust_remote_code=trust_remote_code, **load)
        if saved is None:
            marl_model.add_adapter(adapter_name, peft_config, role="policy")
        else:
            marl_model.load_adapter(str(saved), adapter_name, role="policy", trainable=True)
            for sub in sorted(p for p in saved.iterdir() if (p / ADAPTER_META).exists()):
                if read_json(sub / ADAPTER_META).get("role") == "policy":
                    marl_model.load_adapter(str(sub), sub.name, role="policy", trainable=True)
            if adapter_name not in marl_model.value_heads:
                raise MarlError(f"{name} has no value_head.safetensors, so it is not a saved policy: start a policy from "
                                "it with `marl ppo --sft_adapter`, or pass the base model and peft_config")
        if reward_adapter is not None:
            marl_model.load_adapter(reward_adapter, reward_adapter_name, role="reward", score_index=reward_score_index)
        marl_model.set_adapter(adapter_name)
        model = cls(marl_model, adapter_name, reward_adapter_name if reward_adapter else None, reward_append_eos)
        return model.eval()  # as transformers' from_pretrained; PPOTrainer.step switches modes itself

    # ---- adapters

    @property
    def policy_adapters(self) -> list[str]:
        """Names of the policy adapters (each has a value head), in the order they were added."""
        return [n for n, role in self.marl_model.roles.items() if role == "policy"]

    @property
    def active_adapter(self) -> str | None:
        return self.marl_model.active_adapter

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active policy: the one `generate`, `forward` and `PPOTrainer.step` use."""
        self.marl_model.set_adapter(adapter_name)

    def add_policy_adapter(self, adapter_name: str, peft_config=None) -> None:
        """Add another policy (a fresh LoRA + value head); `peft_config` defaults to the first policy's."""
        if peft_config is None:
            peft_config = self.marl_model.peft.peft_config[self.policy_adapter_name]
        self.marl_model.add_adapter(adapter_name, peft_config, role="policy")

    @property
    def pretrained_model(self) -> "_PeftView":
        """The peft model, as old TRL exposed it; `add_adapter` / `set_adapter` on it go through marl."""
        return _PeftView(self)

    @property
    def v_head(self) -> nn.Linear:
        """The value head of the active policy."""
        name = self.active_adapter
        if name not in self.marl_model.value_heads:
            raise MarlError(f"the active adapter {name!r} has no value head: set_adapter() one of {self.policy_adapters}")
        return self.marl_model.value_heads[name]

    @property
    def config(self):
        return self.marl_model.base.config

    # ---- forward passes

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """(logits (B, T, V), loss or None, values (B, T)) of the active policy, like old TRL's model."""
        head = self.v_head
        out = self.marl_model(input_ids, attention_mask, output_hidden_states=True, **kwargs)
        values = head(out.hidden_states[-1].to(head.weight.dtype)).squeeze(-1)
        return out.logits, getattr(out, "loss", None), values

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **generation_kwargs):
        """`generate` with the active policy adapter."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.marl_model.generate(input_ids, attention_mask, adapter_names=self.active_adapter,
                                        **generation_kwargs)

    def compute_reward_score(self, input_ids, attention_mask=None, ppo_adapter_name: str | None = None,
                             **kwargs) -> torch.Tensor:
        """Reward scores (B,), each read at the row's last non-pad token.

        With `reward_append_eos`, a row not ending in EOS gets one appended first: TRL's RewardTrainer
        trained the reward on text + EOS (KNOWN-ISSUES 2). Afterwards `ppo_adapter_name` is the active
        adapter (or, if not given, the one active before). Other kwargs (token_type_ids, ...) are ignored.
        """
        if self.reward_adapter_name is None:
            raise MarlError("this model has no reward adapter: pass reward_adapter= to from_pretrained")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.reward_append_eos:
            input_ids, attention_mask = self._end_with_eos(input_ids, attention_mask)
        return self.marl_model.compute_reward_score(input_ids, attention_mask, ppo_adapter_name=ppo_adapter_name,
                                                    reward_adapter_name=self.reward_adapter_name)

    def _end_with_eos(self, input_ids, attention_mask):
        tok = self.marl_model.tokenizer
        rows = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
        rows = [r if len(r) and r[-1] == tok.eos_token_id else torch.cat([r, r.new_tensor([tok.eos_token_id])])
                for r in rows]
        ids, mask = _pad(rows, tok.pad_token_id, "right")
        return ids.to(input_ids.device), mask.to(input_ids.device)

    # ---- saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write every policy adapter with its value head, in peft's layout: `policy_adapter_name` at
        the root, the others in `<name>/` (each also loads with plain `PeftModel.from_pretrained`).

        Files already in `save_directory` that are not an adapter's stay. The reward adapter is not
        copied: it is loaded from where it came from.
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".save.") as tmp:
            root = self.marl_model.save_adapter(self.policy_adapter_name, Path(tmp) / "root")
            for f in root.iterdir():
                os.replace(f, out / f.name)  # file by file: the folder may hold the user's other files
        for name in self.policy_adapters:
            if name != self.policy_adapter_name:
                self.marl_model.save_adapter(name, out / name, overwrite=True)

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload policy adapters with marl",
                    private: bool | None = None, token: str | None = None):
        """Upload what `save_pretrained` writes to the Hub repo `repo_id` (created if missing)."""
        return _upload(self.save_pretrained, repo_id, commit_message, private, token)


class _PeftView:
    """`model.pretrained_model`: the peft model, with adapter bookkeeping routed through marl so a
    peft-style `add_adapter(name, config)` gets a value head and `set_adapter` keeps trainability right."""

    def __init__(self, model: AutoModelForCausalLMWithValueHead):
        self._model = model

    def add_adapter(self, adapter_name: str, peft_config, **_peft_only) -> None:
        self._model.add_policy_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str) -> None:
        self._model.set_adapter(adapter_name)

    @property
    def active_adapter(self) -> str | None:
        return self._model.active_adapter

    def __getattr__(self, name):
        return getattr(self._model.marl_model.peft, name)


def _saved_policies(name_or_path: str) -> Path | None:
    """The folder `save_pretrained` / `push_to_hub` wrote (local, or downloaded), else None."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local if (local / "adapter_config.json").exists() else None
    if name_or_path.count("/") != 1:
        return None
    from huggingface_hub import file_exists

    try:
        is_adapter = file_exists(name_or_path, "adapter_config.json")
    except Exception:  # noqa: BLE001 - offline or no such repo: treat it as a base model id
        return None
    return resolve_adapter_path(name_or_path) if is_adapter else None


def _load_kwargs(quantization_config, kwargs: dict) -> dict:
    """`MultiAdapterModel.from_pretrained` kwargs for a `BitsAndBytesConfig` (or the old
    `load_in_8bit=` / `load_in_4bit=` / `torch_dtype=` kwargs); the rest go to transformers."""
    kwargs = dict(kwargs)
    in_8bit, in_4bit = kwargs.pop("load_in_8bit", False), kwargs.pop("load_in_4bit", False)
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    if quantization_config is not None:
        in_8bit, in_4bit = quantization_config.load_in_8bit, quantization_config.load_in_4bit
    if in_8bit:
        return {"quantization": "8bit", **kwargs}
    if in_4bit:
        compute = getattr(quantization_config, "bnb_4bit_compute_dtype", None) or torch.float32
        return {"quantization": "4bit", "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
                "bnb_4bit_use_double_quant": getattr(quantization_config, "bnb_4bit_use_double_quant", True), **kwargs}
    if dtype in (torch.bfloat16, "bfloat16"):
        return {"quantization": "bf16", **kwargs}
    if dtype not in (None, "auto", torch.float32, "float32"):
        raise MarlError(f"dtype {dtype}: marl loads a base in float32, bfloat16, 8-bit or 4-bit")
    return kwargs


def _pad(rows: list[torch.Tensor], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask of 1-D rows padded on `side` ("left" or "right")."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = r.cpu()
        mask[i, cols] = 1
    return ids, mask


def _upload(save, repo_id: str, commit_message: str, private: bool | None, token: str | None):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)


# --------------------------------------------------------------------------- the trainer


class _PolicyPPO(MultiPolicyPPOTrainer):
    """marl's PPO core for one policy fed by `PPOTrainer.step`, also keeping the value statistics
    old TRL reported (returns, rollout values, advantages)."""

    def prepare(self, name, rollout, scores, ref_lp, old=None) -> dict:
        prep = super().prepare(name, rollout, scores, ref_lp, old)
        mask = prep["mask"]
        self.value_stats = {
            "ppo/returns/mean": float(masked_mean(prep["returns"], mask)),
            "ppo/returns/var": float(masked_var(prep["returns"], mask)),
            "ppo/val/mean": float(masked_mean(prep["old_values"], mask)),
            "ppo/val/var": float(masked_var(prep["old_values"], mask)),
            "ppo/policy/advantages_mean": float(masked_mean(prep["advantages"], mask)),
        }
        return prep


def _collate_lists(rows: list[dict]) -> dict[str, list]:
    """Each column as a list (the collator of old TRL's examples): query tensors keep their lengths."""
    return {key: [row[key] for row in rows] for key in rows[0]}


class PPOTrainer:
    """Old TRL's `PPOTrainer` for a model from marl's `AutoModelForCausalLMWithValueHead`.

    `step` trains the model's active policy adapter: select it with `model.set_adapter(name)` (or
    `compute_reward_score(..., ppo_adapter_name=name)`) before its step. Each policy keeps its own
    optimizer, KL controller and step count; only its LoRA and value head change. The reference is
    the same base with every adapter disabled, so `ref_model` must be None.
    """

    def __init__(self, config: PPOConfig | None = None, model: AutoModelForCausalLMWithValueHead | None = None,
                 ref_model=None, tokenizer=None, dataset=None, optimizer=None, data_collator=None,
                 lr_scheduler=None):
        if ref_model is not None:
            raise MarlError("ref_model must be None: marl's reference is the same base with the adapters disabled "
                            "(as old TRL did for peft models), so no second model is loaded")
        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            raise MarlError("model must come from marl's AutoModelForCausalLMWithValueHead.from_pretrained(...)")
        self.config = config or PPOConfig()
        self.args = self.config.to_ppo_args()
        self.model, self.ref_model = model, None
        self.tokenizer = tokenizer or model.marl_model.tokenizer
        self.dataset = dataset
        self.data_collator = data_collator or _collate_lists
        self.dataloader = self.prepare_dataloader(dataset, self.data_collator) if dataset is not None else None
        self.lr_scheduler = lr_scheduler
        self.current_step = 0
        self._ppo: dict[str, _PolicyPPO] = {}
        self._last_adapter: str | None = None
        # A given optimizer (and its scheduler) belongs to the policy active now; others get Adam.
        self._optimizer_owner = self._policy_name("PPOTrainer")
        if optimizer is not None:
            self._policy(self._optimizer_owner).optimizers[self._optimizer_owner] = optimizer
        self.accelerator, self._jsonl = self._trackers()

    # ---- data, trackers

    def prepare_dataloader(self, dataset, data_collator=None):
        """Shuffled batches of `config.batch_size` rows, the last partial one dropped (as old TRL)."""
        return torch.utils.data.DataLoader(dataset, batch_size=self.config.batch_size, shuffle=True, drop_last=True,
                                           collate_fn=data_collator or _collate_lists,
                                           generator=torch.Generator().manual_seed(self.config.seed))

    def _trackers(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        wanted = cfg.log_with if isinstance(cfg.log_with, list) else [cfg.log_with] if cfg.log_with else []
        trackers = [t for t in wanted if t != "jsonl"]
        accelerator = Accelerator(log_with=trackers or None, project_config=ProjectConfiguration(**cfg.project_kwargs),
                                  **cfg.accelerator_kwargs)
        if trackers:
            accelerator.init_trackers(cfg.tracker_project_name, config=cfg.to_dict(), init_kwargs=cfg.tracker_kwargs)
        if "jsonl" not in wanted:
            return accelerator, None
        folder = cfg.project_kwargs.get("logging_dir") or cfg.project_kwargs.get("project_dir")
        if not folder:
            raise MarlError("log_with='jsonl' needs a folder: PPOConfig(project_kwargs={'logging_dir': DIR})")
        return accelerator, Path(folder) / "metrics.jsonl"

    # ---- policies

    def _policy_name(self, where: str) -> str:
        name = self.model.active_adapter
        if name not in self.model.policy_adapters:
            raise MarlError(f"{where}: the active adapter is {name!r}, not a policy: call "
                            f"model.set_adapter(name) with one of {self.model.policy_adapters}")
        return name

    def _policy(self, name: str) -> _PolicyPPO:
        if name not in self._ppo:
            self._ppo[name] = _PolicyPPO(self.model.marl_model, self.args, [self.args.policy({"name": name})],
                                         prompt_ids=[], ref_adapter=None)
        return self._ppo[name]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The active policy's optimizer."""
        name = self._policy_name("optimizer")
        return self._policy(name).optimizers[name]

    @property
    def kl_ctl(self):
        """The active policy's KL controller (`.value` is the current coefficient)."""
        name = self._policy_name("kl_ctl")
        return self._policy(name).kl_ctl[name]

    # ---- generation

    @torch.no_grad()
    def generate(self, query_tensor, length_sampler=None, batch_size: int = 4, return_prompt: bool = True,
                 generate_ref_response: bool = False, **generation_kwargs):
        """Responses of the active policy (and, with `generate_ref_response`, of the reference).

        A 1-D query gives a (1, L) tensor, as old TRL did. A list of queries gives a list of 1-D
        tensors, generated `batch_size` at a time with left padding, each cut after its first EOS.
        `length_sampler()`, if given, draws max_new_tokens for each batch.
        """
        policy = self._policy_name("generate")
        adapters = [policy, None] if generate_ref_response else [policy]  # None: adapters disabled
        if isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1:
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            ids = query_tensor[None].to(self.model.marl_model.device)
            outs = [self.model.marl_model.generate(ids, torch.ones_like(ids), adapter_names=a, **generation_kwargs)
                    for a in adapters]
            outs = [o if return_prompt else o[:, ids.shape[1]:] for o in outs]
        else:
            outs = [self._generate_batched(list(query_tensor), a, batch_size, return_prompt, length_sampler,
                                           generation_kwargs) for a in adapters]
        return tuple(outs) if generate_ref_response else outs[0]

    def _generate_batched(self, queries, adapter, batch_size, return_prompt, length_sampler, generation_kwargs):
        marl_model, eos = self.model.marl_model, self.tokenizer.eos_token_id
        out = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start:start + batch_size]
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            ids, mask = _pad(chunk, marl_model.tokenizer.pad_token_id, "left")
            generated = marl_model.generate(ids.to(marl_model.device), mask.to(marl_model.device),
                                            adapter_names=adapter, **generation_kwargs)[:, ids.shape[1]:]
            keep = response_mask(generated, eos).sum(1)
            for query, response, n in zip(chunk, generated, keep.tolist()):
                response = response[:n]
                out.append(torch.cat([query.to(response.device), response]) if return_prompt else response)
        return out

    # ---- the PPO step

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores) -> dict[str, float]:
        """One PPO update of the active policy from `config.batch_size` (query, response, score) rows.

        Args:
            queries: 1-D token ids per row, unpadded.
            responses: 1-D ids of the generated tokens only; every token given is trained on.
            scores: one number per row (0-d tensors, floats, or a (B,) tensor).

        Returns old TRL's statistics (`ppo/loss/policy`, `objective/kl`, ...) as floats.
        """
        t0 = time.perf_counter()
        name = self._policy_name("step")
        ppo = self._policy(name)
        where = f"policy {name}, step {ppo.step_count + 1}"
        scores = self._check_inputs(where, queries, responses, scores)
        if self.config.score_clip is not None:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        rollout = self._rollout(name, queries, responses)
        t_ref = time.perf_counter()
        ref_lp = reference_logprobs(self.model.marl_model, None, rollout)
        t_update = time.perf_counter()
        self.model.marl_model.set_trainable([name])
        m = ppo.train_policy(name, rollout, scores, ref_lp, ppo.step_count + 1)
        ppo.step_count += 1
        self.current_step += 1
        self._last_adapter = name
        if self.lr_scheduler is not None and name == self._optimizer_owner:
            self.lr_scheduler.step()
        q_len = torch.tensor([len(q) for q in queries], dtype=torch.float)
        r_len = torch.tensor([len(r) for r in responses], dtype=torch.float)
        return {
            "objective/kl": m["kl/mean"], "objective/kl_coef": m["kl/coef"],
            "ppo/mean_non_score_reward": -m["kl/coef"] * m["kl/mean"],
            "ppo/mean_scores": m["reward/mean"], "ppo/std_scores": m["reward/std"],
            "ppo/loss/policy": m["ppo/policy_loss"], "ppo/loss/value": m["ppo/value_loss"],
            "ppo/loss/total": m["ppo/policy_loss"] + self.args.vf_coef * m["ppo/value_loss"],
            "ppo/policy/entropy": m["ppo/entropy"], "ppo/policy/approxkl": m["ppo/approx_kl"],
            "ppo/policy/clipfrac": m["ppo/clipfrac"], "ppo/policy/ratio": m["ppo/ratio"],
            "ppo/val/clipfrac": m["ppo/value_clipfrac"], **ppo.value_stats,
            "ppo/learning_rate": ppo.optimizers[name].param_groups[0]["lr"],
            "tokens/queries_len_mean": float(q_len.mean()), "tokens/queries_len_std": float(q_len.std()),
            "tokens/responses_len_mean": float(r_len.mean()), "tokens/responses_len_std": float(r_len.std()),
            "time/ppo/forward_pass": t_update - t_ref, "time/ppo/optimize_step": time.perf_counter() - t_update,
            "time/ppo/total": time.perf_counter() - t0,
        }

    def _check_inputs(self, where: str, queries, responses, scores) -> torch.Tensor:
        """The scores as a (B,) float tensor on the model's device, after checking every input."""
        if not all(isinstance(x, (list, tuple)) for x in (queries, responses)) or not (
                isinstance(scores, (list, tuple)) or (isinstance(scores, torch.Tensor) and scores.dim() == 1)):
            raise MarlError(f"{where}: queries and responses must be lists of tensors, scores a list or a 1-D tensor")
        counts = {"queries": len(queries), "responses": len(responses), "scores": len(scores)}
        if len(set(counts.values())) > 1:
            raise MarlError(f"{where}: one query, response and score per row, got "
                            + ", ".join(f"{n} {k}" for k, n in counts.items()))
        if counts["queries"] != self.config.batch_size:
            raise MarlError(f"{where}: got {counts['queries']} rows but PPOConfig.batch_size is "
                            f"{self.config.batch_size}: pass exactly batch_size rows")
        for what, rows in (("queries", queries), ("responses", responses)):
            for i, t in enumerate(rows):
                if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0 or t.is_floating_point():
                    raise MarlError(f"{where}: {what}[{i}] must be a non-empty 1-D tensor of token ids")
        try:
            values = torch.stack([torch.as_tensor(s).detach().float().cpu().reshape(()) for s in scores])
        except (RuntimeError, TypeError, ValueError):
            raise MarlError(f"{where}: each score must be one number (a float or a 0-d tensor)") from None
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise MarlError(f"{where}: the score of row {bad[0]} is {values[bad[0]].item()} ({len(bad)} NaN or "
                            "infinite in all): fix the reward before calling step; nothing was trained")
        return values.to(self.model.marl_model.device)

    def _rollout(self, name: str, queries, responses) -> Rollout:
        """Queries left-padded, responses right-padded, in marl's rollout layout; temperature 1 as old TRL."""
        pad, device = self.model.marl_model.tokenizer.pad_token_id, self.model.marl_model.device
        q_ids, q_mask = _pad(list(queries), pad, "left")
        r_ids, r_mask = _pad(list(responses), pad, "right")
        return Rollout(q_ids.to(device), q_mask.to(device), r_ids.to(device), r_mask.to(device),
                       [name] * len(queries), torch.ones(len(queries)))

    # ---- logging, saving

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log=("query", "response")) -> dict[str, float]:
        """Log a step's statistics and the mean / std of its rewards to `config.log_with`.

        The first policy's keys are old TRL's; any other policy's get its name as a prefix
        (`policy_1/ppo/loss/policy`), so several policies share one tracker. A jsonl log also gets
        the `columns_to_log` of each row with its reward. Returns the scalars logged.
        """
        name = self._last_adapter or self.model.active_adapter
        r = torch.stack([torch.as_tensor(x).detach().float().cpu().reshape(()) for x in rewards])
        logs = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        logs.update({"env/reward_mean": float(r.mean()), "env/reward_std": float(r.std()) if len(r) > 1 else 0.0})
        if name != self.model.policy_adapter_name:
            logs = {f"{name}/{k}": v for k, v in logs.items()}
        step = self._ppo[name].step_count if name in self._ppo else 0
        if self.accelerator.trackers:
            self.accelerator.log(logs, step=step)
        if self._jsonl is not None:
            columns = [c for c in columns_to_log if c in batch]
            samples = [dict(zip(columns, row), reward=float(x)) for row, x in zip(zip(*(batch[c] for c in columns)), r)]
            self._jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(self._jsonl, "a") as f:
                f.write(json.dumps({"step": step, "adapter": name, **logs, "samples": samples}, default=str) + "\n")
        return logs

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """The model's policy adapters with their value heads, and the tokenizer."""
        self.model.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(str(save_directory))

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload policy adapters with marl",
                    private: bool | None = None, token: str | None = None):
        """Upload what `save_pretrained` writes to the Hub repo `repo_id` (created if missing)."""
        return _upload(self.save_pretrained, repo_id, commit_message, private, token)
