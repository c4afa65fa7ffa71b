"""Rollouts: every policy's responses in one generate call, then the passes PPO needs.

A rollout batch holds the rows of all policies. Shapes: ``B`` rows, ``P`` prompt
length (left-padded), ``R`` response length (right-padded after the first EOS).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from marl.chat import completion_for_functions, completion_text, prompt_from_ids
from marl.model import MultiAdapterModel, position_ids_from_mask
from marl.ppo.logprobs import DEFAULT_CHUNK_TOKENS, token_logprobs
from marl.ppo.losses import logprobs_from_logits


class RowTemperature(LogitsProcessor):
    """Divide each row's logits by its own temperature, so policies with different
    sampling temperatures can share one generate call."""

    def __init__(self, temperatures: torch.Tensor):
        self.temperatures = temperatures

    def __call__(self, input_ids, scores):
        return scores / self.temperatures.to(scores.device, scores.dtype)[:, None]

    def select(self, rows: torch.Tensor) -> "RowTemperature":
        """The processor of these rows only (a generate call per adapter: marl.multilora.Execution.generate)."""
        return RowTemperature(self.temperatures[rows.to(self.temperatures.device)])


@dataclass
class Rollout:
    """What one generate call over all policies produced."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) pad after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first EOS
    adapter_names: list[str | None]  # (B,) which adapter produced each row
    temperatures: torch.Tensor  # (B,)
    prompt_index: torch.Tensor | None = None  # (B,) the training prompt each row answers (its dataset columns)
    prompts: list | None = None  # (B,) each row's prompt as given (text or messages); None: decoded from the ids

    def __post_init__(self):  # beside the token ids, so rows picked by a device index can index it too
        self.temperatures = torch.as_tensor(self.temperatures, dtype=torch.float32, device=self.prompt_ids.device)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def rows(self, name: str | None) -> torch.Tensor:
        return torch.tensor([i for i, n in enumerate(self.adapter_names) if n == name], dtype=torch.long)

    def has_eos(self, stop_ids: int | Collection[int]) -> torch.Tensor:
        """(B,) whether each response ended with a stop token (rather than at max_new_tokens)."""
        return ends_with_stop(self.response_ids, self.response_mask, stop_ids)


def is_stop(ids: torch.Tensor, stop_ids: int | Collection[int] | None) -> torch.Tensor:
    """Bool tensor like `ids`: which tokens are one of `stop_ids` (one id, several, or None: none)."""
    if stop_ids is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    stop = torch.as_tensor([stop_ids] if isinstance(stop_ids, int) else sorted(stop_ids), dtype=ids.dtype,
                           device=ids.device)
    return torch.isin(ids, stop)


def ends_with_stop(response_ids: torch.Tensor, mask: torch.Tensor, stop_ids: int | Collection[int]) -> torch.Tensor:
    """(B,) whether each masked response holds a stop token (its last one, as masks end at the first)."""
    return (is_stop(response_ids, stop_ids) & mask.bool()).any(dim=1)


def response_mask(response_ids: torch.Tensor, stop_ids: int | Collection[int] | None) -> torch.Tensor:
    """(B, R) mask of 1 up to and including each row's first stop token (all 1 if it has none); any of
    `stop_ids` ends a response (the model's `stop_token_ids`: EOS and the checkpoint's end-of-turn ids)."""
    stop = is_stop(response_ids, stop_ids).long()
    after = (stop.cumsum(dim=1) - stop) > 0  # strictly after the first stop token
    return (~after).long()


@torch.no_grad()
def generate_rollout(model: MultiAdapterModel, prompt_ids, prompt_mask, adapter_names, temperatures,
                     max_new_tokens: int, top_k: int = 0, top_p: float = 1.0, mixed_batch: bool = True) -> Rollout:
    """Sample responses for every row, each row with its own adapter, in one generate call.

    With ``mixed_batch=False`` each adapter generates in its own call (the baseline).
    """
    temperatures = torch.as_tensor(temperatures, dtype=torch.float32, device=prompt_ids.device)
    stop = model.stop_token_ids
    # marl's own sampling settings only: MultiAdapterModel.generate keeps the checkpoint's out
    gen = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=top_k, top_p=top_p,
               eos_token_id=list(stop))
    if mixed_batch:
        out = model.generate(prompt_ids, prompt_mask, adapter_names=adapter_names,
                             logits_processor=LogitsProcessorList([RowTemperature(temperatures)]), **gen)
        responses = out[:, prompt_ids.shape[1]:]
    else:
        responses = [None] * len(adapter_names)
        for name in dict.fromkeys(adapter_names):
            idx = [i for i, n in enumerate(adapter_names) if n == name]
            out = model.generate(prompt_ids[idx], prompt_mask[idx], adapter_names=name,
                                 logits_processor=LogitsProcessorList([RowTemperature(temperatures[idx])]), **gen)
            for j, i in enumerate(idx):
                responses[i] = out[j, prompt_ids.shape[1]:]
        responses = pad_rows(responses, model.tokenizer.pad_token_id, "right", prompt_ids.device)[0]
    pad = model.tokenizer.pad_token_id
    mask = response_mask(responses, stop)
    responses = responses.masked_fill(mask == 0, pad)
    if responses.shape[1] == 0:  # every row stopped at once: keep one pad column so shapes stay valid
        responses = torch.full((len(adapter_names), 1), pad, dtype=torch.long, device=prompt_ids.device)
        mask = torch.zeros_like(responses)
    return Rollout(prompt_ids, prompt_mask, responses, mask, list(adapter_names), temperatures)


