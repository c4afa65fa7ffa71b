"""A sweep is one run: its policies on one base, each with its own `PolicyState`; halving stops exactly the
ranked-out policies and frees their rows; PBT's exploit copies weights and training state and leaves the source
untouched; a policy trained inside a population equals it trained alone; a killed run resumes to the same
adapters and ranking (marl/ppo/learner.py, marl/ppo/policy_state.py, marl/stages/population.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from marl.config import PPOArgs
from marl.errors import MarlError
from marl.io import load_tensors
from marl.ppo.kl import AdaptiveKLController, FixedKLController
from marl.ppo.rollout import reference_logprobs

from .test_trainer import make_trainer, ppo_args, use_sgd

ROOT = Path(__file__).resolve().parents[2]
GRID = {"grid": {"learning_rate": [1e-3, 1e-4], "kl_target": [2.0, None]}}


def sweep_trainer(tiny_model_dir, tiny_run, **kw):
    """A trainer of the sweep's four policies (from the sft adapter), as `marl ppo` builds them."""
    cfg = ppo_args("unused", tiny_model_dir, tiny_run, policies=[], sweep=GRID, **kw)
    return make_trainer(tiny_model_dir, tiny_run, policies=cfg.policy_entries(), **kw), cfg


def test_a_sweep_expands_into_named_policies_beside_the_listed_ones():
    cfg = PPOArgs(policies=[{"name": "policy_a"}], sweep={"list": [{"ent_coef": 0.01, "clip_coef": 0.1}], **GRID},
                  report_to="none")
    names = [p["name"] for p in cfg.policy_entries()]
    assert names == ["policy_a", "lr1e-3_kl2", "lr1e-3_klnone", "lr1e-4_kl2", "lr1e-4_klnone", "ent0p01_clip0p1"]
    r = {p.name: p for p in cfg.resolved_policies()}
    assert r["lr1e-4_klnone"].learning_rate == 1e-4 and r["lr1e-4_klnone"].kl_target is None
    assert r["ent0p01_clip0p1"].ent_coef == 0.01 and r["ent0p01_clip0p1"].clip_coef == 0.1
    assert r["policy_a"].ent_coef == cfg.ent_coef  # the shared value


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"learning_rate": [0.0]}}, "learning_rate: 0.0 must be a number > 0"),
    ({"list": [{"kl_targett": 2}]}, "unknown key 'kl_targett'"),
    ({"grid": {"optim": ["sgd"]}}, "optim: 'sgd' must be one of"),
])
def test_bad_sweeps_are_one_line(sweep, message):
    with pytest.raises(MarlError, match=message):
        PPOArgs(policies=[], sweep=sweep, report_to="none")


@pytest.mark.parametrize("kw, message", [
    ({"schedule": "halving", "sweep": None, "policies": [{"name": "a"}]}, "ranks a population"),
    ({"schedule": "sometimes"}, "schedule: 'sometimes' must be one of"),
    ({"rank_by": "gold"}, "rank_by: 'gold' is neither reward_model nor one of reward_functions"),
    ({"keep": 1.0}, "keep"),
])
def test_bad_schedules_are_one_line(kw, message):
    with pytest.raises(MarlError, match=message):
        PPOArgs(**{"sweep": GRID, "policies": [], "report_to": "none", **kw})


def test_each_swept_setting_reaches_its_policy_s_optimizer_and_controller(tiny_model_dir, tiny_run):
    trainer, cfg = sweep_trainer(tiny_model_dir, tiny_run)
    for name, state in trainer.states.items():
        want = cfg.policy(next(p for p in cfg.policy_entries() if p["name"] == name))
        assert state.optimizer.param_groups[0]["lr"] == want.learning_rate
        if want.kl_target is None:
            assert isinstance(state.kl, FixedKLController)
        else:
            assert isinstance(state.kl, AdaptiveKLController) and state.kl.target == want.kl_target
    assert {s.optimizer.param_groups[0]["lr"] for s in trainer.states.values()} == {1e-3, 1e-4}


