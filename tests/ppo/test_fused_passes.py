"""Passes fused or reused (Learner.old_pass_plan) give the numbers of the passes they replace: the old log-probs
from the update's first forward (`reuse_first_forward`), and the reference in the old-policy pass's stacked
layout (`stack_reference`). Each is checked against the same seed run with the fusion off."""

from __future__ import annotations

import pytest
import torch

from marl.ppo.rollout import reference_logprobs

from ..conftest import param_snapshot
from .test_trainer import make_trainer

ONE = [{"name": "policy_a", "kl_coef": 0.01}]


def trained(tiny_model_dir, tiny_run, steps=2, **kw):
    """(the trainer after `steps` iterations, each iteration's plan of the old pass, its metrics)."""
    trainer = make_trainer(tiny_model_dir, tiny_run, **kw)
    plans, metrics = [], []
    plan = trainer.learner.old_pass_plan
    trainer.learner.old_pass_plan = lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1]
    for _ in range(steps):
        metrics.append(trainer.step())
    return trainer, plans, metrics


def assert_same_weights(a, b, atol=1e-6):
    """Every adapter and value head of two trainers' models equal to `atol`; the policies did move."""
    pa, pb = param_snapshot(a.model), param_snapshot(b.model)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("extra", [
    {},  # value head on the policy's LoRA
    {"ppo_epochs": 3},  # the later epochs run forwards of their own
    {"gradient_checkpointing": True},  # the forward's checkpoints are recomputed in the update's backward
    {"value_model": "adapter"},  # the critic's pass is part of the first forward
    {"advantage_estimator": "grpo", "num_generations": 2, "kl_in": "loss", "kl_target": None},  # no critic
])
def test_the_update_s_first_forward_gives_the_old_pass_s_numbers(tiny_model_dir, tiny_run, extra):
    """One policy, its 4 rows one minibatch of one micro-batch: the update's first forward, detached, is the old
    pass, so reusing it trains the same adapters (to 1e-6) without the pass."""
    kw = dict(policies=ONE, prompts_per_policy=4, mini_batch_size=4, ppo_epochs=1, stack_reference=False) | extra
    fused, plans, metrics = trained(tiny_model_dir, tiny_run, **kw)
    plain, plain_plans, _ = trained(tiny_model_dir, tiny_run, reuse_first_forward=False, **kw)
    assert plans == ["update", "update"] and plain_plans == ["own", "own"]
    assert all(m["time/old_logprobs"] == 0 for m in metrics)
    assert_same_weights(fused, plain)


@pytest.mark.parametrize("kw", [
    dict(prompts_per_policy=4, mini_batch_size=2),  # two minibatches: the first optimizer step comes early
    dict(prompts_per_policy=4, mini_batch_size=4, gradient_accumulation_steps=2),  # two micro-batches
    dict(prompts_per_policy=4, mini_batch_size=4, disable_dropout=False),  # the update's forward has dropout
    dict(prompts_per_policy=4, mini_batch_size=4, policies=None),  # two policies: one kept graph at a time
])
def test_the_first_forward_is_reused_only_when_it_covers_every_row_before_the_first_optimizer_step(
        tiny_model_dir, tiny_run, kw):
    kw = dict(policies=ONE, stack_reference=False, multi_lora="peft") | kw
    if kw["policies"] is None:
        del kw["policies"]
    _, plans, _ = trained(tiny_model_dir, tiny_run, steps=1, **kw)
    assert plans == ["own"]


@pytest.mark.parametrize("kw", [
    dict(mini_batch_size=2),  # two minibatches: the first one's rows
    dict(mini_batch_size=4, gradient_accumulation_steps=2),  # two micro-batches: the first one's rows
    dict(mini_batch_size=2, stack_reference=True),  # the other rows' old pass stacked with the reference
    dict(mini_batch_size=2, ppo_epochs=2, advantage_estimator="grpo", num_generations=2, kl_in="loss",
         kl_target=None),  # no critic
])
def test_the_first_micro_batch_s_old_log_probs_come_from_its_forward(tiny_model_dir, tiny_run, kw):
    """One policy whose first optimizer step comes before all its rows are seen: the rows of the update's first
    micro-batch take their old log-probs and values from its forward, the other rows from the old pass, and the
    adapters are those of the same seed with `reuse_first_forward` off (1e-6)."""
    kw = dict(policies=ONE, prompts_per_policy=4, stack_reference=False) | kw
    runs = []
    for reuse in (True, False):
        t = make_trainer(tiny_model_dir, tiny_run, reuse_first_forward=reuse, **kw)
        first, old_rows = [], []
        learner = t.learner
        forward, passes = learner._first_forward, learner._policy_pass
        learner._first_forward = (lambda name, rollout, rows, first=first, forward=forward:
                                  first.append(len(rows)) or forward(name, rollout, rows))

        def policy_pass(names, rollout, rows, entropy=False, passes=passes, old_rows=old_rows):
            if not torch.is_grad_enabled():  # the old pass (with the reference's rows when stacked)
                old_rows.append(sum(n == "policy_a" for n in ([names] * len(rows) if isinstance(names, str) else names)))
            return passes(names, rollout, rows, entropy=entropy)

        learner._policy_pass = policy_pass
        for _ in range(2):
            t.step()
        runs.append(t)
        micro = 2
        assert first == ([micro, micro] if reuse else [])
        assert sum(old_rows) == (2 * (4 - micro) if reuse else 2 * 4)
    assert_same_weights(*runs)


@pytest.mark.parametrize("ref, policies, extra", [
    ("sft", ONE, {}), (None, ONE, {}),  # the sft adapter or the bare base
    ("sft", None, {}),  # two policies sharing every pass
    ("sft", None, {"value_model": "adapter"}),  # each policy's critic pass on its rows only
])
def test_the_reference_in_the_old_pass_s_stacked_layout_gives_the_numbers_of_two_passes(tiny_model_dir, tiny_run,
                                                                                        ref, policies, extra):
    """The reference (the sft adapter, or the bare base) as one more group of the stacked old-policy pass: the
    reference log-probs, old log-probs and values of the two passes (1e-6), and the same adapters after two
    iterations."""
    kw = dict(prompts_per_policy=4, mini_batch_size=2, forward_batch_size=3, reuse_first_forward=False) | extra
    if policies:
        kw["policies"] = policies
    fused = make_trainer(tiny_model_dir, tiny_run, **kw)
    fused.ref_adapter = ref
    rollout = fused.rollout()
    shared = fused.shares_passes(rollout)
    assert fused.learner.old_pass_plan(rollout, shared, ref) == "with_reference"
    ref_lp, (old_lp, values) = fused.learner.old_and_reference_pass(rollout, ref)  # passes of 1 + 1, ..., 1 + 1 rows
    want_old = (fused.learner._old_pass_all(rollout) if shared else
                fused.learner._old_pass("policy_a", rollout, torch.arange(len(rollout.adapter_names))))
    for got, want in zip((ref_lp, old_lp, values), (reference_logprobs(fused.model, ref, rollout), *want_old)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    runs = []
    for stack in (True, False):  # each built and run in turn: sampling draws from torch's global generator
        t = make_trainer(tiny_model_dir, tiny_run, stack_reference=stack, **kw)
        t.ref_adapter = ref
        for _ in range(2):
            t.step()
        runs.append(t)
    assert_same_weights(*runs)
