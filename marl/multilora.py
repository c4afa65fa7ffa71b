"""All policies in one pass: batched multi-LoRA execution over rows grouped by adapter.

peft runs a mixed-adapter batch by slicing rows per adapter in every layer (and only
in eval mode), so a batch of N policies costs ~1.7x a single-adapter batch of the
same size (docs/known-issues.md #4). Here each LoRA layer instead applies the stacked
weights of all adapters with two batched matmuls (as S-LoRA / Punica do):

    x:  (G, g*T, d_in)   rows grouped by adapter, G groups of (up to) g rows
    A:  (G, r, d_in)     every adapter's lora_A, stacked
    B:  (G, d_out, r)    every adapter's lora_B times its scaling, stacked
    y = baddbmm(base(x), x @ A^T, B^T)      (the add is fused into the second matmul)

Groups of unequal size are zero-padded to the largest in the rank-r part only (the
base layer never sees padding). It works in training mode too: gradients flow
through the stack into each adapter's own parameters, so PPO updates of all
policies share one forward and backward over the base. Adapters stay ordinary peft
adapters: stacking is only how they are executed. Rows of one adapter must be
contiguous; `group_layout` checks that, and callers fall back to peft's path when
it does not hold.

The stacked path computes vanilla LoRA exactly: any rank and alpha (also per layer, peft's
`rank_pattern` / `alpha_pattern`), rslora scaling (peft's `scaling` is read as is) and a LoRA bias
(`lora_bias`: B's bias, scaled like B). Whatever else changes peft's forward for an adapter (a
LoRA variant such as DoRA, `modules_to_save`, trainable tokens, LoRA on a layer type other than
peft's Linear, 8-bit and 4-bit Linear) it does not compute: `stacking_refusal` names it,
`grouped_lora` refuses such an adapter, and `Execution` runs batches holding it one adapter at a
time on peft's own forward, saying so once.

`Execution` is the strategy a `MultiAdapterModel` runs mixed-adapter batches with
(`multi_lora: batched | peft`), and the one place that decides between stacked and
per-adapter passes, for the PPO update and for generation alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BASE_NAME = "__base__"  # peft's adapter name for "no adapter" rows in a mixed-adapter batch

logger = logging.getLogger(__name__)

# peft's LoRA layers whose forward is vanilla LoRA, base(x) + lora_B(lora_A(dropout(x))) * scaling: the stacked
# path computes these (by module and class name, so that bitsandbytes is not imported to ask)
_LINEAR, _LINEAR_8BIT, _LINEAR_4BIT = (("peft.tuners.lora.layer", "Linear"), ("peft.tuners.lora.bnb", "Linear8bitLt"),
                                       ("peft.tuners.lora.bnb", "Linear4bit"))
_VANILLA_LAYERS = {_LINEAR, _LINEAR_8BIT, _LINEAR_4BIT}


@dataclass(frozen=True)
class Layout:
    """Rows grouped by adapter: `groups[i]` (None: no adapter) owns the next `sizes[i]` rows."""

    groups: tuple[str | None, ...]
    sizes: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1

    def bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of each group's rows."""
        out, s = [], 0
        for n in self.sizes:
            out.append((s, s + n))
            s += n
        return out

    def padded_index(self, device) -> torch.Tensor:
        """For each row, its position in the (G * max size) padded layout."""
        g = max(self.sizes)
        return torch.cat([torch.arange(n, device=device) + i * g for i, n in enumerate(self.sizes)])


def group_layout(names: Sequence[str | None]) -> Layout | None:
    """The groups of `names` if each adapter's rows are contiguous, else None."""
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
    if len(set(groups)) != len(groups):
        return None
    return Layout(tuple(groups), tuple(sizes))


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft LoRA linear layer (full precision, 8-bit and 4-bit bases alike)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")
            and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]


