"""Log-probs and entropy of the taken tokens, straight from hidden states, one chunk of tokens at a time.

At real vocabularies the logits are the largest tensors of a PPO step: (B, R, V) float32 at
V = 151,936 is 1.2 GB for 8 rows of 256 tokens, and log-softmax, softmax and their backward
make several more. Here the LM head runs only on the hidden states that predict response
tokens, a chunk of ``chunk_tokens`` tokens at a time, and each chunk keeps only its (n,)
results: the log-prob of the taken token (a selective log-softmax: logit - logsumexp, as in
TRL's ``selective_log_softmax``) and, when asked, the entropy. With gradients each chunk is
checkpointed (`torch.utils.checkpoint`, non-reentrant), so backward recomputes one chunk's
logits at a time too: at most one (chunk_tokens, V) float32 block and its softmax exist at once.

Shapes: ``B`` rows, ``R`` response length, ``H`` hidden size, ``V`` vocabulary, ``N = B * R``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["DEFAULT_CHUNK_TOKENS", "TokenLogprobs", "lm_head_fn", "token_logprobs"]

DEFAULT_CHUNK_TOKENS = 256  # 156 MB of float32 logits per chunk at V = 151,936


class TokenLogprobs(NamedTuple):
    """Output of :func:`token_logprobs`."""

    logprobs: Tensor
    """(B, R) float32 log pi(y_t) under softmax(logits / temperature); 0 where the mask is 0."""
    entropy: Tensor | None
    """(B, R) float32 entropy of softmax(logits / temperature) in nats, or None if not asked for."""


def lm_head_fn(base: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """hidden (..., H) -> logits (..., V) as `base`'s own forward makes them from its last hidden states:
    the output embedding, then the logit scaling a few architectures apply after it (Gemma's
    `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`)."""
    head = base.get_output_embeddings()
    cfg = base.config.get_text_config()
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    divide = getattr(cfg, "logits_scaling", None)

    def logits(hidden: Tensor) -> Tensor:
        z = head(hidden.to(head.weight.dtype) if head.weight.is_floating_point() else hidden)
        if scale is not None:
            z = z * scale
        if divide is not None:
            z = z / divide
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        return z

    return logits


def _chunk(head: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor, temperature: Tensor,
           entropy: bool, entropy_grad: bool) -> tuple[Tensor, Tensor]:
    """Log-probs (n,) and entropies (n,) (zeros if not asked for) of one chunk: hidden (n, H), labels (n,),
    temperature (n,)."""
    z = head(hidden).float() / temperature[:, None]  # (n, V): the only vocabulary-sized tensors live here
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, labels[:, None]).squeeze(-1) - lse
    if not entropy:
        return lp, lp.new_zeros(lp.shape)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        # H = logsumexp(z) - sum_v p_v z_v: never takes the log of a tiny p
        ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return lp, ent


def token_logprobs(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor,
                   temperature: Tensor | float = 1.0, mask: Tensor | None = None,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, entropy: bool = False,
                   entropy_grad: bool = True) -> TokenLogprobs:
    """Log-probs (and entropies) of ``labels`` under softmax(head(hidden) / temperature), chunk by chunk.

    Equals ``logprobs_from_logits(head(hidden) / T, labels)`` and ``entropy_from_logits(...)`` of
    marl.ppo.losses, computed in float32, without ever holding the (B, R, V) logits.

    Args:
        hidden: (B, R, H) last hidden states at the positions that predict ``labels`` (for a
            left-padded prompt of length P: the full sequence's hidden states ``[:, P - 1:-1]``).
        head: hidden (n, H) -> logits (n, V), e.g. :func:`lm_head_fn` of the base.
        labels: (B, R) int64 token ids.
        temperature: (B,) each row's sampling temperature, or one float.
        mask: (B, R) 1 on the tokens to score; positions with 0 are skipped (no head work) and read 0.
        chunk_tokens: tokens per chunk: the largest block is (chunk_tokens, V) float32.
        entropy: also return the entropies.
        entropy_grad: let gradients flow through the entropy (set False when it is only reported).

    Returns:
        TokenLogprobs((B, R) float32 log-probs, (B, R) float32 entropies or None); differentiable
        w.r.t. ``hidden`` (and the head's parameters) when grad is enabled.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    B, R, H = hidden.shape
    h, y = hidden.reshape(B * R, H), labels.reshape(B * R).to(hidden.device)
    if isinstance(temperature, Tensor):
        t = temperature.to(hidden.device, torch.float32)[:, None].expand(B, R).reshape(B * R)
    else:
        t = torch.full((B * R,), float(temperature), device=hidden.device)
    idx = None
    if mask is not None:
        idx = mask.reshape(B * R).to(hidden.device).nonzero().squeeze(-1)
        h, y, t = h.index_select(0, idx), y.index_select(0, idx), t.index_select(0, idx)
    grad = torch.is_grad_enabled() and h.requires_grad
    lps, ents = [], []
    for s in range(0, h.shape[0], chunk_tokens):
        args = (head, h[s:s + chunk_tokens], y[s:s + chunk_tokens], t[s:s + chunk_tokens], entropy, entropy_grad)
        # checkpointed: backward recomputes this chunk's logits instead of keeping every chunk's
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps) if lps else h.new_zeros(0, dtype=torch.float32)
    ent = torch.cat(ents) if ents else h.new_zeros(0, dtype=torch.float32)
    if idx is not None:
        lp = lp.new_zeros(B * R).index_copy(0, idx, lp)
        ent = ent.new_zeros(B * R).index_copy(0, idx, ent)
    return TokenLogprobs(lp.reshape(B, R), ent.reshape(B, R) if entropy else None)
