"""An LLM agent learns gymnasium's Blackjack-v1: a behaviour-cloning warm-up, then PPO, as one
LoRA adapter on a shared base.

    python -m pipelines.agent_blackjack [--model default] [--seed 0] [--ppo_hands 1024]

Needs gymnasium (`pip install 'marl[gym]'`). Each turn the agent reads its hand as a chat message
("You 14 with an ace, dealer 10.") and answers "more" (hit) or "finish" (stick; "hit", "stick",
"stand" and "stay" are read too); the game's +1 / 0 / -1 at the end of a hand is the reward of
its last turn, credited back to earlier turns by discounted return. An answer with none of those
words plays stick with a penalty. The learning curve is saved as a PNG (`--plot`).

1. Baselines: always stick, random, and basic strategy play the evaluation hands.
2. Warm-up (`marl.agent_warmup`): a scripted basic-strategy player plays `--demo_hands` hands
   through the agent's own prompts; `behaviour_clone` trains the agent's adapter on its replies
   (TRL's SFTTrainer). The cloned adapter, frozen, becomes PPO's KL reference.
3. The agent plays the evaluation hands (no training): the warm-up alone.
4. PPO on `--ppo_hands` other hands; the mean reward per block of `--block` hands is printed.
5. The agent plays the evaluation hands again: warm-up + PPO.

Every hand is dealt from its own seed, so all players of the evaluation play the same
`--eval_hands` deals. The embedded default model only knows movie reviews: without the warm-up
it never answers with an action (LlamaGym's advice: a supervised phase before RL). Measured
defaults, 3 seeds: docs/agents.md.
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import sys
import time
from pathlib import Path

from marl.agent import Agent, AgentConfig, play
from marl.errors import MarlError
from marl.stats import mean_se

STICK, HIT = 0, 1
# The warm-up's replies. The default model's LM head puts "fine" among ~100 review adjectives whose
# rows point one way (cosine >= 0.9): cloned, "fine" leaked ~30% of its mass to "conventional",
# "ordinary", ... "finish" and "more" have rows of their own (max cosine 0.53, 0.51) and clone cleanly.
WORDS = {STICK: "finish", HIT: "more"}


class BlackjackAgent(Agent):
    """Reads Blackjack-v1's observation (player sum, dealer card, usable ace) as a chat message."""

    def get_system_prompt(self) -> str:
        return "Blackjack. Say more or finish."

    def format_observation(self, observation) -> str:
        player, dealer, usable_ace = observation
        ace = " with an ace" if usable_ace else ""
        return f"You {player}{ace}, dealer {dealer}."

    def extract_action(self, response: str):
        for word in re.findall(r"[a-z]+", response.lower()):
            if word in ("stick", "stand", "stay", "finish"):
                return STICK
            if word in ("hit", "more"):
                return HIT
        return None


def basic_strategy(observation) -> int:
    """The basic strategy of Blackjack-v1 (dealer stands on 17; no doubling or splitting).

    Hard totals: hit up to 11; 12 sticks against a dealer 4-6; 13-16 stick against 2-6; 17+ stick.
    Soft totals (a usable ace): hit up to 17; 18 sticks against 2-8; 19+ stick. The dealer's ace is 1.
    """
    player, dealer, usable_ace = observation
    if usable_ace:
        return STICK if player >= 19 or (player == 18 and 2 <= dealer <= 8) else HIT
    if player >= 17:
        return STICK
    if player >= 13:
        return STICK if 2 <= dealer <= 6 else HIT
    if player == 12:
        return STICK if 4 <= dealer <= 6 else HIT
    return HIT


class SeededHands:
    """A Blackjack-v1 env whose every hand is dealt from the next seed of a shared counter: the k-th
    hand started by any env of the group is the deal of seed `first + k`, whatever the player.
    `decisions` (shared too) gets each (observation, action) played, `returns` each deal's return."""

    def __init__(self, env, seeds, decisions: list, returns: dict):
        self.env, self.seeds, self.decisions, self.returns = env, seeds, decisions, returns
        self.obs = self.deal = None

    def reset(self, seed=None):
        self.deal = next(self.seeds)
        self.returns[self.deal] = 0.0
        self.obs, info = self.env.reset(seed=self.deal)
        return self.obs, info

    def step(self, action):
        self.decisions.append((self.obs, action))
        self.obs, reward, *rest = self.env.step(action)
        self.returns[self.deal] += float(reward)
        return (self.obs, reward, *rest)


