"""One dataclass per stage; read from YAML, then `--key value` overrides from the command line.

Every field has a `help` string (shown by `marl <stage> --help`). An unknown key, in
the YAML or on the command line, is an error that names it and the nearest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .chat import NAMED_TEMPLATES
from .errors import MarlError
from .sweep import expand_sweep, policy_name, sweep_values
from .names import (ESTIMATORS, GROUP_ESTIMATORS, KL_ESTIMATORS, OPTIMIZERS, QUANTIZATIONS, REWARD_NORMS,
                    SCHEDULES)


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: __import__("copy").deepcopy(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class BaseArgs:
    """Fields every stage shares: the base model, the run folder, the data, the LoRA shape."""

    run_dir: str = _f("runs/default", "run folder: adapters/, metrics, checkpoints and the manifest go here")
    model_name_or_path: str = _f("default", "base model: a local folder, a Hub id, or `default` (embedded tiny model)")
    quantization: str = _f("none", "how the base is loaded: none | bf16 | 8bit | 4bit (bitsandbytes NF4)")
    bnb_4bit_compute_dtype: str = _f("float32", "compute dtype of the 4-bit layers (float32 or bfloat16)")
    bnb_4bit_use_double_quant: bool = _f(True, "quantize the 4-bit quantization constants too")
    trust_remote_code: bool = _f(False, "allow model code from the Hub (off unless you trust it)")
    chat_template: str | None = _f(None, "chat template for conversational data (prompts or pairs as lists of "
                                         "messages): null keeps the tokenizer's own; `chatml`, or a .jinja file, for "
                                         "a tokenizer without one (e.g. a base checkpoint)")
    dataset_name: str = _f("default", "`default`, a Hub dataset id, a local folder, or a json/jsonl/csv/parquet file")
    dataset_config: str | None = _f(None, "Hub dataset configuration name")
    train_split: str = _f("train", "split to train on")
    eval_split: str = _f("test", "held-out split; if the dataset lacks it, eval_fraction of train is held out")
    eval_fraction: float = _f(0.05, "fraction of train held out when there is no eval split")
    max_train_samples: int | None = _f(None, "use at most this many training rows")
    seed: int = _f(0, "random seed")
    overwrite: bool = _f(False, "replace an adapter that this stage already finished in run_dir")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target_modules: str | list[str] = _f("all-linear", "modules to adapt: all-linear or a list of names")
    report_to: str | list[str] = _f("tensorboard", "trackers: tensorboard, wandb, none (a list is fine)")
    torch_threads: int | None = _f(None, "CPU threads for torch (null: torch's default); tiny models run fastest on 1")

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise MarlError(f"quantization: {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if self.quantization in ("4bit", "8bit") and not _installed("bitsandbytes"):
            raise MarlError(f"quantization: {self.quantization} needs bitsandbytes: pip install bitsandbytes, or "
                            "--quantization none")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise MarlError(f"eval_fraction: {self.eval_fraction} must be in [0, 1)")
        if self.lora_r < 1:
            raise MarlError(f"lora_r: {self.lora_r} must be a positive integer")
        check_range(self, positive=("lora_alpha",), at_least_one=("max_train_samples", "torch_threads"))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MarlError(f"lora_dropout: {self.lora_dropout} must be in [0, 1)")
        if not 0 <= self.seed < 2**31:  # numpy takes [0, 2**32); ppo adds the process rank
            raise MarlError(f"seed: {self.seed} must be in [0, 2**31)")
        check_trackers(self.report_to)
        if self.chat_template not in (None, "", "none", "null") and self.chat_template not in NAMED_TEMPLATES \
                and not Path(self.chat_template).expanduser().is_file():
            raise MarlError(f"chat_template: {self.chat_template!r} is neither a template name "
                            f"({', '.join(NAMED_TEMPLATES)}) nor a file: give a .jinja file, a name, or null for the "
                            "tokenizer's own")

    def lora_config(self, task_type: str = "CAUSAL_LM", dropout: float | None = None):
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha,
                          lora_dropout=self.lora_dropout if dropout is None else dropout,
                          target_modules=self.lora_target_modules, bias="none", task_type=task_type)

    def load_kwargs(self) -> dict:
        """How the base model loads (marl.model_io.load_base)."""
        return dict(quantization=self.quantization, bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
                    bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
                    trust_remote_code=self.trust_remote_code)

    def model_kwargs(self) -> dict:
        """How the base and its tokenizer load (`MultiAdapterModel.from_pretrained`)."""
        return self.load_kwargs() | {"chat_template": self.chat_template}


@dataclass
class TrainArgs(BaseArgs):
    """Fields of the two stages that run a transformers Trainer (sft, reward)."""

    learning_rate: float = _f(2e-4, "peak learning rate")
    num_train_epochs: float = _f(1.0, "passes over the training data")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: use num_train_epochs)")
    per_device_train_batch_size: int = _f(16, "rows per device per step")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    warmup_ratio: float = _f(0.03, "fraction of steps of linear warm-up")
    lr_scheduler_type: str = _f("cosine", "learning-rate schedule")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_length: int = _f(256, "truncate (sft) or drop (reward) rows longer than this many tokens")
    logging_steps: int = _f(10, "log every N steps")
    save_steps: int = _f(200, "checkpoint every N steps (resume with --resume true)")
    resume: bool = _f(False, "resume from the last checkpoint in run_dir")
    gradient_checkpointing: bool = _f(False, "trade compute for memory")

    def __post_init__(self):
        super().__post_init__()
        if self.learning_rate <= 0:
            raise MarlError(f"learning_rate: {self.learning_rate} must be > 0")
        if self.per_device_train_batch_size < 1:
            raise MarlError("per_device_train_batch_size must be >= 1")
        check_range(self, positive=("num_train_epochs", "max_length"),
                    at_least_one=("gradient_accumulation_steps", "logging_steps", "save_steps"),
                    non_negative=("weight_decay",))
        from transformers.trainer_utils import SchedulerType

        schedules = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in schedules:
            raise MarlError(f"lr_scheduler_type: {self.lr_scheduler_type!r} must be one of {', '.join(schedules)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise MarlError(f"max_steps: {self.max_steps} must be >= 1, or -1 to train num_train_epochs")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise MarlError(f"warmup_ratio: {self.warmup_ratio} must be in [0, 1)")


@dataclass
class SFTArgs(TrainArgs):
    """Stage 1: supervised fine-tuning of the `sft` adapter with TRL's SFTTrainer."""

    adapter_name: str = _f("sft", "name of the adapter this stage writes to run_dir/adapters/")
    dataset_text_field: str = _f("text", "column holding plain text (for `text` datasets)")
    packing: bool = _f(False, "pack several short texts into one row")


