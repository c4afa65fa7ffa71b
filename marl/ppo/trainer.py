"""Multi-policy PPO on one shared base: every policy a LoRA adapter with its own value
head, optimizer and KL controller; rollouts of all policies in one generate call.

One iteration (`step`), its steps as methods below in this order; only the forward passes call the model:

1. `rollout`: sample prompts for every policy and generate all responses in one mixed-adapter batch
   (marl.ppo.rollout);
2. `score`: reward adapter (+ optional reward functions), combined by each policy's weights;
   `reference_logprobs`: every row under the frozen sft adapter (or the bare base);
3. `shares_passes`: the one decision of the iteration: all policies share each forward and backward
   (the stacked-LoRA path), or each policy takes passes of its own;
4. `make_experience`: the old-policy pass (log-probs, values), then per policy one `Experience`
   (marl.ppo.experience): KL-penalised token rewards, advantages by the policy's estimator (GAE on its
   critic, or critic-free GRPO / RLOO / REINFORCE++: marl.ppo.estimators) and returns;
5. `update`: `ppo_epochs` of clipped-PPO minibatch updates from the experiences, each policy's
   optimizer on its own parameters only; shared passes as `plan_passes` deals them;
6. `kl_step`: each policy's KL controller sees the iteration's KL (marl.ppo.kl);
7. `report`: the metrics of each policy.

`train_policy` (the Agent, marl.compat) is steps 4 to 7 for one policy on a scored rollout it is given.

Departures from the papers, both as in Ziegler et al.'s and TRL's implementations:
the KL penalty is per token and the score is added at the last response token.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from marl import dist
from marl.config import PPOArgs, ResolvedPolicy, critic_name
from marl.errors import MarlError
from marl.io import atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors
from marl.model import MultiAdapterModel
from marl.ppo.advantages import kl_penalty, masked_mean
from marl.ppo.checkpoint import load_optimizer, rng_state, save_optimizer, set_rng_state
from marl.ppo.experience import Experience, loss_weight, make_experience, plan_passes
from marl.ppo.kl import make_kl_controller
from marl.ppo.reward_norm import RunningMoments, normalize_scores
from marl.textstats import text_stats
from marl.multilora import activation_checkpointing
from marl.ppo.logprobs import token_logprobs
from marl.ppo.losses import policy_loss, value_loss
from marl.ppo.rollout import (
    Rollout, completion_strings, decode_texts, generate_rollout, left_pad, reference_logprobs, score_rollout,
)
from marl.rewards import RewardFn, call_reward_function

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
        self.policies = {p.name: p for p in policies}
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
        self.optimizers = {p.name: torch.optim.Adam(model.trainable_parameters(p.name), lr=p.learning_rate)
                           for p in policies}
        self.kl_ctl = {p.name: make_kl_controller(p.kl_coef, p.kl_target, cfg.kl_horizon, cfg.kl_kp) for p in policies}
        self.reward_moments = {p.name: RunningMoments() for p in policies}  # reward_norm: running
        # each process samples its own prompts; the policies start from the main process's weights
        model.multi_lora = cfg.multi_lora
        self.generators = {p.name: torch.Generator().manual_seed(p.seed + 1000 * dist.rank()) for p in policies}
        model.set_trainable(list(self.policies))
        for p in policies:
            dist.broadcast_parameters(model.trainable_parameters(p.name))
        for p in policies:
            unknown = set(p.reward_weights) - set(self.reward_fns) - {REWARD_MODEL}
            if unknown:
                raise MarlError(f"policy {p.name}: reward_weights names {sorted(unknown)[0]!r}, which is neither "
                                f"{REWARD_MODEL} nor one of reward_functions ({', '.join(self.reward_fns) or 'none'})")

    # ------------------------------------------------------------------ one iteration

    def step(self) -> dict:
        """One PPO iteration over every policy; returns metrics keyed `<policy>/<name>`."""
        step = self.step_count + 1
        metrics: dict[str, float] = {"step": step}
        t0 = time.perf_counter()
        rollout = self.rollout()  # 1
        t_gen = time.perf_counter()
        scores, components = self.score(rollout, step)  # 2
        t_score = time.perf_counter()
        ref_lp = reference_logprobs(self.model, self.ref_adapter, rollout, self.cfg.forward_batch_size,
                                    self.cfg.logprob_chunk_tokens)
        t_ref = time.perf_counter()
        shared = self.shares_passes(rollout)  # 3
        experiences = self.make_experience(rollout, scores, ref_lp, components, shared=shared)  # 4
        update_stats = self.update(experiences, step, shared=shared)  # 5
        samples = completion_strings(decode_texts(self.model, rollout)[1])
        for name, exp in experiences.items():
            self.kl_step(exp)  # 6
            m = self.report(exp, update_stats[name])  # 7
            texts = [samples[i] for i in exp.rows.tolist()]
            m.update({f"text/{k}": v for k, v in text_stats(texts)._asdict().items()})  # over-optimisation shows here
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
            metrics[f"{name}/sample"] = texts[0]
        metrics.update({"time/generate": t_gen - t0, "time/score": t_score - t_gen, "time/reference": t_ref - t_score,
                        "time/update": time.perf_counter() - t_ref, "time/step": time.perf_counter() - t0})
        self.step_count = step
        return metrics

    def train_policy(self, name: str, rollout: Rollout, scores: torch.Tensor, ref_lp: torch.Tensor, step: int) -> dict:
        """Make experience, then update, for one policy from its rows of a scored rollout (the Agent and
        compat); only its adapter, value head, optimizer and KL controller change. Returns its metrics."""
        exp = self.make_experience(rollout, scores, ref_lp, names=[name])
        stats = self.update(exp, step)
        self.kl_step(exp[name])
        return self.report(exp[name], stats[name])

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
        for name, p in self.policies.items():
            g = p.group_size
            idx = torch.randint(len(self.prompt_ids), (self.cfg.prompts_per_policy // g,),
                                generator=self.generators[name]).repeat_interleave(g)
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
        for name, p in self.policies.items():
            rows = rollout.rows(name).to(scores.device)
            w = {REWARD_MODEL: 1.0, **{k: 1.0 for k in self.reward_fns}, **p.reward_weights}
            raw = normalize_scores(components[REWARD_MODEL][rows], p.reward_norm, self.reward_moments[name])
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

    # ------------------------------------------------------------------ 4. make experience

    def make_experience(self, rollout: Rollout, scores: torch.Tensor, ref_lp: torch.Tensor,
                        components: dict[str, torch.Tensor] | None = None, names: list[str] | None = None,
                        shared: bool = False) -> dict[str, Experience]:
        """The `Experience` of each policy of `names` (all: None) from its rows of the scored rollout.

        First the old-policy pass: with `shared`, every row of the rollout under its own policy, all policies
        sharing each pass; else each policy's rows in passes of their own. Then, per policy, token rewards
        with its KL controller's coefficient, advantages and returns (marl.ppo.experience.make_experience).
        `scores` (B,), `ref_lp` (B, R) and each of `components` (B,) cover the whole rollout."""
        names = list(self.policies) if names is None else names
        rows = {n: rollout.rows(n).to(scores.device) for n in names}
        if shared:
            old_lp, old_values = self._old_pass_all(rollout)
            old = {n: (old_lp[r], old_values[r]) for n, r in rows.items()}
        else:
            old = {n: self._old_pass(n, rollout, r) for n, r in rows.items()}
        return {n: make_experience(self.policies[n], self.cfg, rollout, rows[n], scores, ref_lp, *old[n],
                                   self.kl_ctl[n].value, components, reduce=dist.sum_over_processes) for n in names}

    def _old_pass_all(self, rollout: Rollout):
        """Old log-probs and values (B, R) of every row under its own policy, all policies sharing each pass."""
        return self._old_pass(rollout.adapter_names, rollout, torch.arange(len(rollout.adapter_names)))

    @torch.no_grad()
    def _old_pass(self, names: str | list[str], rollout: Rollout, rows: torch.Tensor):
        """Old log-probs and values (b, R) of rollout rows `rows` under policy `names` (one name, or each
        row's own policy), `forward_batch_size` rows per pass."""
        lps, vals = [], []
        n = self.cfg.forward_batch_size
        with self.model.eval_mode():
            for s in range(0, len(rows), n):
                lp, v, _ = self._policy_pass(names if isinstance(names, str) else names[s:s + n], rollout,
                                             rows[s:s + n])
                lps.append(lp)
                vals.append(v.float())
        return torch.cat(lps), torch.cat(vals)

    def _policy_pass(self, names: str | list[str], rollout: Rollout, rows: torch.Tensor, entropy: bool = False):
        """Log-probs (b, R), values (b, R) and, if asked, entropies (b, R) of the responses of rollout rows
        `rows` under policy `names`: one name, or each row's own policy (all policies in one grouped pass).

        The value of response token t is read at the position that predicts it (the state before it). The
        LM head runs only there, `logprob_chunk_tokens` tokens at a time (marl.ppo.logprobs); padding after
        EOS is skipped and reads 0.
        """
        P = rollout.prompt_ids.shape[1]
        ids, mask = rollout.input_ids[rows], rollout.attention_mask[rows]
        if isinstance(names, str):
            hidden, values = self.model.policy_forward(names, ids, mask, lm_head=False)
        else:
            hidden, values = self.model.grouped_policy_forward(names, ids, mask, lm_head=False)
        out = token_logprobs(hidden[:, P - 1: -1], self.model.lm_head(names), rollout.response_ids[rows],
                             rollout.temperatures[rows], mask=rollout.response_mask[rows],
                             chunk_tokens=self.cfg.logprob_chunk_tokens, entropy=entropy,
                             entropy_grad=self.cfg.ent_coef != 0)
        return out.logprobs, values[:, P - 1: -1], out.entropy

    # ------------------------------------------------------------------ 5. update

    def update(self, experiences: dict[str, Experience], step: int, shared: bool = False) -> dict[str, dict]:
        """`ppo_epochs` of clipped-PPO minibatch updates of each policy from its experience; each policy's
        optimizer steps on its own parameters only. With `shared` the policies share each forward and
        backward (`_update_shared`), else they are updated one after another. Returns each policy's mean
        statistics."""
        if shared:
            return self._update_shared(experiences, step)
        return {n: self._update_one(exp, step) for n, exp in experiences.items()}

    def _update_one(self, exp: Experience, step: int) -> dict:
        """The minibatch updates of one policy alone, one pass per micro-batch; each micro-batch's loss
        weighs its share of the minibatch's loss (`loss_weight`), so k micro-batches = 1."""
        name = exp.policy
        stats = defaultdict(list)
        with self._update_mode():
            for mb in self._minibatches(name, len(exp.rows)):
                self.optimizers[name].zero_grad(set_to_none=True)
                norm = self._loss_norm(exp, mb)
                for c in self._micro(mb):
                    lp, v, ent = self._policy_pass(name, exp.rollout, exp.rows[c], entropy=True)
                    loss, st = self._losses(lp, v, ent, exp, c, step)
                    (loss * loss_weight(exp.mask[c].sum(), norm)).backward()
                    for k, x in st.items():
                        stats[k].append(x)
                for k, x in self._optimizer_step(name).items():
                    stats[k].append(x)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _update_shared(self, experiences: dict[str, Experience], step: int) -> dict[str, dict]:
        """The same minibatch updates as `_update_one` for every policy, the policies sharing each forward and
        backward (stacked-LoRA path) as `plan_passes` deals their micro-batches, at most `pass_rows()` rows a
        pass (by default no more activations than one micro-batch of `_update_one`). The weighted losses make
        the gradients, and the updates, equal updating the policies one after another (float tolerance)."""
        names = list(experiences)
        rollout = experiences[names[0]].rollout
        if any(e.rollout is not rollout for e in experiences.values()):
            raise ValueError("policies share update passes only over the experience of one rollout")
        stats = {n: defaultdict(list) for n in names}
        with self._update_mode():
            for mbs in zip(*(self._minibatches(n, len(experiences[n].rows)) for n in names)):
                for n in names:
                    self.optimizers[n].zero_grad(set_to_none=True)
                micro = {n: self._micro(mb) for n, mb in zip(names, mbs)}
                micro_stats = {n: [defaultdict(float) for _ in micro[n]] for n in names}
                tokens = {n: experiences[n].mask.sum(1) for n in names}
                norms = {n: self._loss_norm(experiences[n], mb) for n, mb in zip(names, mbs)}
                for segments in plan_passes(micro, tokens, self.pass_rows(), norms):
                    rows = torch.cat([experiences[s.policy].rows[s.rows] for s in segments])
                    lp, v, ent = self._policy_pass([s.policy for s in segments for _ in s.rows], rollout, rows,
                                                   entropy=True)
                    total, o = 0.0, 0
                    for s in segments:
                        sl = slice(o, o + len(s.rows))
                        o += len(s.rows)
                        loss, st = self._losses(lp[sl], v[sl], ent[sl], experiences[s.policy], s.rows, step)
                        total = total + loss * s.loss_weight
                        for k, x in st.items():
                            micro_stats[s.policy][s.micro][k] += x * s.share
                    total.backward()  # policy n's parameters receive only the gradient of policy n's loss
                for n in names:
                    for ms in micro_stats[n]:
                        for k, x in ms.items():
                            stats[n][k].append(x)
                    for k, x in self._optimizer_step(n).items():
                        stats[n][k].append(x)
        return {n: {k: sum(v) / len(v) for k, v in st.items()} for n, st in stats.items()}

    @contextlib.contextmanager
    def _update_mode(self):
        """Training mode for the update passes (activation checkpointing as asked), without dropout when
        `disable_dropout` (the old log-probs came from eval mode); eval mode again afterwards."""
        self.model.train()
        try:
            with (dropout_off(self.model) if self.cfg.disable_dropout else contextlib.nullcontext()), \
                    activation_checkpointing(self.model.base, self.model.lora_layers(), self.cfg.gradient_checkpointing):
                yield
        finally:
            self.model.eval()

    def pass_rows(self) -> int:
        """Rows per forward/backward of the batched update (`update_pass_rows`, 0: one policy's micro-batch)."""
        return self.cfg.update_pass_rows or self._micro_rows()

    def _minibatches(self, name: str, n: int):
        """Per epoch, the minibatches (index tensors) of a policy's n rows, shuffled by its own generator."""
        for _ in range(self.cfg.ppo_epochs):
            perm = torch.randperm(n, generator=self.generators[name])
            yield from (perm[s:s + self.cfg.mini_batch_size] for s in range(0, n, self.cfg.mini_batch_size))

    def _micro_rows(self) -> int:
        """Rows per micro-batch (a minibatch split into gradient_accumulation_steps)."""
        return max(1, self.cfg.mini_batch_size // self.cfg.gradient_accumulation_steps)

    def _micro(self, mb: torch.Tensor) -> list[torch.Tensor]:
        micro = self._micro_rows()
        return [mb[i:i + micro] for i in range(0, len(mb), micro)]

    def _loss_norm(self, exp: Experience, mb: torch.Tensor) -> float:
        """The divisor of the loss of minibatch `mb` (indices into the experience's rows): its valid tokens, so
        that the loss is the minibatch's token mean and every token weighs the same whatever micro-batch or
        pass it falls in; Dr. GRPO's constant max_new_tokens x rows (its loss is a token sum over it)."""
        if self._token_sum(exp.policy):
            return float(self.cfg.max_new_tokens * len(mb))
        return float(exp.mask[mb].sum())

    def _losses(self, lp, v, entropy, exp: Experience, c: torch.Tensor, step: int):
        """PPO loss of the rows `c` (indices into the experience's rows) and its statistics; `lp`, `v` and
        `entropy` (b, R) from `_policy_pass`. Every term is the mean over the rows' valid tokens; the caller
        weighs it by the rows' tokens over `_loss_norm` of their minibatch (`loss_weight`), which makes the
        minibatch's token mean, or Dr. GRPO's token sum over a constant, entropy bonus included.
        Everything in float32, whatever the base's dtype."""
        cfg, name = self.cfg, exp.policy
        p = self.policies[name]
        mask = exp.mask[c]
        pg = policy_loss(lp, exp.old_logprobs[c], exp.advantages[c], mask, cfg.clip_coef)
        ent = masked_mean(entropy, mask)
        loss = pg.loss
        stats = {"policy_loss": pg.loss, "entropy": ent, "approx_kl": pg.approx_kl, "clipfrac": pg.clipfrac,
                 "ratio": pg.ratio_mean}
        if p.kl_in == "loss":  # GRPO: beta * k3 KL(pi || pi_ref) per token, in the loss (Shao et al. 2024, eq. 4)
            k3 = torch.where(mask.bool(), kl_penalty(lp, exp.ref_logprobs[c], "k3"), torch.zeros_like(lp))
            stats["kl_loss"] = masked_mean(k3, mask)
            loss = loss + p.beta * stats["kl_loss"]
        if p.has_critic:  # divided by the policy's return variance of this iteration (value_loss_norm)
            vl = value_loss(v.float(), exp.values[c], exp.returns[c], mask, cfg.vf_clip_coef)
            loss = loss + cfg.vf_coef * vl.loss / exp.returns_scale
            stats.update(value_loss=vl.loss, value_clipfrac=vl.clipfrac)
        loss = loss - cfg.ent_coef * ent
        if not torch.isfinite(loss):
            raise MarlError(f"policy {name}, step {step}: the PPO loss is NaN or infinite; nothing was updated "
                            "and the last good checkpoint is kept: lower learning_rate and resume")
        return loss, {k: float(x.detach()) for k, x in stats.items()}

    def _token_sum(self, name: str) -> bool:
        """Whether policy `name`'s loss is summed over tokens and divided by a constant (Dr. GRPO: grpo without
        the std division) rather than averaged over the minibatch's tokens (`_loss_norm`)."""
        p = self.policies[name]
        return p.advantage_estimator == "grpo" and not p.scale_rewards

    def _optimizer_step(self, name: str) -> dict[str, float]:
        """Average the gradients over the processes, clip, step. A separate critic's parameters are clipped
        on their own (`max_grad_norm` each): the critic's gradient never rescales the policy's step. Returns
        the gradient norms before clipping (`grad_norm`, and `critic_grad_norm` with a critic)."""
        params = self.model.trainable_parameters(name)
        dist.all_reduce_mean([p.grad for p in params])  # each process had its own rollouts
        critic = self.model.critic_of.get(name)
        in_critic = {id(p) for p in self.model.trainable_parameters(critic)} if critic else set()
        norms = {"grad_norm": [p for p in params if id(p) not in in_critic]}
        if in_critic:
            norms["critic_grad_norm"] = [p for p in params if id(p) in in_critic]
        norms = {k: float(torch.nn.utils.clip_grad_norm_(group, self.cfg.max_grad_norm)) for k, group in norms.items()}
        self.optimizers[name].step()
        return norms

    # ------------------------------------------------------------------ 6. KL control, 7. report

    def kl_step(self, exp: Experience) -> None:
        """The policy's KL controller sees this iteration's mean sequence KL (averaged over the processes, so
        every process keeps the same coefficient) and sets the coefficient of the next iteration."""
        mean_kl = exp.sequence_kl().mean().reshape(1)
        dist.all_reduce_mean([mean_kl])
        self.kl_ctl[exp.policy].update(float(mean_kl), len(exp.rows))

    def report(self, exp: Experience, update_stats: dict) -> dict:
        """The policy's metrics of this iteration: its rewards, KL, responses and update statistics."""
        scores = exp.scores
        return {
            "reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl/mean": float(exp.sequence_kl().mean()), "kl/coef": exp.kl_coef,
            "response/length": float(exp.mask.sum(1).mean()),
            "response/eos_fraction": float(exp.has_eos(self.model.stop_token_ids).float().mean()),
            **{f"ppo/{k}": v for k, v in update_stats.items()},
            **{f"reward/{k}": float(v.mean()) for k, v in exp.components.items()},
        }

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: Path) -> None:
        """Everything a resumed run needs, written to `folder` in one atomic rename."""
        with atomic_dir(folder, overwrite=True) as tmp:
            for name in self.policies:
                self.model.save_adapter(name, tmp / "adapters" / name)
                if name in self.model.critic_of:
                    critic = self.model.critic_of[name]
                    self.model.save_adapter(critic, tmp / "adapters" / critic)
                save_optimizer(self.optimizers[name], tmp / f"optim_{name}")
            save_tensors(tmp / "rng.safetensors", rng_state(self.generators))
            atomic_write_json(tmp / "state.json", {
                "step": self.step_count, "kl": {n: c.state_dict() for n, c in self.kl_ctl.items()},
                "reward_norm": {n: m.state_dict() for n, m in self.reward_moments.items()},
                "policies": {n: asdict(p) for n, p in self.policies.items()},
            })

    def load_checkpoint(self, folder: Path) -> None:
        state = read_json(folder / "state.json")
        if set(state["policies"]) != set(self.policies):
            raise MarlError(f"checkpoint {folder} has policies {sorted(state['policies'])}, the config has "
                            f"{sorted(self.policies)}: resume with the same policies")
        for name, p in self.policies.items():
            saved = state["policies"][name].get("advantage_estimator", "gae")  # older checkpoints: PPO's gae
            if saved != p.advantage_estimator:
                raise MarlError(f"checkpoint {folder} trained {name} with advantage_estimator {saved}, the config "
                                f"says {p.advantage_estimator}: resume with the estimator it was trained with")
        for name in self.policies:
            self.model.load_adapter_weights(name, folder / "adapters" / name)
            if name in self.model.critic_of:
                critic = self.model.critic_of[name]
                if not (folder / "adapters" / critic).exists():
                    raise MarlError(f"checkpoint {folder} has no critic for {name}: resume with the value_model "
                                    "it was trained with")
                self.model.load_adapter_weights(critic, folder / "adapters" / critic)
            elif (folder / "adapters" / critic_name(name)).exists():
                raise MarlError(f"checkpoint {folder} trained {name} with a separate critic: resume with "
                                "value_model: adapter")
            load_optimizer(self.optimizers[name], folder / f"optim_{name}")
            self.kl_ctl[name].load_state_dict(state["kl"][name])
            if name in state.get("reward_norm", {}):  # checkpoints from before reward_norm hold none
                self.reward_moments[name].load_state_dict(state["reward_norm"][name])
        set_rng_state(load_tensors(folder / "rng.safetensors"), self.generators)
        self.step_count = state["step"]


# float attributes HF attention modules keep their attention-dropout probability in (Llama, Qwen2, Mistral:
# `attention_dropout`; others: `dropout`); GPT-2's is an nn.Dropout module
_DROPOUT_FLOATS = ("attention_dropout", "dropout")


@contextlib.contextmanager
def dropout_off(module: torch.nn.Module):
    """Every dropout of `module` at probability 0 for the body of the `with`, then as it was: each
    torch.nn dropout module (the base's, the LoRA adapters'), and the attention-dropout probabilities that
    attention modules hold as floats (they apply them in training mode). Training mode stays (activation
    checkpointing needs it); with p = 0 a training-mode pass computes what an eval-mode pass does."""
    saved = []
    for m in module.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            saved.append((m, "p", m.p))
            m.p = 0.0
            continue
        for attr in _DROPOUT_FLOATS:
            value = getattr(m, attr, None)
            if isinstance(value, float) and value > 0:
                saved.append((m, attr, value))
                setattr(m, attr, 0.0)
    try:
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)
