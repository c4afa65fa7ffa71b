"""One shared base model, many named LoRA adapters, and the heads that go with them.

`MultiAdapterModel` loads a causal LM once (full precision, bf16, 8-bit or 4-bit)
and keeps every RLHF role on it as a named peft adapter:

- `sft`      causal-LM LoRA (stage 1), frozen later as the PPO reference;
- `reward`   the LoRA that TRL's RewardTrainer trained, with its score head;
- policies   one LoRA per PPO policy, each with its own value head.

The adapters' bookkeeping (one record each, adding, removing, trainability, switching, always
restored in `finally`) is `marl.adapters.AdapterRegistry`, which the model holds as `adapters`;
loading and saving (the base, its tokenizer, adapter folders) live in `marl.model_io`; the heads
on the hidden states in `marl.heads`. This module adds the forward passes, scoring and generation.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from . import model_io
from .adapters import ROLES, AdapterRegistry
from .chat import reward_ids
from .embedded import resolve_model
from .errors import MarlError
from .heads import lm_head_fn, output_head
from .multilora import Layout, group_layout, grouped_values, lean_lora
from .sampling import exact_sampling
# the stages, merge, compat and the bench import these from here
from .model_io import (ADAPTER_META, QUANTIZATIONS, base_fingerprint, load_base, load_tokenizer,  # noqa: F401
                       model_context, resolve_adapter_path, stop_token_ids)


class MultiAdapterModel(nn.Module):
    """A causal LM loaded once, with named LoRA adapters, value heads and score heads.

    Args:
        base: a transformers causal LM (possibly quantized).
        tokenizer: its tokenizer (pad token set).
        base_name: the name or path it was loaded from (written into manifests).
        fingerprint: `base_fingerprint(base_name)`; adapters from another base are refused.
    """

    def __init__(self, base, tokenizer, base_name: str, fingerprint: str):
        super().__init__()
        self.base = base
        self.tokenizer = tokenizer
        self.adapters = AdapterRegistry(base, base_name, fingerprint)
        # the registry's heads, registered here so they move, train and are named with the model
        self.value_heads = self.adapters.value_heads
        self.score_heads = self.adapters.score_heads

    # ---- construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        quantization: str = "none",
        bnb_4bit_compute_dtype: str = "float32",
        bnb_4bit_use_double_quant: bool = True,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        **kwargs,
    ) -> "MultiAdapterModel":
        """Load the base once (`default` means the embedded tiny model) and its tokenizer, with the chat
        template `chat_template` names (None: the tokenizer's own; marl.chat.set_chat_template)."""

        path = resolve_model(name_or_path)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, chat_template=chat_template)
        base = load_base(path, quantization=quantization, bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
                         bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
                         trust_remote_code=trust_remote_code, **kwargs)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        model = cls(base, tokenizer, base_name=name_or_path, fingerprint=base_fingerprint(path))
        model.quantization = quantization
        return model

    @classmethod
    def from_model(cls, model, tokenizer=None, roles: Mapping[str, str] | None = None) -> "MultiAdapterModel":
        """Wrap a causal LM the caller already loaded, in place (never copied: the caller's hooks,
        device map, quantization and `prepare_model_for_kbit_training` settings stay).

        `model` is a transformers causal LM (full precision, bf16, 8- or 4-bit), or a peft `PeftModel`
        of LoRA adapters on one: each of its adapters is registered under its own name with role
        `roles[name]` (default "sft": frozen, no head); a policy or critic gets a fresh value head and
        is trainable. The tokenizer is loaded from the model's `name_or_path` unless given.
        """
        from peft import PeftModel
        from transformers import PreTrainedModel

        peft = model if isinstance(model, PeftModel) else None
        base = peft.get_base_model() if peft is not None else model
        kind = type(base).__name__
        if not isinstance(base, PreTrainedModel):
            raise MarlError(f"a {kind} is not a transformers model: pass a model from AutoModelForCausalLM."
                            "from_pretrained (or a peft model on one), or its name or folder")
        if base.config.is_encoder_decoder:
            raise MarlError(f"{kind} is an encoder-decoder (seq2seq) model: marl trains decoder-only causal LMs; "
                            "use a causal LM (AutoModelForCausalLM) as the base")
        if base.get_output_embeddings() is None:
            raise MarlError(f"{kind} has no language-model head: pass the AutoModelForCausalLM model, not its "
                            "decoder (e.g. the whole GPT2LMHeadModel, not .transformer)")
        if peft is not None and (bad := {n: getattr(c.peft_type, "value", c.peft_type)
                                         for n, c in peft.peft_config.items() if c.peft_type != "LORA"}):
            name, kind = next(iter(bad.items()))
            raise MarlError(f"adapter {name!r} of the peft model is a {kind} adapter: marl's adapters are LoRA; "
                            "make it with peft.LoraConfig")
        name = base.name_or_path or ""
        if tokenizer is None:
            if not name:
                raise MarlError(f"this {kind} has no name_or_path to load its tokenizer from: pass tokenizer=")
            tokenizer = load_tokenizer(name)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        out = cls(base, tokenizer, base_name=name, fingerprint=base_fingerprint(name) if name else "instance")
        out.quantization = ("8bit" if getattr(base, "is_loaded_in_8bit", False) else
                            "4bit" if getattr(base, "is_loaded_in_4bit", False) else
                            "bf16" if base.dtype == torch.bfloat16 else "none")
        if out.quantization == "4bit":
            model_io.disable_4bit_cpu_inference_kernel(base)
        if peft is not None:
            out.adapters.adopt(peft, roles or {}, out._new_value_head)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The tokens that end a response: the tokenizer's EOS and every id of the checkpoint's
        `generation_config.eos_token_id` (marl.model_io.stop_token_ids). Rollouts, masks, `has_eos` and
        `missing_eos_penalty` all read this one list."""
        return stop_token_ids(self.tokenizer, getattr(self.base, "generation_config", None))

    @property
    def hidden_size(self) -> int:
        return self.adapters.hidden_size

    @property
    def base_name(self) -> str:
        return self.adapters.base_name

    @property
    def fingerprint(self) -> str:
        return self.adapters.fingerprint

    @property
    def peft(self):
        """The peft model the adapters live in (None before the first adapter)."""
        return self.adapters.peft

    @property
    def execution(self):
        """How mixed-adapter batches run (marl.multilora.Execution)."""
        return self.adapters.execution

    @property
    def reward_adapter_name(self) -> str | None:
        """The reward adapter `compute_reward_score` uses by default."""
        return self.adapters.reward_adapter_name

    @reward_adapter_name.setter
    def reward_adapter_name(self, name: str | None) -> None:
        self.adapters.reward_adapter_name = name

    @property
    def switches(self) -> int:
        """Adapter switches made so far (use_adapter, set_adapter, scoring): bench/overhead.py."""
        return self.adapters.switches

    # ---- the adapters (marl.adapters): added, loaded (marl.model_io) and saved by name

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter's name, in the order they were added."""
        return self.adapters.names

    @property
    def roles(self) -> Mapping[str, str]:
        """Each adapter's role, in the order added (read-only, kept up to date)."""
        return self.adapters.roles

    @property
    def critic_of(self) -> Mapping[str, str]:
        """Each policy with a separate critic -> that critic's name (read-only, kept up to date; `attach_critic`)."""
        return self.adapters.critic_of

    def value_head(self, name: str | None) -> nn.Linear | None:
        """Adapter `name`'s value head; None if it has none (a reference, a reward adapter, a policy with a
        critic) or is not on the model."""
        return self.adapters.value_head(name)

    def lora_config(self, name: str):
        """Adapter `name`'s peft `LoraConfig` (rank, targets, dropout; not a copy)."""
        return self.adapters.lora_config(name)

    def add_adapter(self, name: str, lora_config, role: str = "policy", trainable: bool = True,
                    init_from: str | None = None, value_head: bool | None = None) -> None:
        """Add a new LoRA adapter called `name` (fresh, or a copy of adapter `init_from`).

        With `init_from`, rank and target modules are the source's; `lora_config` then only
        sets the dropout (PPO policies use 0, so that log-probs in training match the rollout's).

        Policies and critics get a value head (a linear layer on the last hidden state,
        zero-initialised bias) unless `value_head=False`.
        """
        if role not in ROLES:
            raise MarlError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        if init_from is not None:  # the source's shape (rank, targets); dropout from the given config
            source = copy.deepcopy(self.lora_config(init_from))
            if lora_config is not None:
                source.lora_dropout = lora_config.lora_dropout
            lora_config = source
        self.adapters.inject(name, lora_config, role)
        if init_from is not None:
            self.adapters.copy_weights(init_from, name)
        head = None
        if value_head if value_head is not None else role in ("policy", "critic"):
            head = self._new_value_head()
        self.adapters.finish_adding(name, trainable, value_head=head)

    def _new_value_head(self) -> nn.Linear:
        """A fresh value head: a linear layer on the last hidden state, small random weights, zero bias."""
        head = nn.Linear(self.hidden_size, 1).to(self.device)
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / (self.hidden_size + 1))
            head.bias.zero_()
        return head

    def load_adapter(self, path_or_id: str, name: str | None = None, role: str | None = None,
                     trainable: bool = False, score_index: int | None = None) -> str:
        """Load a saved adapter (a run's `adapters/<name>` or a Hub id) under `name`.

        The adapter's base fingerprint must match this base. A reward adapter's score
        head (saved by RewardTrainer as a peft `modules_to_save`) becomes
        `score_heads[name]`; a policy's `value_head.safetensors` becomes its value head.
        A score head with several outputs (old TRL reward adapters with 2 labels) needs
        `score_index`, the output that scores. Returns the adapter name.
        """
        return model_io.load_adapter(self.adapters, path_or_id, name, role, trainable, score_index)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from the model with its value head and critic, freeing their weights (a
        population's stopped policy). It must not be training (`set_trainable`)."""
        self.adapters.check(name)
        critic = self.adapters.record(name).critic
        if critic is not None:
            self.delete_adapter(critic)
        for heads in (self.value_heads, self.score_heads):
            if name in heads:
                del heads[name]
        self.adapters.remove(name)

    def copy_adapter_weights(self, source: str, target: str) -> None:
        """Copy adapter `source`'s LoRA weights into adapter `target` (same rank and targets), in place."""
        self.adapters.copy_weights(source, target)

    def load_adapter_weights(self, name: str, folder: str | os.PathLike) -> None:
        """Overwrite the weights (and value head) of existing adapter `name` from a saved folder."""
        self.adapters.check(name)
        model_io.load_adapter_weights(self.adapters, name, folder)

    def save_adapter(self, name: str, out_dir: str | os.PathLike, overwrite: bool = False,
                     extra_meta: dict | None = None) -> Path:
        """Save adapter `name` in peft format (plus its head and marl metadata), atomically.

        A folder saved here loads with plain `PeftModel.from_pretrained(base, out_dir)`.
        Refuses to replace an existing adapter folder unless `overwrite`.
        """
        self.adapters.check(name)
        return model_io.save_adapter(self.adapters, name, out_dir, overwrite, extra_meta)

    # ---- switching and trainability

    def set_trainable(self, names: Sequence[str]) -> None:
        """Make exactly these adapters (their value heads and critics) trainable; everything else frozen."""
        self.adapters.set_trainable(names)

    def add_critic(self, policy: str, critic: str, lora_config, init_from: str) -> None:
        """Add adapter `critic` (a copy of adapter `init_from`) with a value head and attach it to `policy`.

        From a reward adapter the value head starts as its score head, so the critic's first values
        are the reward model's scores at every token (as TRL's later PPOTrainer started its value
        model from the reward model); otherwise the value head is fresh.
        """
        self.add_adapter(critic, lora_config, role="critic", init_from=init_from)
        if init_from in self.score_heads:
            score, head = self.score_heads[init_from], self.value_heads[critic]
            with torch.no_grad():
                head.weight.copy_(score.weight[:1].to(head.weight.dtype))
                head.bias.copy_(score.bias[:1] if score.bias is not None else torch.zeros_like(head.bias))
        self.attach_critic(policy, critic)

    def attach_critic(self, policy: str, critic: str) -> None:
        """Give `policy` a separate critic: the values come from adapter `critic` and its value head,
        so the value loss never reaches the policy's LoRA. The policy's own value head is dropped."""
        self.adapters.attach_critic(policy, critic)

    @property
    def trainable_adapters(self) -> list[str]:
        """The adapters whose parameters (and value heads) currently train."""
        return self.adapters.trainable_adapters

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters an optimizer for adapter `name` owns: its LoRA weights and value head
        (with a separate critic: the critic's LoRA and value head too)."""
        return self.adapters.trainable_parameters(name)

    @property
    def active_adapter(self) -> str | None:
        return self.adapters.active

    @contextlib.contextmanager
    def use_adapter(self, name: str | None) -> Iterator["MultiAdapterModel"]:
        """Run the body with adapter `name` active (None: all adapters disabled), then restore."""
        with self.adapters.use(name):
            yield self

    def train(self, mode: bool = True) -> "MultiAdapterModel":
        """Train or eval mode for the base, the heads and the two peft wrappers around the base (peft reads their
        flag: its mixed-adapter path runs only in eval mode); the base's modules are set once."""
        super().train(mode)
        if self.peft is not None:
            self.peft.training = self.peft.base_model.training = mode
        return self

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator["MultiAdapterModel"]:
        """Eval mode (no LoRA dropout) for the body of the `with`, then the caller's mode again. A model already in
        eval mode (this wrapper, the base and peft's wrapper: what `train` and Trainer's `model.train()` set) is
        left as it is: switching walks every module, about 10 ms at Qwen2.5-0.5B's shape and more with each
        adapter, several times a PPO step."""
        if not (self.training or self.base.training or (self.peft is not None and self.peft.training)):
            yield self
            return
        self.eval()
        try:
            yield self
        finally:
            self.train()

    def lean_forward(self) -> contextlib.AbstractContextManager:
        """For the body of the `with`, the LoRA layers run peft's eval-mode forward for the adapter active now
        without its per-call checks, bit for bit the same but for a float32 base's 16-32-row products on a CPU
        (`multilora.lean_lora`; a no-grad pass at 0.5B's shape and a few rows: 3% faster). The body must not switch
        adapters."""
        return lean_lora(self.execution.layers(self.peft)) if self.peft is not None else contextlib.nullcontext()

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the active adapter (None: bare base) until changed."""
        self.adapters.activate(name)

    # ---- forward passes

    @property
    def lm(self) -> nn.Module:
        """The callable causal LM (the peft wrapper once adapters exist)."""
        return self.peft if self.peft is not None else self.base

    @property
    def backbone(self) -> nn.Module:
        """The decoder without the LM head (hidden states only)."""
        return getattr(self.base, self.base.base_model_prefix)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), **kwargs)

    def policy_forward(self, name: str, input_ids, attention_mask, adapter_names: list[str] | None = None,
                       lm_head: bool = True):
        """Logits (B, T, V) and values (B, T) of policy `name` (its LoRA and value head, or its critic's).

        With `lm_head=False` the first output is the last hidden states (B, T, H) instead, for the
        caller to apply the LM head (`lm_head(name)`) only where it needs logits (marl.ppo.logprobs)."""
        critic = self.adapters.record(name).critic
        pos = position_ids_from_mask(attention_mask)
        with self.use_adapter(name):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                   use_cache=False).last_hidden_state
        if critic is None:
            values = self._values(name, hidden)
        else:
            with self.use_adapter(critic):
                critic_hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                              position_ids=pos).last_hidden_state
            values = self._values(critic, critic_hidden)
        return (self.lm_head(name)(hidden) if lm_head else hidden), values

    def lm_head(self, names: str | Sequence[str | None] | None):
        """hidden (..., H) -> logits (..., V) of adapter `names` (None: the bare base; several: adapters that
        share one head): the base's LM head, or the adapter's own copy of it (a peft adapter that saves the
        output embedding, `modules_to_save`), whichever adapter is active when it is called."""
        many = names is not None and not isinstance(names, str)
        heads = {id(h): h for h in (output_head(self.base, n) for n in (dict.fromkeys(names) if many else [names]))}
        if len(heads) > 1:
            raise ValueError(f"adapters {sorted(set(names) - {None})} have LM heads of their own: give each "
                             "passes of its own")
        return lm_head_fn(self.base, next(iter(heads.values())))

    def _values(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """Values (B, T) of adapter `name`'s value head; zeros for a policy without one (critic-free)."""
        return grouped_values(self.value_heads, Layout((name,), (hidden.shape[0],)), hidden)

    @torch.no_grad()
    def compute_reward_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             ppo_adapter_name: str | None = None, reward_adapter_name: str | None = None,
                             **_ignored) -> torch.Tensor:
        """Score sequences with the reward adapter and its score head; returns shape (B,).

        The score is read where RewardTrainer's classifier read it: at the last attended token
        that is not the pad token (`reward_token_index`; with pad = EOS, the token before a
        final EOS), so left and right padding give the same scores. Afterwards
        `ppo_adapter_name` is the active adapter (or, if not given, whatever was active
        before), also when this raises.
        """
        name = reward_adapter_name or self.reward_adapter_name
        if name is None or name not in self.score_heads:
            raise MarlError("no reward adapter is loaded: pass reward_adapter= (a run's adapters/reward or a Hub id)")
        if ppo_adapter_name is not None:
            self.adapters.check(ppo_adapter_name)
        restore = ppo_adapter_name if ppo_adapter_name is not None else self.adapters.active
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        try:
            self.adapters.activate(name)
            with self.eval_mode(), self.lean_forward():  # scores never sample the reward adapter's LoRA dropout
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids_from_mask(attention_mask),
                                       use_cache=False).last_hidden_state
            head = self.score_heads[name]
            scores = head(hidden.to(head.weight.dtype)).squeeze(-1)  # (B, T)
            # RewardTrainer's pad: the tokenizer's, else EOS; it becomes the classifier's config.pad_token_id
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eos_token_id if pad is None else pad
            index = reward_token_index(input_ids, attention_mask, pad)
            return scores.gather(1, index[:, None]).squeeze(1).float()
        finally:
            self.adapters.activate(restore)

    def score_texts(self, texts: Sequence[str], batch_size: int = 32, **kwargs) -> torch.Tensor:
        """Reward scores (N,) of full texts, built as RewardTrainer built them: EOS appended unless the
        text ends in it, then tokenized as one text (BOS if the tokenizer adds one); any padding side."""
        return self.score_ids([reward_ids(self.tokenizer, t, "") for t in texts], batch_size, **kwargs)

    def score_completions(self, prompts: Sequence, completions: Sequence[str], batch_size: int = 32,
                          **kwargs) -> torch.Tensor:
        """Reward scores (N,) of completions (text) of prompts (text or conversations), each pair formatted as
        RewardTrainer formatted its training pairs: the conversation through the chat template, or the text
        with EOS appended (marl.chat.reward_ids)."""
        rows = [reward_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.score_ids(rows, batch_size, **kwargs)

    def score_ids(self, rows: Sequence[Sequence[int]], batch_size: int = 32, **kwargs) -> torch.Tensor:
        """Reward scores (N,) of token-id rows (no padding), `batch_size` rows per pass (`compute_reward_score`)."""
        pad = self.tokenizer.pad_token_id
        out = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
                mask[i, :len(r)] = 1
            out.append(self.compute_reward_score(ids.to(self.device), mask.to(self.device), **kwargs))
        return torch.cat(out) if out else torch.zeros(0)

    @property
    def multi_lora(self) -> str:
        """How mixed-adapter batches run: "batched" (stacked LoRA) or "peft" (marl.multilora.Execution)."""
        return self.execution.mode

    @multi_lora.setter
    def multi_lora(self, mode: str) -> None:
        self.execution.mode = mode

    def lora_layers(self) -> list[nn.Module]:
        """peft's LoRA layers of the base (scanned once per set of adapters)."""
        return self.execution.layers(self.peft)

    def stacked_layout(self, names: Sequence[str | None]) -> Layout | None:
        """The stacked-LoRA `Layout` for rows of these adapters, or None: one pass per adapter
        (`Execution.layout`, the one decision; the PPO trainer and `generate` ask here)."""
        return self.execution.layout(names, self.peft)

    def grouped_policy_forward(self, names: Sequence[str], input_ids, attention_mask, lm_head: bool = True):
        """Logits (B, T, V) and values (B, T) of several policies in ONE pass over the base.

        Each policy's rows are contiguous (`names` gives each row's policy; groups may
        differ in size); every LoRA layer applies the stacked factors of all of them
        (marl.multilora). Policies with separate critics take a second grouped pass, under
        the critics, for the values. Gradients reach each policy's own parameters only.
        With `lm_head=False` the first output is the last hidden states (B, T, H) instead.
        """
        layout = group_layout(names)
        if layout is None:
            raise ValueError("grouped_policy_forward needs each policy's rows to be contiguous")
        critics = [None if g is None else self.adapters.record(g).critic for g in layout.groups]  # None: bare base
        pos = position_ids_from_mask(attention_mask)
        with self.execution.stacked(self.peft, layout):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                   use_cache=False).last_hidden_state
        if not any(critics):
            values = grouped_values(self.value_heads, layout, hidden)
        else:  # the critic pass runs on the rows of the policies that have a critic (critic-free ones: 0)
            has = [i for i, c in enumerate(critics) if c is not None]
            rows = torch.cat([torch.arange(*layout.bounds()[i], device=input_ids.device) for i in has])
            critic_layout = Layout(tuple(critics[i] for i in has), tuple(layout.sizes[i] for i in has))
            with self.execution.stacked(self.peft, critic_layout):
                critic_hidden = self.backbone(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                              position_ids=pos[rows], use_cache=False).last_hidden_state
            v = grouped_values(self.value_heads, critic_layout, critic_hidden)
            values = v.new_zeros(hidden.shape[:2]).index_copy(0, rows, v)
        return (self.lm_head(layout.groups)(hidden) if lm_head else hidden), values

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, adapter_names: Sequence[str | None] | str | None = None,
                 **gen_kwargs):
        """Generate, one adapter per row in a single mixed-adapter batch (None rows: bare base).

        With `multi_lora == "batched"` and rows grouped by adapter, the stacked-LoRA path
        runs all adapters at the cost of one; otherwise peft's `adapter_names=` path, which
        peft allows only in eval mode (docs/known-issues.md #4; `Execution.generate`).
        Eval mode is set for the call.
        """
        if isinstance(adapter_names, str) or adapter_names is None:
            names = [adapter_names] * input_ids.shape[0]
        else:
            names = list(adapter_names)
        for n in set(names) - {None}:
            self.adapters.check(n)
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        gen_kwargs.setdefault("eos_token_id", list(self.stop_token_ids))
        if gen_kwargs.get("do_sample"):
            gen_kwargs.setdefault("top_k", 0)  # transformers' global default is 50: sampling is untruncated unless asked
        gen_kwargs = exact_sampling(gen_kwargs)  # one random number a row instead of one a vocabulary entry
        with self.eval_mode(), self._caller_sampling_only():
            if self.peft is None:
                return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            if len(set(names)) == 1:  # one adapter: the plain (faster) path, without peft's per-call checks
                with self.use_adapter(names[0]), self.lean_forward():
                    return self.peft.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            with self.use_adapter(next(n for n in names if n is not None)):
                return self.execution.generate(self.peft, names, self.use_adapter, input_ids=input_ids,
                                               attention_mask=attention_mask, **gen_kwargs)


    @contextlib.contextmanager
    def _caller_sampling_only(self) -> Iterator[None]:
        """For the body of the `with`, the checkpoint's generation config is reduced to its special token ids.

        transformers fills every sampling setting a `generate` call leaves unset from the checkpoint's
        `generation_config.json` (Qwen2.5-Instruct: repetition_penalty, top_k, top_p, temperature) and then
        from its global defaults (top_k 50): samples would come from another distribution than the softmax
        PPO's ratios assume (docs/known-issues.md #13). Here only what the caller passes applies."""
        from transformers import GenerationConfig

        holders = [m for m in (self.base, self.peft) if getattr(m, "generation_config", None) is not None]
        saved = [m.generation_config for m in holders]
        old = self.base.generation_config
        clean = GenerationConfig(eos_token_id=list(self.stop_token_ids), pad_token_id=self.tokenizer.pad_token_id,
                                 bos_token_id=getattr(old, "bos_token_id", None),
                                 decoder_start_token_id=getattr(old, "decoder_start_token_id", None))
        try:
            for m in holders:
                m.generation_config = clean
            yield
        finally:
            for m, g in zip(holders, saved):
                m.generation_config = g


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last attended token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def reward_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       pad_token_id: int | None) -> torch.Tensor:
    """Index (B,) of the token a transformers `*ForSequenceClassification` pools its score at.

    transformers 5 reads each row at its LAST token whose id is not `pad_token_id` (not "first pad - 1":
    they differ for a row with EOS inside it), so with pad = EOS the EOS that TRL's RewardTrainer appends
    counts as padding and the token before it is read (docs/known-issues.md #2, #7). Here only attended
    tokens count, so a left-padded row gives the index of the same token as right-padded; a row whose
    attended tokens are all pad (an empty text + EOS) gives its first attended token, as transformers
    does on the unpadded row. Without a pad token (None) it is the last attended token.

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding (left or right).
        pad_token_id: the pad id the classifier was trained with (its `config.pad_token_id`).
    Returns:
        (B,) long positions in [0, T).
    """
    attended = attention_mask.bool()
    keep = attended if pad_token_id is None else attended & (input_ids != pad_token_id)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_kept = torch.where(keep, positions, -1).max(dim=1).values
    first_attended = attended.long().argmax(dim=1)  # argmax returns the first maximum
    return torch.where(last_kept >= 0, last_kept, first_attended)


def position_ids_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Positions counted over real tokens, so a left-padded row sees the same positions as unpadded."""
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
