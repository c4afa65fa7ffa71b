"""Each policy's optimizer (marl/ppo/optim.py): adam and adamw_8bit, their state through state_dict and checkpoints."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from marl.config import PPOArgs
from marl.errors import MarlError
from marl.ppo import optim
from marl.ppo.checkpoint import load_optimizer, save_optimizer
from marl.ppo.kl import make_kl_controller
from marl.ppo.optim import make_optimizer, optimizer_state_bytes
from marl.ppo.policy_state import PolicyState
from marl.ppo.reward_norm import RunningMoments

pytest.importorskip("bitsandbytes")


def lora_like(seed: int = 0) -> list[torch.nn.Parameter]:
    """A LoRA pair of Qwen2.5-0.5B's q_proj width (16 x 896: 8-bit moments) and a value head (897: float32)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(16, 896, generator=g) * 0.02),
            torch.nn.Parameter(torch.randn(896, 16, generator=g) * 0.02),
            torch.nn.Parameter(torch.randn(1, 897, generator=g) * 0.02)]


def train(opt, params, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def state_tensors(opt) -> dict[str, torch.Tensor]:
    """Every tensor of `opt.state`, keyed by parameter position and state name, as clones."""
    index = {id(p): i for i, p in enumerate(opt.param_groups[0]["params"])}
    return {f"{index[id(p)]}.{k}": v.clone() for p, st in opt.state.items() for k, v in st.items()
            if isinstance(v, torch.Tensor)}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_adam_is_the_default_and_adamw_8bit_keeps_8bit_moments_above_the_size_threshold():
    assert PPOArgs().optim == "adam"
    params = lora_like()
    assert type(make_optimizer("adam", params, 1e-3)) is torch.optim.Adam
    opt = make_optimizer("adamw_8bit", params, 1e-3)
    train(opt, params, 1)
    big, _, head = (opt.state[p] for p in params)
    assert big["state1"].dtype == big["state2"].dtype == torch.uint8 and big["state1"].shape == (16, 896)
    assert big["absmax1"].shape == (16 * 896 // 256,)  # one float32 maximum per block of 256
    assert head["state1"].dtype == torch.float32  # 897 < 4096 elements: float32 moments
    # per 8-bit parameter: 2 bytes of moments + 8 / 256 of block maxima, against Adam's 8
    adam = make_optimizer("adam", lora_like(), 1e-3)
    train(adam, adam.param_groups[0]["params"], 1)
    assert optimizer_state_bytes(opt) < 0.3 * optimizer_state_bytes(adam)


def test_adamw_8bit_with_weight_decay_0_follows_adam_closely():
    start, a, b = lora_like(), lora_like(), lora_like()
    train(make_optimizer("adam", a, 1e-3), a, 5)
    train(make_optimizer("adamw_8bit", b, 1e-3), b, 5)
    for x0, x, y in zip(start, a, b):
        assert (x - y).abs().mean() < 0.05 * (x - x0).abs().mean()


def trained_pair(kind):
    """(source optimizer, its parameters, destination optimizer, its parameters), each trained a little."""
    src_params, dst_params = lora_like(0), lora_like(1)
    src, dst = make_optimizer(kind, src_params, 1e-3), make_optimizer(kind, dst_params, 2e-3)
    train(src, src_params, 3, seed=1)
    train(dst, dst_params, 1, seed=2)
    return src, src_params, dst, dst_params


@pytest.mark.parametrize("kind", optim.OPTIMIZERS)
def test_copying_a_policys_optimizer_state_is_bit_identical_and_leaves_the_source_unchanged(kind):
    """What PBT does when a policy takes over another's training state (`PolicyState.copy_from`)."""
    src, src_params, dst, dst_params = trained_pair(kind)
    before = state_tensors(src)

    def state(opt):
        return PolicyState(None, opt, make_kl_controller(0.1, None), RunningMoments(), torch.Generator())

    state(dst).copy_from(state(src))
    assert_same_state(state_tensors(dst), before)
    assert dst.param_groups[0]["lr"] == 1e-3
    with torch.no_grad():  # the adapter weights are copied too
        for p, q in zip(src_params, dst_params):
            q.copy_(p)
    train(dst, dst_params, 2, seed=3)  # training the copy leaves the source as it was
    assert_same_state(state_tensors(src), before)
    train(src, src_params, 2, seed=3)  # same gradients from the same state: the same weights
    for p, q in zip(src_params, dst_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", optim.OPTIMIZERS)
def test_a_bare_load_state_dict_shares_adams_tensors_but_copies_bitsandbytes_state(kind):
    """docs/known-issues.md #18: why `PolicyState.copy_from` copies first."""
    src, _, dst, dst_params = trained_pair(kind)
    before = state_tensors(src)
    dst.load_state_dict(src.state_dict())
    assert_same_state(state_tensors(dst), before)
    train(dst, dst_params, 1, seed=3)
    moved = [k for k, v in state_tensors(src).items() if not torch.equal(v, before[k])]
    assert (moved != []) == (kind == "adam")


@pytest.mark.parametrize("kind", optim.OPTIMIZERS)
def test_checkpoint_round_trips_bit_identically(tmp_path, kind):
    params, other = lora_like(0), lora_like(0)
    opt = make_optimizer(kind, params, 1e-3)
    train(opt, params, 3)
    save_optimizer(opt, tmp_path / "optim_policy_a")
    restored = make_optimizer(kind, other, 1e-3)
    load_optimizer(restored, tmp_path / "optim_policy_a")
    assert_same_state(state_tensors(restored), state_tensors(opt))
    assert restored.param_groups[0]["lr"] == 1e-3
    with torch.no_grad():  # the adapter, as the checkpoint restores it
        for p, q in zip(params, other):
            q.copy_(p)
    train(opt, params, 2, seed=5)
    train(restored, other, 2, seed=5)
    for p, q in zip(params, other):
        assert torch.equal(p, q)


def test_unknown_or_unavailable_optimizers_are_one_line_errors(monkeypatch):
    with pytest.raises(MarlError, match="optim: 'sgd' must be one of adam, adamw_8bit"):
        PPOArgs(optim="sgd")
    with pytest.raises(MarlError, match="optim: 'sgd' must be one of adam, adamw_8bit"):
        make_optimizer("sgd", lora_like(), 1e-3)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MarlError, match="adamw_8bit needs bitsandbytes") as e:
        PPOArgs(optim="adamw_8bit")
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes: ImportError
    with pytest.raises(MarlError, match="adamw_8bit needs bitsandbytes"):
        make_optimizer("adamw_8bit", lora_like(), 1e-3)
