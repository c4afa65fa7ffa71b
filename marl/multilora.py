"""All policies in one pass: batched multi-LoRA execution over rows grouped by adapter.

peft runs a mixed-adapter batch by slicing rows per adapter in every layer (and only
in eval mode), so a batch of N policies costs ~1.7x a single-adapter batch of the
same size (KNOWN-ISSUES 4). Here each LoRA layer instead applies the stacked
weights of all adapters with two batched matmuls (as S-LoRA / Punica do):

    x:  (G, g*T, d_in)   rows grouped by adapter, G groups of g rows
    A:  (G, r, d_in)     every adapter's lora_A, stacked
    B:  (G, d_out, r)    every adapter's lora_B, stacked
    y = base(x) + scale_G * (x @ A^T) @ B^T

It works in training mode too (gradients flow through the stack into each
adapter's own parameters), so PPO updates of all policies share one forward and
backward over the base. Adapters stay ordinary peft adapters: stacking is only how
they are executed. Rows must come in contiguous, equal-sized groups; `group_layout`
checks that, and callers fall back to peft's path when it does not hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def group_layout(names: Sequence[str | None]) -> tuple[list[str | None], int] | None:
    """(adapter of each group, rows per group) if `names` is contiguous equal-sized groups, else None."""
    if not names:
        return None
    groups: list[str | None] = []
    sizes: list[int] = []
    for n in names:
        if groups and groups[-1] == n:
            sizes[-1] += 1
        else:
            groups.append(n)
            sizes.append(1)
    if len(set(groups)) != len(groups) or len(set(sizes)) != 1:
        return None
    return groups, sizes[0]


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft LoRA linear layer (full precision, 8-bit and 4-bit bases alike)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")
            and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]


class _Stack:
    """The stacked LoRA factors of one layer for the groups of a batch (optionally cached)."""

    def __init__(self, layer, groups: list[str | None], cache: bool):
        self.layer, self.groups, self.cache, self._value = layer, groups, cache, None

    def get(self):
        if self._value is not None:
            return self._value
        layer = self.layer
        named = groups_with_lora(layer, self.groups)
        ref = layer.lora_A[named[0]].weight
        # adapters of different ranks: zero-pad to the largest (zero rows of A / columns of B add nothing)
        r = max(layer.lora_A[g].weight.shape[0] for g in named)
        d_in, d_out = ref.shape[1], layer.lora_B[named[0]].weight.shape[0]

        def pad_a(w):
            return w if w.shape[0] == r else torch.cat([w, w.new_zeros(r - w.shape[0], d_in)])

        def pad_b(w):
            return w if w.shape[1] == r else torch.cat([w, w.new_zeros(d_out, r - w.shape[1])], dim=1)

        zeros_a, zeros_b = ref.new_zeros(r, d_in), ref.new_zeros(d_out, r)
        a = torch.stack([pad_a(layer.lora_A[g].weight) if g in named else zeros_a for g in self.groups])
        b = torch.stack([pad_b(layer.lora_B[g].weight) if g in named else zeros_b for g in self.groups])
        scale = torch.tensor([layer.scaling[g] if g in named else 0.0 for g in self.groups],
                             dtype=ref.dtype, device=ref.device)
        value = (a, b, scale)
        if self.cache:
            self._value = value
        return value


def groups_with_lora(layer, groups: list[str | None]) -> list[str]:
    return [g for g in groups if g is not None and g in layer.lora_A]


def _grouped_forward(layer, stack: _Stack, group_size: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    kwargs.pop("adapter_names", None)
    result = layer.base_layer(x, *args, **kwargs)
    if not groups_with_lora(layer, stack.groups):
        return result
    a, b, scale = stack.get()
    G = a.shape[0]
    xg = x.to(a.dtype).reshape(G, -1, x.shape[-1])  # (G, g*T, d_in): rows of a group are contiguous
    if layer.training:
        drops = [layer.lora_dropout[g] if g in layer.lora_dropout else None for g in stack.groups]
        if any(d is not None and not isinstance(d, nn.Identity) for d in drops):
            xg = torch.stack([d(xi) if d is not None else xi for d, xi in zip(drops, xg)])
    h = torch.bmm(torch.bmm(xg, a.transpose(1, 2)), b.transpose(1, 2)) * scale[:, None, None]
    return result + h.reshape(result.shape).to(result.dtype)


@contextlib.contextmanager
def grouped_lora(model: nn.Module, groups: list[str | None], group_size: int,
                 cache_weights: bool = False, layers: list[nn.Module] | None = None) -> Iterator[None]:
    """Run every LoRA layer of `model` in grouped mode for the body of the `with`.

    Rows [i*g, (i+1)*g) use adapter `groups[i]` (None: no adapter). `cache_weights`
    stacks each layer's factors once (for generation, where weights do not change);
    without it they are restacked every call, so training sees the current weights.
    `layers` saves the module scan when the caller keeps the list.
    """
    layers = lora_layers(model) if layers is None else layers
    try:
        for layer in layers:
            stack = _Stack(layer, groups, cache_weights)
            layer.forward = (lambda x, *a, _l=layer, _s=stack, **k: _grouped_forward(_l, _s, group_size, x, *a, **k))
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def grouped_values(heads: nn.ModuleDict, groups: list[str], hidden: torch.Tensor) -> torch.Tensor:
    """Each group's value head on its rows: hidden (B, T, H) -> values (B, T)."""
    G = len(groups)
    w = torch.stack([heads[g].weight.squeeze(0) for g in groups])  # (G, H)
    bias = torch.stack([heads[g].bias.squeeze(0) for g in groups])  # (G,)
    hg = hidden.to(w.dtype).reshape(G, -1, hidden.shape[-1])  # (G, g*T, H)
    v = torch.bmm(hg, w[:, :, None]).squeeze(-1) + bias[:, None]
    return v.reshape(hidden.shape[:-1])
