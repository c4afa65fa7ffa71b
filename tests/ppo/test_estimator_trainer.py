"""PPO, GRPO, RLOO (and REINFORCE++) policies side by side on one base: isolation, batched = per-policy,
no value model for the critic-free ones, reward functions that read dataset columns, config errors."""

from __future__ import annotations

import json

import pytest
import torch

from marl.config import PPOArgs, critic_name
from marl.errors import MarlError
from marl.model import MultiAdapterModel
from marl.ppo.experience import Experience, loss_weight
from marl.ppo.learner import Learner
from marl.ppo.policy_state import PolicyState
from marl.ppo.rollout import reference_logprobs
from marl.ppo.trainer import MultiPolicyPPOTrainer
from marl.rewards import call_reward_function

from ..conftest import param_snapshot
from .test_trainer import ppo_args, use_sgd

G2 = {"num_generations": 2}
SIDE_BY_SIDE = [{"name": "policy_ppo"}, {"name": "policy_grpo", "advantage_estimator": "grpo", **G2},
                {"name": "policy_rloo", "advantage_estimator": "rloo", **G2}]
PROMPTS = ["The movie was", "I watched it and", "This film is"]


def make_trainer(tiny_model_dir, tiny_run, policies=SIDE_BY_SIDE, reward_fns=None, columns=None, **kw):
    """Policies built as `marl ppo` builds them: a value head (or critic adapter) only for those with a critic."""
    cfg = ppo_args("unused", tiny_model_dir, tiny_run, policies=policies, **kw)
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(tiny_model_dir, **cfg.load_kwargs())
    model.load_adapter(str(tiny_run / "adapters/reward"), "reward", role="reward")
    model.load_adapter(str(tiny_run / "adapters/sft"), "sft", role="sft")
    specs = [cfg.policy(p) for p in cfg.policies]
    for p in specs:
        model.add_adapter(p.name, cfg.lora_config(dropout=0.0), init_from="sft", value_head=p.has_critic)
        if cfg.value_model == "adapter" and p.has_critic:
            model.add_critic(p.name, critic_name(p.name), cfg.lora_config(dropout=0.0), init_from=p.name)
    prompts = [model.tokenizer(t)["input_ids"] for t in PROMPTS]
    return MultiPolicyPPOTrainer(model, cfg, specs, prompts, "sft", reward_fns, prompt_columns=columns)


def owned(name: str, params) -> set[str]:
    return {n for n in params if f".{name}." in n or n.startswith(f"value_heads.{name}")}


