"""The heads on a base's last hidden states: the LM head as the base's forward applies it, and the
output embedding an adapter computes its logits with (its own copy, when it saves one).

Value heads and score heads are `nn.Linear(hidden, 1)` layers kept per adapter (marl.adapters).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import MarlError


def lm_head_fn(base: nn.Module, head: nn.Module | None = None) -> Callable[[Tensor], Tensor]:
    """hidden (..., H) -> logits (..., V) as `base`'s own forward makes them from its last hidden states:
    the output embedding (or `head` in its place: an adapter's own copy of it), then the logit scaling a few
    architectures apply after it (Gemma's `final_logit_softcapping`, Cohere's `logit_scale`, Granite's
    `logits_scaling`)."""
    head = base.get_output_embeddings() if head is None else head
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

    if type(head) is nn.Linear and scale is None and divide is None and cap is None:
        logits.linear = head  # a plain linear head: token_logprobs takes the hand-written backward
    return logits


def output_head(base: nn.Module, adapter: str | None) -> nn.Module:
    """The output embedding adapter `adapter` (None: the bare base) computes logits with: the base's, or the
    adapter's own copy when it saves one (peft's `modules_to_save`)."""
    head = base.get_output_embeddings()
    copies = getattr(head, "modules_to_save", None)  # peft's ModulesToSaveWrapper: a copy per adapter
    if isinstance(copies, nn.ModuleDict):
        return copies[adapter] if adapter in copies else head.original_module
    if hasattr(head, "original_module"):  # another peft wrapper would follow the active adapter, not `adapter`
        raise MarlError(f"an adapter on this base changes its output embedding ({type(head).__name__}), which "
                        "marl cannot apply per adapter: merge that adapter into a base of its own")
    return head