@dataclass
class RewardArgs(TrainArgs):
    """Stage 2: the `reward` adapter and its score head with TRL's RewardTrainer."""

    adapter_name: str = _f("reward", "name of the adapter this stage writes to run_dir/adapters/")
    center_rewards_coefficient: float | None = _f(None, "penalty pulling mean rewards to 0 (Eisenstein et al.)")
    eval_batch_size: int = _f(64, "rows per batch when measuring held-out accuracy")


@dataclass
class PolicySettings:
    """The settings each PPO policy can have its own: PPOArgs holds their shared values, a policy's entry in
    `policies` (PolicySpec) overrides any of them, and a sweep varies any of them. Declared here once."""

    learning_rate: float = _f(1e-4, "the learning rate of each policy's optimizer")
    temperature: float = _f(1.0, "sampling temperature")
    kl_coef: float = _f(0.05, "KL penalty coefficient (the initial value when kl_target is set)")
    kl_target: float | None = _f(2.0, "per-sequence KL the adaptive controller holds (null: kl_coef stays fixed, "
                                      "and a larger reward scale then drags the policy as far as it likes); lower "
                                      "it to keep a policy nearer the reference (an imperfect reward adapter is "
                                      "over-optimised less), raise it to let the policy chase the reward; marl "
                                      "warns when a target is lost (measured: bench/RESULTS.md, docs/kl-control.md)")
    kl_in: str = _f("reward", "reward: -kl_coef * KL per token in the reward (PPO, as now); loss: beta * k3 KL "
                              "to the reference added to the policy loss (GRPO), beta fixed: such a policy needs "
                              "kl_target: null (kl_target steers kl_coef only; the combination is refused)")
    beta: float = _f(0.04, "kl_in: loss: weight of the k3 KL term in the loss (GRPO's beta)")
    reward_scale: float = _f(1.0, "score multiplier")
    reward_shift: float = _f(0.0, "added to the score after scaling")
    reward_norm: str = _f("none", "normalise the reward model's raw scores before reward_scale / reward_shift: "
                                  "none, batch (this batch's mean and std) or running (mean and std of every score "
                                  "so far, as TRL's use_score_norm; kept in checkpoints); with kl_target set the "
                                  "score's scale matters less, so normalising is for a fixed kl_coef or scores "
                                  "far from O(1) (measured: bench/RESULTS.md, docs/kl-control.md)")
    reward_weights: dict[str, float] = _f({}, "weight of each component; `reward_model` is the reward adapter")
    advantage_estimator: str = _f("gae", "gae: PPO with a critic (value head or critic adapter); grpo, rloo: "
                                         "critic-free group baselines over num_generations samples per prompt; "
                                         "reinforce_pp: critic-free, returns whitened over the batch (no value model)")
    num_generations: int = _f(4, "grpo / rloo: samples per prompt; a policy's prompts_per_policy rows are "
                                 "prompts_per_policy / num_generations prompts, each answered num_generations times")
    scale_rewards: bool = _f(True, "grpo: divide by the group's reward std (false: Dr. GRPO, no std division and "
                                   "the policy loss summed over tokens / (max_new_tokens x mini-batch rows))")
    clip_coef: float = _f(0.2, "PPO ratio clip")
    vf_coef: float = _f(0.1, "value loss weight")
    ent_coef: float = _f(0.0, "entropy bonus weight")
    gae_lambda: float = _f(0.95, "GAE lambda")
    init_from_sft: bool = _f(True, "start each policy from the sft adapter's weights (else fresh LoRA)")
    optim: str = _f("adam", "the policy's optimizer: adam (torch Adam, float32 moments) or adamw_8bit (bitsandbytes' "
                            "AdamW8bit, weight decay 0: both moments stored in 8 bits, blockwise, for every tensor of "
                            "at least 4096 elements; needs bitsandbytes)")