def test_ppo_grpo_and_rloo_side_by_side_on_a_4bit_base_each_change_only_their_own_adapter(tiny_model_dir, tiny_run):
    trainer = make_trainer(tiny_model_dir, tiny_run, quantization="4bit")
    model = trainer.model
    assert set(model.value_heads) == {"policy_ppo"}  # the critic-free policies have no value head
    start = param_snapshot(model)
    m = trainer.step()
    after_one = param_snapshot(model)
    rollout = trainer.rollout()  # step 2 by hand: one policy at a time, so each one's changes can be checked
    assert rollout.prompt_index[4:8].tolist()[::2] == rollout.prompt_index[4:8].tolist()[1::2]  # grpo: pairs
    scores, _ = trainer.score(rollout, 2)
    ref_lp = reference_logprobs(model, "sft", rollout)
    for name in trainer.policies:
        before = param_snapshot(model)
        trainer.learner.train(rollout, scores, ref_lp, 2, names=[name])
        after = param_snapshot(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed and changed <= owned(name, before), name  # base, sft, reward, other policies: bit-identical
    policies = set().union(*(owned(n, start) for n in trainer.policies))
    for n in start:
        if n not in policies:
            assert torch.equal(start[n], after[n]), n
    for name in trainer.policies:
        assert any(not torch.equal(start[n], after_one[n]) for n in owned(name, start)), name
    assert "policy_ppo/ppo/value_loss" in m
    for name in ("policy_grpo", "policy_rloo"):
        assert f"{name}/ppo/value_loss" not in m and m[f"{name}/ppo/policy_loss"] == m[f"{name}/ppo/policy_loss"]


@pytest.mark.parametrize("policies, kw", [
    ([{"name": "policy_grpo", "advantage_estimator": "grpo", "kl_in": "loss", "beta": 0.1, "kl_target": None, **G2},
      {"name": "policy_rloo", "advantage_estimator": "rloo", **G2},
      {"name": "policy_drgrpo", "advantage_estimator": "grpo", "scale_rewards": False, "kl_in": "loss",
       "kl_target": None, **G2},
      {"name": "policy_rpp", "advantage_estimator": "reinforce_pp"}], {}),
    (SIDE_BY_SIDE, {"value_model": "adapter"}),  # one critic pass, over the PPO policy's rows only
    # Dr. GRPO's entropy bonus is part of its token sum: it does not grow with the pieces a micro-batch is cut into
    ([{"name": "policy_drgrpo", "advantage_estimator": "grpo", "scale_rewards": False, **G2},
      {"name": "policy_rloo", "advantage_estimator": "rloo", **G2}], {"ent_coef": 0.5}),
])
def test_batched_update_equals_per_policy_for_the_critic_free_estimators(tiny_model_dir, tiny_run, policies, kw):
    # micro-batches of 2 rows, passes of 3 rows dealt over the policies: a pass holds part of a micro-batch
    kw = dict(prompts_per_policy=4, mini_batch_size=4, ppo_epochs=2, gradient_accumulation_steps=2, **kw)
    seq = make_trainer(tiny_model_dir, tiny_run, policies, multi_lora="peft", **kw)
    bat = make_trainer(tiny_model_dir, tiny_run, policies, multi_lora="batched", update_pass_rows=3, **kw)
    use_sgd(seq, bat)
    rollout = seq.rollout()
    for n in seq.policies:
        bat.states[n].generator.set_state(seq.states[n].generator.get_state())
    scores, _ = seq.score(rollout, 1)
    ref_lp = reference_logprobs(seq.model, "sft", rollout)
    start = param_snapshot(seq.model)
    assert not seq.shares_passes(rollout)
    want = seq.learner.update(seq.learner.make_experience(rollout, scores, ref_lp), 1)
    assert bat.shares_passes(rollout)
    got = bat.learner.update(bat.learner.make_experience(rollout, scores, ref_lp, shared=True), 1, shared=True)
    for name in want:
        assert got[name].keys() == want[name].keys()
        for k in want[name]:
            tol = dict(abs=0.1) if k.endswith("clipfrac") else dict(rel=1e-4, abs=1e-5)
            assert got[name][k] == pytest.approx(want[name][k], **tol), (name, k)
    a, b = param_snapshot(seq.model), param_snapshot(bat.model)
    for name in seq.policies:
        assert any(not torch.equal(start[k], a[k]) for k in owned(name, a)), name
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


K_POLICIES = [{"name": "policy_ppo"}, {"name": "policy_drgrpo", "advantage_estimator": "grpo", "scale_rewards": False,
                                      "kl_in": "loss", "kl_target": None, **G2},
              {"name": "policy_rpp", "advantage_estimator": "reinforce_pp"}]


@pytest.mark.parametrize("multi_lora", ["peft", "batched"])
def test_k_micro_batches_update_as_one_every_token_weighing_the_same(tiny_model_dir, tiny_run, multi_lora):
    """gradient_accumulation_steps 4 (micro-batches of one row) gives the update of 1 micro-batch, with rows of
    1 to 6 response tokens: each token weighs the same in its minibatch's loss, whatever micro-batch it is in."""
    kw = dict(prompts_per_policy=4, mini_batch_size=4, ppo_epochs=1, ent_coef=0.1, multi_lora=multi_lora)
    one = make_trainer(tiny_model_dir, tiny_run, K_POLICIES, gradient_accumulation_steps=1, **kw)
    k = make_trainer(tiny_model_dir, tiny_run, K_POLICIES, gradient_accumulation_steps=4, **kw)
    use_sgd(one, k)
    rollout = one.rollout()
    for n in one.policies:
        k.states[n].generator.set_state(one.states[n].generator.get_state())
    scores, _ = one.score(rollout, 1)
    ref_lp = reference_logprobs(one.model, "sft", rollout)
    start = param_snapshot(one.model)
    lengths = torch.tensor([1, 6, 2, 4])  # each policy's 4 rows: 13 tokens, 1 to 6 a row
    keep = (torch.arange(rollout.response_ids.shape[1]) < lengths[:, None]).float()
    for t in (one, k):
        shared = t.shares_passes(rollout)
        assert shared == (multi_lora == "batched")
        experiences = t.learner.make_experience(rollout, scores, ref_lp, shared=shared)
        for e in experiences.values():
            e.mask = e.mask * keep
        t.learner.update(experiences, 1, shared=shared)
    a, b = param_snapshot(one.model), param_snapshot(k.model)
    for name in one.policies:
        assert any(not torch.equal(start[x], a[x]) for x in owned(name, a)), name
    for x in a:  # the updates themselves, to float noise (parameters around 1 would hide them)
        torch.testing.assert_close(a[x] - start[x], b[x] - start[x], atol=1e-7, rtol=1e-4,
                                   msg=lambda m, x=x: f"{x}: {m}")


def test_critic_free_policies_have_no_value_head_and_skip_the_value_pass(tiny_model_dir, tiny_run):
    trainer = make_trainer(tiny_model_dir, tiny_run, value_model="adapter")
    model = trainer.model
    assert set(model.value_heads) == {"policy_ppo_critic"} and set(model.critic_of) == {"policy_ppo"}
    rows_per_pass = []
    hook = model.backbone.register_forward_hook(lambda mod, args, kw, out: rows_per_pass.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
    enc = model.tokenizer(["the movie was great"] * 4, return_tensors="pt")
    try:
        _, values = model.policy_forward("policy_grpo", enc["input_ids"], enc["attention_mask"])
        assert rows_per_pass == [4] and not values.any()  # no critic pass, values 0
        rows_per_pass.clear()
        _, values = model.grouped_policy_forward(["policy_ppo"] * 2 + ["policy_rloo"] * 2, enc["input_ids"],
                                                 enc["attention_mask"])
        assert rows_per_pass == [4, 2]  # the critic pass over the PPO policy's two rows only
        assert values[:2].abs().sum() > 0 and not values[2:].any()
    finally:
        hook.remove()
    model.train()
    values.sum().backward()
    assert not any(p.grad is not None for n, p in model.peft.named_parameters() if ".policy_rloo." in n)


def answer_reward(prompts, completions, answer, **kwargs):
    """1 when the row's answer column is its prompt's first word, None (no score) where it has no answer."""
    return [None if a is None else float(p.split()[0] == a) for p, a in zip(prompts, answer)]


def test_a_reward_function_reads_a_dataset_column(tiny_model_dir, tiny_run):
    columns = {"answer": ["The", "I", None]}  # one per prompt of PROMPTS; the third has no answer
    trainer = make_trainer(tiny_model_dir, tiny_run, policies=[{"name": "policy_grpo", "advantage_estimator": "grpo",
                                                                "num_generations": 4}],
                           reward_fns={"answer": answer_reward}, columns=columns, prompts_per_policy=8,
                           mini_batch_size=4)
    rollout = trainer.rollout()
    scores, components = trainer.score(rollout, 1)
    want = [0.0 if columns["answer"][i] is None else 1.0 for i in rollout.prompt_index.tolist()]  # None reads 0
    assert components["answer"].tolist() == want
    torch.testing.assert_close(scores, (components["reward_model"] + components["answer"]).clamp(-10, 10))
    # older marl functions, fn(completions, **kwargs) or fn(completions, prompts), keep working
    assert call_reward_function(lambda completions, prompts: [len(p) for p in prompts], "old", ["ab"], ["x"],
                                answer=["y"]) == [2.0]
    with pytest.raises(MarlError, match="'short' returned 1 values for 2 completions"):
        call_reward_function(lambda completions, **kw: [1.0], "short", ["a", "b"], ["x", "y"])
    with pytest.raises(MarlError, match="'text' returned 'good': return a number or None"):
        call_reward_function(lambda completions, **kw: ["good"], "text", ["a"], ["x"])


def test_marl_ppo_with_grpo_carries_the_dataset_columns_and_resumes(tmp_path, tiny_model_dir, tiny_run):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": p.split()[0]}) + "\n" for p in PROMPTS * 4))
    from pipelines import ppo

    def cfg(steps, **kw):
        return ppo_args(tmp_path / "run", tiny_model_dir, tiny_run, dataset_name=str(data), total_steps=steps,
                        policies=[{"name": "policy_ppo"}, {"name": "policy_grpo", "advantage_estimator": "grpo", **G2}],
                        reward_functions={"answer": "tests.ppo.test_estimator_trainer:answer_reward"}, **kw)

    ppo.run(cfg(1))
    state = json.loads((tmp_path / "run/checkpoints/ppo/latest/state.json").read_text())
    assert state["policies"]["policy_grpo"]["advantage_estimator"] == "grpo"
    assert not (tmp_path / "run/adapters/policy_grpo/value_head.safetensors").exists()
    assert (tmp_path / "run/adapters/policy_ppo/value_head.safetensors").exists()
    with pytest.raises(MarlError, match="trained policy_ppo with advantage_estimator gae, the config says rloo"):
        ppo.run(cfg(2, resume=True, advantage_estimator="rloo"))  # the shared default: policy_ppo would be rloo
    ppo.run(cfg(2, resume=True))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "ppo" and "step" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["policy_grpo/reward/answer"] == 1.0 for r in steps)  # every row's answer column matched


@pytest.mark.parametrize("kw, message", [
    (dict(policies=[{"name": "g", "advantage_estimator": "grpo", "num_generations": 3}]),
     r"^policies\[g\]: num_generations \(3\) must be >= 2 and divide prompts_per_policy \(32\)"),
    (dict(advantage_estimator="rloo", num_generations=1), r"^num_generations \(1\) must be >= 2"),
    (dict(policies=[{"name": "g", "advantage_estimator": "ppo"}]),
     r"^policies\[g\]: advantage_estimator: 'ppo' must be one of gae, grpo, rloo, reinforce_pp$"),
    (dict(kl_in="both"), r"^kl_in: 'both' must be reward or loss$"),
    # kl_target steers kl_coef; with the KL in the loss its weight is beta: the controller would do nothing
    (dict(policies=[{"name": "g", "advantage_estimator": "grpo", "kl_in": "loss"}]),
     r"^policies\[g\]: kl_in: loss with kl_target 2: the KL controller steers kl_coef, which kl_in: loss does not "
     r"use \(its weight is beta, fixed\): set kl_target: null for g, or kl_in: reward$"),
    (dict(kl_in="loss", kl_target=4.0, policies=[{"name": "a", "kl_target": None}, {"name": "b"}]),
     r"^policies\[b\]: kl_in: loss with kl_target 4: "),
])
def test_estimator_config_errors_are_one_line(kw, message):
    with pytest.raises(MarlError, match=message) as e:
        PPOArgs(**kw)
    assert "\n" not in str(e.value)


def test_the_kl_in_the_loss_with_a_fixed_beta_is_accepted():
    cfg = PPOArgs(kl_in="loss", kl_target=None, policies=[{"name": "a"}, {"name": "b", "kl_in": "reward"}])
    assert [cfg.policy(p).kl_target for p in cfg.policies] == [None, None]
    cfg = PPOArgs(policies=[{"name": "a", "kl_in": "loss", "kl_target": None}, {"name": "b"}])
    assert [cfg.policy(p).kl_target for p in cfg.policies] == [None, 2.0]  # b keeps the controller


def test_the_compare_config_trains_ppo_grpo_and_rloo_side_by_side():
    from pathlib import Path

    from marl.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "compare.yaml"
    assert path.read_text().startswith("# marl ppo --config configs/compare.yaml")
    cfg = load_config(PPOArgs, str(path))
    assert [cfg.policy(p).advantage_estimator for p in cfg.policies] == ["gae", "grpo", "rloo"]
    assert "compare:" in (path.parents[1] / "Makefile").read_text()


@pytest.mark.parametrize("scale_rewards, want", [
    # k3 per token, log r = ref - new: token 0: e^-1 - 1 + 1 = 0.367879; token 1: 0; token 2 masked
    # mean 0.183940, times beta 0.1 = 0.0183940 (the clipped term is 0: advantages 0)
    (True, 0.0183940),
    # Dr. GRPO: the token sum 0.0367879 over max_new_tokens 4 x minibatch rows 2 = 0.0045985 (the mean over the
    # row's 2 tokens, 0.0183940, weighted by 2 tokens / 8)
    (False, 0.0045985),
])
def test_the_kl_in_the_loss_is_beta_times_the_mean_k3_and_dr_grpo_sums_over_tokens(scale_rewards, want):
    cfg = PPOArgs(policies=[{"name": "g", "advantage_estimator": "grpo", "kl_in": "loss", "beta": 0.1,
                             "scale_rewards": scale_rewards, "kl_target": None}], num_generations=2, prompts_per_policy=2,
                  mini_batch_size=2, max_new_tokens=4)
    learner = Learner.__new__(Learner)  # _losses reads only the settings
    learner.cfg, learner.states = cfg, {"g": PolicyState(cfg.policy(cfg.policies[0]), None, None, None, None)}
    lp = torch.tensor([[0.0, -1.0, 7.0]], requires_grad=True)
    zeros = torch.zeros(1, 3)
    # a minibatch of 2 rows: row 0 above, row 1 without a valid token (it adds no token, only a row)
    exp = Experience(policy="g", rollout=None, rows=torch.tensor([0, 1]), response_ids=torch.zeros(2, 3, dtype=torch.long),
                     mask=torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                     old_logprobs=torch.cat([lp.detach(), zeros]), ref_logprobs=torch.tensor([[-1.0, -1.0, 0.0], [0.0] * 3]),
                     values=None, components={}, scores=torch.zeros(2), kl=zeros, kl_coef=0.1, token_rewards=zeros,
                     advantages=torch.zeros(2, 3), returns=None)
    row, minibatch = torch.tensor([0]), torch.tensor([0, 1])
    loss, stats = learner._losses(lp, zeros, zeros, exp, row, 1)  # the mean over row 0's 2 tokens
    # its weight in the minibatch's loss: 2 tokens / 2 (token mean: 1), or 2 / (4 x 2 rows) (Dr. GRPO)
    weight = loss_weight(exp.mask[row].sum(), learner._loss_norm(exp, minibatch))
    assert float(loss.detach()) * weight == pytest.approx(want, rel=1e-5)
    assert stats["kl_loss"] == pytest.approx(0.183940, rel=1e-5) and "value_loss" not in stats
