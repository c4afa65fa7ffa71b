"""The LlamaGym-style Agent: credit assignment, unreadable replies, isolation of agents on one base,
the batched loop, the examples, and the default model learning the text game."""

from __future__ import annotations

import math
import time

import pytest
import torch

from marl.agent import Agent, AgentConfig, play, turn_returns
from marl.errors import MarlError
from marl.model import MultiAdapterModel

from .conftest import param_snapshot

pytestmark = pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")  # one-row batches

FAST = dict(batch_size=2, max_new_tokens=4, mini_batch_size=2, ppo_epochs=1, lora_r=4, lora_alpha=8,
            learning_rate=1e-3, default_action="noop")


class WordAgent(Agent):
    """Acts with the reply's first word; `fail` = how many calls of extract_action fail first
    (-1: all), `how` = "none" (return None) or "raise"."""

    def __init__(self, *args, fail: int = 0, how: str = "none", **kwargs):
        super().__init__(*args, **kwargs)
        self.fail, self.how, self.calls = fail, how, 0

    def get_system_prompt(self):
        return "Say one word."

    def format_observation(self, observation):
        return f"Round {observation}."

    def extract_action(self, response):
        self.calls += 1
        if self.fail < 0 or self.calls <= self.fail:
            if self.how == "raise":
                raise ValueError("no word")
            return None
        return "word"


class CountdownEnv:
    """Gymnasium-style: `length` steps, reward 1 at the last one."""

    def __init__(self, length: int = 3):
        self.length, self.t = length, 0

    def reset(self, seed=None):
        self.t = 0
        return self.t, {}

    def step(self, action):
        self.t += 1
        done = self.t == self.length
        return self.t, float(done), done, False, {}


@pytest.fixture
def model(tiny_model_dir):
    return MultiAdapterModel.from_pretrained(tiny_model_dir)


def agent_params(model, name):
    return {n for n, _ in model.named_parameters() if f".{name}." in n or n.startswith(f"value_heads.{name}.")}


# --------------------------------------------------------------------------- credit assignment


def test_turn_returns_hand_checked():
    # discounted, gamma 0.5: G2 = 1, G1 = 0 + 0.5 * 1 = 0.5, G0 = 0 + 0.5 * 0.5 = 0.25
    assert turn_returns([0, 0, 1], "discounted", 0.5) == [0.25, 0.5, 1.0]
    # G2 = 2, G1 = -1 + 0.5 * 2 = 0, G0 = 1 + 0.5 * 0 = 1
    assert turn_returns([1, -1, 2], "discounted", 0.5) == [1.0, 0.0, 2.0]
    assert turn_returns([0, 0, 1], "final") == [1.0, 1.0, 1.0]
    assert turn_returns([1, -1, 2], "final") == [2.0, 2.0, 2.0]
    assert turn_returns([0, 0, 1], "per_turn") == [0.0, 0.0, 1.0]
    assert turn_returns([], "discounted", 0.9) == []
    with pytest.raises(MarlError, match="credit"):
        turn_returns([1], "mean")


@pytest.mark.parametrize("credit,expected", [("discounted", [0.25, 0.5, 1.0]), ("final", [1.0, 1.0, 1.0]),
                                             ("per_turn", [0.0, 0.0, 1.0])])
def test_update_trains_on_the_credited_scores(model, monkeypatch, credit, expected):
    agent = WordAgent(model, config=AgentConfig(**{**FAST, "batch_size": 1}, credit=credit, gamma=0.5))
    seen = {}

    def spy(rollout, scores, ref_lp, step, names):
        seen["scores"] = scores.tolist()
        return {n: {} for n in names}

    monkeypatch.setattr(agent.learner, "train", spy)
    play(agent, [CountdownEnv(3)], episodes=1)
    assert seen["scores"] == pytest.approx(expected)


# --------------------------------------------------------------------------- unreadable replies