# A policy's own settings: PolicySettings' fields and the seed (which the other stages share, in BaseArgs).
PER_POLICY = (*(f.name for f in dataclasses.fields(PolicySettings)), "seed")


def _resolved_has_critic(self) -> bool:
    """Whether the policy learns a value model (value head or critic adapter): GAE only. The one place
    this is decided; a policy without a critic gets no value head, no value pass and no value loss."""
    return self.advantage_estimator == "gae"


def _resolved_group_size(self) -> int:
    """Consecutive rows that answer one prompt: num_generations for grpo / rloo, else 1."""
    return self.num_generations if self.advantage_estimator in GROUP_ESTIMATORS else 1


# A policy entry of `policies`: a name and an override (None: the shared value) of every per-policy setting.
PolicySpec = dataclasses.make_dataclass(
    "PolicySpec", [("name", str, _f("policy", "adapter name (policy_<x> by convention)"))] + [
        (n, typing.Any, field(default=None, metadata={"help": f"override of {n}" + (
            " (an explicit null: this policy keeps its kl_coef fixed)" if n == "kl_target" else "")}))
        for n in PER_POLICY])
PolicySpec.__doc__ = "One PPO policy: a name and its own overrides of the shared PPO settings (PER_POLICY)."

# A policy's effective settings: its name and every per-policy setting (PPOArgs.policy).
ResolvedPolicy = dataclasses.make_dataclass(
    "ResolvedPolicy", [("name", str)] + [(n, typing.Any) for n in PER_POLICY],
    namespace={"has_critic": property(_resolved_has_critic), "group_size": property(_resolved_group_size)})
ResolvedPolicy.__doc__ = "A policy's name and effective settings: its overrides over the shared ones."


