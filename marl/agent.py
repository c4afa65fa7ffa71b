"""LlamaGym-style agents: an LLM policy for gymnasium-like environments, trained with marl's PPO.

Subclass `Agent`, say how the environment reads as chat and how a reply becomes an action,
and run the usual loop::

    class BlackjackAgent(marl.Agent):
        def get_system_prompt(self): return "You play Blackjack. Answer 'stick' or 'hit'."
        def format_observation(self, obs): return f"Your hand: {obs[0]}. Dealer shows: {obs[1]}."
        def extract_action(self, response): return {"stick": 0, "hit": 1}.get(response.strip(" .!").lower())

    agent = BlackjackAgent(model, "blackjack", AgentConfig(default_action=0))
    obs, info = env.reset()
    while True:
        obs, reward, terminated, truncated, info = env.step(agent.act(obs))
        agent.assign_reward(reward)
        if terminated or truncated:
            stats = agent.terminate_episode()  # a PPO update when `batch_size` episodes are done, else {}
            obs, info = env.reset()

Code written for LlamaGym runs with its import changed to ``from marl import Agent,
AutoModelForCausalLMWithValueHead``: an `Agent` built as ``BlackjackAgent(model, tokenizer, device,
generate_config_dict=None, ppo_config_dict=None)`` from marl's old-TRL model trains that model's
policy adapter (`llamagym_config` maps the two dicts onto `AgentConfig`).

Each turn of an episode is one PPO sample: prompt = the conversation so far through the
tokenizer's own chat template, response = the assistant message, score = that turn's credited
reward (`turn_returns`). The update is `Learner.train` (marl.ppo.learner) on those samples:
per-token KL penalty against the reference, GAE over the response tokens, clipped PPO. The
agent's policy is its own adapter with its own value head, optimizer and KL controller, so
several agents (and `marl ppo` policies) share one base without touching each other.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import difflib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from marl.compat.model import AutoModelForCausalLMWithValueHead
from marl.config import PPOArgs
from marl.errors import MarlError
from marl.model import MultiAdapterModel
from marl.ppo.rollout import Rollout, generate_rollout, left_pad, pad_rows, reference_logprobs
from marl.ppo.learner import Learner
from marl.build import add_policy

logger = logging.getLogger(__name__)

CREDITS = ("discounted", "final", "per_turn")
ON_PARSE_FAILURE = ("penalty", "retry", "default", "raise")


@dataclass
class AgentConfig:
    """How an agent samples, assigns credit, handles unparsable replies, and trains."""

    # episodes and credit
    batch_size: int = 8  # finished episodes per PPO update
    credit: str = "discounted"  # discounted | final | per_turn, see turn_returns
    gamma: float = 0.99  # discount across turns (credit="discounted")
    # replies that extract_action cannot read
    on_parse_failure: str = "penalty"  # penalty | retry | default | raise
    default_action: Any = None  # the action used when a reply cannot be read
    parse_failure_penalty: float = -1.0  # added to the score of a turn that fell back to default_action
    max_retries: int = 2  # resamples before falling back to the penalty (on_parse_failure="retry")
    # sampling
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # the policy adapter
    init_from: str | None = None  # copy this adapter's weights when the agent's adapter is created
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: str | list[str] = "all-linear"
    seed: int = 0
    # PPO (as in PPOArgs)
    learning_rate: float = 1e-4
    ppo_epochs: int = 4
    mini_batch_size: int = 8  # turns per optimizer step
    clip_coef: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gae_lambda: float = 0.95
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_estimator: str = "k1"
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    extra_ppo_args: dict = field(default_factory=dict)  # any other PPOArgs field

    def __post_init__(self):
        if self.credit not in CREDITS:
            raise MarlError(f"credit: {self.credit!r} is not one of {', '.join(CREDITS)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise MarlError(f"gamma: {self.gamma} must be in [0, 1]")
        if self.on_parse_failure not in ON_PARSE_FAILURE:
            raise MarlError(f"on_parse_failure: {self.on_parse_failure!r} is not one of {', '.join(ON_PARSE_FAILURE)}")
        if self.on_parse_failure != "raise" and self.default_action is None:
            raise MarlError("default_action is None: set the action to take when extract_action cannot read a reply "
                            "(e.g. AgentConfig(default_action=0)), or on_parse_failure='raise'")
        for key in ("batch_size", "max_new_tokens", "mini_batch_size", "ppo_epochs"):
            if getattr(self, key) < 1:
                raise MarlError(f"{key}: {getattr(self, key)} must be >= 1")
        if self.max_retries < 0:
            raise MarlError(f"max_retries: {self.max_retries} must be >= 0")

    def ppo_args(self, name: str) -> PPOArgs:
        """The PPOArgs of this agent's policy `name` (dropout off: PPO ratios need a deterministic policy)."""
        # every setting both configs have, by name (gamma aside: inside a turn it stays 1, discounting happens
        # across turns, in turn_returns)
        ppo_fields = {f.name for f in dataclasses.fields(PPOArgs)} - {"gamma"}
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in ppo_fields}
        return PPOArgs(**{"report_to": "none", "lora_dropout": 0.0, "prompts_per_policy": self.mini_batch_size,
                          "policies": [{"name": name}], "gamma": 1.0, **shared, **self.extra_ppo_args})