def one_turn(agent, reward=0.5):
    """Play a one-turn episode with batch_size 1; return (action, update stats)."""
    action = agent.act(0)
    agent.assign_reward(reward)
    return action, agent.terminate_episode()


@pytest.mark.parametrize("how", ["none", "raise"])
def test_parse_failure_penalty(model, how):
    agent = WordAgent(model, config=AgentConfig(**{**FAST, "batch_size": 1}, on_parse_failure="penalty",
                                                parse_failure_penalty=-1.0), fail=-1, how=how)
    action, stats = one_turn(agent, reward=0.5)
    assert action == "noop"
    assert stats["agent/parse_failures"] == 1 and stats["agent/default_actions"] == 1
    assert stats["score/mean"] == pytest.approx(0.5 - 1.0)  # the env reward plus the penalty
    assert stats["agent/episode_reward"] == pytest.approx(0.5)  # the game's reward is reported as is


def test_parse_failure_default_has_no_penalty(model):
    agent = WordAgent(model, config=AgentConfig(**{**FAST, "batch_size": 1}, on_parse_failure="default"), fail=-1)
    action, stats = one_turn(agent, reward=0.5)
    assert action == "noop"
    assert stats["agent/parse_failures"] == 1 and stats["agent/default_actions"] == 1
    assert stats["score/mean"] == pytest.approx(0.5)


def test_parse_failure_retry_resamples_then_falls_back(model):
    cfg = AgentConfig(**{**FAST, "batch_size": 1}, on_parse_failure="retry", max_retries=2)
    agent = WordAgent(model, config=cfg, fail=2)  # the third reply reads
    action, stats = one_turn(agent)
    assert action == "word" and agent.calls == 3
    assert stats["agent/parse_failures"] == 2 and stats["agent/retries"] == 2
    assert stats["agent/default_actions"] == 0 and stats["score/mean"] == pytest.approx(0.5)

    agent = WordAgent(model, "agent2", config=cfg, fail=-1)  # never reads: penalty after the retries
    action, stats = one_turn(agent)
    assert action == "noop" and agent.calls == 3
    assert stats["agent/parse_failures"] == 3 and stats["agent/default_actions"] == 1
    assert stats["score/mean"] == pytest.approx(0.5 - 1.0)


def test_parse_failure_raise_and_missing_default_action(model):
    agent = WordAgent(model, config=AgentConfig(**{**FAST, "default_action": None}, on_parse_failure="raise"),
                      fail=1)
    with pytest.raises(MarlError, match="extract_action could not read"):
        agent.act(0)
    assert agent._live == {}  # the failed turn left no half-written episode behind
    assert agent.act(1) == "word"
    assert [m["role"] for m in agent._live[0].messages] == ["system", "user", "assistant"]
    with pytest.raises(MarlError, match="default_action is None"):
        AgentConfig(on_parse_failure="penalty")


# --------------------------------------------------------------------------- the loop


