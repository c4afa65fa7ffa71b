"""Drawing each row's next token from its softmax exactly, with one random number per row.

transformers samples with `torch.multinomial(probs, 1)`, which on a CPU draws one exponential per vocabulary
entry and takes the argmax of p / q: 151,936 random numbers a row for Qwen2.5's vocabulary, about 20 ms a
new token at 4 rows on two cores, 7-8% of a 0.5B model's decode (docs/speed.md, "The decode"). Here a row
takes one uniform u (float64) and returns the first token whose running sum of probabilities passes
u * total: inverse-CDF sampling, exact in distribution to float64 rounding (about 1e-16), and a token of
probability 0 (a -inf score: a top-k cut, a stop token before `min_new_tokens`) is never drawn. The running
sum is taken in two levels (block sums, then the chosen block's own entries), all in float64.

`exact_sampling` rewrites a `generate` call's sampling arguments so that transformers runs its greedy loop
and this sampler picks the token as the last logits processor, after the same temperature, top-k and top-p
warpers transformers would have applied, in its order. The tokens differ from `torch.multinomial`'s under
the same seed (another use of the random stream), their distribution does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

BLOCK = 1024  # entries summed per block of the first level; the chosen block's running sum is the second

# `generate` arguments that the fast path handles, and those that leave a call to transformers' own sampling
_SAMPLING = ("temperature", "top_k", "top_p")
_UNHANDLED = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "watermarking_config",
              "renormalize_logits", "output_scores", "generation_config", "assistant_model", "prompt_lookup_num_tokens")


def sample_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token id per row of `probs` (B, V): non-negative weights, each row's total finite and above 0 (they
    need not sum to 1); (B,) long. Uses the default random generator of `probs`' device, one float64 a row."""
    rows, vocab = probs.shape
    blocks = -(-vocab // BLOCK)
    padded = F.pad(probs, (0, blocks * BLOCK - vocab)).view(rows, blocks, BLOCK)
    block_sums = padded.sum(-1, dtype=torch.float64)  # (B, blocks)
    ends = block_sums.cumsum(-1)
    total = ends[:, -1:]
    if not bool(torch.isfinite(total).all() & (total > 0).all()):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or a row whose total is not above 0")
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device) * total
    block = torch.searchsorted(ends, u, right=True).clamp_(max=blocks - 1)  # (B, 1): ends[block-1] <= u < ends[block]
    starts = F.pad(ends, (1, 0))[:, :-1].gather(1, block)
    entries = padded.gather(1, block[..., None].expand(rows, 1, BLOCK)).squeeze(1).to(torch.float64)
    running = entries.cumsum(-1) + starts
    inner = torch.searchsorted(running, u, right=True)  # first entry whose running sum passes u
    # float64 rounding can leave u at or past the block's own running total: take its last entry above 0
    last = BLOCK - 1 - (entries > 0).flip(-1).long().argmax(-1, keepdim=True)
    inner = torch.where(inner >= BLOCK, last, inner)
    return (block * BLOCK + inner).squeeze(1)


class ExactSampler(LogitsProcessor):
    """The last logits processor of a greedy `generate` call: applies the sampling warpers, draws each row's token
    with `sample_tokens` from the softmax, and returns scores that are 0 at that token and -inf elsewhere, so the
    greedy argmax takes it."""

    def __init__(self, warpers: list[LogitsProcessor]):
        self.warpers = warpers

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        token = sample_tokens(torch.softmax(scores, dim=-1))
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


def exact_sampling(gen_kwargs: dict) -> dict:
    """`generate` arguments that sample with `ExactSampler` (do_sample False, the warpers moved into it after the
    caller's logits processors), or `gen_kwargs` unchanged when they do not sample or use something else:
    beams, several sequences a prompt, another warper, returned scores (which would show the sampler's 0 / -inf)."""
    if not gen_kwargs.get("do_sample") or gen_kwargs.get("num_beams", 1) != 1:
        return gen_kwargs
    if gen_kwargs.get("num_return_sequences", 1) != 1:  # transformers' greedy loop refuses it
        return gen_kwargs
    if any(gen_kwargs.get(k) is not None for k in _UNHANDLED):
        return gen_kwargs
    out = {k: v for k, v in gen_kwargs.items() if k not in _SAMPLING}
    out["do_sample"] = False
    temperature, top_k, top_p = (gen_kwargs.get(k) for k in _SAMPLING)
    warpers: list[LogitsProcessor] = []  # transformers' order and arguments (GenerationMixin._get_logits_processor)
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    out["logits_processor"] = LogitsProcessorList([*(gen_kwargs.get("logits_processor") or []),
                                                   ExactSampler(warpers)])
    return out