# LlamaGym's defaults (llamagym/agent.py): sampling settings, and 16 per PPO batch.
LLAMAGYM_GENERATE = {"max_new_tokens": 32, "do_sample": True, "top_p": 0.6, "top_k": 0, "temperature": 0.9}
LLAMAGYM_PPO = {"batch_size": 16}
_OLD_TRL_NAMES = {"init_kl_coef": "kl_coef", "cliprange": "clip_coef", "lam": "gae_lambda"}  # old PPOConfig names


def llamagym_config(generate_config_dict: dict | None = None, ppo_config_dict: dict | None = None) -> AgentConfig:
    """The `AgentConfig` of LlamaGym's two dicts (None: LlamaGym's defaults).

    `generate_config_dict` keys, with or without LlamaGym's "generate/" prefix: max_new_tokens,
    temperature, top_k, top_p, do_sample (True only: PPO learns from sampled replies).
    `ppo_config_dict` keys: any `AgentConfig` field, or old TRL's init_kl_coef, cliprange, lam.
    `batch_size` counts finished episodes (LlamaGym counted turns). Without a `default_action`, an
    unreadable reply stops with an error (LlamaGym's `act` returned None to the environment).
    """
    gen = {key.split("/")[-1]: value for key, value in (generate_config_dict or LLAMAGYM_GENERATE).items()}
    if not gen.pop("do_sample", True):
        raise MarlError("generate_config_dict: do_sample=False, but PPO learns from sampled replies: drop do_sample "
                        "(a lower temperature or top_p makes replies less random)")
    ppo = {_OLD_TRL_NAMES.get(key, key): value for key, value in {**LLAMAGYM_PPO, **(ppo_config_dict or {})}.items()}
    for source, keys, known in (("generate_config_dict", gen, ("max_new_tokens", "temperature", "top_k", "top_p")),
                                ("ppo_config_dict", ppo, [f.name for f in dataclasses.fields(AgentConfig)])):
        for key in keys:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise MarlError(f"{source} has no key {key!r}: " + (f"did you mean {close[0]!r}?" if close else
                                                                    f"use one of {', '.join(known)}"))
    if "default_action" not in ppo:
        ppo.setdefault("on_parse_failure", "raise")
    return AgentConfig(**gen, **ppo)


def turn_returns(rewards: Sequence[float], credit: str = "discounted", gamma: float = 1.0) -> list[float]:
    """The score each turn of one episode is trained on, from the rewards assigned to its turns.

    - ``"discounted"``: G_t = r_t + gamma * G_{t+1}, the discounted return from turn t on;
    - ``"final"``: the episode return sum_t r_t on every turn;
    - ``"per_turn"``: r_t, the turn's own reward only.

    E.g. rewards [0, 0, 1], gamma 0.5: discounted [0.25, 0.5, 1], final [1, 1, 1], per_turn [0, 0, 1].
    """
    if credit == "per_turn":
        return [float(r) for r in rewards]
    if credit == "final":
        return [float(sum(rewards))] * len(rewards)
    if credit != "discounted":
        raise MarlError(f"credit: {credit!r} is not one of {', '.join(CREDITS)}")
    out, g = [], 0.0
    for r in reversed(rewards):
        g = float(r) + gamma * g
        out.append(g)
    return out[::-1]