def test_prompt_is_the_chat_template_of_the_conversation(model):
    agent = WordAgent(model, config=AgentConfig(**FAST))
    agent.act(1)
    agent.act(2)
    ep = agent._live[0]
    roles = [m["role"] for m in ep.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    expected = model.tokenizer.apply_chat_template(ep.messages[:4], add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    assert ep.turns[1].prompt_ids == list(expected)


def test_oldest_exchanges_leave_a_prompt_that_would_not_fit(model):
    agent = WordAgent(model, config=AgentConfig(**FAST))
    long = "the movie was good and " * 20  # ~100 tokens a message; the context is 256
    messages = [{"role": "system", "content": "Say one word."}]
    for _ in range(4):
        messages += [{"role": "user", "content": long}, {"role": "assistant", "content": long}]
    messages.append({"role": "user", "content": "last"})
    ids = agent._prompt_ids(messages)
    assert len(ids) <= 256 - FAST["max_new_tokens"]
    text = model.tokenizer.decode(ids)
    assert "Say one word." in text and text.rstrip().endswith("last\nAssistant:")
    with pytest.raises(MarlError, match="over the model's context"):
        agent._prompt_ids(messages[:1] + [{"role": "user", "content": long * 3}])


def test_act_batch_generates_once_per_round_and_trains(model, monkeypatch):
    agent = WordAgent(model, config=AgentConfig(**{**FAST, "batch_size": 4}))
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda ids, *a, **k: calls.append(len(ids)) or generate(ids, *a, **k))
    before = param_snapshot(model)
    updates = []
    returns = play(agent, [CountdownEnv(2), CountdownEnv(3), CountdownEnv(1)], episodes=5, on_update=updates.append)
    assert len(returns) == 5 and all(r == 1.0 for r in returns)
    assert calls[0] == 3  # the three environments in one generate call
    assert len(updates) == 1 and updates[0]["agent/episodes"] == 4
    for key in ("agent/episode_reward", "kl/mean", "ppo/policy_loss", "ppo/value_loss", "score/mean"):
        assert math.isfinite(updates[0][key]), key
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= agent_params(model, "agent")
    assert agent.update()["agent/episodes"] == 1  # the partial batch
    with pytest.raises(MarlError, match="no turn to reward"):
        agent.assign_reward(1.0, env=7)
    with pytest.raises(MarlError, match="no episode in progress"):
        agent.terminate_episode(env=7)


def test_two_agents_on_one_base_train_without_touching_each_other(model):
    from peft import LoraConfig

    model.add_adapter("sft", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), role="sft",
                      trainable=False)
    with torch.no_grad():  # a reference that differs from the bare base
        for n, p in model.named_parameters():
            if ".sft." in n:
                p.add_(0.01 * torch.randn_like(p))
    a = WordAgent(model, "agent_a", config=AgentConfig(**{**FAST, "learning_rate": 1e-2}), ref_adapter="sft")
    b = WordAgent(model, "agent_b", config=AgentConfig(**{**FAST, "kl_coef": 0.5, "seed": 1}), ref_adapter="sft",
                  fail=-1)
    assert a.learner.states["agent_a"].optimizer is not b.learner.states["agent_b"].optimizer
    trainable_before = set(model.trainable_adapters)
    for agent, other in ((a, "agent_b"), (b, "agent_a")):
        before = param_snapshot(model)
        stats = play(agent, [CountdownEnv(2), CountdownEnv(2)], episodes=2)
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        mine = agent_params(model, agent.name)
        assert changed and changed <= mine, f"{agent.name} changed {sorted(changed - mine)[:3]}"
        assert any(".lora_" in n for n in changed) and any(n.startswith("value_heads.") for n in changed)
        assert not changed & agent_params(model, other)
        assert stats == [1.0, 1.0]
    assert set(model.trainable_adapters) == trainable_before
    assert a.learner.states["agent_a"].kl is not b.learner.states["agent_b"].kl


def test_existing_adapter_is_reused_and_init_from_copies(model):
    from peft import LoraConfig

    model.add_adapter("sft", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), role="sft",
                      trainable=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".sft." in n:
                p.add_(0.01)
    agent = WordAgent(model, "agent", config=AgentConfig(**FAST, init_from="sft"))
    assert agent.ref_adapter == "sft"  # "auto" picks the sft adapter
    params = dict(model.named_parameters())
    for n, p in params.items():
        if ".agent." in n and ".lora_" in n:
            assert torch.equal(p, params[n.replace(".agent.", ".sft.")])
    again = WordAgent(model, "agent", config=AgentConfig(**FAST), ref_adapter=None)
    assert again.ref_adapter is None
    with pytest.raises(MarlError, match="no value head"):
        WordAgent(model, "sft", config=AgentConfig(**FAST), ref_adapter=None)
    with pytest.raises(MarlError, match="not on the model"):
        WordAgent(model, "agent", config=AgentConfig(**FAST), ref_adapter="missing")