@dataclass
class PPOArgs(PolicySettings, BaseArgs):
    """Stage 3: several PPO policies side by side on the shared base."""

    sft_adapter: str | None = _f("auto", "reference/initial policy: auto (run_dir/adapters/sft if present), a path, or none")
    reward_adapter: str = _f("auto", "reward adapter: auto (run_dir/adapters/reward), a path or a Hub id")
    reward_score_index: int | None = _f(None, "which output of a reward adapter's score head scores, when it has "
                                              "several (old TRL 2-label adapters: 1); null: it has one")
    policies: list[dict] = _f([{"name": "policy_a"}], "the policies, each a dict of a name and PolicySpec overrides")
    sweep: dict[str, Any] | list[dict] | None = _f(None, "a population: {grid: {setting: [values]}} (every combination) and/or "
                                         "{list: [{setting: value}, ...]} over any per-policy setting; each becomes "
                                         "a policy named by its settings (e.g. lr3e-4_kl2), beside `policies`")
    schedule: str = _f("none", "what a ranking does to the policies every `every` iterations: none; halving (the "
                               "best `keep` fraction goes on, the rest stop training and keep their adapter); pbt "
                               "(the bottom pbt_quantile take a top policy's weights and training state, then perturb "
                               "its settings)")
    every: int = _f(10, "halving, pbt: iterations between two rankings of the policies")
    keep: float = _f(0.5, "halving: the fraction of the policies that goes on at each ranking (at least one)")
    grace: int = _f(0, "halving, pbt: rankings before this iteration only report, none stops or copies a policy; "
                       "raise it when your settings' learning curves cross late (early rankings favour fast "
                       "starters: docs/sweeps.md); 0: act from the first ranking")
    pbt_quantile: float = _f(0.25, "pbt: the bottom fraction that copies a policy of the top fraction")
    rank_by: str = _f("reward_model", "what ranks the policies on held-out prompts: reward_model (the reward "
                                      "adapter's mean) or one of reward_functions (a verifier, a gold scorer)")
    max_kl: float | None = _f(None, "ranking: a policy whose held-out KL to the reference is above this ranks below "
                                    "every policy within it, whatever its reward (null: no limit)")
    min_distinct_2: float | None = _f(0.8, "ranking: a policy whose held-out distinct-2 is below this fraction of the "
                                           "reference's ranks below every policy above it (null: no floor)")
    rank_prompts: int = _f(32, "ranking: held-out prompts each policy answers (twice) at each ranking; taken after "
                               "the first eval_prompts when the held-out set has enough, so the final evaluation is "
                               "not what selected")
    total_steps: int = _f(20, "PPO iterations (rollout + update)")
    prompts_per_policy: int = _f(32, "prompts each policy answers per iteration")
    max_prompt_length: int = _f(64, "drop prompts longer than this many tokens")
    max_new_tokens: int = _f(32, "response length limit")
    top_k: int = _f(0, "top-k sampling (0: off)")
    top_p: float = _f(1.0, "nucleus sampling")
    ppo_epochs: int = _f(4, "passes over each rollout batch")
    mini_batch_size: int = _f(8, "rows per optimizer step")
    gradient_accumulation_steps: int = _f(1, "micro-batches per mini-batch (every token weighs the same in the "
                                             "mini-batch's loss, however many micro-batches it is split into)")
    forward_batch_size: int = _f(64, "rows per no-grad pass (scoring, reference and old log-probs); lower it "
                                     "when the full-vocabulary logits of that many rows do not fit")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    vf_clip_coef: float | None = _f(0.2, "value clip (null: off)")
    value_loss_norm: bool = _f(True, "divide the value loss by max(1, the variance of the policy's returns "
                                     "of the iteration, over all its rows and processes): with the value head on the policy's LoRA, a large kl_coef "
                                     "(tight kl_target) otherwise blows the value loss up and its gradient moves "
                                     "the policy off; false: old TRL's value loss (docs/kl-control.md)")
    gamma: float = _f(1.0, "discount")
    kl_horizon: float = _f(3.0, "adaptive KL controller (PI on log kl_coef, marl/ppo/kl.py): integral time in PPO "
                                 "iterations; a constant log error e = log(KL / kl_target) moves log kl_coef by e "
                                 "per kl_horizon iterations")
    kl_kp: float = _f(1.5, "adaptive KL controller: proportional gain on the change of log(KL / kl_target)")
    kl_estimator: str = _f("k1", "per-token KL estimator: k1, k3, abs or mse (k2; abs and mse as old TRL)")
    kl_bound: float = _f(5.0, "eval: mean KL a policy should stay under")
    whiten_advantages: bool = _f(True, "normalise advantages per batch")
    reward_clip: float | None = _f(10.0, "clip scores to [-c, c] (null: off)")
    reward_functions: dict[str, str] = _f({}, "extra rewards: name -> module:function, called as TRL's "
                                                  "fn(prompts, completions, **columns) -> floats (None: no score)")
    missing_eos_penalty: float | None = _f(None, "subtract this from the score of responses without EOS")
    save_steps: int = _f(10, "checkpoint every N iterations")
    resume: bool = _f(False, "continue from run_dir/checkpoints/ppo")
    eval_prompts: int = _f(64, "held-out prompts scored before and after training")
    eval_samples_per_prompt: int = _f(4, "answers sampled per held-out prompt (more: less noisy before/after)")
    log_samples: int = _f(2, "sample responses printed per policy at each log")
    mixed_batch: bool = _f(True, "generate all policies in one mixed-adapter batch (false: one call each)")
    value_model: str = _f("head", "head: each policy's value head sits on its own LoRA (old TRL); adapter: a "
                                  "separate critic LoRA + value head per policy, so the value loss never reaches "
                                  "the policy (one more pass per update; the critic is kept in checkpoints): for "
                                  "when the value loss moves the policy even with value_loss_norm (measured: "
                                  "bench/RESULTS.md, docs/kl-control.md)")
    critic_init: str = _f("policy", "value_model adapter: the critic starts as a copy of the policy's LoRA with a "
                                    "fresh value head (policy), or as the reward adapter with its score head (reward, "
                                    "as TRL's later PPOTrainer initialised its value model)")
    multi_lora: str = _f("batched", "batched: all policies in one pass (stacked LoRA); peft: peft's per-adapter path")
    update_pass_rows: int = _f(0, "rows per forward/backward of the batched update, dealt policy by policy (0: one "
                                  "policy's micro-batch, so neither activations nor gradients grow with the number "
                                  "of policies; more: fewer, larger passes mixing policies, and more memory)")
    logprob_chunk_tokens: int = _f(256, "tokens per chunk of the LM head + log-softmax in every log-prob pass: the "
                                        "largest logits block is (chunk, vocabulary) float32 (156 MB at 152k tokens)")
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer in backward instead of keeping its "
                                             "activations (PPO update passes): less memory, ~1/3 more compute")
    disable_dropout: bool = _f(True, "run the policy and critic passes of the update without dropout (the base's "
                                     "and the LoRA adapters'), as the old log-probs were taken, so the first "
                                     "minibatch's ratio is 1 and the clip sees only the policy's change (TRL's "
                                     "trainers do the same); false: dropout on in the update, as before")
    reuse_first_forward: bool = _f(True, "one policy updated alone, with disable_dropout: the old log-probs and "
                                         "values of the rows of the update's first micro-batch are its forward, "
                                         "detached, instead of the old pass (the same numbers); all rows when one "
                                         "micro-batch holds them (mini_batch_size and its micro-batch >= "
                                         "prompts_per_policy): no old pass at all; false: every row in the old pass")
    stack_reference: bool = _f(True, "run the reference pass and the old-policy pass as one stacked multi-LoRA pass "
                                     "(the reference one more group of rows; multi_lora: batched, adapters the "
                                     "stacked path computes), forward_batch_size rows a pass in all: the same "
                                     "numbers to float rounding, one pass over the base instead of two; false: "
                                     "two passes")

    def __post_init__(self):
        super().__post_init__()
        check_range(self, positive=("learning_rate", "temperature", "max_grad_norm", "clip_coef", "kl_horizon",
                                    "vf_clip_coef", "reward_clip", "kl_bound"),
                    at_least_one=("total_steps", "prompts_per_policy", "max_prompt_length", "max_new_tokens",
                                  "ppo_epochs", "mini_batch_size", "gradient_accumulation_steps", "save_steps",
                                  "eval_prompts", "eval_samples_per_prompt"),
                    non_negative=("kl_coef", "beta", "vf_coef", "missing_eos_penalty"))
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise MarlError(f"top_p: {self.top_p} must be in (0, 1] and top_k: {self.top_k} >= 0")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.gae_lambda <= 1.0):
            raise MarlError(f"gamma ({self.gamma}) and gae_lambda ({self.gae_lambda}) must be in [0, 1]")
        if self.multi_lora not in ("batched", "peft"):
            raise MarlError(f"multi_lora: {self.multi_lora!r} must be batched or peft")
        if self.value_model not in ("head", "adapter"):
            raise MarlError(f"value_model: {self.value_model!r} must be head or adapter")
        if self.forward_batch_size < 1:
            raise MarlError(f"forward_batch_size: {self.forward_batch_size} must be >= 1")
        if self.critic_init not in ("policy", "reward"):
            raise MarlError(f"critic_init: {self.critic_init!r} must be policy or reward")
        if self.update_pass_rows < 0:
            raise MarlError(f"update_pass_rows: {self.update_pass_rows} must be >= 0 (0: one policy's micro-batch)")
        if self.logprob_chunk_tokens < 1:
            raise MarlError(f"logprob_chunk_tokens: {self.logprob_chunk_tokens} must be >= 1 (e.g. 256)")
        if self.kl_kp < 0:
            raise MarlError(f"kl_kp: {self.kl_kp} must be >= 0 (0: the integral part alone)")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise MarlError(f"kl_estimator: {self.kl_estimator!r} must be k1, k3, abs or mse")
        if self.prompts_per_policy % self.mini_batch_size:
            raise MarlError(f"prompts_per_policy ({self.prompts_per_policy}) must be a multiple of "
                            f"mini_batch_size ({self.mini_batch_size})")
        self._check_policy(self.policy({"name": "(shared)"}), "")
        _check_sweep(self.sweep)
        entries = self.policy_entries()
        if not entries:
            raise MarlError("policies: list at least one policy, e.g. policies: [{name: policy_a}], or give a sweep")
        known = {f.name for f in dataclasses.fields(PolicySpec)}
        seen = set()
        for p in entries:
            if not isinstance(p, dict) or "name" not in p:
                raise MarlError(f"policies: each entry needs a name, got {p!r}")
            bad = set(p) - known
            if bad:
                raise MarlError(f"policies[{p['name']}]: unknown key {sorted(bad)[0]!r}; known: {', '.join(sorted(known))}")
            if p["name"] in seen:
                raise MarlError(f"policies: duplicate policy name {p['name']!r}: give each policy its own name")
            if p["name"] in ("sft", "reward", "ref", "__base__") or p["name"] == self.reward_adapter:
                raise MarlError(f"policies: {p['name']!r} is the name of another role: call it policy_<x>")
            seen.add(p["name"])
            self._check_policy(self.policy(p), f"policies[{p['name']}]: ")
        if self.value_model == "adapter":
            taken = sorted(seen & {critic_name(n) for n in seen})
            if taken:
                raise MarlError(f"policies: {taken[0]!r} is the name of another policy's critic "
                                "(value_model: adapter): give it another name")
        self._check_schedule(entries)

    def _check_policy(self, r: "ResolvedPolicy", where: str) -> None:
        """One line for a per-policy setting out of range (`where`: "" for the shared values, else the policy)."""
        for key, low, strict in (("learning_rate", 0, True), ("temperature", 0, True), ("clip_coef", 0, True),
                                 ("kl_coef", 0, False), ("beta", 0, False), ("vf_coef", 0, False)):
            value = getattr(r, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > low if strict
                                                                                      else value >= low):
                raise MarlError(f"{where}{key}: {value!r} must be a number {'>' if strict else '>='} {low}")
        if not 0.0 <= r.gae_lambda <= 1.0:
            raise MarlError(f"{where}gae_lambda: {r.gae_lambda} must be in [0, 1]")
        if r.reward_norm not in REWARD_NORMS:
            raise MarlError(f"{where}reward_norm: {r.reward_norm!r} must be none, batch or running")
        if r.kl_target is not None and (r.kl_target <= 0 or r.kl_coef <= 0):
            raise MarlError(f"{where}kl_target: {r.kl_target} needs kl_target > 0 and an initial kl_coef > 0 (the "
                            "adaptive controller scales it)")
        if r.optim not in OPTIMIZERS:
            raise MarlError(f"{where}optim: {r.optim!r} must be one of {', '.join(OPTIMIZERS)}")
        if r.optim == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise MarlError(f"{where}optim: adamw_8bit needs bitsandbytes (pip install bitsandbytes), or set optim: adam")
        if r.advantage_estimator not in ESTIMATORS:
            raise MarlError(f"{where}advantage_estimator: {r.advantage_estimator!r} must be one of "
                            f"{', '.join(ESTIMATORS)}")
        if r.kl_in not in ("reward", "loss"):
            raise MarlError(f"{where}kl_in: {r.kl_in!r} must be reward or loss")
        if r.advantage_estimator in GROUP_ESTIMATORS and (r.num_generations < 2
                                                          or self.prompts_per_policy % r.num_generations):
            raise MarlError(f"{where}num_generations ({r.num_generations}) must be >= 2 and divide prompts_per_policy "
                            f"({self.prompts_per_policy}) for advantage_estimator {r.advantage_estimator}: each prompt "
                            "is answered num_generations times")
        if where and r.kl_in == "loss" and r.kl_target is not None:  # the controller steers kl_coef, unused then
            raise MarlError(f"{where}kl_in: loss with kl_target {r.kl_target:g}: the KL controller steers kl_coef, "
                            "which kl_in: loss does not use (its weight is beta, fixed): set kl_target: null for "
                            f"{r.name}, or kl_in: reward")

    def _check_schedule(self, entries: list[dict]) -> None:
        if self.schedule not in SCHEDULES:
            raise MarlError(f"schedule: {self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        check_range(self, positive=("max_kl",), at_least_one=("every", "rank_prompts"), non_negative=("grace",))
        if not 0.0 < self.keep < 1.0 or not 0.0 < self.pbt_quantile <= 0.5:
            raise MarlError(f"keep ({self.keep}) must be in (0, 1) and pbt_quantile ({self.pbt_quantile}) in (0, 0.5]")
        if self.min_distinct_2 is not None and not 0.0 <= self.min_distinct_2 <= 1.0:
            raise MarlError(f"min_distinct_2: {self.min_distinct_2} must be in [0, 1] (a fraction of the reference's)")
        if self.rank_by != "reward_model" and self.rank_by not in self.reward_functions:
            raise MarlError(f"rank_by: {self.rank_by!r} is neither reward_model nor one of reward_functions "
                            f"({', '.join(self.reward_functions) or 'none'})")
        if self.schedule != "none" and self.grace >= self.total_steps:
            raise MarlError(f"grace: {self.grace} >= total_steps ({self.total_steps}): schedule {self.schedule} would "
                            "never act; lower grace below total_steps, or set schedule: none")
        if self.schedule != "none" and len(entries) < 2:
            raise MarlError(f"schedule: {self.schedule} ranks a population: give a sweep or at least two policies")
        if self.schedule == "pbt" and self.value_model == "adapter":
            critics = {self.policy(p).has_critic for p in entries}
            if len(critics) > 1:
                raise MarlError("schedule: pbt with value_model: adapter needs every policy with a critic or none "
                                "(an exploit copies the critic too): sweep critic-free estimators apart, or use "
                                "value_model: head")

    def policy_entries(self) -> list[dict]:
        """Every policy of the run as a PolicySpec dict: `policies`, then one per setting of `sweep`, named by
        its settings (marl.ppo.population.policy_name)."""
        entries = [dict(p) if isinstance(p, dict) else p for p in self.policies]
        if self.sweep:
            values = sweep_values(self.sweep)
            entries += [{"name": policy_name(s, values), **s} for s in expand_sweep(self.sweep)]
        return entries

    def resolved_policies(self) -> list["ResolvedPolicy"]:
        """The effective settings of every policy of the run (`policy_entries`)."""
        return [self.policy(p) for p in self.policy_entries()]

    def policy(self, spec: dict) -> "ResolvedPolicy":
        """A policy's effective settings: its overrides over the shared ones."""
        out = {}
        for name in PER_POLICY:
            v = spec.get(name)
            if name == "kl_target" and name in spec and v is None:
                out[name] = None  # an explicit null: this policy's kl_coef stays fixed
                continue
            out[name] = getattr(self, name) if v is None else v
        return ResolvedPolicy(name=spec["name"], **out)


def _check_sweep(sweep) -> None:
    """One line for a sweep that is not {grid: {setting: [values]}, list: [{setting: value}, ...]} (or a list)."""
    if sweep is None:
        return
    if isinstance(sweep, list):
        sweep = {"list": sweep}
    shape = "write sweep: {grid: {learning_rate: [1.0e-4, 3.0e-4]}} or {list: [{kl_target: 2}, {kl_target: 6}]}"
    if not isinstance(sweep, dict) or set(sweep) - {"grid", "list"}:
        raise MarlError(f"sweep: {sweep!r} has keys other than grid and list: {shape}")
    grid, entries = sweep.get("grid") or {}, sweep.get("list") or []
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise MarlError(f"sweep: grid must map each setting to a non-empty list of values: {shape}")
    if not isinstance(entries, list) or any(not isinstance(e, dict) for e in entries):
        raise MarlError(f"sweep: list must be a list of {{setting: value}} mappings: {shape}")


STAGES = {"sft": SFTArgs, "reward": RewardArgs, "ppo": PPOArgs}


# report_to names and the modules they need (any one of them); "none" and "all" need none
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "clearml": ("clearml",), "neptune": ("neptune",), "trackio": ("trackio",),
            "dvclive": ("dvclive",), "swanlab": ("swanlab",), "codecarbon": ("codecarbon",)}