@dataclass
class Turn:
    """One PPO sample: the prompt the agent saw, the reply it sampled (or was shown), and what it earned."""

    prompt_ids: list[int]
    response_ids: list[int]  # through the first EOS
    reward: float = 0.0  # from the environment (assign_reward)
    penalty: float = 0.0  # parse_failure_penalty, kept to this turn (not passed back to earlier ones)
    demonstrated: bool = False  # the reply was given (act(reply=...)), not sampled


@dataclass
class Episode:
    messages: list[dict]  # the chat: [system,] user, assistant, user, ...
    turns: list[Turn] = field(default_factory=list)

    @property
    def reward(self) -> float:
        return sum(t.reward for t in self.turns)

    @property
    def demonstrated(self) -> bool:
        return any(t.demonstrated for t in self.turns)


class Agent(abc.ABC):
    """An LLM agent whose policy is the LoRA adapter `name` (with a value head) on a shared base.

    Two signatures::

        Agent(model: MultiAdapterModel, name="agent", config=None, ref_adapter="auto")    # marl's
        Agent(model: AutoModelForCausalLMWithValueHead, tokenizer, device=None,
              generate_config_dict=None, ppo_config_dict=None)                            # LlamaGym's

    Args (marl's):
        model: the shared base; the adapter `name` is created on it if missing (fresh, or a copy
            of `config.init_from`), or reused as it is.
        name: the agent's adapter name.
        config: sampling, credit assignment, parse-failure handling and PPO settings.
        ref_adapter: the frozen reference for the KL penalty: an adapter name, None for the bare
            base (adapters disabled), or "auto": `sft` if the model has it, else the bare base.

    Args (LlamaGym's): the old-TRL model's active policy adapter is the agent's, the bare base its
    reference (old TRL's for a peft model); `tokenizer` must be the model's (same vocabulary; its
    chat template is used); `device` moves the model; the dicts are read by `llamagym_config`.

    Several parallel environments are told apart by an `env` key (any hashable; 0 for `act`).
    """

    def __init__(self, model, *args, **kwargs):

        if isinstance(model, AutoModelForCausalLMWithValueHead):
            self._setup(*_llamagym_signature(model, *args, **kwargs))
        else:
            self._setup(*_marl_signature(model, *args, **kwargs))

    def _setup(self, model: MultiAdapterModel, name: str, config: AgentConfig | None, ref_adapter: str | None):
        if not isinstance(model, MultiAdapterModel):
            raise MarlError(f"Agent(model, ...): model is a {type(model).__name__}; pass a MultiAdapterModel, or "
                            "marl's AutoModelForCausalLMWithValueHead with LlamaGym's (model, tokenizer, device)")
        if not isinstance(name, str):
            raise MarlError(f"Agent(model, name, config): name is a {type(name).__name__}, not str (LlamaGym's "
                            "(model, tokenizer, device) takes marl's AutoModelForCausalLMWithValueHead)")
        self.model, self.name, self.tokenizer = model, name, model.tokenizer
        self.config = config or AgentConfig()
        if ref_adapter == "auto":
            ref_adapter = "sft" if "sft" in model.adapter_names else None
        if ref_adapter is not None and ref_adapter not in model.adapter_names:
            raise MarlError(f"reference adapter {ref_adapter!r} is not on the model (it has "
                            f"{', '.join(model.adapter_names) or 'none'}): load it, or pass ref_adapter=None")
        if ref_adapter == name:
            raise MarlError(f"the agent's adapter {name!r} cannot be its own reference: pass ref_adapter='sft' or None")
        self.ref_adapter = ref_adapter
        if name in model.adapter_names and model.value_head(name) is None:
            raise MarlError(f"adapter {name!r} has no value head (role {model.roles[name]!r}): "
                            f"give the agent a new name, and init_from={name!r} to start from its weights")
        args = self.config.ppo_args(name)
        spec = args.policy(args.policies[0])
        if name not in model.adapter_names:
            with torch.random.fork_rng():  # a seeded LoRA init (as `marl ppo`'s) that leaves the caller's RNG alone
                add_policy(model, args, spec, init_from=self.config.init_from)
        with only_trainable(model, name):  # the learner makes its policy the only trainable adapter
            self.learner = Learner(model, args, [spec])
        self.updates = 0
        self.last_episode: Episode | None = None  # the episode terminate_episode ended last
        self._live: dict[Hashable, Episode] = {}
        self._finished: list[Episode] = []
        self._counts: Counter = Counter()  # parse failures etc. since the last update
        self._warned = False

    # ------------------------------------------------------------------ what a subclass defines

    @abc.abstractmethod
    def get_system_prompt(self) -> str | None:
        """The system message of every episode (None or "": no system message)."""

    @abc.abstractmethod
    def format_observation(self, observation) -> str:
        """The user message for an observation."""

    @abc.abstractmethod
    def extract_action(self, response: str):
        """The environment action a reply asks for; None or an exception means unreadable."""

    # ------------------------------------------------------------------ the loop

    def act(self, observation, reply: str | None = None):
        """The action for `observation` in the (single) environment 0; with `reply`, the action of
        that given reply, recorded as if sampled (a demonstration)."""
        return self.act_batch([observation], envs=[0], replies=None if reply is None else [reply])[0]

    def act_batch(self, observations: Sequence, envs: Sequence[Hashable] | None = None,
                  replies: Sequence[str] | None = None) -> list:
        """Actions for several live episodes at once (one generate call), `envs[i]` naming the
        environment of `observations[i]` (default 0, 1, ...). Starts an episode where none is live.

        With `replies`, nothing is sampled: `replies[i]` is the agent's reply (a demonstration),
        recorded with the prompt act() builds and the reply's tokens as the chat template writes them.
        """
        envs = list(range(len(observations))) if envs is None else list(envs)
        if len(envs) != len(observations) or len(set(envs)) != len(envs):
            raise MarlError(f"act_batch: {len(observations)} observations need as many distinct envs, got {envs}")
        if replies is not None and len(replies) != len(observations):
            raise MarlError(f"act_batch: {len(observations)} observations need as many replies, got {len(replies)}")
        conversations = []
        for env, obs in zip(envs, observations):
            text = self.format_observation(obs)
            if not isinstance(text, str):
                raise MarlError(f"format_observation returned {type(text).__name__}, not str: return the user message")
            history = self._live[env].messages if env in self._live else self._opening()
            conversations.append(history + [{"role": "user", "content": text}])
        prompts = [self._prompt_ids(messages) for messages in conversations]
        given = replies is not None
        if given:
            replies, actions = self._demonstrated_actions(conversations, replies)
        else:
            replies, actions = self._sample_actions(prompts)
        # Episodes change only now, so a failed call (e.g. on_parse_failure="raise") leaves them as they were.
        for env, messages, prompt, (ids, text), (_, penalty) in zip(envs, conversations, prompts, replies, actions):
            ep = self._live.setdefault(env, Episode([]))
            ep.messages = messages + [{"role": "assistant", "content": text}]
            ep.turns.append(Turn(prompt, ids, penalty=penalty, demonstrated=given))
        return [action for action, _ in actions]

    def assign_reward(self, reward: float, env: Hashable = 0) -> None:
        """Add `reward` to the last turn of `env`'s episode."""
        ep = self._live.get(env)
        if ep is None or not ep.turns:
            raise MarlError(f"assign_reward: environment {env!r} has no turn to reward yet: call act() first")
        if not math.isfinite(float(reward)):
            raise MarlError(f"assign_reward: the reward {reward!r} of environment {env!r} is not a finite number")
        ep.turns[-1].reward += float(reward)

    def terminate_episode(self, env: Hashable = 0, train: bool = True) -> dict:
        """End `env`'s episode (kept as `last_episode`); when `batch_size` episodes are done, train
        on them and return the update's statistics, else {}. With `train=False` (as LlamaGym's),
        the episode joins no PPO batch (e.g. an evaluation, or demonstrations to clone)."""
        ep = self._live.pop(env, None)
        if ep is None:
            raise MarlError(f"terminate_episode: environment {env!r} has no episode in progress: call act() first")
        self.last_episode = ep
        if not train:
            return {}
        self._finished.append(ep)
        return self.update() if len(self._finished) >= self.config.batch_size else {}

    def demonstrate(self, pairs: Sequence[tuple], rewards: Sequence[float] | None = None) -> Episode:
        """The episode of given (observation, reply) pairs, recorded as act() records a turn (the
        same prompts, the reply's tokens), for `marl.agent_warmup.behaviour_clone`; trains nothing."""
        key = object()  # an env of its own: live episodes are not touched
        for i, (observation, reply) in enumerate(pairs):
            self.act_batch([observation], envs=[key], replies=[reply])
            self.assign_reward(0.0 if rewards is None else rewards[i], env=key)
        if key not in self._live:
            raise MarlError("demonstrate: no (observation, reply) pairs given")
        self.terminate_episode(env=key, train=False)
        return self.last_episode

    def freeze_reference(self, name: str | None = None) -> str:
        """Make a frozen copy of the agent's adapter as it is now (`<name>_ref` by default; refreshed
        if it exists) the reference of the KL penalty: after a warm-up, PPO is then held near the
        cloned policy rather than pulled back to the base. Returns the reference's name."""
        name = name or f"{self.name}_ref"
        model = self.model
        if name == self.name:
            raise MarlError(f"freeze_reference: {name!r} is the agent's own adapter: choose another name")
        if name not in model.adapter_names:
            model.add_adapter(name, None, role="sft", trainable=False, init_from=self.name)
        elif name in model.trainable_adapters or model.roles[name] != "sft":
            raise MarlError(f"freeze_reference: adapter {name!r} exists and is not a frozen reference: choose another name")
        else:
            model.copy_adapter_weights(self.name, name)
        self.ref_adapter = name
        return name

    def update(self) -> dict:
        """One PPO update of this agent's adapter on the finished episodes (then dropped); {} if none."""
        episodes, self._finished = self._finished, []
        if not episodes:
            return {}
        t0 = time.perf_counter()
        turns, scores = [], []
        for ep in episodes:
            credited = turn_returns([t.reward for t in ep.turns], self.config.credit, self.config.gamma)
            turns += ep.turns
            scores += [c + t.penalty for c, t in zip(credited, ep.turns)]
        rollout = self._rollout(turns)
        scores = torch.tensor(scores, dtype=torch.float32, device=self.model.device)
        self.updates += 1
        with only_trainable(self.model, self.name):
            ref_lp = reference_logprobs(self.model, self.ref_adapter, rollout)
            ppo = self.learner.train(rollout, scores, ref_lp, self.updates, names=[self.name])[self.name]
        counts, self._counts = self._counts, Counter()
        stats = {
            "agent/update": self.updates, "agent/episodes": len(episodes), "agent/turns": len(turns),
            "agent/episode_reward": sum(ep.reward for ep in episodes) / len(episodes),
            "agent/episode_length": len(turns) / len(episodes),
            "agent/parse_failures": counts["parse_failures"], "agent/retries": counts["retries"],
            "agent/default_actions": counts["default_actions"],
            "agent/parse_failure_rate": counts["parse_failures"] / max(1, counts["replies"]),
        }
        # The trainer's reward/* is the mean turn score here (credited reward + penalties).
        stats.update({k.replace("reward/", "score/"): v for k, v in ppo.items()})
        stats["time/update"] = time.perf_counter() - t0
        return stats

    def save(self, out_dir, overwrite: bool = False):
        """Save the agent's adapter and value head (peft format) to `out_dir`."""
        return self.model.save_adapter(self.name, out_dir, overwrite=overwrite, extra_meta={"stage": "agent"})

    # ------------------------------------------------------------------ internals

    def _opening(self) -> list[dict]:
        """The messages an episode starts with: the system prompt, if any."""
        system = self.get_system_prompt()
        return [{"role": "system", "content": system}] if system else []

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat so far through the tokenizer's chat template, ready for the assistant's reply.

        When it would not fit the model's context, the oldest exchanges are left out of the prompt.
        """
        return self._fit(messages)[1]

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """(the messages the prompt holds, the prompt's token ids): see `_prompt_ids`."""
        tok = self.model.tokenizer
        context = getattr(self.model.base.config.get_text_config(), "max_position_embeddings", None)
        limit = (context or 10**9) - self.config.max_new_tokens
        head = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(head):]
        while True:
            ids = tok.apply_chat_template(head + body, add_generation_prompt=True, tokenize=True, return_dict=False)
            if len(ids) <= limit:
                return head + body, list(ids)
            if len(body) <= 1:
                raise MarlError(f"the prompt of one turn is {len(ids)} tokens, over the model's context of {context} "
                                f"minus max_new_tokens={self.config.max_new_tokens}: shorten the system prompt or "
                                "the formatted observation, or lower max_new_tokens")
            body = body[2:]  # drop the oldest user/assistant pair

    def _generate(self, prompts: list[list[int]]) -> list[tuple[list[int], str]]:
        """One sampled reply per prompt (one generate call): its token ids through EOS, and its text."""
        ids, mask = left_pad(prompts, self.model.tokenizer.pad_token_id, self.model.device)
        cfg = self.config
        out = generate_rollout(self.model, ids, mask, [self.name] * len(prompts),
                               torch.full((len(prompts),), cfg.temperature), cfg.max_new_tokens, cfg.top_k, cfg.top_p)
        replies = []
        for r, m in zip(out.response_ids, out.response_mask):
            r = r[m.bool()].tolist()
            replies.append((r, self.model.tokenizer.decode(r, skip_special_tokens=True).strip()))
        return replies

    def _reply_ids(self, messages: list[dict], reply: str) -> list[int]:
        """The tokens the agent would sample to say `reply` after `messages`: what the chat template
        writes after the generation prompt, through the first stop token."""
        tok = self.model.tokenizer
        shown, prompt = self._fit(messages)
        full = list(tok.apply_chat_template(shown + [{"role": "assistant", "content": reply}], tokenize=True,
                                            return_dict=False))
        if full[:len(prompt)] != prompt:
            raise MarlError("the chat template does not write the assistant's reply after the generation prompt, so "
                            "a demonstrated reply has no tokens to clone: use a template that does")
        ids = full[len(prompt):]
        stops = [i for i, t in enumerate(ids) if t in self.model.stop_token_ids]
        if stops:  # through the first stop token (`<|im_end|>`, `<|eot_id|>` or EOS), as a sampled reply ends
            ids = ids[:stops[0] + 1]
        if len(ids) > self.config.max_new_tokens:
            raise MarlError(f"the demonstrated reply {reply!r} is {len(ids)} tokens, over max_new_tokens="
                            f"{self.config.max_new_tokens}: shorten it, or raise max_new_tokens")
        return ids

    def _demonstrated_actions(self, conversations: list[list[dict]], replies: Sequence[str]):
        """Like `_sample_actions`, for given replies: (ids, text) and (action, 0.0) per conversation."""
        out_replies, out_actions = [], []
        for messages, reply in zip(conversations, replies):
            text = str(reply).strip()
            try:
                action = self.extract_action(text)
            except Exception:  # noqa: BLE001 - an unreadable demonstration is refused below
                action = None
            if action is None:
                raise MarlError(f"extract_action cannot read the demonstrated reply {text!r}: demonstrate replies "
                                "the agent can act on")
            out_replies.append((self._reply_ids(messages, text), text))
            out_actions.append((action, 0.0))
        return out_replies, out_actions

    def _sample_actions(self, prompts: list[list[int]]):
        """Replies and (action, penalty) per prompt, handling unreadable replies as configured."""
        cfg = self.config
        replies = [None] * len(prompts)
        actions = [None] * len(prompts)
        pending = list(range(len(prompts)))
        tries = 1 + (cfg.max_retries if cfg.on_parse_failure == "retry" else 0)
        for attempt in range(tries):
            if attempt:
                self._counts["retries"] += len(pending)
            for i, reply in zip(pending, self._generate([prompts[i] for i in pending])):
                replies[i] = reply
                actions[i] = self._read_action(reply[1])
            pending = [i for i in pending if actions[i] is None]
            if not pending:
                break
        out = []
        for i, action in enumerate(actions):
            if action is not None:
                out.append((action, 0.0))
                continue
            if cfg.on_parse_failure == "raise":
                raise MarlError(f"extract_action could not read the reply {replies[i][1]!r}: fix extract_action, "
                                "or set on_parse_failure to penalty, retry or default")
            self._counts["default_actions"] += 1
            penalty = 0.0 if cfg.on_parse_failure == "default" else cfg.parse_failure_penalty
            out.append((cfg.default_action, penalty))
        return replies, out

    def _read_action(self, text: str):
        """`extract_action(text)`, or None (counted and logged) when it fails."""
        self._counts["replies"] += 1
        try:
            action = self.extract_action(text)
            error = None if action is not None else "returned None"
        except Exception as e:  # noqa: BLE001 - any failure to read a reply is handled as configured
            action, error = None, f"raised {e.__class__.__name__}: {e}"
        if action is None:
            self._counts["parse_failures"] += 1
            log = logger.debug if self._warned else logger.warning  # once per agent, then debug
            self._warned = True
            log("agent %s: extract_action %s on %r (on_parse_failure=%s)", self.name, error, text[:200],
                self.config.on_parse_failure)
        return action

    def _rollout(self, turns: list[Turn]) -> Rollout:
        """The turns as a Rollout: prompts left-padded, responses right-padded."""
        pad, dev = self.model.tokenizer.pad_token_id, self.model.device
        prompt_ids, prompt_mask = left_pad([t.prompt_ids for t in turns], pad, dev)
        response_ids, response_mask = pad_rows([t.response_ids for t in turns], pad, "right", dev)
        return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, [self.name] * len(turns),
                       torch.full((len(turns),), float(self.config.temperature)))