def test_a_swept_ent_coef_reaches_its_policy_s_loss(tiny_model_dir, tiny_run, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tiny_run, policies=[{"name": "policy_a", "ent_coef": 0.0},
                                                               {"name": "policy_b", "ent_coef": 0.5}])
    rollout = trainer.rollout()
    scores, _ = trainer.score(rollout, 1)
    ref_lp = reference_logprobs(trainer.model, "sft", rollout)
    exp = trainer.learner.make_experience(rollout, scores, ref_lp)
    losses = {}
    for name in ("policy_a", "policy_b"):
        e = exp[name]
        c = torch.arange(len(e.rows))
        lp, v, ent = trainer.learner._policy_pass(name, rollout, e.rows, entropy=True)
        loss, stats = trainer.learner._losses(lp, v, ent, e, c, 1)
        # the loss without the bonus: policy loss + value term (same for both formulas)
        losses[name] = (float(loss), stats)
    a, b = losses["policy_a"], losses["policy_b"]
    assert b[1]["entropy"] > 0
    base_b = b[1]["policy_loss"] + 0.1 * b[1]["value_loss"] / exp["policy_b"].returns_scale
    assert b[0] == pytest.approx(base_b - 0.5 * b[1]["entropy"], rel=1e-5)  # ent_coef 0.5: the bonus is in
    base_a = a[1]["policy_loss"] + 0.1 * a[1]["value_loss"] / exp["policy_a"].returns_scale
    assert a[0] == pytest.approx(base_a, rel=1e-5)  # ent_coef 0: none


def test_exploit_copies_weights_optimizer_controller_and_moments_and_leaves_the_source(tiny_model_dir, tiny_run):
    import dataclasses

    trainer, _ = sweep_trainer(tiny_model_dir, tiny_run, reward_norm="running")
    trainer.step()  # every policy's Adam state, KL controller and running moments now exist and differ
    model, learner = trainer.model, trainer.learner
    src, dst = "lr1e-3_kl2", "lr1e-4_klnone"
    source_state = {n: p.detach().clone() for n, p in model.named_parameters() if f".{src}." in n or
                    n.startswith(f"value_heads.{src}.")}
    source_opt = {k: v.clone() for k, v in learner.states[src].optimizer.state_dict()["state"][0].items()}
    settings = dataclasses.replace(learner.states[src].settings, learning_rate=1.25e-3)
    learner.exploit(dst, src, settings, step=1)
    params = dict(model.named_parameters())
    for n, p in source_state.items():
        assert torch.equal(params[n], p)  # the source is untouched
        assert torch.equal(params[n.replace(f".{src}.", f".{dst}.")], p)  # the loser has its weights
    s, d = learner.states[src], learner.states[dst]
    for pid, state in s.optimizer.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(d.optimizer.state_dict()["state"][pid][k], v)
    assert all(torch.equal(source_opt[k], v) for k, v in s.optimizer.state_dict()["state"][0].items())
    assert d.kl.state_dict() == s.kl.state_dict() and d.kl is not s.kl
    assert d.moments.state_dict() == s.moments.state_dict()
    assert d.optimizer.param_groups[0]["lr"] == 1.25e-3 and s.optimizer.param_groups[0]["lr"] == 1e-3
    assert d.settings.name == dst and d.settings.kl_target == 2.0  # the copied settings, its own name
    assert d.lineage == [{"step": 1, "from": src, "settings": d.lineage[0]["settings"]}]
    assert d.generator is not s.generator  # it goes on drawing its own prompts
    trainer.step()  # and both train on


def test_a_policy_trained_in_the_population_equals_it_trained_alone(tiny_model_dir, tiny_run):
    pop, _ = sweep_trainer(tiny_model_dir, tiny_run)
    alone = make_trainer(tiny_model_dir, tiny_run, policies=[{"name": "lr1e-3_kl2", "learning_rate": 1e-3}])
    use_sgd(pop, alone)
    rollout = pop.rollout()
    alone.states["lr1e-3_kl2"].generator.set_state(pop.states["lr1e-3_kl2"].generator.get_state())  # same shuffles
    scores, _ = pop.score(rollout, 1)
    ref_lp = reference_logprobs(pop.model, "sft", rollout)
    assert pop.shares_passes(rollout)  # the population shares every pass
    pop.learner.train(rollout, scores, ref_lp, 1, shared=True)
    alone.learner.train(rollout, scores, ref_lp, 1, names=["lr1e-3_kl2"])
    got = dict(pop.model.named_parameters())
    for n, p in alone.model.named_parameters():
        if ".lr1e-3_kl2." in n or n.startswith("value_heads.lr1e-3_kl2."):
            torch.testing.assert_close(got[n], p, atol=1e-5, rtol=1e-4)  # as batched = sequential (float noise)


