"""Saving and restoring optimizer and RNG state without pickle (safetensors + JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from marl.io import atomic_write_json, load_tensors, save_tensors


def save_optimizer(opt: torch.optim.Optimizer, path_stem: Path) -> None:
    """`<stem>.safetensors` holds every state tensor, `<stem>.json` the rest. A state nested in dicts (bitsandbytes'
    8-bit optimizers keep their quantized moments under one key: marl/ppo/optim.py) is saved under dotted keys."""
    sd = opt.state_dict()
    tensors, scalars, seen = {}, {}, set()

    def flat(prefix: str, state: dict) -> None:
        for k, v in state.items():
            if isinstance(v, dict):
                flat(f"{prefix}.{k}", v)
            elif isinstance(v, torch.Tensor):  # one map shared by several parameters: safetensors stores copies
                shared = v.untyped_storage().data_ptr() in seen
                seen.add(v.untyped_storage().data_ptr())
                tensors[f"{prefix}.{k}"] = v.clone() if shared else v
            else:
                scalars[f"{prefix}.{k}"] = v

    for pid, state in sd["state"].items():
        flat(str(pid), state)
    save_tensors(path_stem.with_suffix(".safetensors"), tensors)
    atomic_write_json(path_stem.with_suffix(".json"), {"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer(opt: torch.optim.Optimizer, path_stem: Path) -> None:
    meta = json.loads(path_stem.with_suffix(".json").read_text())
    tensors = load_tensors(path_stem.with_suffix(".safetensors"))
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, *path, k = key.split(".")
        node = state.setdefault(int(pid), {})
        for part in path:
            node = node.setdefault(part, {})
        node[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    out.update({f"gen.{k}": g.get_state() for k, g in generators.items()})
    return out


def set_rng_state(state: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for k, g in generators.items():
        if f"gen.{k}" in state:
            g.set_state(state[f"gen.{k}"])