def play(agent: Agent, envs: Sequence, episodes: int, seed: int | None = None, on_update=None, *,
         policy: Callable[[Any], str] | None = None, train: bool = True, record: list | None = None) -> list[float]:
    """Play `episodes` episodes on gymnasium-style `envs` in parallel (one `act_batch` per round).

    Each env has `reset(seed=) -> (obs, info)` and `step(action) -> (obs, reward, terminated,
    truncated, info)`; env i is reset with seed `seed + i` the first time. `on_update(stats)` is
    called after each PPO update. Returns each finished episode's total reward, in finishing order.

    `policy(observation) -> reply` plays a scripted player through the agent's prompts instead of
    sampling (demonstrations); `train=False` plays without PPO updates; `record` (a list) gets
    each finished `Episode`, e.g. for `marl.agent_warmup.behaviour_clone`.
    """
    obs, started, returns = {}, 0, []
    for i, env in enumerate(envs[:episodes]):
        obs[i] = env.reset(seed=None if seed is None else seed + i)[0]
        started += 1
    totals = dict.fromkeys(obs, 0.0)
    while obs:
        live = list(obs)
        replies = None if policy is None else [policy(obs[i]) for i in live]
        for i, action in zip(live, agent.act_batch([obs[i] for i in live], envs=live, replies=replies)):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            agent.assign_reward(reward, env=i)
            totals[i] += float(reward)
            if terminated or truncated:
                returns.append(totals[i])
                stats = agent.terminate_episode(env=i, train=train)
                if record is not None:
                    record.append(agent.last_episode)
                if stats and on_update is not None:
                    on_update(stats)
                totals[i] = 0.0
                if started < episodes:
                    obs[i] = envs[i].reset()[0]
                    started += 1
                else:
                    del obs[i]
    return returns