def stacking_refusal(model: nn.Module, name: str, layers: list[nn.Module] | None = None) -> str | None:
    """Why the stacked path cannot compute adapter `name` of peft model `model` exactly: the peft option that
    changes its forward (e.g. "use_dora=True"), or None when the stacked path computes it exactly.

    `layers`: `lora_layers(model)`, when the caller keeps them."""
    config = getattr(model, "peft_config", {}).get(name)
    if getattr(config, "modules_to_save", None):
        return f"modules_to_save={list(config.modules_to_save)}"
    if getattr(config, "trainable_token_indices", None):
        return "trainable_token_indices"
    for layer in lora_layers(model) if layers is None else layers:
        if name not in layer.lora_A and name not in getattr(layer, "lora_embedding_A", {}):
            continue
        variant = getattr(layer, "lora_variant", {}).get(name)
        if variant is not None:
            return _variant_option(config, variant)
        if (type(layer).__module__, type(layer).__name__) not in _VANILLA_LAYERS:
            return f"LoRA on a {type(layer).__name__} layer"
    return None


def _variant_option(config, variant) -> str:
    """The LoraConfig option that made peft give an adapter `variant` (peft marks such fields `is_lora_variant`,
    or lists the `init_lora_weights` values that are variants)."""
    for f in dataclasses.fields(config) if config is not None else ():
        value = getattr(config, f.name)
        if (f.metadata.get("is_lora_variant") and value) or value in f.metadata.get("lora_variants", ()):
            return f"{f.name}={value!r}" if isinstance(value, (bool, str)) else f.name
    return f"the LoRA variant {type(variant).__name__}"


class Execution:
    """How rows of several adapters run on one peft model: "batched" (stacked LoRA, this module)
    or "peft" (each adapter in passes of its own; generation through peft's `adapter_names=`, which
    peft allows only in eval mode: docs/known-issues.md #4). Keeps the model's LoRA layers, scanned
    once per set of adapters."""

    def __init__(self, mode: str = "batched"):
        self.mode = mode
        self._layers: list[nn.Module] | None = None
        self._refusals: dict[str, str | None] = {}  # adapter -> `stacking_refusal`, asked once per set of adapters
        self._told: set[str] = set()  # adapters whose refusal was printed

    def layout(self, names: Sequence[str | None], model: nn.Module | None = None) -> Layout | None:
        """The one decision of how rows of several adapters run (`names`: each row's adapter, None: the
        bare base): the `Layout` of one stacked-LoRA pass over all of them (mode "batched", more than one
        adapter, each adapter's rows contiguous, and, given the peft `model`, no adapter that the stacked
        path cannot compute exactly), or None: each adapter in passes of its own (generate: peft's
        `adapter_names=` path). The PPO trainer and `generate` both ask here."""
        if self.mode != "batched" or len(set(names)) < 2:
            return None
        layout = group_layout(names)
        if layout is not None and model is not None and self.refused(model, names):
            return None
        return layout

    def refused(self, model: nn.Module, names: Sequence[str | None]) -> list[str]:
        """The adapters among `names` that the stacked path cannot compute exactly (`stacking_refusal`); the
        first time one is met, one line says so."""
        out = []
        for name in dict.fromkeys(n for n in names if n is not None):
            if name not in self._refusals:
                self._refusals[name] = stacking_refusal(model, name, self.layers(model))
            why = self._refusals[name]
            if why is None:
                continue
            out.append(name)
            if name not in self._told:
                self._told.add(name)
                logger.warning("marl: warning: adapter %r uses %s, which the stacked multi-LoRA path does not compute: "
                               "batches with it run one adapter at a time on peft's own forward", name, why)
        return out

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The LoRA layers of `model` (scanned on first use after `forget_layers`)."""
        if self._layers is None:
            self._layers = lora_layers(model)
        return self._layers

    def forget_layers(self) -> None:
        """Rescan the layers on next use (an adapter was added or removed)."""
        self._layers = None
        self._refusals.clear()

    def stacked(self, model: nn.Module, layout: Layout, cache_weights: bool = False):
        """`grouped_lora` over `model`'s layers for the body of a `with`."""
        return grouped_lora(model, layout, cache_weights, layers=self.layers(model))

    def generate(self, model: nn.Module, names: Sequence[str | None], switch=None, **kwargs):
        """`model.generate(**kwargs)` with row i under adapter `names[i]` (None: the bare base): one stacked
        call when `layout` allows it and no row is expanded into several sequences (num_return_sequences,
        num_beams); one call per adapter (`switch(name)`: a context that makes it active) when the rows hold
        an adapter the stacked path cannot compute (`refused`); else one call through peft's mixed-adapter
        path (eval mode only). Per-adapter calls give each its rows of any logits processor with a
        `select(rows)` method and are right-padded with `pad_token_id` to one tensor."""
        expands = kwargs.get("num_return_sequences", 1) > 1 or kwargs.get("num_beams", 1) > 1
        layout = None if expands else self.layout(names, model)
        if layout is not None:
            with self.stacked(model, layout, cache_weights=True):
                return model.generate(**kwargs)
        if switch is not None and not expands and self.refused(model, names):
            return _generate_each(model, names, switch, **kwargs)
        return model.generate(adapter_names=[BASE_NAME if n is None else n for n in names], **kwargs)