def make_envs(n: int, first_seed: int = 0) -> list[SeededHands]:
    """`n` Blackjack-v1 environments dealing the hands of seeds first_seed, first_seed + 1, ..."""
    try:
        import gymnasium as gym
    except ImportError:
        raise MarlError("this example needs gymnasium: pip install 'marl[gym]' (or pip install gymnasium)") from None
    seeds, decisions, returns = itertools.count(first_seed), [], {}
    return [SeededHands(gym.make("Blackjack-v1"), seeds, decisions, returns) for _ in range(n)]


def paired_difference(after: dict, before: dict) -> tuple[float, float]:
    """(mean, standard error) over the deals both played of after's return minus before's."""
    diffs = [after[deal] - before[deal] for deal in after if deal in before]
    return mean_se(diffs) if diffs else (0.0, float("nan"))


def agreement(decisions: list) -> float:
    """The share of (observation, action) decisions that basic strategy would have made too."""
    return mean(action == basic_strategy(obs) for obs, action in decisions)


def play_scripted(policy, hands: int, first_seed: int) -> list[float]:
    """The return of each of the hands of seeds first_seed ... first_seed + hands - 1 under `policy(obs) -> action`."""
    env = make_envs(1, first_seed)[0]
    returns = []
    for _ in range(hands):
        obs, _ = env.reset()
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    return returns


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / max(1, len(xs))


def failure_rate(episodes) -> float:
    """The share of the episodes' turns whose reply could not be read (played by default, penalised)."""
    return mean(t.penalty != 0 for ep in episodes for t in ep.turns)


def evaluate(agent: Agent, hands: int, first_seed: int, envs: int) -> tuple[float, float, float, dict]:
    """(mean reward, share of unreadable replies, agreement with basic strategy, {deal: return})
    of `agent` on the given hands, without training."""
    episodes, env_list = [], make_envs(envs, first_seed)
    returns = play(agent, env_list, hands, train=False, record=episodes)
    return mean(returns), failure_rate(episodes), agreement(env_list[0].decisions), env_list[0].returns


