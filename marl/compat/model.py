"""Old TRL's `AutoModelForCausalLMWithValueHead` on one `MultiAdapterModel`."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from marl.errors import MarlError
from marl.io import read_json
from marl.model import ADAPTER_META, MultiAdapterModel, resolve_adapter_path
from marl.ppo.rollout import pad_rows


logger = logging.getLogger(__name__)


def default_lora_config():
    """The policy adapter `from_pretrained` adds without a `peft_config`: r=16, alpha 32, every
    linear layer, no dropout (PPO's probability ratios need a deterministic policy)."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")


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
        Without `peft_config` (old TRL then trained the whole model), the policy is a LoRA adapter
        of `default_lora_config()`, said in one warning: marl trains adapters only.
        A reward adapter whose score head has several outputs (old TRL's 2-label adapters) needs
        `reward_score_index`, the output that scores (the old example read 1).
        """
        name = str(pretrained_model_name_or_path)
        saved = _saved_policies(name)
        if saved is not None and peft_config is not None:
            raise MarlError(f"{name} holds saved policy adapters: drop peft_config to continue training them")
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
        if saved is None:
            marl_model.add_adapter(adapter_name, peft_config, role="policy")
        else:
            marl_model.load_adapter(str(saved), adapter_name, role="policy", trainable=True)
            for sub in sorted(p for p in saved.iterdir() if (p / ADAPTER_META).exists()):
                if read_json(sub / ADAPTER_META).get("role") == "policy":
                    marl_model.load_adapter(str(sub), sub.name, role="policy", trainable=True)
            if marl_model.value_head(adapter_name) is None:
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
            peft_config = self.marl_model.lora_config(self.policy_adapter_name)
        self.marl_model.add_adapter(adapter_name, peft_config, role="policy")

    @property
    def pretrained_model(self) -> "_PeftView":
        """The peft model, as old TRL exposed it; `add_adapter` / `set_adapter` on it go through marl."""
        return _PeftView(self)

    @property
    def v_head(self) -> nn.Linear:
        """The value head of the active policy."""
        name = self.active_adapter
        head = self.marl_model.value_head(name)
        if head is None:
            raise MarlError(f"the active adapter {name!r} has no value head: set_adapter() one of {self.policy_adapters}")
        return head

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
        """Reward scores (B,), each read where RewardTrainer's classifier read it (the row's last token
        that is not the pad token; with pad = EOS, the token before the final EOS: docs/known-issues.md #7).

        With `reward_append_eos`, a row not ending in EOS gets one appended first: TRL's RewardTrainer
        trained the reward on text + EOS (docs/known-issues.md #2). Afterwards `ppo_adapter_name` is the active
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
        """Each row as RewardTrainer built it, right-padded again: its attended tokens without pad tokens at
        either end (a batch passed without a mask), then EOS unless it ends in one. With pad = EOS nothing
        is stripped: a final EOS run is read past anyway (docs/known-issues.md #7)."""
        tok = self.marl_model.tokenizer
        rows = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
        if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
            rows = [_strip(r, tok.pad_token_id) for r in rows]
        rows = [r if len(r) and r[-1] == tok.eos_token_id else torch.cat([r, r.new_tensor([tok.eos_token_id])])
                for r in rows]
        ids, mask = pad_rows(rows, tok.pad_token_id, "right")
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


def _strip(row: torch.Tensor, pad_id: int) -> torch.Tensor:
    """A 1-D row without the `pad_id` tokens at its start and end."""
    real = (row != pad_id).nonzero()
    return row[int(real[0]):int(real[-1]) + 1] if len(real) else row[:0]


def _upload(save, repo_id: str, commit_message: str, private: bool | None, token: str | None):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)


# --------------------------------------------------------------------------- the trainer
