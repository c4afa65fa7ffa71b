"""Old TRL's `AutoModelForCausalLMWithValueHead` on one `MultiAdapterModel`."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from marl.chat import turn_end_ids
from marl.errors import MarlError
from marl.io import load_tensors, read_json
from marl.model import (ADAPTER_META, MultiAdapterModel, last_token_index, position_ids_from_mask,
                        resolve_adapter_path, reward_token_index)


logger = logging.getLogger(__name__)

# old TRL's value-head options: marl's value heads are a plain linear layer (docs/migrating-from-trl.md)
_VALUE_HEAD_KWARGS = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")


def default_lora_config():
    """The policy adapter `from_pretrained` adds without a `peft_config`: r=16, alpha 32, every
    linear layer, no dropout (PPO's probability ratios need a deterministic policy)."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")


class ValueHead:
    """`model.v_head`: a policy's value head as old TRL exposed it. `summary` is the linear layer
    (hidden -> 1); calling it maps hidden states (B, T, H) to values (B, T, 1). Unlike old TRL's it
    has no dropout."""

    def __init__(self, linear: nn.Linear):
        self.summary = linear

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.to(self.summary.weight.dtype))

    def __getattr__(self, name):
        return getattr(self.summary, name)


class AutoModelForCausalLMWithValueHead(nn.Module):
    """Old TRL's value-head model: named LoRA policies (each with a value head) and a reward
    adapter (with its score head) on one shared `MultiAdapterModel`.

    Attributes:
        marl_model: the `MultiAdapterModel` underneath.
        policy_adapter_name: the policy `from_pretrained` made ("default" unless `adapter_name=`, or the
            active adapter of a peft model passed in); `save_pretrained` writes it at the folder's root.
        reward_adapter_name: the reward adapter's name, or None without one.
        score: the reward adapter's score head with all its outputs (old TRL's `score`), or None.
        reward_append_eos: append EOS to reward inputs that lack it (see `compute_reward_score`).
        gradient_checkpointing: `PPOTrainer.step` recomputes the decoder layers in its backward
            (`gradient_checkpointing_enable()`).
    """

    is_peft_model = True  # old TRL's flag: marl's policies are always peft adapters

    def __init__(self, marl_model: MultiAdapterModel, policy_adapter_name: str,
                 reward_adapter_name: str | None = None, reward_append_eos: bool = True,
                 score: nn.Linear | None = None):
        super().__init__()
        self.marl_model = marl_model
        self.policy_adapter_name = policy_adapter_name
        self.reward_adapter_name = reward_adapter_name
        self.reward_append_eos = reward_append_eos
        self.score = score
        self.gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, peft_config=None, reward_adapter: str | None = None,
                        reward_adapter_name: str = "reward_adapter", quantization_config=None,
                        adapter_name: str = "default", reward_append_eos: bool = True,
                        reward_score_index: int | None = None, trust_remote_code: bool = False,
                        is_trainable: bool = True, tokenizer=None, **kwargs) -> "AutoModelForCausalLMWithValueHead":
        """The base once, the policy adapter with a value head, and the reward adapter (a local folder
        or Hub id) with its score head.

        `pretrained_model_name_or_path` is one of:
        - a model name or folder: the base is loaded (`quantization_config` a `BitsAndBytesConfig`, or the
          old `load_in_8bit=` / `load_in_4bit=` / `torch_dtype=`; other kwargs go to transformers) and the
          policy `adapter_name` is added from `peft_config`;
        - a folder (or Hub repo) with an adapter_config.json: written by `save_pretrained` / `push_to_hub`
          (its policies and value heads are reloaded) or by peft's `save_pretrained` (its adapter is the
          policy, with a fresh value head), onto the base it names;
        - a transformers causal LM already loaded (any precision, 8/4-bit, after
          `prepare_model_for_kbit_training`): used in place, the policy added from `peft_config`;
        - a peft `PeftModel`: used in place; its active LoRA adapter is the policy, under its own name,
          and its other adapters stay loaded (frozen).

        Without `peft_config` (old TRL then trained the whole model), the policy is a LoRA adapter of
        `default_lora_config()`, said in one warning: marl trains adapters only. A reward adapter whose
        score head has several outputs keeps them all in `compute_reward_score`; `reward_score_index`
        picks the one marl's own per-row scoring (`marl_model.compute_reward_score`) reads (default 0).
        `is_trainable` is accepted for old code: marl's policies are always trainable. `tokenizer` is
        needed only for a model instance without a `name_or_path`.
        """
        if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
            raise MarlError(f"reward_adapter is a {type(reward_adapter).__name__}: give the folder or Hub id of the "
                            "reward adapter (peft's save_pretrained of the reward model)")
        if bad := [k for k in _VALUE_HEAD_KWARGS if k in kwargs]:
            raise MarlError(f"{bad[0]}: marl's value heads are one linear layer, no dropout, small random weights "
                            "and a zero bias: drop the argument (docs/migrating-from-trl.md)")
        _check_peft_config(peft_config)
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            marl_model, policy = _load(str(pretrained_model_name_or_path), peft_config, adapter_name,
                                       quantization_config, trust_remote_code, tokenizer, kwargs)
        elif isinstance(pretrained_model_name_or_path, nn.Module):
            if quantization_config is not None or kwargs:
                given = ["quantization_config"] * (quantization_config is not None) + sorted(kwargs)
                raise MarlError(f"{', '.join(given)}: the model is already loaded, so loading options do not apply; "
                                "pass them to its from_pretrained, or pass its name instead of the model")
            marl_model, policy = _wrap(pretrained_model_name_or_path, peft_config, adapter_name, tokenizer)
        else:
            raise MarlError(f"from_pretrained got a {type(pretrained_model_name_or_path).__name__}: give a model name "
                            "or folder, a transformers causal LM, or a peft model")
        score = None
        if reward_adapter is not None:
            score = _full_score_head(str(reward_adapter))
            index = reward_score_index if reward_score_index is not None or score.out_features == 1 else 0
            marl_model.load_adapter(str(reward_adapter), reward_adapter_name, role="reward", score_index=index)
            score = score.to(marl_model.device)
        marl_model.set_adapter(policy)
        model = cls(marl_model, policy, reward_adapter_name if reward_adapter is not None else None,
                    reward_append_eos, score)
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
            peft_config = self.marl_model.lora_config(self.policy_adapter_name)
        self.marl_model.add_adapter(adapter_name, peft_config, role="policy")

    @property
    def pretrained_model(self) -> "_PeftView":
        """The peft model, as old TRL exposed it; `add_adapter` / `set_adapter` on it go through marl."""
        return _PeftView(self)

    @property
    def v_head(self) -> ValueHead:
        """The value head of the active policy (`v_head.summary` is its linear layer)."""
        name = self.active_adapter
        head = self.marl_model.value_head(name)
        if head is None:
            raise MarlError(f"the active adapter {name!r} has no value head: set_adapter() one of {self.policy_adapters}")
        return ValueHead(head)

    @property
    def config(self):
        return self.marl_model.base.config

    @property
    def is_loaded_in_8bit(self) -> bool:
        return self.marl_model.quantization == "8bit"

    @property
    def is_loaded_in_4bit(self) -> bool:
        return self.marl_model.quantization == "4bit"

    @property
    def supports_rm_adapter(self) -> bool:
        return self.reward_adapter_name is not None

    @property
    def rm_adapter_name(self) -> str | None:
        return self.reward_adapter_name

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """Old TRL's names: the peft model's parameters under `pretrained_model.` (a LoRA weight's name holds
        `lora_` and its adapter's name), the active policy's value head as `v_head.summary.*` (another
        policy's as `v_head.<name>.summary.*`) and the reward adapter's score head as `score.*`.
        `parameters()` yields the same tensors."""
        if not recurse:
            return
        dot = f"{prefix}." if prefix else ""
        m = self.marl_model
        lm = m.peft if m.peft is not None else m.base
        yield from lm.named_parameters(prefix=f"{dot}pretrained_model", remove_duplicate=remove_duplicate)
        for name in self.policy_adapters:
            head = m.value_head(name)
            if head is not None:
                where = "v_head" if name == self.active_adapter else f"v_head.{name}"
                yield from head.named_parameters(prefix=f"{dot}{where}.summary")
        if self.score is not None:
            yield from self.score.named_parameters(prefix=f"{dot}score")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **_ignored) -> None:
        """Recompute the decoder layers in `PPOTrainer.step`'s backward (marl's own checkpointing: it keeps
        the adapter of each forward, docs/known-issues.md #12), as `PPOConfig(gradient_checkpointing=True)`."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def enable_input_require_grads(self) -> None:
        """The base's `enable_input_require_grads` (old TRL passed it through; marl's update needs none)."""
        self.marl_model.base.enable_input_require_grads()

    # ---- forward passes

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """(logits (B, T, V), loss or None, values (B, T)) of the active policy, like old TRL's model."""
        head = self.v_head
        out = self.marl_model(input_ids, attention_mask, output_hidden_states=True, **kwargs)
        values = head(out.hidden_states[-1]).squeeze(-1)
        return out.logits, getattr(out, "loss", None), values

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **generation_kwargs):
        """`generate` with the active policy adapter."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.marl_model.generate(input_ids, attention_mask, adapter_names=self.active_adapter,
                                        **generation_kwargs)

    @torch.no_grad()
    def compute_reward_score(self, input_ids, attention_mask=None, ppo_adapter_name: str | None = None,
                             **kwargs) -> torch.Tensor:
        """The reward adapter's score head at every token, (B, T, num_labels), as old TRL returned it, with
        each row's score written from its reward token to the end: `raw[:, -1]` reads every row's score,
        left or right padded.

        The reward token is where RewardTrainer's classifier read the score (the row's last token that is
        not the pad token; with pad = EOS, the token before the final EOS: docs/known-issues.md #7), so
        `raw[:, -1, k]` equals the classifier's logit k. Positions before it hold their own per-token
        scores. With `reward_append_eos`, a row not ending in EOS is scored with one appended after its last
        token (TRL's RewardTrainer trained on text + EOS, docs/known-issues.md #2); when pad is not EOS,
        pad tokens at either end of a row are not scored. Afterwards `ppo_adapter_name` is the active
        adapter (or, if not given, the one active before). Other kwargs (token_type_ids, ...) are ignored.
        """
        if self.reward_adapter_name is None:
            raise MarlError("this model has no reward adapter: pass reward_adapter= to from_pretrained")
        m, tok = self.marl_model, self.marl_model.tokenizer
        if ppo_adapter_name is not None and ppo_adapter_name not in m.adapter_names:
            raise MarlError(f"ppo_adapter_name {ppo_adapter_name!r} is not an adapter of this model: use one of "
                            f"{self.policy_adapters}")
        restore = ppo_adapter_name if ppo_adapter_name is not None else m.active_adapter
        T = input_ids.shape[1]
        ids, mask = input_ids, self._reward_mask(input_ids, attention_mask)
        if self.reward_append_eos:
            ids, mask = _append_eos(ids, mask, tok.eos_token_id, tok.pad_token_id, turn_end_ids(tok))
        try:
            m.set_adapter(self.reward_adapter_name)
            with m.eval_mode():  # scores never sample the reward adapter's LoRA dropout
                hidden = m.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                    use_cache=False).last_hidden_state
        finally:
            m.set_adapter(restore)
        raw = self.score(hidden.to(self.score.weight.dtype)).float()  # (B, T or T + 1, K)
        at = reward_token_index(ids, mask, tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
        score = raw[torch.arange(len(at), device=at.device), at]  # (B, K)
        from_reward_token = torch.arange(T, device=at.device)[None, :] >= at.clamp(max=T - 1)[:, None]  # (B, T)
        return torch.where(from_reward_token[..., None], score[:, None, :], raw[:, :T])

    def _reward_mask(self, input_ids, attention_mask):
        """The attention mask (ones if None) without the pad tokens at either end of a row when pad is not
        EOS (a batch passed without a mask); with pad = EOS a final EOS run is read past anyway."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        tok = self.marl_model.tokenizer
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            return mask
        pad = (input_ids == tok.pad_token_id).long()
        ends = pad.cumprod(1) | pad.flip(1).cumprod(1).flip(1)
        return mask * (1 - ends)

    # ---- saving

    def save_pretrained(self, save_directory: str | os.PathLike, **_ignored) -> None:
        """Write every policy adapter with its value head, in peft's layout: `policy_adapter_name` at
        the root, the others in `<name>/` (each also loads with plain `PeftModel.from_pretrained`).

        Files already in `save_directory` that are not an adapter's stay. The reward adapter is not
        copied: it is loaded from where it came from. Old TRL's other options (`safe_serialization`,
        `max_shard_size`) are accepted: marl always writes safetensors.
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


def _check_peft_config(peft_config) -> None:
    if peft_config is None:
        return
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise MarlError(f"peft_config is a {type(peft_config).__name__}: marl's policies are LoRA adapters; pass a "
                        "peft.LoraConfig")


def _load(name: str, peft_config, adapter_name: str, quantization_config, trust_remote_code: bool, tokenizer,
          kwargs: dict) -> tuple[MultiAdapterModel, str]:
    """The base loaded by name, with the policy: a new adapter, or the saved ones of an adapter folder."""
    from peft import LoraConfig

    kwargs = dict(kwargs)
    kwargs.pop("is_trainable", None)
    saved = _saved_policies(name)
    if saved is not None and peft_config is not None:
        logger.warning("peft_config is ignored: %s holds a saved adapter, which is the policy (as old TRL did)", name)
        peft_config = None
    if saved is None and peft_config is None:
        peft_config = default_lora_config()
        logger.warning("no peft_config: marl trains LoRA adapters, not full models, so %s gets a LoRA adapter %r "
                       "(r=%d, lora_alpha=%d, all linear layers); pass peft_config=LoraConfig(...) to choose",
                       name, adapter_name, peft_config.r, peft_config.lora_alpha)
    base_name = read_json(saved / "adapter_config.json").get("base_model_name_or_path") if saved else name
    if not base_name:
        raise MarlError(f"{name}/adapter_config.json names no base model (base_model_name_or_path)")
    load = _load_kwargs(quantization_config, kwargs)
    marl_model = MultiAdapterModel.from_pretrained(base_name, trust_remote_code=trust_remote_code, **load)
    if tokenizer is not None:
        marl_model.tokenizer = tokenizer
    if saved is None:
        marl_model.add_adapter(adapter_name, peft_config, role="policy")
    elif (saved / "value_head.safetensors").exists():  # marl's save_pretrained: the policies with their heads
        marl_model.load_adapter(str(saved), adapter_name, role="policy", trainable=True)
        for sub in sorted(p for p in saved.iterdir() if (p / ADAPTER_META).exists()):
            if read_json(sub / ADAPTER_META).get("role") == "policy":
                marl_model.load_adapter(str(sub), sub.name, role="policy", trainable=True)
    else:  # peft's save_pretrained: the adapter, with a fresh value head (as old TRL gave it)
        marl_model.add_adapter(adapter_name, LoraConfig.from_pretrained(str(saved)), role="policy")
        marl_model.load_adapter_weights(adapter_name, saved)
    return marl_model, adapter_name


def _wrap(model: nn.Module, peft_config, adapter_name: str, tokenizer) -> tuple[MultiAdapterModel, str]:
    """A model the user loaded, used in place, with its policy: the peft model's active adapter, or a new one."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if peft_config is not None:
            logger.warning("peft_config is ignored: the peft model's active adapter %r is the policy (as old TRL did)",
                           model.active_adapter)
        policy = model.active_adapter
        return MultiAdapterModel.from_model(model, tokenizer, roles={policy: "policy"}), policy
    marl_model = MultiAdapterModel.from_model(model, tokenizer)
    if peft_config is None:
        peft_config = default_lora_config()
        logger.warning("no peft_config: marl trains LoRA adapters, not full models, so the %s gets a LoRA adapter %r "
                       "(r=%d, lora_alpha=%d, all linear layers); pass peft_config=LoraConfig(...) to choose",
                       type(model).__name__, adapter_name, peft_config.r, peft_config.lora_alpha)
    marl_model.add_adapter(adapter_name, peft_config, role="policy")
    return marl_model, adapter_name


def _full_score_head(reward_adapter: str) -> nn.Linear:
    """The reward adapter's score head with all its outputs (num_labels), read from its folder."""
    folder = resolve_adapter_path(reward_adapter)
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise MarlError(f"reward adapter {reward_adapter!r} has no adapter_model.safetensors"
                        + (" (adapter_model.bin is a pickle file, which marl does not read)"
                           if (folder / "adapter_model.bin").exists() else "")
                        + ": save it again with peft's save_pretrained, which writes safetensors")
    score = {k.rsplit(".", 1)[-1]: v for k, v in load_tensors(weights).items()
             if ".score." in k or k.startswith("score.")}
    if "weight" not in score:
        raise MarlError(f"reward adapter {reward_adapter!r} has no score head: train it with `marl reward` (or "
                        "TRL's RewardTrainer with a peft SEQ_CLS config)")
    head = nn.Linear(score["weight"].shape[1], score["weight"].shape[0], bias="bias" in score)
    head.load_state_dict({k: v.float() for k, v in score.items()})
    return head.requires_grad_(False)


def _append_eos(ids: torch.Tensor, mask: torch.Tensor, eos: int, pad: int | None, turn_end: list[int] = ()):
    """(B, T) ids and mask with EOS put right after the last attended token of each row that does not end
    in it, in one more column when any row needs it; earlier tokens keep their positions. A row that ends with
    the chat template's end of turn (`turn_end`) is a conversation as RewardTrainer formats it: no EOS."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    last = last_token_index(mask)
    has_tokens = mask.bool().any(1)
    needs = ~has_tokens | (ids[rows, last] != eos)
    if turn_end:
        k = len(turn_end)
        ends = torch.tensor([bool(m[max(0, j - k + 1):j + 1].all()) and r[max(0, j - k + 1):j + 1].tolist() == turn_end
                             for r, m, j in zip(ids, mask, last.tolist())], device=ids.device)
        needs &= ~ends
    if not needs.any():
        return ids, mask
    T = ids.shape[1]
    ids = torch.cat([ids, ids.new_full((ids.shape[0], 1), eos if pad is None else pad)], 1)
    mask = torch.cat([mask, mask.new_zeros((mask.shape[0], 1))], 1)
    where = torch.where(has_tokens, last + 1, torch.full_like(last, T))
    ids[rows[needs], where[needs]] = eos
    mask[rows[needs], where[needs]] = 1
    return ids, mask


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
        if not (local / "adapter_config.json").exists():
            return None
        if (local / "pytorch_model.bin").exists() and not (local / "value_head.safetensors").exists():
            raise MarlError(f"{local}/pytorch_model.bin (old TRL's value head) is a pickle file, which marl does not "
                            "load: delete it to reload the adapter with a fresh value head")
        if not (local / "adapter_model.safetensors").exists():
            raise MarlError(f"{local} has no adapter_model.safetensors (adapter_model.bin is a pickle file, which marl "
                            "does not load): save the adapter again with peft's save_pretrained, which writes "
                            "safetensors")
        return local
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
    device_map = kwargs.get("device_map")
    if isinstance(device_map, dict) and not torch.cuda.is_available() and all(
            isinstance(d, int) for d in device_map.values()):
        kwargs["device_map"] = {k: "cpu" for k in device_map}  # the examples' {"": local_process_index}, on a CPU
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


def _upload(save, repo_id: str, commit_message: str, private: bool | None, token: str | None):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)


# --------------------------------------------------------------------------- the trainer