def _generate_each(model: nn.Module, names: Sequence[str | None], switch, input_ids, attention_mask,
                   logits_processor=None, **kwargs) -> torch.Tensor:
    """One `generate` call per adapter of `names` on its rows, back in row order, right-padded."""
    outs: list[torch.Tensor | None] = [None] * len(names)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        index = torch.tensor(rows, device=input_ids.device)
        processors = None if logits_processor is None else type(logits_processor)(
            p.select(index) if hasattr(p, "select") else p for p in logits_processor)
        with switch(name):
            out = model.generate(input_ids=input_ids[index], attention_mask=attention_mask[index],
                                 logits_processor=processors, **kwargs)
        for j, i in enumerate(rows):
            outs[i] = out[j]
    width = max(o.shape[0] for o in outs)
    pad = kwargs.get("pad_token_id")
    return torch.stack([torch.cat([o, o.new_full((width - o.shape[0],), pad)]) for o in outs])


class _Stack:
    """The stacked LoRA factors of one layer for the groups of a batch (optionally cached)."""

    def __init__(self, layer, groups: Sequence[str | None], cache: bool):
        self.layer, self.groups, self.cache, self._value = layer, groups, cache, None
        self.named = [g for g in groups if g is not None and g in layer.lora_A]

    def get(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A (G, r, d_in), B * scaling (G, d_out, r), B's bias * scaling (G, d_out) or None if no adapter here
        has a LoRA bias); groups without this adapter get zeros."""
        if self._value is not None:
            return self._value
        layer, named = self.layer, self.named
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
        b = torch.stack([pad_b(layer.lora_B[g].weight) * layer.scaling[g] if g in named else zeros_b
                         for g in self.groups])
        bias = None
        if any(layer.lora_B[g].bias is not None for g in named):  # peft: lora_B(...) * scaling, bias included
            bias = torch.stack([layer.lora_B[g].bias * layer.scaling[g]
                                if g in named and layer.lora_B[g].bias is not None else ref.new_zeros(d_out)
                                for g in self.groups])
        value = (a, b, bias)
        if self.cache:
            self._value = value
        return value


def _grouped_forward(layer, stack: _Stack, layout: Layout, index: torch.Tensor | None, x: torch.Tensor,
                     *args, **kwargs) -> torch.Tensor:
    kwargs.pop("adapter_names", None)
    result = layer.base_layer(x, *args, **kwargs)
    if not stack.named:
        return result
    a, b, bias = stack.get()
    G, d_in, d_out = a.shape[0], a.shape[2], b.shape[1]
    if x.dim() > 2 and x.shape[0] != layout.rows:
        raise ValueError(f"grouped LoRA: the batch has {x.shape[0]} rows, the adapter layout {layout.rows}")
    xr = x.to(a.dtype).reshape(layout.rows, -1, d_in)  # (rows, T, d_in): batch-first, rows grouped
    if layer.training:
        drops = [layer.lora_dropout[g] if g in layer.lora_dropout else None for g in stack.groups]
        if any(d is not None and not isinstance(d, nn.Identity) for d in drops):
            xr = torch.cat([d(xr[s:e]) if d is not None else xr[s:e] for d, (s, e) in zip(drops, layout.bounds())])
    T = xr.shape[1]
    if index is None:  # equal groups: a view
        xg = xr.reshape(G, -1, d_in)
    else:  # unequal groups: zero rows pad each group to the largest (rank-r work only)
        xg = xr.new_zeros(G * max(layout.sizes), T, d_in).index_copy(0, index, xr).reshape(G, -1, d_in)
    h = torch.bmm(xg, a.transpose(1, 2))  # (G, g*T, r)
    if index is None and result.dtype == a.dtype:
        out = result.reshape(G, -1, d_out)
        if bias is not None:
            out = out + bias[:, None]
        return torch.baddbmm(out, h, b.transpose(1, 2)).reshape(result.shape)
    y = torch.bmm(h, b.transpose(1, 2))
    if bias is not None:
        y = y + bias[:, None]
    if index is not None:
        y = y.reshape(-1, T, d_out).index_select(0, index)
    return result + y.reshape(result.shape).to(result.dtype)


@contextlib.contextmanager
def grouped_lora(model: nn.Module, layout: Layout, cache_weights: bool = False,
                 layers: list[nn.Module] | None = None) -> Iterator[None]:
    """Run every LoRA layer of `model` in grouped mode for the body of the `with`.

    Row groups follow `layout` (adapter None: no LoRA on those rows). `cache_weights`
    stacks each layer's factors once (for generation, where weights do not change);
    without it they are restacked every call, so training sees the current weights.
    `layers` saves the module scan when the caller keeps the list. An adapter the stacked path cannot
    compute exactly (`stacking_refusal`) is refused with a ValueError.
    """
    layers = lora_layers(model) if layers is None else layers
    for g in dict.fromkeys(g for g in layout.groups if g is not None):
        why = stacking_refusal(model, g, layers)
        if why is not None:
            raise ValueError(f"grouped LoRA cannot compute adapter {g!r} exactly (it uses {why}): run batches "
                             "with it on peft's path (Execution.layout decides)")
    index: dict[torch.device, torch.Tensor | None] = {}

    def forward(x, *args, _layer, _stack, **kwargs):
        if x.device not in index:
            index[x.device] = None if layout.even else layout.padded_index(x.device)
        return _grouped_forward(_layer, _stack, layout, index[x.device], x, *args, **kwargs)

    try:
        for layer in layers:
            stack = _Stack(layer, layout.groups, cache_weights)
            layer.forward = (lambda x, *a, _l=layer, _s=stack, **k: forward(x, *a, _layer=_l, _stack=_s, **k))
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def grouped_values(heads: nn.ModuleDict, layout: Layout, hidden: torch.Tensor) -> torch.Tensor:
    """Each group's value head on its rows: hidden (B, T, H) -> values (B, T) float32 (or the heads' dtype).

    A group without a head (a critic-free policy, or None) reads 0: no value pass for its rows."""
    out = []
    for g, (s, e) in zip(layout.groups, layout.bounds()):
        head = heads[g] if g is not None and g in heads else None
        if head is None:
            out.append(hidden.new_zeros(e - s, hidden.shape[1], dtype=torch.float32))
        else:
            out.append(head(hidden[s:e].to(head.weight.dtype)).squeeze(-1))
    return torch.cat(out)


@contextlib.contextmanager
def lean_lora(layers: list[nn.Module]) -> Iterator[None]:
    """For the body of the `with`, each full-precision and 4-bit LoRA layer runs peft's own eval-mode forward for
    the adapter active at entry (or the bare base, adapters disabled) as the same operations in the same order,
    so bit for bit the same result, without peft's per-call checks; one exception: a float32 base on a CPU takes
    16-32 rows as (W @ x^T)^T without gradients (`few_row_linear`), the same sums in another order.

    Generation runs every layer once per new token, and at a few rows those checks and module calls cost more than
    the LoRA matmuls themselves (docs/speed.md, "The decode"). A layer in any other state (merged, several active
    adapters, a LoRA variant, another layer type) keeps peft's forward, and a call in training mode, under autocast
    or with peft's keyword arguments goes to peft's forward too. The body must not switch adapters."""
    lean = []
    for layer in layers:
        forward = _lean_forward(layer)
        if forward is not None and "forward" not in layer.__dict__:
            layer.forward = forward
            lean.append(layer)
    try:
        yield
    finally:
        for layer in lean:
            layer.__dict__.pop("forward", None)


# A CPU's BLAS (MKL on x86) computes x @ W^T for 16-32 rows through a weight of at least 256 x 256 1.1-2.9x faster
# as (W @ x^T)^T (docs/speed.md, "Few-row matmuls on a CPU"); other row counts and smaller weights gain nothing
WEIGHT_LEFT_ROWS = (16, 32)
WEIGHT_LEFT_MIN_DIM = 256


def few_row_linear(base: nn.Module):
    """`base`'s forward, for a float32 `nn.Linear` on a CPU with both dimensions >= `WEIGHT_LEFT_MIN_DIM` computed
    as (W @ x^T)^T (+ bias) when the input holds `WEIGHT_LEFT_ROWS` rows: the same dot products summed in another
    order (within float32 rounding of `F.linear`, not bit for bit). Any other module comes back unchanged."""
    w = getattr(base, "weight", None)
    if type(base) is not nn.Linear or w.device.type != "cpu" or w.dtype != torch.float32 or \
            min(w.shape) < WEIGHT_LEFT_MIN_DIM:
        return base
    lo, hi = WEIGHT_LEFT_ROWS

    def forward(x, *args):
        rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
        if args or not lo <= rows <= hi or x.dtype != w.dtype or torch.is_grad_enabled():
            return base(x, *args)
        y = torch.mm(w, x.reshape(rows, -1).t()).t().contiguous()
        if base.bias is not None:
            y += base.bias
        return y.view(*x.shape[:-1], w.shape[0])
    return forward


def _lean_forward(layer: nn.Module):
    """`lean_lora`'s forward for one layer in its current state, or None to keep peft's."""
    kind = (type(layer).__module__, type(layer).__name__)
    if kind not in (_LINEAR, _LINEAR_4BIT) or getattr(layer, "merged", False):
        return None
    base, peft_forward = few_row_linear(layer.base_layer), type(layer).forward
    if layer.disable_adapters:
        name = None
    else:
        active = list(layer.active_adapters)
        if len(active) != 1:
            return None
        name = active[0]
        if name not in layer.lora_A:
            name = None
        elif name in getattr(layer, "lora_variant", {}):
            return None
    if name is None:
        def bare(x, *args, **kwargs):
            if kwargs:
                return peft_forward(layer, x, *args, **kwargs)
            return base(x, *args)
        return bare
    a, b, scaling = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear:
        return None
    four_bit = kind == _LINEAR_4BIT
    cast = getattr(layer, "cast_input_dtype_enabled", True)

    def adapted(x, *args, **kwargs):
        if kwargs or layer.training or torch.is_autocast_enabled():
            return peft_forward(layer, x, *args, **kwargs)
        result = base(x, *args)
        dtype = result.dtype
        if cast and x.dtype != a.weight.dtype:  # peft's _cast_input_dtype
            x = x.to(a.weight.dtype)
        # lora_B(lora_A(x)) as nn.Linear computes it (its dropout is the identity in eval mode)
        out = F.linear(F.linear(x, a.weight, a.bias), b.weight, b.bias) * scaling
        if four_bit:  # peft's Linear4bit: clone, then add the LoRA output cast to the base's dtype
            return result.clone() + out.to(dtype)
        return (result + out).to(dtype)  # peft's Linear
    return adapted


@contextlib.contextmanager
def _switched_to(layers: list[nn.Module], state: list[tuple]) -> Iterator[None]:
    """The LoRA layers in a saved switch state (grouped forward, active adapter, disabled) for the body."""
    now = _switch_state(layers)
    _set_switch_state(layers, state)
    try:
        yield
    finally:
        _set_switch_state(layers, now)


def _switch_state(layers: list[nn.Module]) -> list[tuple]:
    return [(layer.__dict__.get("forward"), layer._active_adapter, layer._disable_adapters) for layer in layers]


def _set_switch_state(layers: list[nn.Module], state: list[tuple]) -> None:
    for layer, (forward, active, disabled) in zip(layers, state):
        if forward is None:
            layer.__dict__.pop("forward", None)
        else:
            layer.forward = forward
        layer._active_adapter, layer._disable_adapters = active, disabled


@contextlib.contextmanager
def activation_checkpointing(base: nn.Module, layers: list[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Checkpoint every decoder layer of `base` (transformers' own, non-reentrant) for the body of the `with`.

    Backward recomputes a layer after the forward's adapter switch has been undone (`use_adapter`
    and `grouped_lora` restore in `finally`, and a policy pass and its critic pass use different
    adapters), so each checkpoint saves the LoRA layers' switch state at forward time and the
    recompute runs in that state (torch.utils.checkpoint's `context_fn`; docs/known-issues.md #12).
    Non-reentrant checkpointing needs no `enable_input_require_grads` hook on the frozen embeddings,
    so none is left behind.
    """
    if not enabled:
        yield
        return

    def context_fn():
        return contextlib.nullcontext(), _switched_to(layers, _switch_state(layers))

    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()
    try:
        yield
    finally:
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