def plot(returns: list[float], block: int, lines: dict[str, float], out: str, window: int = 512) -> None:
    """The PPO learning curve: the mean reward of each block of `block` hands (± its standard
    error) and the trailing mean of up to `window` hands, against the evaluation's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=80)
    ends = list(range(block, len(returns) + block, block))
    blocks = [returns[e - block:e] for e in ends]
    ax.errorbar([min(e, len(returns)) for e in ends], [mean(b) for b in blocks],
                yerr=[mean_se(b)[1] if len(b) > 1 else 0.0 for b in blocks], fmt="o",
                color="tab:blue", ms=4, capsize=2, label=f"PPO hands: mean of {block} (± s.e.)")
    xs = list(range(min(block, len(returns)), len(returns) + 1, 8))
    ax.plot(xs, [mean(returns[max(0, x - window):x]) for x in xs], color="tab:blue", lw=1,
            label=f"PPO hands: trailing mean of {window}")
    styles = {"always stick": "tab:gray", "random": "tab:red", "basic strategy": "tab:green",
              "agent after warm-up": "tab:orange", "agent after PPO": "tab:purple"}
    for name, value in lines.items():
        ax.axhline(value, ls="--", lw=1, color=styles.get(name, "k"), label=f"{name} (eval) {value:+.3f}")
    ax.set_xlabel("PPO hands played")
    ax.set_ylabel("mean reward per hand")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def check_args(args) -> None:
    """Refuse counts that cannot work before anything loads."""
    from marl.agent_warmup import check_lr_scheduler

    for key in ("envs", "ppo_hands", "eval_hands", "block", "batch_size", "bc_batch_size", "max_new_tokens"):
        if getattr(args, key) < 1:
            raise MarlError(f"--{key} {getattr(args, key)} must be at least 1")
    if args.demo_hands < 0 or args.bc_epochs <= 0:
        raise MarlError(f"--demo_hands {args.demo_hands} / --bc_epochs {args.bc_epochs}: give demo_hands >= 0 "
                        "(0: no warm-up) and bc_epochs > 0")
    check_lr_scheduler(args.bc_schedule)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "--model_name_or_path", dest="model", default="default",
                   help="base model: `default`, a local folder or a Hub id")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--envs", type=int, default=32, help="hands played in parallel")
    p.add_argument("--demo_hands", type=int, default=1024, help="hands the scripted player shows (0: no warm-up)")
    p.add_argument("--bc_epochs", type=float, default=10.0)
    p.add_argument("--bc_learning_rate", type=float, default=1e-3)
    p.add_argument("--bc_batch_size", type=int, default=8)
    p.add_argument("--bc_schedule", default="linear", help="the warm-up's learning-rate schedule (transformers')")
    p.add_argument("--ppo_hands", type=int, default=1024, help="hands played while training with PPO")
    p.add_argument("--eval_hands", type=int, default=1024, help="hands each player is measured on")
    p.add_argument("--block", type=int, default=128, help="hands per printed block of the learning curve")
    p.add_argument("--batch_size", type=int, default=64, help="hands per PPO update")
    p.add_argument("--learning_rate", type=float, default=3e-5, help="PPO learning rate")
    p.add_argument("--kl_coef", type=float, default=0.2, help="PPO's KL penalty against the cloned policy")
    p.add_argument("--max_new_tokens", type=int, default=6)
    p.add_argument("--on_parse_failure", default="penalty", help="penalty | retry | default | raise")
    p.add_argument("--plot", default="runs/agent_blackjack/seed{seed}.png",
                   help="save the learning curve here (PNG; {seed} is the seed; '' for none)")
    p.add_argument("--out", default=None, help="save the trained adapter here")
    args = p.parse_args(argv)
    check_args(args)
    return args


def say(text: str) -> None:
    print(text, flush=True)


def baselines(args, eval_seed: int) -> dict:
    """Step 1: always stick, random and basic strategy on the evaluation hands."""
    rng = random.Random(args.seed)
    results = {
        "always stick": mean(play_scripted(lambda obs: STICK, args.eval_hands, eval_seed)),
        "random": mean(play_scripted(lambda obs: rng.choice((STICK, HIT)), args.eval_hands, eval_seed)),
        "basic strategy": mean(play_scripted(basic_strategy, args.eval_hands, eval_seed)),
    }
    for name, value in results.items():
        say(f"{name:>20}: {value:+.3f} mean reward over the {args.eval_hands} evaluation hands")
    return results


def make_agent(args) -> BlackjackAgent:
    from marl.model import MultiAdapterModel

    config = AgentConfig(batch_size=args.batch_size, mini_batch_size=32, ppo_epochs=2, learning_rate=args.learning_rate,
                         kl_coef=args.kl_coef, max_new_tokens=args.max_new_tokens, credit="discounted", gamma=1.0,
                         on_parse_failure=args.on_parse_failure, default_action=STICK, parse_failure_penalty=-1.0,
                         lora_r=16, lora_alpha=32, seed=args.seed)
    return BlackjackAgent(MultiAdapterModel.from_pretrained(args.model), "blackjack", config, ref_adapter="auto")


def warm_up(agent: Agent, args, demo_seed: int) -> None:
    """Step 2: clone a basic-strategy player's replies into the agent's adapter, then freeze it as PPO's reference
    (PPO is held near the cloned policy, not pulled back to the base)."""
    from marl.agent_warmup import behaviour_clone

    demos = []
    play(agent, make_envs(args.envs, demo_seed), args.demo_hands, train=False, record=demos,
         policy=lambda obs: WORDS[basic_strategy(obs)])
    bc = behaviour_clone(agent, demos, epochs=args.bc_epochs, learning_rate=args.bc_learning_rate,
                         batch_size=args.bc_batch_size, seed=args.seed, lr_scheduler_type=args.bc_schedule)
    agent.freeze_reference()
    say(f"warm-up: cloned {bc['bc/turns']} basic-strategy replies of {args.demo_hands} hands, {bc['bc/steps']} "
        f"steps, loss {bc['bc/loss']:.3f} ({bc['time/bc']:.0f} s)")


def measure(agent: Agent, args, eval_seed: int, when: str, results: dict) -> dict:
    """Steps 3 and 5: the agent on the evaluation hands, no training, into `results`; {deal: return}."""
    reward, fail, agree, deals = evaluate(agent, args.eval_hands, eval_seed, args.envs)
    results.update({f"agent after {when}": reward, f"parse failures after {when}": fail,
                    f"basic-strategy agreement after {when}": agree})
    say(f"{f'agent after {when}':>20}: {reward:+.3f}  (parse failures {fail:.1%}, basic-strategy decisions "
        f"{agree:.1%})")
    return deals


def train_with_ppo(agent: Agent, args, ppo_seed: int, results: dict) -> list[float]:
    """Step 4: PPO on other hands, each update and each block of `--block` hands printed; the hands' returns."""
    episodes, logged = [], [0]

    def log(stats: dict) -> None:
        batch, logged[0] = episodes[logged[0]:], len(episodes)  # the episodes this update trained on
        say(f"  update {stats['agent/update']:3d}: reward {stats['agent/episode_reward']:+.3f}  parse failures "
            f"{failure_rate(batch):.0%}  kl {stats['kl/mean']:.3f}")

    returns = play(agent, make_envs(args.envs, ppo_seed), args.ppo_hands, on_update=log, record=episodes)
    if agent._finished:
        log(agent.update())  # the last, partial batch
    for s in range(0, len(returns), args.block):
        block = returns[s:s + args.block]
        say(f"  PPO hands {s + 1:5d}-{s + len(block):5d}: mean reward {mean(block):+.3f}")
    last = min(512, len(returns))
    results.update({f"last {last} PPO hands": mean(returns[-last:]), "parse failures during PPO":
                    failure_rate(episodes), "ppo returns": returns})
    say(f"{f'last {last} PPO hands':>20}: {mean(returns[-last:]):+.3f} (parse failures "
        f"{results['parse failures during PPO']:.1%})")
    return returns