def _installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
        return False


def check_trackers(report_to: str | list[str]) -> None:
    """One line for a tracker that does not exist or is not installed (the Trainer raised mid-setup)."""
    for name in [report_to] if isinstance(report_to, str) else report_to:
        if name in ("none", "all", None, ""):
            continue
        if name not in TRACKERS:
            raise MarlError(f"report_to: {name!r} is not a tracker marl knows: use {', '.join(TRACKERS)} or none")
        if not any(_installed(m) for m in TRACKERS[name]):
            raise MarlError(f"report_to: {name} is not installed: pip install {TRACKERS[name][0]}, or --report_to "
                            "none")


def check_range(cfg, positive: tuple[str, ...] = (), at_least_one: tuple[str, ...] = (),
                non_negative: tuple[str, ...] = ()) -> None:
    """One-line errors for numeric settings out of range (None means unset and passes)."""
    for key in positive:
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise MarlError(f"{key}: {value} must be > 0")
    for key in non_negative:
        value = getattr(cfg, key)
        if value is not None and not value >= 0:
            raise MarlError(f"{key}: {value} must be >= 0")
    for key in at_least_one:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise MarlError(f"{key}: {value} must be >= 1")


# --------------------------------------------------------------------------- parsing


def critic_name(policy: str) -> str:
    """The adapter that holds policy `policy`'s critic (PPO `value_model: adapter`)."""
    return f"{policy}_critic"


