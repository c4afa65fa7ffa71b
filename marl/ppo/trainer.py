"""Multi-policy PPO on one shared base: every policy a LoRA adapter with its own value
head, optimizer and KL controller; rollouts of all policies in one generate call.

One iteration (`step`), its steps as methods below in this order; only the forward passes call the model:

1. `rollout`: sample prompts for every policy and generate all responses in one mixed-adapter batch
   (marl.ppo.rollout);
2. `score`: reward adapter (+ optional reward functions), combined by each policy's weights;
3. `shares_passes`: the one decision of the iteration: all policies share each forward and backward
   (the stacked-LoRA path), or each policy takes passes of its own;
   `reference_logprobs`: every row under the frozen sft adapter (or the bare base); in the same stacked
   pass as the old-policy log-probs when the learner's `old_pass_plan` says so;
4-7. the learner (marl.ppo.learner): `make_experience`, `update`, `kl_step` and `report` of every policy;
   each policy's training state is one `PolicyState` (marl.ppo.policy_state), and policies can be added
   and removed between iterations (`add_policy`, `remove_policy`: a sweep's schedule).

The Agent (marl.agent) and old TRL's PPOTrainer (marl.compat) use the same `Learner` on rollouts of their own.

Departures from the papers, both as in Ziegler et al.'s and TRL's implementations:
the KL penalty is per token and the score is added at the last response token.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from marl.config import PPOArgs, ResolvedPolicy
from marl.errors import MarlError
from marl.io import atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors
from marl.model import MultiAdapterModel
from marl.ppo.checkpoint import rng_state, set_rng_state
from marl.ppo.learner import Learner
from marl.ppo.policy_state import PolicyState
from marl.ppo.reward_norm import normalize_scores
from marl.ppo.rollout import (
    Rollout, completion_strings, decode_texts, generate_rollout, left_pad, reference_logprobs, score_rollout,
)
from marl.rewards import RewardFn, call_reward_function
from marl.textstats import text_stats

REWARD_MODEL = "reward_model"  # the reward adapter's component name in reward_weights


class MultiPolicyPPOTrainer:
    """Trains `policies` (adapters already on `model`) with PPO against `ref_adapter`.

    Args:
        model: the shared base with the policy, reference and reward adapters loaded.
        cfg: the PPO settings shared by all policies.
        policies: each policy's effective settings (`cfg.policy(spec)`).
        prompt_ids: token ids of the training prompts (lists, unpadded).
        ref_adapter: the frozen reference adapter name, or None for the bare base.
        reward_fns: extra reward components, name -> fn(prompts, completions, **columns) -> floats or None
            (marl.rewards: TRL's signature).
        log: called with one metrics dict per iteration (jsonl, trackers).
        prompt_columns: the training dataset's other columns, name -> one value per prompt of `prompt_ids`;
            reward functions receive them for the rows they score (e.g. an answer column).
        prompts: each prompt of `prompt_ids` as the dataset gave it (text, or a conversation: a list of
            messages); the reward adapter and reward functions see it. None: decoded from the ids (text).
    """

    def __init__(self, model: MultiAdapterModel, cfg: PPOArgs, policies: list[ResolvedPolicy],
                 prompt_ids: list[list[int]], ref_adapter: str | None, reward_fns: dict[str, RewardFn] | None = None,
                 log=None, prompt_columns: dict[str, list] | None = None, prompts: list | None = None):
        self.model, self.cfg, self.ref_adapter = model, cfg, ref_adapter
        self.prompt_ids = prompt_ids
        if prompts is not None and len(prompts) != len(prompt_ids):
            raise ValueError(f"{len(prompts)} prompts for {len(prompt_ids)} prompt_ids")
        self.prompts = prompts
        if cfg.top_k or cfg.top_p < 1.0:
            warnings.warn(f"top_k={cfg.top_k}, top_p={cfg.top_p}: responses are sampled from the truncated "
                          "distribution, but PPO's ratios, KL and entropy use the full softmax, so the update is "
                          "off-policy on the truncated tokens; keep top_k 0 and top_p 1 for exact PPO", stacklevel=2)
        self.prompt_columns = prompt_columns or {}
        for col, values in self.prompt_columns.items():
            if len(values) != len(prompt_ids):
                raise ValueError(f"prompt column {col!r} has {len(values)} values for {len(prompt_ids)} prompts")
        self.reward_fns = reward_fns or {}
        self.log = log or (lambda record: None)
        self.step_count = 0
        for p in policies:
            self._check_weights(p)
        self.learner = Learner(model, cfg, policies)  # each policy's PolicyState: optimizer, KL controller, ...

    @property
    def states(self) -> dict[str, PolicyState]:
        """Each training policy's state (marl.ppo.policy_state), keyed by name."""
        return self.learner.states

    @property
    def policies(self) -> dict[str, ResolvedPolicy]:
        """Each training policy's settings, keyed by name."""
        return {n: s.settings for n, s in self.learner.states.items()}

    def add_policy(self, settings: ResolvedPolicy) -> PolicyState:
        """Start training one more policy (its adapter is on the model) from the next iteration."""
        self._check_weights(settings)
        return self.learner.add(settings)

    def remove_policy(self, name: str) -> PolicyState:
        """Stop training policy `name` (its adapter stays on the model): its rows leave the next rollout."""
        return self.learner.remove(name)

    def _check_weights(self, p: ResolvedPolicy) -> None:
        unknown = set(p.reward_weights) - set(self.reward_fns) - {REWARD_MODEL}
        if unknown:
            raise MarlError(f"policy {p.name}: reward_weights names {sorted(unknown)[0]!r}, which is neither "
                            f"{REWARD_MODEL} nor one of reward_functions ({', '.join(self.reward_fns) or 'none'})")

    # ------------------------------------------------------------------ one iteration

    def step(self) -> dict:
        """One PPO iteration over every policy; returns metrics keyed `<policy>/<name>`, and the seconds of its
        phases: time/generate, time/score, time/reference (with the old log-probs when they share its pass),
        time/old_logprobs (their pass of its own; 0 when they come with the reference or from the update's
        first forward), time/update (making experience and the update), time/step (all of it)."""
        step = self.step_count + 1
        metrics: dict[str, float] = {"step": step}
        t0 = time.perf_counter()
        rollout = self.rollout()  # 1
        t_gen = time.perf_counter()
        scores, components = self.score(rollout, step)  # 2
        t_score = time.perf_counter()
        shared = self.shares_passes(rollout)  # 3
        old = None
        if self.learner.old_pass_plan(rollout, shared, self.ref_adapter) == "with_reference":
            ref_lp, old = self.learner.old_and_reference_pass(rollout, self.ref_adapter, shared)
        else:
            ref_lp = reference_logprobs(self.model, self.ref_adapter, rollout, self.cfg.forward_batch_size,
                                        self.cfg.logprob_chunk_tokens)
        t_ref = time.perf_counter()
        experiences = self.learner.make_experience(rollout, scores, ref_lp, components, shared=shared, old=old)  # 4
        update_stats = self.learner.update(experiences, step, shared=shared)  # 5
        t_update = time.perf_counter()
        samples = completion_strings(decode_texts(self.model, rollout)[1])
        for name, exp in experiences.items():
            self.learner.kl_step(exp)  # 6
            m = self.learner.report(exp, update_stats[name])  # 7
            texts = [samples[i] for i in exp.rows.tolist()]
            m.update({f"text/{k}": v for k, v in text_stats(texts)._asdict().items()})  # over-optimisation shows here
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
            metrics[f"{name}/sample"] = texts[0]
        old_s = self.learner.old_pass_seconds
        metrics.update({"time/generate": t_gen - t0, "time/score": t_score - t_gen, "time/reference": t_ref - t_score,
                        "time/old_logprobs": old_s, "time/update": t_update - t_ref - old_s,
                        "time/step": time.perf_counter() - t0})
        self.step_count = step
        return metrics

    # ------------------------------------------------------------------ 1. rollout

    def rollout(self) -> Rollout:
        """Sample prompts for every policy and generate all responses (one mixed-adapter call)."""
        ids, mask, names, temps, index = self._prompt_batch()
        rollout = generate_rollout(self.model, ids, mask, names, temps, self.cfg.max_new_tokens,
                                   self.cfg.top_k, self.cfg.top_p, mixed_batch=self.cfg.mixed_batch)
        rollout.prompt_index = index
        if self.prompts is not None:
            rollout.prompts = [self.prompts[i] for i in index.tolist()]
        return rollout

    def _prompt_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
        """Left-padded prompts of every policy, their adapter names, temperatures and prompt indices.

        A policy with a group estimator (grpo, rloo) draws prompts_per_policy / num_generations prompts and
        answers each num_generations times, in consecutive rows (the groups its advantages compare)."""
        rows, names, temps, index = [], [], [], []
        for name, state in self.states.items():
            p, g = state.settings, state.settings.group_size
            idx = torch.randint(len(self.prompt_ids), (self.cfg.prompts_per_policy // g,),
                                generator=state.generator).repeat_interleave(g)
            index += idx.tolist()
            rows += [self.prompt_ids[i] for i in idx.tolist()]
            names += [name] * len(idx)
            temps += [p.temperature] * len(idx)
        ids, mask = left_pad(rows, self.model.tokenizer.pad_token_id, self.model.device)
        return ids, mask, names, torch.tensor(temps), torch.tensor(index)

    # ------------------------------------------------------------------ 2. score

    def score(self, rollout: Rollout, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Combined scores (B,) and each raw component (B,), per the policies' weights."""
        prompts, completions = decode_texts(self.model, rollout)
        components = {REWARD_MODEL: score_rollout(self.model, rollout, self.cfg.forward_batch_size)
                      .to(rollout.response_ids.device)}
        columns = self._reward_columns(rollout)
        ids = [r[m.bool()].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]
        for fname, fn in self.reward_fns.items():
            vals = call_reward_function(fn, fname, prompts, completions, completion_ids=ids, **columns)
            components[fname] = torch.tensor(vals, device=rollout.response_ids.device)
        scores = torch.zeros(len(prompts), device=rollout.response_ids.device)
        has_eos = rollout.has_eos(self.model.stop_token_ids)
        for name, state in self.states.items():
            p, rows = state.settings, rollout.rows(name).to(scores.device)
            w = {REWARD_MODEL: 1.0, **{k: 1.0 for k in self.reward_fns}, **p.reward_weights}
            raw = normalize_scores(components[REWARD_MODEL][rows], p.reward_norm, state.moments)
            s = w[REWARD_MODEL] * (raw * p.reward_scale + p.reward_shift)
            for fname in self.reward_fns:
                s = s + w[fname] * components[fname][rows]
            if self.cfg.missing_eos_penalty is not None:
                s = s - self.cfg.missing_eos_penalty * (~has_eos[rows]).float()
            if not torch.isfinite(s).all():
                raise MarlError(f"policy {name}, step {step}: the reward is NaN or infinite; the last good "
                                "checkpoint is kept in checkpoints/ppo: fix the reward function or model and resume")
            if self.cfg.reward_clip is not None:
                s = s.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
            scores[rows] = s
        return scores, components

    def _reward_columns(self, rollout: Rollout) -> dict[str, list]:
        """The dataset's other columns for every rollout row (TRL passes them to reward functions)."""
        if rollout.prompt_index is None:
            return {}
        return {col: [values[i] for i in rollout.prompt_index.tolist()] for col, values in self.prompt_columns.items()}

    # ------------------------------------------------------------------ 3. the one batching decision

    def shares_passes(self, rollout: Rollout) -> bool:
        """Whether all policies share each forward and backward of this iteration (the stacked-LoRA path: the
        model's `stacked_layout` of the rollout's rows), or each policy takes its own passes. Decided once
        per iteration; `make_experience` and `update` follow it."""
        return self.model.stacked_layout(rollout.adapter_names) is not None

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: Path, extra: dict | None = None) -> None:
        """Everything a resumed run needs, written to `folder` in one atomic rename: every policy's adapter and
        `PolicyState`, the random generators, the step, and `extra` (JSON: e.g. a population's schedule)."""
        with atomic_dir(folder, overwrite=True) as tmp:
            parts = self.learner.save(tmp)
            save_tensors(tmp / "rng.safetensors", rng_state({n: s.generator for n, s in self.states.items()}))
            atomic_write_json(tmp / "state.json", {"step": self.step_count, **parts, **({"extra": extra} if extra
                                                                                          else {})})

    def load_checkpoint(self, folder: Path) -> dict:
        """Continue from a checkpoint `save_checkpoint` wrote: the same policies, exactly where they were.
        Returns its `extra` (empty if none)."""
        state = read_json(folder / "state.json")
        self.learner.load(folder, state)
        set_rng_state(load_tensors(folder / "rng.safetensors"), {n: s.generator for n, s in self.states.items()})
        self.step_count = state["step"]
        return state.get("extra", {})
