"""An LLM agent learns gymnasium's Blackjack-v1 with PPO, as a LoRA adapter on a shared base.

    python -m pipelines.agent_blackjack --episodes 256 [--model Qwen/Qwen2.5-0.5B-Instruct] [--envs 8]

Needs gymnasium (`pip install 'marl[gym]'`). Each turn the agent reads its hand as a chat
message and answers "stick" or "hit"; the game's +1 / 0 / -1 at the end of a hand is credited
to every turn by discounted return. An answer with neither word plays the default action
(stick) with a penalty. Several hands are played in parallel (`--envs`), one generate call per
round. The embedded default model (`--model default`, the default) only knows movie reviews, so
with it this shows the loop working rather than a good player; an instruction-tuned model
plays from the start and improves.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from marl.agent import Agent, AgentConfig, play
from marl.errors import MarlError

STICK, HIT = 0, 1


class BlackjackAgent(Agent):
    """Reads Blackjack-v1's observation (player sum, dealer card, usable ace) as a chat message."""

    def get_system_prompt(self) -> str:
        return ("You are playing Blackjack. Get as close to 21 as you can without going over. "
                "Answer with one word: stick to keep your hand, or hit to draw another card.")

    def format_observation(self, observation) -> str:
        player, dealer, usable_ace = observation
        ace = " with a usable ace" if usable_ace else ""
        return f"Your hand totals {player}{ace}. The dealer shows {dealer}. Stick or hit?"

    def extract_action(self, response: str):
        for word in re.findall(r"[a-z]+", response.lower()):
            if word in ("stick", "stand", "stay"):
                return STICK
            if word == "hit":
                return HIT
        return None


def make_envs(n: int):
    """`n` Blackjack-v1 environments (a clear error if gymnasium is missing)."""
    try:
        import gymnasium as gym
    except ImportError:
        raise MarlError("this example needs gymnasium: pip install 'marl[gym]' (or pip install gymnasium)") from None
    return [gym.make("Blackjack-v1") for _ in range(n)]


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="base model: `default`, a local folder or a Hub id")
    p.add_argument("--episodes", type=int, default=256, help="hands to play")
    p.add_argument("--envs", type=int, default=8, help="hands played in parallel")
    p.add_argument("--batch_size", type=int, default=16, help="hands per PPO update")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--max_new_tokens", type=int, default=8)
    p.add_argument("--on_parse_failure", default="penalty", help="penalty | retry | default | raise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save the trained adapter here")
    args = p.parse_args(argv)

    import torch

    from marl.model import MultiAdapterModel
    from pipelines._common import quiet

    quiet()
    torch.manual_seed(args.seed)
    envs = make_envs(args.envs)
    model = MultiAdapterModel.from_pretrained(args.model)
    config = AgentConfig(batch_size=args.batch_size, learning_rate=args.learning_rate,
                         max_new_tokens=args.max_new_tokens, on_parse_failure=args.on_parse_failure,
                         default_action=STICK, parse_failure_penalty=-1.0, seed=args.seed)
    agent = BlackjackAgent(model, "blackjack", config, ref_adapter="auto")

    def log(stats: dict) -> None:
        print(f"update {stats['agent/update']:3d}: reward {stats['agent/episode_reward']:+.2f}  "
              f"parse failures {stats['agent/parse_failure_rate']:.0%}  kl {stats['kl/mean']:.3f}", flush=True)

    t0 = time.time()
    returns = play(agent, envs, args.episodes, seed=args.seed, on_update=log)
    agent.update()  # the last, partial batch
    k = max(1, len(returns) // 4)
    print(f"mean reward: first {k} hands {sum(returns[:k]) / k:+.3f}, last {k} hands {sum(returns[-k:]) / k:+.3f} "
          f"({time.time() - t0:.0f} s)")
    if args.out:
        print(f"saved {agent.save(args.out, overwrite=True)}")
    return returns


if __name__ == "__main__":
    try:
        main()
    except MarlError as e:
        sys.exit(f"agent_blackjack: error: {e}")