def _coerce(value: Any, tp, key: str):
    """Turn a YAML/CLI value into the field's type, or raise a one-line error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        errors = []
        for a in sorted(args, key=lambda a: a is str):  # str last: "[a, b]" is a list if a list is allowed
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except MarlError as e:
                errors.append(str(e))
        raise MarlError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise MarlError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise MarlError(f"{key}: expected a number, got {value!r}")
        try:
            v = yaml.safe_load(value) if isinstance(value, str) else value
            if tp is int and isinstance(v, float) and not v.is_integer():
                raise ValueError
            return tp(v)
        except (TypeError, ValueError):
            raise MarlError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise MarlError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, dict):
        v = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(v, origin):
            raise MarlError(f"{key}: expected a {origin.__name__}, got {value!r}")
        return v
    return value


def load_config(cls, path: str | None = None, overrides: list[str] | None = None):
    """Build a stage config from a YAML file and `--key value` / `--key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise MarlError(f"config file {path} does not exist: see configs/ for the stage configs")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise MarlError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise MarlError(f"config file {path} must be a mapping of key: value")
    raw.update(parse_overrides(overrides or []))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; see `marl {_stage_name(cls)} --help`"
            raise MarlError(f"unknown config key {key!r} for {_stage_name(cls)}{hint}")
        values[key] = _coerce(value, hints[key], key)
    return cls(**values)


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`['--lr', '1e-4', '--x=y']` -> {'lr': '1e-4', 'x': 'y'} (values stay strings; typed later)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise MarlError(f"unexpected argument {arg!r}: overrides are written --key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise MarlError(f"--{key} needs a value: write --{key} VALUE")
            i += 1
            value = argv[i]
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _stage_name(cls) -> str:
    return {v: k for k, v in STAGES.items()}.get(cls, cls.__name__)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls) -> str:
    """Help text: every key, its default and what it does."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name} (default: {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