# --------------------------------------------------------------------------- the schedule inside marl ppo


def stage_args(run_dir, tiny_model_dir, tiny_run, **kw):
    kw = {"every": 2, "save_steps": 2, "total_steps": 4, **kw}
    return ppo_args(run_dir, tiny_model_dir, tiny_run, policies=[], sweep=GRID, rank_prompts=2, eval_prompts=2,
                    torch_threads=1, **kw)


def spy_rollouts(monkeypatch) -> list[tuple[int, list[str], int]]:
    """(iteration, its policies, its rows) of every rollout the trainer makes from now on."""
    from marl.ppo.trainer import MultiPolicyPPOTrainer

    rows = []
    rollout = MultiPolicyPPOTrainer.rollout

    def spy(self):
        out = rollout(self)
        rows.append((self.step_count + 1, sorted(set(out.adapter_names)), len(out.adapter_names)))
        return out

    monkeypatch.setattr(MultiPolicyPPOTrainer, "rollout", spy)
    return rows


def test_halving_stops_exactly_the_ranked_out_policies_and_frees_their_rows(tmp_path, tiny_model_dir, tiny_run,
                                                                           monkeypatch, capsys):
    from pipelines import ppo

    rows = spy_rollouts(monkeypatch)
    results = ppo.run(stage_args(tmp_path / "run", tiny_model_dir, tiny_run, schedule="halving", keep=0.5))
    pop = json.loads((tmp_path / "run/population.json").read_text())
    first = pop["rankings"][0]
    assert first["step"] == 2 and len(first["standings"]) == 4
    stopped = [s["name"] for s in first["standings"][2:]]  # the ranking's bottom half
    assert sorted(stopped) == sorted(results["population"]["stopped"])
    assert first["actions"] == [f"{n} stopped" for n in stopped]
    kept = sorted(s["name"] for s in first["standings"][:2])
    assert rows[1] == (2, sorted(kept + stopped), 16) and rows[2] == (3, kept, 8)  # 4 prompts each, then 2 policies
    for name in stopped:
        meta = json.loads((tmp_path / "run/adapters" / name / "marl_adapter.json").read_text())
        assert meta["population"]["stopped_at"] == 2 and "reward_mean" in meta["population"]["last_eval"]
    assert pop["winner"] in kept and pop["winner"] == pop["ranking"][0]["name"]
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["stages"]["ppo"]["results"]["population"]["winner"] == pop["winner"]
    assert (tmp_path / "run/population.md").exists() and (tmp_path / "run/population.png").exists()
    # the run's users: marl eval prints the ranking, `best` names the winner
    from marl.cli import main

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--n", "2", "--max_new_tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert f"Winner: **{pop['winner']}**" in out and all(n in out for n in stopped)
    assert main(["push", str(tmp_path / "run"), "--adapter", "best", "--repo-id", "you/best", "--dry-run"]) == 0
    assert f"adapters/{pop['winner']}" in capsys.readouterr().out.replace("\\", "/")


@pytest.mark.parametrize("schedule", ["halving", "pbt"])
def test_before_grace_a_ranking_only_reports(tmp_path, tiny_model_dir, tiny_run, monkeypatch, schedule):
    from pipelines import ppo

    rows = spy_rollouts(monkeypatch)
    ppo.run(stage_args(tmp_path / "run", tiny_model_dir, tiny_run, schedule=schedule, every=1, total_steps=3,
                       grace=2, save_steps=3))
    pop = json.loads((tmp_path / "run/population.json").read_text())
    assert [r["step"] for r in pop["rankings"]] == [1, 2, 3] and pop["grace"] == 2  # 3: the final ranking
    assert pop["rankings"][0]["actions"] == [] and len(pop["rankings"][0]["standings"]) == 4
    assert pop["rankings"][1]["actions"]  # from iteration `grace` on the schedule acts
    if schedule == "halving":
        assert [n for _, _, n in rows] == [16, 16, 8]  # 4 policies x 4 prompts until the ranking at 2 halves them
    else:
        assert {e["step"] for p in pop["policies"].values() for e in p["lineage"]} == {2}
    md = (tmp_path / "run/population.md").read_text()
    assert "from iteration 2" in md and "- step 1: " in md and "(acted: none, before grace)" in md