def save_outputs(agent: Agent, args, results: dict) -> None:
    """The learning curve (`--plot`) and the trained adapter (`--out`)."""
    if args.plot:
        args.plot = args.plot.format(seed=args.seed)
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        lines = ("always stick", "random", "basic strategy", "agent after warm-up", "agent after PPO")
        plot(results["ppo returns"], args.block, {k: results[k] for k in lines}, args.plot)
        say(f"saved {args.plot}")
    if args.out:
        say(f"saved {agent.save(args.out, overwrite=True)}")


def main(argv: list[str] | None = None) -> dict:
    """The steps of the module docstring, in order; returns every figure they print."""
    args = parse_args(argv)
    import torch

    from marl.stages.common import quiet

    quiet()
    torch.set_num_threads(1)  # a tiny model: one thread beats two fighting over the cores
    torch.manual_seed(args.seed)
    t0, cpu0 = time.time(), time.process_time()
    # Disjoint seed ranges: demonstrations, PPO hands, and the evaluation hands every player plays.
    demo_seed, ppo_seed, eval_seed = (1_000_000 * (3 * args.seed + k) for k in (1, 2, 3))
    results = baselines(args, eval_seed)
    agent = make_agent(args)
    if args.demo_hands:
        warm_up(agent, args, demo_seed)
    warm_deals = measure(agent, args, eval_seed, "warm-up", results)
    train_with_ppo(agent, args, ppo_seed, results)
    gain, gain_se = paired_difference(measure(agent, args, eval_seed, "PPO", results), warm_deals)
    results.update({"PPO minus warm-up": gain, "PPO minus warm-up s.e.": gain_se,
                    "seconds": time.time() - t0, "cpu seconds": time.process_time() - cpu0})
    say(f"{'PPO minus warm-up':>20}: {gain:+.3f} ± {gain_se:.3f} (same deals, paired standard error); "
        f"{results['seconds']:.0f} s ({results['cpu seconds']:.0f} s of CPU)")
    save_outputs(agent, args, results)
    return results


if __name__ == "__main__":
    try:
        main()
    except MarlError as e:
        print(f"marl: error: {e}", file=sys.stderr)
        sys.exit(2)
