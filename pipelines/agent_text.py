"""A text game in which the tiny default model learns, on the CPU, in a few minutes.

    python -m pipelines.agent_text [--episodes 160] [--envs 16] [--model default]

Movie night: a friend tells the agent, film after film, how they liked it and asks for the
agent's opinion. Agreeing earns +1, disagreeing -1. The agent's reply is read by the embedded
corpus's sentiment lexicon (`marl.default.sentiment_score`): a reply with no opinion cannot be
read and plays "no opinion" with a small penalty. The default model, pretrained on movie
reviews, starts out giving opinions more or less at random; PPO on its `movie_night` adapter
makes it agree with its friend. Prints the mean reward of the first and last quarter of the
episodes.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from marl.agent import Agent, AgentConfig, play
from marl.default import sentiment_score
from marl.errors import MarlError

LIKE, DISLIKE, NO_OPINION = "like", "dislike", "no opinion"
TITLES = ("Night Harbor", "The Last Orchard", "Paper Moons", "Iron Valley", "Silver Lake", "The Glass Tower",
          "Copper Sky", "Winter Garden", "Echo Park", "Red Canyon", "The Clockmaker", "Neon City")


class MovieNightEnv:
    """Gymnasium-style (`reset`, `step`) episodes of `films` turns.

    The observation is the friend's line; the action is LIKE, DISLIKE or NO_OPINION; the reward
    is +1 when it matches the friend's opinion, -1 when it is the opposite, 0 for no opinion.
    With `mood="fan"` the friend loves every film; with `"mixed"` (default) loves or hates at random.
    """

    def __init__(self, films: int = 2, mood: str = "mixed"):
        if mood not in ("fan", "mixed"):
            raise MarlError(f"mood: {mood!r} must be fan or mixed")
        self.films, self.mood = films, mood
        self.rng = random.Random(0)
        self.turn, self.opinion = 0, LIKE

    def reset(self, seed: int | None = None):
        if seed is not None:
            self.rng = random.Random(seed)
        self.turn = 0
        return self._line(), {}

    def step(self, action):
        reward = 0.0 if action == NO_OPINION else (1.0 if action == self.opinion else -1.0)
        self.turn += 1
        done = self.turn == self.films
        return (None if done else self._line()), reward, done, False, {"opinion": self.opinion}

    def _line(self) -> str:
        self.opinion = LIKE if self.mood == "fan" else self.rng.choice((LIKE, DISLIKE))
        verb = "loved" if self.opinion == LIKE else "hated"
        return f"I {verb} {self.rng.choice(TITLES)}. Your opinion?"


class MovieCriticAgent(Agent):
    """Says what it thought of a film; its opinion is the sentiment of its reply."""

    def get_system_prompt(self) -> None:
        return None  # the default model never saw a system message; a chat model would get one here

    def format_observation(self, observation: str) -> str:
        return observation

    def extract_action(self, response: str):
        score = sentiment_score(response)
        return LIKE if score > 0 else DISLIKE if score < 0 else None  # None: no opinion to read


def default_config(**overrides) -> AgentConfig:
    """Settings under which the default model learns the game in a few minutes on 2 CPU cores."""
    base = dict(batch_size=16, max_new_tokens=6, learning_rate=2e-3, ppo_epochs=2, mini_batch_size=16,
                kl_coef=0.05, lora_r=8, lora_alpha=16, on_parse_failure="penalty", default_action=NO_OPINION,
                parse_failure_penalty=-0.5, credit="discounted", gamma=0.9)
    return AgentConfig(**{**base, **overrides})


def train(model, episodes: int = 160, envs: int = 16, mood: str = "mixed", seed: int = 0, on_update=None,
          **overrides) -> tuple[MovieCriticAgent, list[float]]:
    """Train a `movie_night` agent on `model` for `episodes` episodes; returns it and each episode's reward."""
    agent = MovieCriticAgent(model, "movie_night", default_config(seed=seed, **overrides), ref_adapter="auto")
    returns = play(agent, [MovieNightEnv(mood=mood) for _ in range(envs)], episodes, seed=seed, on_update=on_update)
    return agent, returns


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="base model: `default`, a local folder or a Hub id")
    p.add_argument("--episodes", type=int, default=160, help="episodes to play")
    p.add_argument("--envs", type=int, default=16, help="episodes played in parallel")
    p.add_argument("--mood", default="mixed", help="fan (always loved the film) or mixed")
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save the trained adapter here")
    args = p.parse_args(argv)

    import torch

    from marl.model import MultiAdapterModel
    from marl.stages.common import quiet

    quiet()
    torch.manual_seed(args.seed)
    model = MultiAdapterModel.from_pretrained(args.model)

    def log(stats: dict) -> None:
        print(f"update {stats['agent/update']:3d}: reward {stats['agent/episode_reward']:+.2f}  "
              f"no opinion {stats['agent/parse_failure_rate']:.0%}  kl {stats['kl/mean']:.3f}", flush=True)

    t0 = time.time()
    agent, returns = train(model, args.episodes, args.envs, args.mood, args.seed, on_update=log,
                           learning_rate=args.learning_rate)
    k = max(1, len(returns) // 4)
    print(f"mean episode reward: first {k} episodes {sum(returns[:k]) / k:+.3f}, "
          f"last {k} episodes {sum(returns[-k:]) / k:+.3f} ({time.time() - t0:.0f} s)")
    if args.out:
        print(f"saved {agent.save(args.out, overwrite=True)}")
    return returns


if __name__ == "__main__":
    try:
        main()
    except MarlError as e:
        print(f"marl: error: {e}", file=sys.stderr)
        sys.exit(2)