def test_a_grace_past_the_run_is_one_line(tmp_path, tiny_model_dir, tiny_run):
    with pytest.raises(MarlError, match=r"grace: 4 >= total_steps \(4\): schedule halving would never act"):
        stage_args(tmp_path / "run", tiny_model_dir, tiny_run, schedule="halving", grace=4)


def _killed_after(argv: list[str], run: Path, step: int) -> None:
    """Run `marl ppo argv` in another process and kill -9 it once its checkpoint has reached `step`."""
    log = run.parent / f"{run.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "marl.cli", *argv], cwd=ROOT, stdout=out, stderr=out,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    state = run / "checkpoints/ppo/latest/state.json"
    try:
        while proc.poll() is None:
            if state.exists() and json.loads(state.read_text())["step"] >= step:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
    assert json.loads(state.read_text())["step"] == step


@pytest.mark.parametrize("schedule", ["halving", "pbt"])
def test_a_run_killed_after_a_schedule_step_resumes_to_the_same_adapters_and_ranking(tmp_path, tiny_model_dir,
                                                                                   tiny_run, schedule):
    from pipelines import ppo

    full = ppo.run(stage_args(tmp_path / "full", tiny_model_dir, tiny_run, schedule=schedule))
    part = tmp_path / "part"
    argv = ["ppo", "--model_name_or_path", tiny_model_dir, "--run_dir", str(part), "--report_to", "none",
            "--reward_adapter", str(tiny_run / "adapters/reward"), "--sft_adapter", str(tiny_run / "adapters/sft"),
            "--policies", "[]", "--sweep", json.dumps(GRID), "--schedule", schedule, "--every", "2",
            "--save_steps", "2", "--rank_prompts", "2", "--eval_prompts", "2", "--prompts_per_policy", "4",
            "--mini_batch_size", "2", "--ppo_epochs", "1", "--max_new_tokens", "6", "--lora_r", "4",
            "--lora_alpha", "8", "--log_samples", "0", "--torch_threads", "1",
            "--total_steps", "40"]  # killed long before its end
    _killed_after(argv, part, step=2)  # after the first ranking (step 2) and its checkpoint
    resumed = ppo.run(stage_args(part, tiny_model_dir, tiny_run, schedule=schedule, resume=True))
    assert resumed["population"] == full["population"]
    a, b = (json.loads((p / "population.json").read_text()) for p in (tmp_path / "full", part))
    assert [r["standings"] for r in a["rankings"]] == [r["standings"] for r in b["rankings"]]
    assert a["policies"] == b["policies"]
    for name in full["population"]["stopped"] + [n for n in a["policies"] if n not in full["population"]["stopped"]]:
        x = load_tensors(tmp_path / "full/adapters" / name / "adapter_model.safetensors")
        y = load_tensors(part / "adapters" / name / "adapter_model.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.parametrize("sweep, message", [
    ('{grid: 3}', "grid must map each setting to a non-empty list"),
    ('{grid: {learning_rate: []}}', "grid must map each setting to a non-empty list"),
    ('{lists: []}', "keys other than grid and list"),
    ('[3]', "list must be a list of"),
])
def test_a_malformed_sweep_on_the_command_line_is_one_line(sweep, message, capsys):
    from marl.cli import main

    assert main(["ppo", "--sweep", sweep, "--report_to", "none"]) == 2
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert last.startswith("marl: error: sweep:") and message in last


def test_a_policy_added_to_a_running_trainer_trains_from_the_next_iteration(tiny_model_dir, tiny_run):
    from marl.build import add_policy

    trainer = make_trainer(tiny_model_dir, tiny_run, policies=[{"name": "policy_a"}])
    trainer.step()
    cfg = trainer.cfg
    new = cfg.policy({"name": "policy_new", "learning_rate": 1e-3})
    add_policy(trainer.model, cfg, new, init_from="policy_a")
    trainer.add_policy(new)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".policy_new." in n}
    m = trainer.step()
    assert "policy_new/reward/mean" in m and trainer.states["policy_new"].optimizer.param_groups[0]["lr"] == 1e-3
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())  # it trained
    with pytest.raises(MarlError, match="already training"):
        trainer.add_policy(new)
    trainer.remove_policy("policy_new")
    assert "policy_new/reward/mean" not in trainer.step()
