"""Saving and restoring optimizer and RNG state without pickle (safetensors + JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from marl.io import atomic_write_json, load_tensors, save_tensors


def save_optimizer(opt: torch.optim.Optimizer, path_stem: Path) -> None:
    """`<stem>.safetensors` holds every state tensor, `<stem>.json` the rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    save_tensors(path_stem.with_suffix(".safetensors"), tensors)
    atomic_write_json(path_stem.with_suffix(".json"), {"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer(opt: torch.optim.Optimizer, path_stem: Path) -> None:
    meta = json.loads(path_stem.with_suffix(".json").read_text())
    tensors = load_tensors(path_stem.with_suffix(".safetensors"))
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
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