def pad_rows(rows, pad: int, side: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, max_len), of rows of token ids (lists or 1-D tensors) padded with
    `pad` on `side` ("left": prompts, "right": responses); on `device`, else on the CPU."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.as_tensor(r, dtype=torch.long).cpu()
        mask[i, cols] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, max_len), left-padded prompts on `device` (`pad_rows`)."""
    return pad_rows(rows, pad, "left", device)


def response_logits(logits: torch.Tensor, prompt_len: int, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The logits (B, R, V) that predict the response tokens, from full-sequence logits (B, P + R, V),
    divided by each row's sampling temperature (a tensor (B,) or one float)."""
    logits = logits[:, prompt_len - 1: -1]
    if isinstance(temperature, torch.Tensor):
        return logits / temperature.to(logits.device, logits.dtype)[:, None, None]
    return logits / temperature if temperature != 1.0 else logits


def response_logprobs(logits: torch.Tensor, rollout_response: torch.Tensor, prompt_len: int,
                      temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Log-probs (B, R) of the response tokens from full-sequence logits (B, P + R, V).

    Logits are divided by the sampling temperature, so the log-probs are those of the
    distribution the tokens were drawn from.
    """
    return logprobs_from_logits(response_logits(logits, prompt_len, temperature), rollout_response)


@torch.no_grad()
def rollout_logprobs(model: MultiAdapterModel, rollout: Rollout, rows: torch.Tensor | None = None,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Log-probs (b, R) of the responses of rollout rows `rows` (all: None) under the active adapter.

    The LM head runs only on the positions that predict response tokens, `chunk_tokens` at a time
    (marl.ppo.logprobs), never on the prompt and never on the whole (b, R, V) at once. Padding
    after EOS reads 0."""
    rows = torch.arange(rollout.prompt_ids.shape[0]) if rows is None else rows
    ids, mask, P = rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_ids.shape[1]
    hidden = model.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                            use_cache=False).last_hidden_state
    return token_logprobs(hidden[:, P - 1: -1], model.lm_head(model.active_adapter), rollout.response_ids[rows],
                          rollout.temperatures[rows], mask=rollout.response_mask[rows],
                          chunk_tokens=chunk_tokens).logprobs


@torch.no_grad()
def reference_logprobs(model: MultiAdapterModel, ref_adapter: str | None, rollout: Rollout,
                       batch_size: int = 64, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Log-probs (B, R) of every row's response under the reference (frozen sft, or the bare base),
    `batch_size` rows per pass; padding after EOS reads 0.

    Runs in eval mode whatever the model's mode (the sft adapter's LoRA dropout must not sample)."""
    out = []
    with model.eval_mode(), model.use_adapter(ref_adapter), model.lean_forward():
        for s in range(0, rollout.prompt_ids.shape[0], batch_size):
            rows = torch.arange(s, min(s + batch_size, rollout.prompt_ids.shape[0]))
            out.append(rollout_logprobs(model, rollout, rows, chunk_tokens))
    return torch.cat(out)


def row_prompts(model: MultiAdapterModel, rollout: Rollout) -> list:
    """Each row's prompt as given (text or messages): `rollout.prompts`, else decoded from its token ids."""
    if rollout.prompts is not None:
        return list(rollout.prompts)
    return [prompt_from_ids(model.tokenizer, ids[m.bool()].tolist())
            for ids, m in zip(rollout.prompt_ids, rollout.prompt_mask)]


def completion_texts(model: MultiAdapterModel, rollout: Rollout) -> list[str]:
    """Each row's response as text before its stop token, special tokens kept: what the reward adapter's
    input is built from (marl.chat.reward_ids)."""
    stop = model.stop_token_ids
    return [completion_text(model.tokenizer, ids[m.bool()].tolist(), stop)
            for ids, m in zip(rollout.response_ids, rollout.response_mask)]


def score_rollout(model: MultiAdapterModel, rollout: Rollout, batch_size: int = 32) -> torch.Tensor:
    """The reward adapter's score (B,) of every row: its prompt and completion formatted as RewardTrainer
    formatted its training pairs (`MultiAdapterModel.score_completions`)."""
    return model.score_completions(row_prompts(model, rollout), completion_texts(model, rollout), batch_size)


def decode_texts(model: MultiAdapterModel, rollout: Rollout) -> tuple[list, list]:
    """(prompts, completions) as TRL hands them to reward functions: text prompts and text completions
    (special tokens dropped, the completion stops before its stop token), or for conversational prompts the
    messages and `[{"role": "assistant", "content": ...}]`."""
    tok, stop = model.tokenizer, model.stop_token_ids
    prompts = (list(rollout.prompts) if rollout.prompts is not None
               else tok.batch_decode(rollout.prompt_ids, skip_special_tokens=True))
    completions = []
    for p, ids, m in zip(prompts, rollout.response_ids, rollout.response_mask):
        ids = ids[m.bool()]
        text = tok.decode(ids[~is_stop(ids, stop)], skip_special_tokens=True)
        completions.append(completion_for_functions(p, text))
    return prompts, completions


def completion_strings(completions: list) -> list[str]:
    """The text of each completion of `decode_texts` (a conversational one's assistant content)."""
    return [c if isinstance(c, str) else c[0]["content"] for c in completions]
