"""Multi-process helpers: who writes, who generates what, how gradients meet.

Launched by `accelerate launch` or `torchrun`, every process runs the same stage;
each generates its own PPO rollouts (seeded by rank), gradients are averaged, and
only the main process writes adapters, checkpoints and metrics.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group when launched with several processes (gloo on CPU, nccl on GPU)."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_mean(tensors) -> None:
    """Average gradients (or any tensors) over processes, in place."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    n = torch.distributed.get_world_size()
    for t in tensors:
        if t is not None:
            torch.distributed.all_reduce(t)
            t /= n


def all_reduce_sum(tensors) -> None:
    """Sum tensors over processes, in place (each on its own device: NCCL reduces only CUDA tensors)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for t in tensors:
        if t is not None:
            torch.distributed.all_reduce(t)


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` summed over the processes (`t` itself with one process): the `reduce` of the batch
    statistics (marl.ppo.advantages.masked_moments)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t


def broadcast_parameters(params) -> None:
    """Start every process from the main process's weights (fresh LoRA inits differ by seed otherwise)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for p in params:
        torch.distributed.broadcast(p.data, src=0)


def write_digest(tag: str, named_params) -> None:
    """For multi-process tests: when MARL_DIGEST_DIR is set, every process writes a hash of
    its trainable weights, so a test can check all processes ended identical."""
    folder = os.environ.get("MARL_DIGEST_DIR")
    if not folder:
        return
    import hashlib
    import json
    from pathlib import Path

    h = hashlib.sha256()
    for name, p in sorted(named_params, key=lambda x: x[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{tag}.rank{rank()}.json").write_text(json.dumps({"digest": h.hexdigest()}))
