"""A supervised warm-up for agents: behaviour cloning into the agent's OWN adapter, before or
between PPO updates (LlamaGym's advice: a supervised phase before RL).

Two sources, one path:

- **demonstrations**: (observation, reply) pairs (`agent.demonstrate(pairs)`), or a scripted
  player (`play(agent, envs, n, policy=fn, train=False, record=episodes)`, `fn(observation) ->
  reply`), both recorded through the agent's own prompts;
- **the agent's own best trajectories**: filtered behaviour cloning / rejection sampling on the
  episode return (`best_episodes(episodes, top_fraction=0.25)` of episodes played with
  `record=`).

`behaviour_clone(agent, episodes)` then trains the agent's adapter with TRL's `SFTTrainer` on
every turn: input = the prompt `act` built (the same chat template, system prompt and history,
token for token) + the reply's tokens, loss on the reply's tokens only (Pomerleau 1991, behaviour
cloning; filtered BC as in Chen et al. 2021, "Decision Transformer", %BC). The base, the agent's
value head and every other adapter stay as they were.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Sequence

import torch

from marl.agent import Agent, Episode, Turn, only_trainable
from marl.errors import MarlError
from marl.ppo.rollout import reference_logprobs


def best_episodes(episodes: Sequence[Episode], top_fraction: float | None = None,
                  min_return: float | None = None) -> list[Episode]:
    """The episodes to clone from the agent's own play: those with a return >= `min_return`, and/or
    the `top_fraction` with the highest returns (ties at the cut kept). Order is kept.

    E.g. returns [1, -1, 0, 1], top_fraction 0.5: the cut is the 2nd highest return, 1 -> episodes 0 and 3.
    """
    if top_fraction is None and min_return is None:
        raise MarlError("best_episodes: give top_fraction (e.g. 0.25) and/or min_return (e.g. 1.0)")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise MarlError(f"best_episodes: top_fraction {top_fraction} must be in (0, 1]")
    kept = list(episodes)
    if min_return is not None:
        kept = [ep for ep in kept if ep.reward >= min_return]
    if top_fraction is not None and kept:
        k = max(1, math.ceil(top_fraction * len(kept)))
        cut = sorted((ep.reward for ep in kept), reverse=True)[k - 1]
        kept = [ep for ep in kept if ep.reward >= cut]
    return kept


def clone_examples(episodes: Sequence[Episode]) -> list[dict]:
    """One SFT example per turn: `input_ids` = prompt + reply tokens, `labels` = -100 on the prompt
    (the reply is what is cloned: exactly the tokens the agent would have to sample)."""
    rows = []
    for ep in episodes:
        for t in ep.turns:
            rows.append({"input_ids": list(t.prompt_ids) + list(t.response_ids),
                         "labels": [-100] * len(t.prompt_ids) + list(t.response_ids)})
    if not rows:
        raise MarlError("behaviour cloning got no turns: give episodes with at least one turn (best_episodes kept none?)")
    return rows


def behaviour_clone(agent: Agent, episodes: Sequence[Episode], epochs: float = 1.0, learning_rate: float = 1e-3,
                    batch_size: int = 16, seed: int = 0, max_steps: int = -1,
                    lr_scheduler_type: str = "constant") -> dict:
    """Train `agent`'s own adapter to reproduce the replies of `episodes` (TRL `SFTTrainer`).

    `lr_scheduler_type` is transformers' ("constant", "linear": down to 0 at the last step, ...).

    Returns {"bc/turns", "bc/steps", "bc/loss" (mean train loss), "time/bc"}. Only the agent's LoRA
    weights change; its value head, the base and every other adapter are untouched, and the
    adapter that was active before is active again afterwards.
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    check_lr_scheduler(lr_scheduler_type)
    model, name = agent.model, agent.name
    rows = clone_examples(episodes)
    t0 = time.perf_counter()
    was_training = model.training
    padding_side = model.tokenizer.padding_side
    with tempfile.TemporaryDirectory(prefix="marl-bc-") as out, model.use_adapter(name), \
            only_trainable(model, name):
        with warnings.catch_warnings():  # transformers renames gradient_checkpointing; TRL still defaults it on
            warnings.simplefilter("ignore", FutureWarning)
            args = SFTConfig(
                output_dir=out, num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=batch_size,
                learning_rate=learning_rate, lr_scheduler_type=lr_scheduler_type, warmup_steps=0, weight_decay=0.0,
                seed=seed, logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, max_length=None,
                dataloader_num_workers=0, bf16=False,
            )
        model.tokenizer.padding_side = "right"  # TRL's collator pads right; act() pads left itself
        try:
            trainer = SFTTrainer(model=model.peft, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=model.tokenizer)
            trainer.remove_callback(PrinterCallback)  # no per-run dict on stdout; the caller prints the result
            model.set_trainable([name])  # TRL may touch requires_grad; only this adapter trains
            out_stats = trainer.train()
        finally:
            model.tokenizer.padding_side = padding_side
            model.train(was_training)
    return {"bc/turns": len(rows), "bc/steps": out_stats.global_step, "bc/loss": out_stats.training_loss,
            "time/bc": time.perf_counter() - t0}


def check_lr_scheduler(name: str) -> None:
    """Refuse a learning-rate schedule transformers does not have (a MarlError that lists them)."""
    from transformers import SchedulerType

    schedules = [s.value for s in SchedulerType]
    if name not in schedules:
        raise MarlError(f"behaviour_clone: lr_scheduler_type {name!r} is not one of {', '.join(schedules)}")


def reply_logprob(agent: Agent, episodes: Sequence[Episode]) -> float:
    """Mean log-prob per reply token of the episodes' replies given their prompts, under the agent's
    adapter at its sampling temperature (what behaviour cloning raises)."""
    turns: list[Turn] = [t for ep in episodes for t in ep.turns]
    if not turns:
        raise MarlError("reply_logprob: no turns to score")
    total, count = 0.0, 0
    for s in range(0, len(turns), 64):
        rollout = agent._rollout(turns[s:s + 64])
        lp = reference_logprobs(agent.model, agent.name, rollout)
        total += float((lp * rollout.response_mask).sum())
        count += int(rollout.response_mask.sum())
    return total / count