def _marl_signature(model: MultiAdapterModel, name: str = "agent", config: AgentConfig | None = None,
                    ref_adapter: str | None = "auto"):
    return model, name, config, ref_adapter


def _llamagym_signature(model, tokenizer, device=None, generate_config_dict: dict | None = None,
                        ppo_config_dict: dict | None = None):
    """marl's (model, name, config, ref_adapter) for LlamaGym's arguments."""
    marl_model = model.marl_model
    if tokenizer is not None and tokenizer is not marl_model.tokenizer:
        if tokenizer.get_vocab() != marl_model.tokenizer.get_vocab():
            raise MarlError("the tokenizer's vocabulary differs from the model's: pass AutoTokenizer.from_pretrained "
                            "of the model's checkpoint, unchanged (marl pads with the model's own pad token)")
        if tokenizer.chat_template:  # a template set on the user's tokenizer is the one to prompt with
            marl_model.tokenizer.chat_template = tokenizer.chat_template
    if device is not None and torch.device(device).type != marl_model.device.type:
        marl_model.to(device)
    name = model.active_adapter or model.policy_adapter_name
    return marl_model, name, llamagym_config(generate_config_dict, ppo_config_dict), None


@contextlib.contextmanager
def only_trainable(model: MultiAdapterModel, name: str):
    """Make adapter `name` the only trainable one for the body, then restore what was trainable."""
    previous = model.trainable_adapters
    model.set_trainable([name])
    try:
        yield
    finally:
        model.set_trainable(previous)
