"""Log-probs and entropy of the taken tokens, straight from hidden states, one chunk of tokens at a time.

At real vocabularies the logits are the largest tensors of a PPO step: (B, R, V) float32 at
V = 151,936 is 1.2 GB for 8 rows of 256 tokens, and log-softmax, softmax and their backward
make several more. Here the LM head runs only on the hidden states that predict response
tokens, a chunk of ``chunk_tokens`` tokens at a time, and each chunk keeps only its (n,)
results: the log-prob of the taken token (a selective log-softmax: logit - logsumexp, as in
TRL's ``selective_log_softmax``) and, when asked, the entropy. With gradients backward
recomputes each chunk's logits, one chunk at a time (a plain linear head's backward is written
out; any other head is checkpointed with `torch.utils.checkpoint`, non-reentrant): at most one
(chunk_tokens, V) float32 block and its softmax exist at once. The last chunk of a linear head
keeps its blocks from the forward instead, which costs no peak (`_LinearLogprobs`) and saves
one pass of the LM head a backward.

Shapes: ``B`` rows, ``R`` response length, ``H`` hidden size, ``V`` vocabulary, ``N = B * R``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["DEFAULT_CHUNK_TOKENS", "TokenLogprobs", "token_logprobs"]

DEFAULT_CHUNK_TOKENS = 256  # 156 MB of float32 logits per chunk at V = 151,936


class TokenLogprobs(NamedTuple):
    """Output of :func:`token_logprobs`."""

    logprobs: Tensor
    """(B, R) float32 log pi(y_t) under softmax(logits / temperature); 0 where the mask is 0."""
    entropy: Tensor | None
    """(B, R) float32 entropy of softmax(logits / temperature) in nats, or None if not asked for."""


def _log_softmax_(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: Tensor) -> Tensor:
    """log softmax(linear(hidden) / temperature) (n, V) in float32, normalised in place (one (n, V) block)."""
    z = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    z.div_(temperature[:, None])
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


def _neg_dot(p: Tensor, logp: Tensor) -> Tensor:
    """-sum_v p_v log p_v of each row of two (n, V) blocks, with no third block. On a CPU one dot product a row:
    torch.bmm's batched (1, V) x (V, 1) products were 4x slower there, and less exact (docs/speed.md)."""
    if p.device.type == "cpu":
        return -torch.stack([torch.dot(a, b) for a, b in zip(p, logp)]) if len(p) else p.new_zeros(0)
    return -torch.bmm(p.unsqueeze(1), logp.unsqueeze(2)).view(-1)


class _LinearLogprobs(torch.autograd.Function):
    """Selective log-softmax and entropy through a plain linear head, with the backward written out, working in
    place, so forward and backward each hold about two (n, V) float32 blocks (autograd through log-softmax,
    softmax and their products would keep four to six).

        d log p_y / dz_j = [j = y] - p_j        dH / dz_j = -p_j (log p_j + H)

    Backward needs the chunk's probabilities (and its log-probs when the entropy has a gradient). A chunk made
    with ``keep`` keeps them from its forward; any other saves only its inputs and recomputes its logits in
    backward (one more pass of the LM head). `token_logprobs` keeps the last chunk's: backward runs it first,
    while every activation of the forward is still alive, so the blocks it keeps take the place of the two that
    recomputing would make there, and the peak does not grow.

    An output that no loss reads (the entropy when it is only reported) gets no gradient (None, not zeros), so
    backward skips its work: then dL/dz = g_lp ([j = y] - p_j), from p alone.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, entropy: bool, entropy_grad: bool, keep: bool):
        logp = _log_softmax_(hidden, weight, bias, temperature)
        lp = logp.gather(-1, labels[:, None]).squeeze(-1)
        p = logp.exp() if entropy else None
        ent = _neg_dot(p, logp) if entropy else lp.new_zeros(lp.shape)
        ctx.save_for_backward(hidden, weight, bias, labels, temperature)
        ctx.entropy = entropy and entropy_grad
        ctx.kept = None
        if keep:  # backward reads p, and log p only for the entropy's gradient: at most the two blocks made here
            ctx.kept = (logp if ctx.entropy else None, logp.exp_() if p is None else p)
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, temperature = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # used in place: a second backward (retain_graph) recomputes
        if g_lp is None and (g_ent is None or not ctx.entropy):
            return None, None, None, None, None, None, None, None
        if kept is not None:
            logp, p = kept
        else:
            logp = _log_softmax_(hidden, weight, bias, temperature)
            p = logp.exp()
        if ctx.entropy and g_ent is not None:
            ent = _neg_dot(p, logp)
            g = logp.add_(ent[:, None]).mul_(-g_ent[:, None])  # dL/dz, built in logp's memory
            if g_lp is not None:
                g.sub_(g_lp[:, None])
            g.mul_(p)
        else:  # the log-probs' gradient alone
            g = p.mul_(-g_lp[:, None])
        del logp, p, kept
        if g_lp is not None:
            g.scatter_add_(1, labels[:, None], g_lp[:, None])
        g.div_(temperature[:, None])  # z = linear(hidden) / T
        gw = g.to(weight.dtype)
        grad_h = (gw @ weight).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = gw.t() @ hidden.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


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
        head: hidden (n, H) -> logits (n, V), e.g. `MultiAdapterModel.lm_head` (marl.heads.lm_head_fn).
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
    linear = head if type(head) is torch.nn.Linear else getattr(head, "linear", None)
    grad = torch.is_grad_enabled() and (h.requires_grad or (linear is not None and linear.weight.requires_grad))
    lps, ents = [], []
    for s in range(0, h.shape[0], chunk_tokens):
        hc, yc, tc = h[s:s + chunk_tokens], y[s:s + chunk_tokens], t[s:s + chunk_tokens]
        if linear is not None:
            last = s + chunk_tokens >= h.shape[0]
            lp, ent = _LinearLogprobs.apply(hc, linear.weight, linear.bias, yc, tc, entropy, entropy_grad, grad and last)
            ent = ent if entropy_grad else ent.detach()
        elif grad:  # checkpointed: backward recomputes this chunk's logits instead of keeping every chunk's
            lp, ent = checkpoint(_chunk, head, hc, yc, tc, entropy, entropy_grad, use_reentrant=False)
        else:
            lp, ent = _chunk(head, hc, yc, tc, entropy, entropy_grad)
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps) if lps else h.new_zeros(0, dtype=torch.float32)
    ent = torch.cat(ents) if ents else h.new_zeros(0, dtype=torch.float32)
    if idx is not None:
        lp = lp.new_zeros(B * R).index_copy(0, idx, lp)
        ent = ent.new_zeros(B * R).index_copy(0, idx, ent)
    return TokenLogprobs(lp.reshape(B, R), ent.reshape(B, R) if entropy else None)