def test_config_errors_name_the_field():
    with pytest.raises(MarlError, match="credit"):
        AgentConfig(default_action=0, credit="average")
    with pytest.raises(MarlError, match="on_parse_failure"):
        AgentConfig(default_action=0, on_parse_failure="ignore")
    with pytest.raises(MarlError, match="gamma"):
        AgentConfig(default_action=0, gamma=1.5)


# --------------------------------------------------------------------------- LlamaGym's code, ported


class TinyBlackjack:
    """A Blackjack-like stand-in (no gymnasium): obs (total, dealer, usable ace); hit adds 3, over
    21 loses; stick wins at 18 or more, else loses."""

    def reset(self, seed=None):
        self.total = 14
        return (self.total, 10, 0), {}

    def step(self, action):
        if action == 1:
            self.total += 3
            bust = self.total > 21
            return (self.total, 10, 0), -1.0 if bust else 0.0, bust, False, {}
        return (self.total, 10, 0), 1.0 if self.total >= 18 else -1.0, True, False, {}


def test_llamagym_readme_loop_runs_with_only_the_import_changed(tiny_model_dir, caplog):
    import logging

    from transformers import AutoTokenizer

    from marl import Agent, AutoModelForCausalLMWithValueHead  # the one changed line

    # LlamaGym's README from here on (5000 episodes -> 16, gym.make -> a stand-in)
    class BlackjackAgent(Agent):
        def get_system_prompt(self) -> str:
            return "You are an expert blackjack player."

        def format_observation(self, observation) -> str:
            return f"Your current total is {observation[0]}"

        def extract_action(self, response: str):
            return 0 if "stick" in response else 1

    device = "cpu"
    with caplog.at_level(logging.WARNING, logger="marl.compat.model"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    agent = BlackjackAgent(model, tokenizer, device)

    env = TinyBlackjack()
    before = param_snapshot(model)
    all_stats = []
    for episode in range(16):  # noqa: B007 - as the README writes it
        observation, info = env.reset()
        done = False

        while not done:
            action = agent.act(observation)  # act based on observation
            observation, reward, terminated, truncated, info = env.step(action)
            agent.assign_reward(reward)  # provide reward to agent
            done = terminated or truncated

        train_stats = agent.terminate_episode()  # trains if batch is full
        all_stats.append(train_stats)

    warned = [r.getMessage() for r in caplog.records if "gets a LoRA adapter" in r.getMessage()]
    assert len(warned) == 1 and "'default'" in warned[0]
    assert all(s == {} for s in all_stats[:15])  # LlamaGym's batch: 16 episodes
    stats = all_stats[15]
    assert stats["agent/episodes"] == 16 and stats["agent/update"] == 1
    for key in ("ppo/policy_loss", "ppo/value_loss", "kl/mean", "agent/episode_reward"):
        assert math.isfinite(stats[key]), key
    assert agent.name == "default" and agent.ref_adapter is None  # the bare base, as old TRL's peft reference
    assert agent.config.max_new_tokens == 32 and agent.config.top_p == 0.6  # LlamaGym's sampling defaults
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".default." in n or n.startswith("v_head.summary.") for n in changed)  # old TRL's names
    assert any(".lora_" in n for n in changed)


def test_llamagym_dicts_map_onto_agent_config_and_bad_ones_are_named():
    from marl.agent import llamagym_config

    cfg = llamagym_config({"generate/max_new_tokens": 8, "generate/do_sample": True, "generate/top_k": 5},
                          {"batch_size": 4, "init_kl_coef": 0.1, "cliprange": 0.3, "default_action": 0})
    assert (cfg.max_new_tokens, cfg.top_k, cfg.temperature) == (8, 5, 1.0)  # unset keys: marl's defaults
    assert (cfg.batch_size, cfg.kl_coef, cfg.clip_coef) == (4, 0.1, 0.3)
    assert cfg.on_parse_failure == "penalty" and cfg.default_action == 0
    assert llamagym_config().on_parse_failure == "raise"  # LlamaGym's act returned None; marl stops and says so
    with pytest.raises(MarlError, match="do_sample"):
        llamagym_config({"do_sample": False})
    with pytest.raises(MarlError, match="did you mean 'batch_size'"):
        llamagym_config(None, {"bacth_size": 4})
    with pytest.raises(MarlError, match="generate_config_dict has no key 'num_beams'"):
        llamagym_config({"num_beams": 4})


