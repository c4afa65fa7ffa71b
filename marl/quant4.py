"""4-bit (bitsandbytes NF4 / FP4) linear layers on the CPU without a new dequantized weight per call.

bitsandbytes 0.50 computes a `Linear4bit` on the CPU by dequantizing the whole weight into a new float tensor
on every call, in the forward and again in the backward (docs/known-issues.md #19): at Qwen2.5-0.5B's shape
a float32 (4864, 896) block of 16.6 MiB per MLP projection, 1.37 GiB per pass over the 168 layers, freed
right away. Live tensors never hold more than one, but the process does not get the memory back: glibc
raises its mmap threshold to the size of such a block once one is freed, so every later allocation below it
(activations included) comes from the heap, which the interleaved blocks fragment. With 4 policies the
step's peak RSS grew by 1.2 GB over the same step in full precision (docs/memory.md).

`use_dequant_workspace(model)` makes every 4-bit layer of `model` on the CPU dequantize into one buffer, kept
with the model and shared by its layers (the largest weight's size: 16.6 MiB at Qwen2.5-0.5B), through
bitsandbytes' own CPU kernel, then `linear` as bitsandbytes does: the outputs and gradients are the same
bits. On other devices and for layouts the kernel does not take, bitsandbytes' own path runs.
"""

from __future__ import annotations

import ctypes
import sys
from math import prod

import torch
from torch import nn


class _Workspace:
    """One flat buffer per dtype, as large as the largest weight of the layers that share it."""

    def __init__(self, numel: int):
        self.numel, self.buffers = numel, {}

    def view(self, shape, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.buffers:
            self.buffers[dtype] = torch.empty(self.numel, dtype=dtype)
        return self.buffers[dtype][:prod(shape)].view(*shape)


def _kernel(quant_type: str, dtype: torch.dtype):
    """bitsandbytes' CPU dequantization kernel for this format and dtype, or None."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{name}", None) if name else None


def _absmax(qs) -> torch.Tensor:
    """The float32 block maxima of a 4-bit weight (dequantized first under double quantization)."""
    if not qs.nested:
        return qs.absmax.float()
    from bitsandbytes.functional import dequantize_blockwise

    return (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()


def _cpu_kernel(weight, dtype: torch.dtype):
    """bitsandbytes' CPU dequantization kernel for `weight` into `dtype`, or None where its CPU path would not
    call it either (odd widths, blocks of 2048 and more on AVX512, a weight repacked for inference: #19)."""
    qs = weight.quant_state
    if weight.device.type != "cpu" or qs.shape[-1] % 2 or getattr(qs, "packing_format_for_cpu", False):
        return None
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and qs.blocksize >= 2048:
        return None
    return _kernel(qs.quant_type, dtype)


def dequantize_into(weight, out: torch.Tensor) -> torch.Tensor:
    """`weight` (a bitsandbytes `Params4bit` that `_cpu_kernel` takes) dequantized into `out` (its shape, the
    compute dtype) by bitsandbytes' CPU kernel: the same bits as `bitsandbytes.functional.dequantize_4bit`."""
    qs = weight.quant_state
    rows, cols = prod(qs.shape[:-1]), qs.shape[-1]
    packed = weight.data.view(torch.uint8).reshape(rows, cols // 2)
    absmax = _absmax(qs)
    _cpu_kernel(weight, out.dtype)(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()),
                                   ctypes.c_void_p(out.data_ptr()), ctypes.c_longlong(qs.blocksize),
                                   ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out


class _Linear4bit(torch.autograd.Function):
    """y = x W^T + b with W dequantized into the workspace, in the forward and again in the backward (as
    bitsandbytes' MatMul4Bit: nothing of W is saved)."""

    @staticmethod
    def forward(ctx, x, bias, layer, workspace):
        ctx.layer, ctx.workspace, ctx.has_bias = layer, workspace, bias is not None
        w = dequantize_into(layer.weight, workspace.view(layer.weight.quant_state.shape, x.dtype))
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        qs = ctx.layer.weight.quant_state
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = dequantize_into(ctx.layer.weight, ctx.workspace.view(qs.shape, grad.dtype))
            grad_x = torch.matmul(grad, w)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_b, None, None


def _forward(layer, workspace: _Workspace, x: torch.Tensor) -> torch.Tensor:
    """`bnb.nn.Linear4bit.forward`, dequantizing into `workspace` (bitsandbytes' own forward where the CPU kernel
    does not apply)."""
    import bitsandbytes as bnb

    bnb.nn.modules.fix_4bit_weight_quant_state_from_module(layer)
    if not layer.compute_type_is_set:
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    dtype = layer.compute_dtype or x.dtype
    if x.device.type != "cpu" or len(layer.weight.quant_state.shape) != 2 or _cpu_kernel(layer.weight, dtype) is None:
        return bnb.nn.Linear4bit.forward(layer, x)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return _Linear4bit.apply(x.to(dtype), bias, layer, workspace).to(x.dtype)


def use_dequant_workspace(model: nn.Module) -> int:
    """Every bitsandbytes `Linear4bit` of `model` on the CPU dequantizes into one shared buffer (`_forward`);
    returns the number of layers changed."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing imported it, so no layer is 4-bit
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"]
    if not layers:
        return 0
    workspace = _Workspace(max(prod(m.weight.quant_state.shape) for m in layers))
    for m in layers:
        m.forward = (lambda x, _m=m: _forward(_m, workspace, x))
    return len(layers)
