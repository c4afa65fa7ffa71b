"""The PPO loop on a tiny base: isolation, resume, quantized end to end, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from marl.config import PPOArgs, critic_name
from marl.errors import MarlError
from marl.io import load_tensors
from marl.model import MultiAdapterModel
from marl.ppo.rollout import reference_logprobs, response_mask
from marl.ppo.trainer import MultiPolicyPPOTrainer

from ..conftest import param_snapshot


def ppo_args(run_dir, model_dir, tiny_run, **kw):
    base = dict(run_dir=str(run_dir), model_name_or_path=model_dir, reward_adapter=str(tiny_run / "adapters/reward"),
                sft_adapter=str(tiny_run / "adapters/sft"),
                policies=[{"name": "policy_a", "kl_coef": 0.01}, {"name": "policy_b", "kl_coef": 0.5}],
                total_steps=2, prompts_per_policy=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=6,
                eval_prompts=4, report_to="none", log_samples=0, save_steps=1, lora_r=4, lora_alpha=8)
    base.update(kw)
    return PPOArgs(**base)


def test_response_mask_stops_after_first_eos():
    eos = 2
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert response_mask(ids, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def make_trainer(tiny_model_dir, tiny_run, **kw):
    cfg = ppo_args("unused", tiny_model_dir, tiny_run, **kw)
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    model.load_adapter(str(tiny_run / "adapters/reward"), "reward", role="reward")
    model.load_adapter(str(tiny_run / "adapters/sft"), "sft", role="sft")
    for spec in cfg.policies:
        model.add_adapter(spec["name"], cfg.lora_config(dropout=0.0), init_from="sft")
        if cfg.value_model == "adapter":
            model.add_critic(spec["name"], critic_name(spec["name"]), cfg.lora_config(dropout=0.0),
                             init_from="reward" if cfg.critic_init == "reward" else spec["name"])
    prompts = [model.tokenizer(t)["input_ids"] for t in ["The movie was", "I watched it and", "This film is"]]
    return MultiPolicyPPOTrainer(model, cfg, [cfg.policy(p) for p in cfg.policies], prompts, "sft")


def use_sgd(*trainers, lr: float = 0.5) -> None:
    """SGD for every policy of `trainers`: updates linear in the gradients (Adam's first steps amplify float
    noise), so that equivalent updates compare closely."""
    for t in trainers:
        for n, state in t.states.items():
            state.optimizer = torch.optim.SGD(t.model.trainable_parameters(n), lr=lr)


@pytest.fixture
def trainer(tiny_model_dir, tiny_run):
    return make_trainer(tiny_model_dir, tiny_run)


THREE = [{"name": "policy_a", "kl_coef": 0.01}, {"name": "policy_b", "kl_coef": 0.5}, {"name": "policy_c"}]


@pytest.mark.parametrize("pass_rows, policies", [
    (0, None),  # one micro-batch (1 row) per pass: the per-policy path's activation memory
    (3, None),  # passes of 3 rows: 2 of one policy + 1 of the other (uneven groups, split micro-batches)
    (64, None),  # every policy's whole minibatch in one pass
    (5, THREE),  # three policies, passes of 5 rows
    (3, "critic"),  # each policy with a separate critic adapter
])
def test_batched_update_equals_one_policy_after_another(tiny_model_dir, tiny_run, pass_rows, policies):
    """Policies sharing each forward/backward == updating them one after another, whatever the pass size."""
    kw = dict(prompts_per_policy=4, mini_batch_size=2, ppo_epochs=2, gradient_accumulation_steps=2)
    if policies == "critic":
        kw["value_model"] = "adapter"
    elif policies:
        kw["policies"] = policies
    seq = make_trainer(tiny_model_dir, tiny_run, multi_lora="peft", **kw)
    bat = make_trainer(tiny_model_dir, tiny_run, multi_lora="batched", update_pass_rows=pass_rows, **kw)
    use_sgd(seq, bat)
    rollout = seq.rollout()
    for n in seq.policies:  # same minibatch shuffles in both
        bat.states[n].generator.set_state(seq.states[n].generator.get_state())
    scores, _ = seq.score(rollout, 1)
    ref_lp = reference_logprobs(seq.model, "sft", rollout)
    assert not seq.shares_passes(rollout)
    want = seq.learner.update(seq.learner.make_experience(rollout, scores, ref_lp), 1)
    assert bat.shares_passes(rollout)
    got = bat.learner.update(bat.learner.make_experience(rollout, scores, ref_lp, shared=True), 1, shared=True)
    for name in want:  # the logged statistics too (per micro-batch, then averaged)
        assert got[name].keys() == want[name].keys()
        for k in want[name]:  # clip fractions count ties (v == old v) that float noise can break
            tol = dict(abs=0.1) if k.endswith("clipfrac") else dict(rel=1e-4, abs=1e-5)
            assert got[name][k] == pytest.approx(want[name][k], **tol), (name, k)
    a, b = param_snapshot(seq.model), param_snapshot(bat.model)
    changed = [k for k in a if ".policy_" in k or k.startswith("value_heads")]
    assert changed
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_the_batched_update_holds_one_policy_s_gradients_at_a_time(tiny_model_dir, tiny_run):
    """Passes of one policy's micro-batch (the default): each policy steps as soon as its minibatch is whole and
    its gradients are freed, so no pass runs while another policy's gradients exist (their memory would grow
    with the number of policies), and none are left after the update."""
    kw = dict(policies=THREE, prompts_per_policy=4, mini_batch_size=2, ppo_epochs=2)
    bat = make_trainer(tiny_model_dir, tiny_run, multi_lora="batched", **kw)
    rollout = bat.rollout()
    scores, _ = bat.score(rollout, 1)
    ref_lp = reference_logprobs(bat.model, "sft", rollout)
    experiences = bat.learner.make_experience(rollout, scores, ref_lp, shared=True)
    own_pass, seen = bat.learner._policy_pass, []

    def policy_pass(names, *args, **kw):
        holding = [n for n in bat.policies if any(p.grad is not None for p in bat.model.trainable_parameters(n))]
        seen.append(([names] if isinstance(names, str) else sorted(set(names)), holding))
        return own_pass(names, *args, **kw)

    bat.learner._policy_pass = policy_pass
    start = param_snapshot(bat.model)
    bat.learner.update(experiences, 1, shared=True)
    assert len(seen) == 3 * 2 * 2  # policies x minibatches x epochs, one policy per pass
    assert all(len(names) == 1 and holding == [] for names, holding in seen), seen
    assert [names[0] for names, _ in seen[:3]] == list(bat.policies)  # policy by policy
    assert all(p.grad is None for n in bat.policies for p in bat.model.trainable_parameters(n))
    end = param_snapshot(bat.model)
    assert all(any(not torch.equal(start[k], end[k]) for k in start if f".{n}." in k) for n in bat.policies)


def test_the_value_loss_divides_by_the_policy_s_return_variance_however_its_rows_are_split(tiny_model_dir, tiny_run,
                                                                                          monkeypatch):
    """value_loss_norm: half of each policy's rows with returns of std 1, half of std 10; micro-batches of 2 rows
    cut into pieces by passes of 3 rows. Shared passes update as one policy after another does: each divides
    by the policy's return variance of the iteration, not by a piece's."""
    import marl.ppo.experience as experience_module

    real_gae = experience_module.gae

    def wide_returns(rewards, values, mask, gamma, lam):
        adv = real_gae(rewards, values, mask, gamma, lam)
        b, R = rewards.shape
        std = torch.tensor([1.0] * (b // 2) + [10.0] * (b - b // 2)).unsqueeze(1)
        return adv._replace(returns=adv.returns + std * (-1.0) ** torch.arange(R) * mask)

    monkeypatch.setattr(experience_module, "gae", wide_returns)
    kw = dict(prompts_per_policy=4, mini_batch_size=4, ppo_epochs=1, gradient_accumulation_steps=2, vf_coef=1.0)
    seq = make_trainer(tiny_model_dir, tiny_run, multi_lora="peft", **kw)
    bat = make_trainer(tiny_model_dir, tiny_run, multi_lora="batched", update_pass_rows=3, **kw)
    use_sgd(seq, bat)
    rollout = seq.rollout()
    for n in seq.policies:
        bat.states[n].generator.set_state(seq.states[n].generator.get_state())
    scores, _ = seq.score(rollout, 1)
    ref_lp = reference_logprobs(seq.model, "sft", rollout)
    want = seq.learner.make_experience(rollout, scores, ref_lp)
    assert all(e.returns_scale > 10 for e in want.values())  # the rows' variance, once per policy
    start = param_snapshot(seq.model)
    seq.learner.update(want, 1)
    bat.learner.update(bat.learner.make_experience(rollout, scores, ref_lp, shared=True), 1, shared=True)
    a, b = param_snapshot(seq.model), param_snapshot(bat.model)
    assert all(not torch.equal(a[k], start[k]) for k in a if k.startswith("value_heads"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_make_experience_takes_its_batch_statistics_over_every_process(trainer, monkeypatch):
    from marl import dist

    reduced = []
    monkeypatch.setattr(dist, "sum_over_processes", lambda t: reduced.append(t.shape) or t)
    rollout = trainer.rollout()
    scores, _ = trainer.score(rollout, 1)
    trainer.learner.make_experience(rollout, scores, reference_logprobs(trainer.model, "sft", rollout))
    # per policy: whitening's counts and sums, its squared deviations; the returns' the same
    assert len(reduced) == 4 * len(trainer.policies)


def test_one_policy_update_leaves_everything_else_bit_identical(trainer):
    model = trainer.model
    rollout = trainer.rollout()
    scores, _ = trainer.score(rollout, 1)
    ref_lp = reference_logprobs(model, "sft", rollout)
    before = param_snapshot(model)
    trainer.learner.train(rollout, scores, ref_lp, 1, names=["policy_a"])
    after = param_snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "policy_a did not change"
    owned = {n for n in before if ".policy_a." in n or n.startswith("value_heads.policy_a")}
    assert changed <= owned
    assert any(".lora_" in n for n in changed) and any(n.startswith("value_heads.") for n in changed)


def test_a_one_policy_update_leaves_no_gradients_behind(tiny_model_dir, tiny_run):
    """Between updates a policy holds no gradients (as many bytes as its LoRA and head): freed after its step."""
    trainer = make_trainer(tiny_model_dir, tiny_run, policies=THREE[:1], prompts_per_policy=4, mini_batch_size=2)
    trainer.step()
    params = [p for n in trainer.policies for p in trainer.model.trainable_parameters(n)]
    assert params and all(p.grad is None for p in params)


@pytest.mark.parametrize("value_model", ["head", "adapter"])
def test_the_value_loss_reaches_the_policy_only_with_a_shared_trunk(tiny_model_dir, tiny_run, value_model):
    trainer = make_trainer(tiny_model_dir, tiny_run, value_model=value_model)
    model = trainer.model
    model.train()
    ids = model.tokenizer(["the movie was great"], return_tensors="pt")
    _, values = model.policy_forward("policy_a", ids["input_ids"], ids["attention_mask"])
    values.pow(2).sum().backward()
    own = [p for n, p in model.peft.named_parameters() if ".policy_a." in n]
    reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    assert reached == (value_model == "head")
    if value_model == "adapter":
        critic = [p for n, p in model.peft.named_parameters() if ".policy_a_critic." in n]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic)
        assert "policy_a" not in model.value_heads and "policy_a_critic" in model.value_heads


def test_a_critic_from_the_reward_adapter_starts_with_the_reward_scores(tiny_model_dir, tiny_run):
    trainer = make_trainer(tiny_model_dir, tiny_run, value_model="adapter", critic_init="reward")
    model = trainer.model.eval()
    tok = model.tokenizer
    tok.padding_side = "left"
    enc = tok(["the movie was great", "a dull and slow film"], return_tensors="pt", padding=True)
    _, values = model.policy_forward("policy_b", enc["input_ids"], enc["attention_mask"])
    want = model.compute_reward_score(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(values[:, -1], want, rtol=1e-5, atol=1e-5)  # left padding: the last token
    with pytest.raises(MarlError, match="critic_init: 'sft' must be policy or reward"):
        PPOArgs(critic_init="sft")


def test_a_policy_update_with_a_critic_changes_only_that_policy_and_its_critic(tiny_model_dir, tiny_run):
    trainer = make_trainer(tiny_model_dir, tiny_run, value_model="adapter")
    rollout = trainer.rollout()
    scores, _ = trainer.score(rollout, 1)
    ref_lp = reference_logprobs(trainer.model, "sft", rollout)
    before = param_snapshot(trainer.model)
    trainer.learner.train(rollout, scores, ref_lp, 1, names=["policy_a"])
    after = param_snapshot(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".policy_a." in n for n in changed) and any(".policy_a_critic." in n for n in changed)
    assert any(n.startswith("value_heads.policy_a_critic") for n in changed)
    assert changed <= {n for n in before if ".policy_a." in n or ".policy_a_critic." in n
                       or n.startswith("value_heads.policy_a_critic")}


def test_a_critic_gradient_of_norm_100_leaves_the_policy_s_clipped_gradient_unchanged(tiny_model_dir, tiny_run):
    trainer = make_trainer(tiny_model_dir, tiny_run, value_model="adapter")  # max_grad_norm 1
    model = trainer.model
    critic = set(map(id, model.trainable_parameters("policy_a_critic")))
    params = model.trainable_parameters("policy_a")
    policy = [p for p in params if id(p) not in critic]
    assert policy and len(policy) < len(params)

    def fill(group, norm):  # every element the same, the group's norm `norm`
        n = sum(p.numel() for p in group)
        for p in group:
            p.grad = torch.full_like(p, norm / math.sqrt(n))

    fill(policy, 0.5)
    fill([p for p in params if id(p) in critic], 100.0)
    want = [p.grad.clone() for p in policy]
    trainer.states["policy_a"].optimizer = torch.optim.SGD(params, lr=0.0)
    norms = trainer.learner._optimizer_step("policy_a")
    for p, g in zip(policy, want):  # under max_grad_norm: not clipped, whatever the critic's gradient
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert norms == pytest.approx({"grad_norm": 0.5, "critic_grad_norm": 100.0})
    critic_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if id(p) in critic]))
    assert float(critic_norm) == pytest.approx(1.0, rel=1e-5)  # the critic is clipped on its own


def test_no_grad_passes_in_small_batches_give_the_same_numbers(tiny_model_dir, tiny_run):
    trainer = make_trainer(tiny_model_dir, tiny_run)
    rollout = trainer.rollout()

    def passes(n):
        trainer.cfg.forward_batch_size = n
        return [trainer.score(rollout, 1)[0], reference_logprobs(trainer.model, "sft", rollout, n),
                *trainer.learner._old_pass_all(rollout), *trainer.learner._old_pass("policy_a", rollout, rollout.rows("policy_a"))]

    whole, small = passes(64), passes(3)  # 8 rows: passes of 3, 3 and 2
    for i, (a, b) in enumerate(zip(whole, small)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"pass {i}: {m}")


def test_step_reports_metrics_per_policy(trainer):
    m = trainer.step()
    for name in ("policy_a", "policy_b"):
        for key in ("reward/mean", "reward/std", "kl/mean", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl",
                    "ppo/policy_loss", "ppo/value_loss", "response/length", "reward/reward_model"):
            assert math.isfinite(m[f"{name}/{key}"]), key
    for key in ("time/generate", "time/score", "time/reference", "time/old_logprobs", "time/update"):
        assert m[key] >= 0


def test_nan_reward_names_policy_and_step(trainer):
    trainer.reward_fns = {"bad": lambda completions, **kw: [float("nan")] * len(completions)}
    with pytest.raises(MarlError, match=r"policy policy_a, step 1: the reward is NaN"):
        trainer.step()


def _run_ppo(cfg):
    from pipelines import ppo

    return ppo.run(cfg)


# running reward normalisation and the KL controller's state (its last error) must survive a resume too
NORM_POLICIES = [{"name": "policy_a", "kl_coef": 0.01, "reward_norm": "running", "kl_target": 0.5},
                 {"name": "policy_b", "kl_coef": 0.5, "reward_norm": "batch"}]


@pytest.mark.parametrize("value_model, policies, optim", [("head", None, "adam"), ("adapter", None, "adam"),
                                                           ("head", NORM_POLICIES, "adam"), ("head", None, "adamw_8bit")])
def test_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, tiny_run, value_model, policies, optim,
                                          monkeypatch):
    kw = {} if policies is None else {"policies": policies}
    if optim != "adam":  # the tiny LoRA tensors (128 elements) take 8-bit moments too
        pytest.importorskip("bitsandbytes")
        monkeypatch.setattr("marl.ppo.optim.MIN_8BIT_SIZE", 64)
        kw["optim"] = optim
    full = ppo_args(tmp_path / "full", tiny_model_dir, tiny_run, total_steps=4, save_steps=2, value_model=value_model,
                    **kw)
    _run_ppo(full)
    part = ppo_args(tmp_path / "part", tiny_model_dir, tiny_run, total_steps=2, save_steps=2, value_model=value_model,
                    **kw)
    _run_ppo(part)
    if policies is not None:  # two steps of 4 rows folded into policy_a's running moments
        state = json.loads((tmp_path / "part/checkpoints/ppo/latest/state.json").read_text())
        assert state["reward_norm"]["policy_a"]["count"] == 8.0
    if value_model == "adapter":  # the critic is training state: in the checkpoint, not among the adapters
        assert (tmp_path / "part/checkpoints/ppo/latest/adapters/policy_a_critic").exists()
        assert not (tmp_path / "part/adapters/policy_a_critic").exists()
        with pytest.raises(MarlError, match="with a separate critic: resume with value_model: adapter"):
            _run_ppo(ppo_args(tmp_path / "part", tiny_model_dir, tiny_run, total_steps=4, save_steps=2,
                              resume=True))
    if optim == "adamw_8bit":  # the checkpoint holds the quantized moments
        saved = load_tensors(tmp_path / "part/checkpoints/ppo/latest/optim_policy_a.safetensors")
        assert any(v.dtype == torch.uint8 for v in saved.values())
    resumed = ppo_args(tmp_path / "part", tiny_model_dir, tiny_run, total_steps=4, save_steps=2, resume=True,
                       value_model=value_model, **kw)
    _run_ppo(resumed)
    for name in ("policy_a", "policy_b"):
        a = load_tensors(tmp_path / "full/adapters" / name / "adapter_model.safetensors")
        b = load_tensors(tmp_path / "part/adapters" / name / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

    def rewards(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["policy_a/reward/mean"]) for r in rows if r.get("stage") == "ppo" and "step" in r]

    full_r, part_r = rewards(tmp_path / "full"), rewards(tmp_path / "part")
    assert [s for s, _ in part_r] == [s for s, _ in full_r] == [1, 2, 3, 4]
    assert [r for _, r in part_r] == pytest.approx([r for _, r in full_r], abs=1e-6)


def test_two_policies_on_a_4bit_base_end_to_end(tmp_path, tiny_model_dir, tiny_run):
    results = _run_ppo(ppo_args(tmp_path / "q", tiny_model_dir, tiny_run, quantization="4bit"))
    assert set(results) >= {"policy_a", "policy_b"}
    for name in ("policy_a", "policy_b"):
        assert (tmp_path / "q/adapters" / name / "value_head.safetensors").exists()
    assert (tmp_path / "q/ppo_report.png").exists() and (tmp_path / "q/ppo_eval.md").exists()


@pytest.mark.parametrize("policies, message", [
    ([{"name": "a"}, {"name": "a"}], "duplicate policy name 'a'"),
    ([{"name": "reward"}], "name of another role"),
    ([{"name": "sft"}], "name of another role"),
    ([{"name": "a", "klcoef": 1}], "unknown key 'klcoef'"),
    ([{"name": "a"}, {"name": "a_critic"}], "'a_critic' is the name of another policy's critic"),
])
def test_bad_policy_lists(policies, message):
    with pytest.raises(MarlError, match=message):
        PPOArgs(policies=policies, value_model="adapter")


def test_missing_reward_adapter(tmp_path, tiny_model_dir):
    with pytest.raises(MarlError, match="no reward adapter at"):
        _run_ppo(PPOArgs(run_dir=str(tmp_path), model_name_or_path=tiny_model_dir, report_to="none"))


def test_a_reward_adapter_given_as_the_reference_is_refused(tmp_path, tiny_model_dir, tiny_run):
    with pytest.raises(MarlError, match="is a reward adapter .* cannot be loaded as the sft adapter"):
        _run_ppo(ppo_args(tmp_path, tiny_model_dir, tiny_run, sft_adapter=str(tiny_run / "adapters/reward")))


def test_prompts_longer_than_context(tmp_path, tiny_model_dir, tiny_run):
    with pytest.raises(MarlError, match="exceeds the model's context"):
        _run_ppo(ppo_args(tmp_path, tiny_model_dir, tiny_run, max_prompt_length=10_000))


def test_nan_reward_keeps_last_checkpoint(tmp_path, tiny_model_dir, tiny_run, monkeypatch):
    _run_ppo(ppo_args(tmp_path, tiny_model_dir, tiny_run, total_steps=1))
    ckpt = tmp_path / "checkpoints/ppo/latest/state.json"
    assert json.loads(ckpt.read_text())["step"] == 1
    import marl.rewards

    monkeypatch.setattr(marl.rewards, "nan_reward", lambda completions, **kw: [float("nan")] * len(completions),
                        raising=False)
    cfg = ppo_args(tmp_path, tiny_model_dir, tiny_run, total_steps=3, resume=True,
                   reward_functions={"nan": "marl.rewards:nan_reward"})
    with pytest.raises(MarlError, match="policy policy_a, step 2"):
        _run_ppo(cfg)
    assert json.loads(ckpt.read_text())["step"] == 1


def test_a_run_reports_the_text_beside_reward_and_kl_and_warns_once(tmp_path, tiny_model_dir, tiny_run,
                                                                     monkeypatch, capsys):
    from marl.stages import ppo
    from marl.textstats import CollapseWatch

    seen = []

    class Watch(CollapseWatch):  # the rule itself is tested in tests/test_textstats.py; here: its wiring
        def check(self, name, reward, distinct_2):
            seen.append((name, distinct_2, self.reference))
            return f"{name} collapsed" if name == "policy_a" and len(seen) == 3 else None

    monkeypatch.setattr(ppo, "CollapseWatch", Watch)
    _run_ppo(ppo_args(tmp_path / "r", tiny_model_dir, tiny_run, total_steps=2))
    rows = [json.loads(x) for x in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "ppo" and "step" in r]
    for r in steps:
        for name in ("policy_a", "policy_b"):
            for key in ("text/distinct_1", "text/distinct_2", "text/repeat_4", "text/words"):
                assert 0.0 <= r[f"{name}/{key}"] and (key == "text/words" or r[f"{name}/{key}"] <= 1.0)
    assert [r.get("policy_a/warning") for r in steps] == [None, "policy_a collapsed"]
    assert "ppo: warning, step 2: policy_a collapsed" in capsys.readouterr().out
    ev = json.loads((tmp_path / "r/ppo_eval.json").read_text())
    assert seen[0][2] == ev["before"]["sft"]["distinct_2"]  # compared with the sft adapter's held-out distinct-2
    for name in ("sft", "policy_a", "policy_b"):
        src = ev["before"] if name == "sft" else ev["after"]
        assert {"distinct_1", "distinct_2", "repeat_4", "words"} <= set(src[name])
    assert "| distinct_1 | distinct_2 | repeat_4 |" in (tmp_path / "r/ppo_eval.md").read_text()
    assert ev["summary"]["policy_a"]["distinct_2_after"] == ev["after"]["policy_a"]["distinct_2"]


def test_value_loss_norm_divides_the_value_loss_by_the_returns_scale(tiny_model_dir, tiny_run, monkeypatch):
    import marl.ppo.experience as experience_module

    calls = []
    monkeypatch.setattr(experience_module, "returns_scale",
                        lambda returns, mask, reduce=None: calls.append(returns.shape) or 1e9)

    def value_head_moves(trainer):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "value_heads" in n}
        trainer.step()
        after = dict(trainer.model.named_parameters())
        return max(float((after[n] - b).abs().max()) for n, b in before.items())

    off = value_head_moves(make_trainer(tiny_model_dir, tiny_run, total_steps=1, value_loss_norm=False))
    assert calls == []  # off: the value loss is not touched
    on = value_head_moves(make_trainer(tiny_model_dir, tiny_run, total_steps=1))
    assert calls  # on by default: once per iteration for every policy with a critic, over all its rows
    # divided by 1e9, the value loss's gradient falls under Adam's epsilon: the value heads barely move
    assert on < 0.1 * off