def test_llamagym_signature_checks_its_arguments(tiny_model_dir, model):
    from transformers import AutoTokenizer

    from marl import AutoModelForCausalLMWithValueHead

    with pytest.raises(MarlError, match="name is a"):
        WordAgent(model, AutoTokenizer.from_pretrained(tiny_model_dir), "cpu")
    compat = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
    grown = AutoTokenizer.from_pretrained(tiny_model_dir)
    grown.add_special_tokens({"additional_special_tokens": ["<new>"]})
    with pytest.raises(MarlError, match="vocabulary differs"):
        WordAgent(compat, grown, "cpu")


# --------------------------------------------------------------------------- warm-up: behaviour cloning


class EchoAgent(WordAgent):
    """Its action is its reply."""

    def extract_action(self, response):
        return response


class ReplyLengthEnv(CountdownEnv):
    """CountdownEnv whose last step pays 1 for a reply of an even number of characters, else 0."""

    def step(self, action):
        obs, _, done, truncated, info = super().step(action)
        return obs, float(done and len(action) % 2 == 0), done, truncated, info


def lora_params(model, name):
    return {n for n in agent_params(model, name) if ".lora_" in n}


def test_demonstrations_are_recorded_with_the_prompts_act_builds(model):
    agent = EchoAgent(model, config=AgentConfig(**FAST))
    agent.act(9)  # a live episode the demonstration must not touch
    ep = agent.demonstrate([(1, "stick"), (2, "hit")], rewards=[0.0, 1.0])
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ep.demonstrated and ep.reward == 1.0 and ep.messages[2]["content"] == "stick"
    tok = model.tokenizer
    for i, t in enumerate(ep.turns):  # the prompt of turn i is the chat so far, as act() builds it
        expected = tok.apply_chat_template(ep.messages[:2 * i + 2], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        assert t.prompt_ids == list(expected)
    # the reply's tokens are what the template writes after "Assistant:": " hit" and EOS
    assert ep.turns[1].response_ids == tok(" hit", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(agent._live) == [0] and len(agent._live[0].turns) == 1
    with pytest.raises(MarlError, match="cannot read the demonstrated reply"):
        WordAgent(model, "reader", config=AgentConfig(**FAST), fail=-1).demonstrate([(1, "stick")])
    with pytest.raises(MarlError, match="over max_new_tokens"):
        agent.demonstrate([(1, "the movie was good and " * 5)])


def test_play_with_a_scripted_policy_records_demonstrations_without_training(model):
    agent = EchoAgent(model, config=AgentConfig(**{**FAST, "batch_size": 1}))
    episodes = []
    returns = play(agent, [CountdownEnv(2), CountdownEnv(2)], 3, policy=lambda obs: f"go{obs}", train=False,
                   record=episodes)
    assert returns == [1.0, 1.0, 1.0] and agent.updates == 0
    assert len(episodes) == 3 and all(ep.demonstrated for ep in episodes)
    assert [m["content"] for m in episodes[0].messages if m["role"] == "assistant"] == ["go0", "go1"]


def test_behaviour_clone_from_a_scripted_policy(model):
    from marl.agent_warmup import behaviour_clone, reply_logprob

    agent = EchoAgent(model, config=AgentConfig(**FAST))
    scripted = []
    play(agent, [CountdownEnv(2) for _ in range(4)], 8, policy=lambda obs: "stick" if obs else "hit", train=False,
         record=scripted)
    before, lp_before = param_snapshot(model), reply_logprob(agent, scripted)
    stats = behaviour_clone(agent, scripted, epochs=2, learning_rate=1e-2, batch_size=4)
    assert stats["bc/turns"] == 16 and stats["bc/steps"] == 8  # 8 episodes of 2 turns; 16 / 4 a step * 2 epochs
    assert reply_logprob(agent, scripted) > lp_before + 0.3
    with pytest.raises(MarlError, match="lr_scheduler_type 'cosin' is not one of"):
        behaviour_clone(agent, scripted, lr_scheduler_type="cosin")
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= lora_params(model, "agent")


def test_behaviour_clone_from_demonstrations_moves_only_the_agents_adapter(model):
    from peft import LoraConfig

    from marl.agent_warmup import behaviour_clone, reply_logprob

    model.add_adapter("sft", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), role="sft", trainable=False)
    other = EchoAgent(model, "other", config=AgentConfig(**FAST, seed=1))
    agent = EchoAgent(model, config=AgentConfig(**FAST))
    demos = [agent.demonstrate([(1, "stick"), (2, "hit")]) for _ in range(4)]
    model.set_adapter("other")
    before, lp_before = param_snapshot(model), reply_logprob(agent, demos)
    stats = behaviour_clone(agent, demos, epochs=4, learning_rate=1e-2, batch_size=4)
    lp_after = reply_logprob(agent, demos)
    assert stats["bc/turns"] == 8 and stats["bc/steps"] == 8  # 8 turns / 4 a step * 4 epochs
    # per reply token; the tiny random base's small LM head (hidden 32) bounds the gain to ~0.5 nats
    assert lp_after > lp_before + 0.3, (lp_before, lp_after)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= lora_params(model, "agent")  # not its value head, nor sft, other, the base
    assert model.active_adapter == "other" and set(model.trainable_adapters) == {"agent", "other"}
    assert other.name == "other"


def test_behaviour_clone_from_the_agents_best_episodes(model):
    from marl.agent_warmup import behaviour_clone, best_episodes, reply_logprob

    agent = EchoAgent(model, config=AgentConfig(**{**FAST, "max_new_tokens": 3}))
    played = []
    returns = play(agent, [ReplyLengthEnv(1) for _ in range(8)], 16, seed=0, train=False, record=played)
    best = best_episodes(played, min_return=1.0)
    assert 0 < len(best) < 16 and all(ep.reward == 1.0 for ep in best) and sum(returns) == len(best)
    rest = [ep for ep in played if ep not in best]
    before, lp_best, lp_rest = param_snapshot(model), reply_logprob(agent, best), reply_logprob(agent, rest)
    behaviour_clone(agent, best, epochs=4, learning_rate=1e-2, batch_size=4)
    gain_best, gain_rest = reply_logprob(agent, best) - lp_best, reply_logprob(agent, rest) - lp_rest
    assert gain_best > 0.2 and gain_best > gain_rest + 0.1, (gain_best, gain_rest)  # what was kept is what is cloned
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= lora_params(model, "agent")


def test_best_episodes_hand_checked():
    from marl.agent import Episode, Turn
    from marl.agent_warmup import best_episodes

    eps = [Episode([], [Turn([1], [2], reward=r)]) for r in (1.0, -1.0, 0.0, 1.0)]
    # top half: the cut is the 2nd highest return (1) -> episodes 0 and 3
    assert best_episodes(eps, top_fraction=0.5) == [eps[0], eps[3]]
    # top quarter: k = 1, cut 1, the tie at the cut is kept
    assert best_episodes(eps, top_fraction=0.25) == [eps[0], eps[3]]
    assert best_episodes(eps, min_return=0.0) == [eps[0], eps[2], eps[3]]
    # min_return first (3 left), then the top third of those: k = 1, cut 1
    assert best_episodes(eps, top_fraction=0.34, min_return=0.0) == [eps[0], eps[3]]
    with pytest.raises(MarlError, match="top_fraction"):
        best_episodes(eps)
    with pytest.raises(MarlError, match="top_fraction"):
        best_episodes(eps, top_fraction=1.5)


def test_freeze_reference_copies_the_adapter_for_the_kl_penalty(model):
    from marl.ppo.rollout import reference_logprobs

    agent = EchoAgent(model, config=AgentConfig(**{**FAST, "learning_rate": 1e-2}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".agent." in n and "lora_B" in n:
                p.add_(0.05)  # as after a warm-up: not the bare base
    assert agent.freeze_reference() == "agent_ref" == agent.ref_adapter
    episodes = []
    play(agent, [CountdownEnv(2), CountdownEnv(2)], 2, record=episodes)  # one PPO update
    assert agent.updates == 1
    rollout = agent._rollout([t for ep in episodes for t in ep.turns])
    kept = param_snapshot(model)
    ref_lp = reference_logprobs(model, "agent_ref", rollout)
    agent.freeze_reference()  # refreshed: now equal to the updated agent again
    assert not torch.allclose(ref_lp, reference_logprobs(model, "agent_ref", rollout))
    assert torch.allclose(reference_logprobs(model, "agent", rollout), reference_logprobs(model, "agent_ref", rollout))
    changed = {n for n, p in model.named_parameters() if not torch.equal(kept[n], p)}
    assert changed and all(".agent_ref." in n for n in changed)
    with pytest.raises(MarlError, match="agent's own adapter"):
        agent.freeze_reference("agent")


# --------------------------------------------------------------------------- the examples


def test_blackjack_agent_reads_and_formats():
    from pipelines.agent_blackjack import HIT, STICK, BlackjackAgent

    assert BlackjackAgent.extract_action(None, "Hit me.") == HIT
    assert BlackjackAgent.extract_action(None, "I will stick") == STICK
    assert BlackjackAgent.extract_action(None, "the movie was great") is None
    assert "with an ace" in BlackjackAgent.format_observation(None, (13, 10, True))


def test_blackjack_needs_gymnasium_with_a_clear_error(monkeypatch):
    import sys

    from pipelines.agent_blackjack import make_envs

    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium now raises ImportError
    with pytest.raises(MarlError, match="pip install"):
        make_envs(1)


def test_blackjack_loop_runs(tiny_model_dir, tmp_path):
    pytest.importorskip("gymnasium")
    from pipelines.agent_blackjack import main

    results = main(["--model", tiny_model_dir, "--ppo_hands", "4", "--envs", "2", "--batch_size", "2",
                    "--max_new_tokens", "4", "--demo_hands", "4", "--bc_epochs", "1", "--eval_hands", "4",
                    "--block", "2", "--plot", str(tmp_path / "curve.png")])
    returns = results["ppo returns"]
    assert len(returns) == 4 and all(r in (-1.0, 0.0, 1.0, 1.5) for r in returns)
    assert (tmp_path / "curve.png").stat().st_size > 0
    for key in ("always stick", "random", "basic strategy", "agent after warm-up", "agent after PPO"):
        assert -1.0 <= results[key] <= 1.5, key


@pytest.mark.slow
def test_blackjack_warm_up_teaches_the_default_model_to_answer():
    """The shipped warm-up on the default model: the agent answers with an action (parse failures
    under 5%) and plays basic strategy's decision in at least 90% of turns (~3 min on one core)."""
    pytest.importorskip("gymnasium")
    from pipelines.agent_blackjack import main

    results = main(["--ppo_hands", "64", "--eval_hands", "256", "--plot", ""])
    assert results["parse failures after warm-up"] < 0.05
    assert results["basic-strategy agreement after warm-up"] >= 0.9
    assert results["agent after warm-up"] > results["random"]


def test_basic_strategy_hand_checked():
    from pipelines.agent_blackjack import HIT, STICK, basic_strategy, play_scripted

    # (player sum, dealer card (ace = 1), usable ace) -> action, from the basic-strategy table
    assert basic_strategy((11, 10, False)) == HIT
    assert basic_strategy((12, 3, False)) == HIT and basic_strategy((12, 4, False)) == STICK
    assert basic_strategy((16, 6, False)) == STICK and basic_strategy((16, 7, False)) == HIT
    assert basic_strategy((17, 1, False)) == STICK
    assert basic_strategy((17, 6, True)) == HIT
    assert basic_strategy((18, 8, True)) == STICK and basic_strategy((18, 9, True)) == HIT
    assert basic_strategy((18, 1, True)) == HIT and basic_strategy((19, 10, True)) == STICK
    pytest.importorskip("gymnasium")
    # every player meets the same deals: sticking at once on the same seeds gives the same returns
    assert play_scripted(lambda obs: STICK, 20, 7) == play_scripted(lambda obs: STICK, 20, 7)


@pytest.mark.parametrize("module, flags, said", [
    ("agent_blackjack", ["--envs", "0"], "--envs 0 must be at least 1"),
    ("agent_blackjack", ["--bc_schedule", "cosin"], "lr_scheduler_type 'cosin' is not one of"),
    ("agent_text", ["--mood", "sad"], "mood: 'sad' must be fan or mixed"),
])
def test_examples_refuse_bad_flags_in_one_line(module, flags, said):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", f"pipelines.{module}", *flags], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("marl: error: ") and said in out.stderr


def test_paired_difference_hand_checked():
    from pipelines.agent_blackjack import paired_difference

    # deals 1-3 in both: differences 1, 0, -1 -> mean 0, sample variance (1 + 0 + 1) / 2 = 1, s.e. sqrt(1 / 3)
    gain, se = paired_difference({1: 1.0, 2: 0.0, 3: -1.0}, {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0})
    assert gain == 0.0 and se == pytest.approx(3 ** -0.5)


def test_seeded_hands_keep_each_deals_return():
    pytest.importorskip("gymnasium")
    from pipelines.agent_blackjack import STICK, make_envs, play_scripted

    envs = make_envs(2, 7)
    for _ in range(3):  # 6 hands, the two envs taking turns: deals 7 ... 12
        for env in envs:
            env.reset()
            env.step(STICK)  # sticking ends the hand
    assert envs[1].returns == dict(zip(range(7, 13), play_scripted(lambda obs: STICK, 6, 7)))
    assert len(envs[0].decisions) == 6


def test_text_game_loop_trains_the_adapter(model):
    from pipelines.agent_text import MovieCriticAgent, MovieNightEnv, default_config, train

    env = MovieNightEnv(films=2, mood="fan")
    obs, _ = env.reset(seed=0)
    assert "loved" in obs
    assert env.step("like")[1] == 1.0 and env.step("no opinion")[1:3] == (0.0, True)
    MovieCriticAgent(model, "movie_night", default_config())  # creates the adapter; train() reuses it
    before = param_snapshot(model)
    agent, returns = train(model, episodes=4, envs=2, batch_size=2, max_new_tokens=3, mini_batch_size=4)
    assert len(returns) == 4 and agent.updates == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= agent_params(model, "movie_night")


def test_default_model_learns_the_text_game():
    """The tiny default model learns to agree with its friend: 160 episodes (10 PPO updates), ~10 s
    on 2 idle CPU cores once the default model is built (test_default builds it)."""
    from pipelines.agent_text import train

    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained("default")
    t0 = time.time()
    _, returns = train(model, episodes=160, envs=16, seed=0)
    k = len(returns) // 4
    first, last = sum(returns[:k]) / k, sum(returns[-k:]) / k
    print(f"movie night: first {k} episodes {first:+.3f}, last {k} {last:+.3f}, {time.time() - t0:.0f} s")
    assert last >= first + 0.5, (first, last)  # rewards are in [-2, 2]; chance is 0
