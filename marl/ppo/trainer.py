"""Multi-policy PPO on one shared base: every policy a LoRA adapter with its own value
head, optimizer and KL controller; rollouts of all policies in one generate call.

One iteration (`step`), read top to bottom:

1. sample prompts for every policy and generate all responses in one mixed-adapter batch;
2. score them: reward adapter (+ optional reward functions), per policy weights;
3. reference log-probs for all rows at once (frozen sft adapter, or the bare base);
4. per policy: old log-probs and values, KL-penalised token rewards, advantages by the policy's
   estimator (GAE on its critic, or critic-free GRPO / RLOO / REINFORCE++: marl.ppo.estimators), then
   `ppo_epochs` passes of clipped-PPO minibatch updates on that policy's parameters only.

Departures from the papers, both as in Ziegler et al.'s and TRL's implementations:
the KL penalty is per token and the score is added at the last response token.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from marl import dist
from marl.config import PPOArgs, ResolvedPolicy, critic_name
from marl.errors import MarlError
from marl.io import atomic_dir, atomic_write_json, read_json
from marl.model import MultiAdapterModel
from marl.ppo.advantages import compute_token_rewards, gae, kl_penalty, masked_mean, masked_whiten
from marl.ppo.checkpoint import load_optimizer, rng_state, save_optimizer, set_rng_state
from marl.ppo.estimators import critic_free_advantages
from marl.ppo.kl import make_kl_controller
from marl.ppo.reward_norm import RunningMoments, normalize_scores
from marl.textstats import text_stats
from marl.multilora import activation_checkpointing
from marl.ppo.logprobs import lm_head_fn, token_logprobs
from marl.ppo.losses import policy_loss, value_loss
from marl.ppo.rollout import (
    Rollout, decode_texts, full_texts, generate_rollout, left_pad, reference_logprobs,
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
    """

    def __init__(self, model: MultiAdapterModel, cfg: PPOArgs, policies: list[ResolvedPolicy],
                 prompt_ids: list[list[int]], ref_adapter: str | None, reward_fns: dict[str, RewardFn] | None = None,
                 log=None, prompt_columns: dict[str, list] | None = None):
        self.model, self.cfg, self.ref_adapter = model, cfg, ref_adapter
        self.policies = {p.name: p for p in policies}
        self.prompt_ids = prompt_ids
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

    # ------------------------------------------------------------------ rollout

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

    def _reward_columns(self, rollout: Rollout) -> dict[str, list]:
        """The dataset's other columns for every rollout row (TRL passes them to reward functions)."""
        if rollout.prompt_index is None:
            return {}
        return {col: [values[i] for i in rollout.prompt_index.tolist()] for col, values in self.prompt_columns.items()}

    def score(self, rollout: Rollout, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Combined scores (B,) and each raw component (B,), per the policies' weights."""
        prompts, completions = decode_texts(self.model, rollout)
        full = full_texts(self.model, rollout)
        components = {REWARD_MODEL: self.model.score_texts(full, batch_size=self.cfg.forward_batch_size)
                      .to(rollout.response_ids.device)}
        columns = self._reward_columns(rollout)
        ids = [r[m.bool()].tolist() for r, m in zip(rollout.response_ids, rollout.response_mask)]
        for fname, fn in self.reward_fns.items():
            vals = call_reward_function(fn, fname, prompts, completions, completion_ids=ids, **columns)
            components[fname] = torch.tensor(vals, device=rollout.response_ids.device)
        scores = torch.zeros(len(full), device=rollout.response_ids.device)
        has_eos = rollout.has_eos(self.model.tokenizer.eos_token_id)
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

    # ------------------------------------------------------------------ passes of one policy

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
        out = token_logprobs(hidden[:, P - 1: -1], lm_head_fn(self.model.base), rollout.response_ids[rows],
                             rollout.temperatures[rows], mask=rollout.response_mask[rows],
                             chunk_tokens=self.cfg.logprob_chunk_tokens, entropy=entropy,
                             entropy_grad=self.cfg.ent_coef != 0)
        return out.logprobs, values[:, P - 1: -1], out.entropy

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

    def _old_pass_all(self, rollout: Rollout):
        """Old log-probs and values (B, R) of every row under its own policy, all policies sharing each pass."""
        return self._old_pass(rollout.adapter_names, rollout, torch.arange(len(rollout.adapter_names)))

    def _batched(self, rollout: Rollout) -> bool:
        """Whether all policies can share each pass (stacked-LoRA path, each policy's rows contiguous)."""
        from marl.multilora import group_layout

        return (self.cfg.multi_lora == "batched" and len(self.policies) > 1
                and group_layout(rollout.adapter_names) is not None and None not in rollout.adapter_names)

    def prepare(self, name: str, rollout: Rollout, scores: torch.Tensor, ref_lp: torch.Tensor,
                old: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Token rewards, advantages and returns of policy `name`'s rows (B_p, R), by its advantage_estimator:
        GAE on its critic's values, or a critic-free estimator (marl.ppo.estimators; returns are then 0).
        With `kl_in: loss` the token rewards carry no KL (it is beta * k3 in the loss, `_losses`)."""
        p = self.policies[name]
        rows = rollout.rows(name).to(scores.device)
        rmask = rollout.response_mask[rows].float()
        old_lp, old_values = old if old is not None else self._old_pass(name, rollout, rows)
        kl_coef = self.kl_ctl[name].value if p.kl_in == "reward" else 0.0
        tr = compute_token_rewards(scores[rows], old_lp, ref_lp[rows], rmask, kl_coef, self.cfg.kl_estimator)
        if p.has_critic:
            adv = gae(tr.rewards, old_values, rmask, self.cfg.gamma, self.cfg.gae_lambda)
            advantages = masked_whiten(adv.advantages, rmask) if self.cfg.whiten_advantages else adv.advantages
            returns = adv.returns
        else:
            advantages = critic_free_advantages(p.advantage_estimator, tr.rewards, rmask, p.group_size,
                                                p.scale_rewards)
            returns = torch.zeros_like(advantages)
        return {"rows": rows, "mask": rmask, "old_lp": old_lp, "old_values": old_values, "advantages": advantages,
                "returns": returns, "kl": tr.kl, "kl_coef": kl_coef if p.kl_in == "reward" else p.beta,
                "scores": scores[rows], "ref_lp": ref_lp[rows]}

    def finish(self, name: str, rollout: Rollout, prep: dict, upd: dict) -> dict:
        """Update the KL controller of policy `name` and return its metrics for this step."""
        rmask = prep["mask"]
        seq_kl = (prep["kl"] * rmask).sum(1)
        mean_kl = seq_kl.mean().reshape(1)
        dist.all_reduce_mean([mean_kl])  # every process's controller sees the same KL, so beta stays equal
        self.kl_ctl[name].update(float(mean_kl), len(prep["rows"]))
        return {
            "reward/mean": float(prep["scores"].mean()), "reward/std": float(prep["scores"].std()) if len(prep["scores"]) > 1 else 0.0,
            "kl/mean": float(seq_kl.mean()), "kl/coef": prep["kl_coef"],
            "response/length": float(rmask.sum(1).mean()),
            "response/eos_fraction": float(rollout.has_eos(self.model.tokenizer.eos_token_id)[prep["rows"]]
                                           .float().mean()),
            **{f"ppo/{k}": v for k, v in upd.items()},
        }

    def _losses(self, lp, v, entropy, prep: dict, c: torch.Tensor, name: str, step: int):
        """PPO loss of one micro-batch `c` (indices into the policy's rows) and its statistics; `lp`, `v` and
        `entropy` (b, R) from `_policy_pass`. Everything in float32, whatever the base's dtype."""
        cfg, p = self.cfg, self.policies[name]
        mask = prep["mask"][c]
        pg = policy_loss(lp, prep["old_lp"][c], prep["advantages"][c], mask, cfg.clip_coef)
        ent = masked_mean(entropy, mask)
        loss = pg.loss
        stats = {"policy_loss": pg.loss, "entropy": ent, "approx_kl": pg.approx_kl, "clipfrac": pg.clipfrac,
                 "ratio": pg.ratio_mean}
        if p.kl_in == "loss":  # GRPO: beta * k3 KL(pi || pi_ref) per token, in the loss (Shao et al. 2024, eq. 4)
            k3 = torch.where(mask.bool(), kl_penalty(lp, prep["ref_lp"][c], "k3"), torch.zeros_like(lp))
            stats["kl_loss"] = masked_mean(k3, mask)
            loss = loss + p.beta * stats["kl_loss"]
        if self._token_sum(name):  # Dr. GRPO: = token_sum_mean of the per-token terms over a constant
            loss = loss * mask.sum() / (cfg.max_new_tokens * self._micro_rows())
        if p.has_critic:
            vl = value_loss(v.float(), prep["old_values"][c], prep["returns"][c], mask, cfg.vf_clip_coef)
            loss = loss + cfg.vf_coef * vl.loss
            stats.update(value_loss=vl.loss, value_clipfrac=vl.clipfrac)
        loss = loss - cfg.ent_coef * ent
        if not torch.isfinite(loss):
            raise MarlError(f"policy {name}, step {step}: the PPO loss is NaN or infinite; nothing was updated "
                            "and the last good checkpoint is kept: lower learning_rate and resume")
        return loss, {k: float(x.detach()) for k, x in stats.items()}

    def _token_sum(self, name: str) -> bool:
        """Whether policy `name`'s loss is summed over tokens and divided by a constant (Dr. GRPO: grpo without
        the std division) rather than averaged over the micro-batch's tokens. The batched update then adds its
        segments of a micro-batch as they are, instead of weighting each by its share of the tokens."""
        p = self.policies[name]
        return p.advantage_estimator == "grpo" and not p.scale_rewards

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

    def _optimizer_step(self, name: str) -> float:
        params = self.model.trainable_parameters(name)
        dist.all_reduce_mean([p.grad for p in params])  # each process had its own rollouts
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        self.optimizers[name].step()
        return norm

    def update(self, name: str, rollout: Rollout, prep: dict, step: int) -> dict:
        """`ppo_epochs` passes of minibatch PPO on policy `name` alone; returns mean statistics."""
        rows = prep["rows"]
        stats = defaultdict(list)
        self.model.train()
        with activation_checkpointing(self.model.base, self.model.lora_layers(), self.cfg.gradient_checkpointing):
            for mb in self._minibatches(name, len(rows)):
                self.optimizers[name].zero_grad(set_to_none=True)
                chunks = self._micro(mb)
                for c in chunks:
                    lp, v, ent = self._policy_pass(name, rollout, rows[c], entropy=True)
                    loss, st = self._losses(lp, v, ent, prep, c, name, step)
                    (loss / len(chunks)).backward()
                    for k, x in st.items():
                        stats[k].append(x)
                stats["grad_norm"].append(self._optimizer_step(name))
        self.model.eval()
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def pass_rows(self) -> int:
        """Rows per forward/backward of the batched update (`update_pass_rows`, 0: one policy's micro-batch)."""
        return self.cfg.update_pass_rows or max(1, self.cfg.mini_batch_size // self.cfg.gradient_accumulation_steps)

    def update_together(self, rollout: Rollout, preps: dict[str, dict], step: int) -> dict[str, dict]:
        """The same minibatch updates as `update` for every policy, the policies sharing each forward and
        backward (stacked-LoRA path); each policy's optimizer then steps on its own parameters.

        Each pass holds at most `pass_rows()` rows, dealt round-robin from every policy's minibatch, so by
        default no pass holds more activations than one micro-batch of `update`. A policy's loss on the
        rows of a micro-batch that land in a pass is weighted by their share of the micro-batch's tokens,
        so the gradients, and the updates, equal updating the policies one after another (float tolerance).
        """
        names = list(preps)
        stats = {n: defaultdict(list) for n in names}
        cap = self.pass_rows()
        self.model.train()
        with activation_checkpointing(self.model.base, self.model.lora_layers(), self.cfg.gradient_checkpointing):
            for mbs in zip(*(self._minibatches(n, len(preps[n]["rows"])) for n in names)):
                for n in names:
                    self.optimizers[n].zero_grad(set_to_none=True)
                chunks = {n: self._micro(mb) for n, mb in zip(names, mbs)}
                tokens = {n: [float(preps[n]["mask"][c].sum()) for c in chunks[n]] for n in names}
                # (policy, micro-batch, row) of every row, dealt round-robin over the policies
                queues = [[(n, ci, int(i)) for ci, c in enumerate(chunks[n]) for i in c] for n in names]
                order = [q[j] for j in range(max(map(len, queues))) for q in queues if j < len(q)]
                chunk_stats = {n: [defaultdict(float) for _ in chunks[n]] for n in names}
                for s in range(0, len(order), cap):
                    taken = sorted(order[s:s + cap], key=lambda t: names.index(t[0]))  # stable: rows stay in order
                    segments: dict[tuple[str, int], list[int]] = {}
                    for n, ci, i in taken:
                        segments.setdefault((n, ci), []).append(i)
                    segs = [(n, ci, torch.tensor(idx)) for (n, ci), idx in segments.items()]
                    rows = torch.cat([preps[n]["rows"][c] for n, _, c in segs])
                    lp_all, v_all, ent_all = self._policy_pass([n for n, _, c in segs for _ in range(len(c))],
                                                               rollout, rows, entropy=True)
                    total, o = 0.0, 0
                    for n, ci, c in segs:
                        sl = slice(o, o + len(c))
                        o += len(c)
                        loss, st = self._losses(lp_all[sl], v_all[sl], ent_all[sl], preps[n], c, n, step)
                        w = float(preps[n]["mask"][c].sum()) / max(tokens[n][ci], 1.0)  # share of the micro-batch
                        total = total + loss * ((1.0 if self._token_sum(n) else w) / len(chunks[n]))
                        for k, x in st.items():
                            chunk_stats[n][ci][k] += x * w
                    total.backward()  # policy n's parameters receive only the gradient of policy n's loss
                for n in names:
                    for cs in chunk_stats[n]:
                        for k, x in cs.items():
                            stats[n][k].append(x)
                    stats[n]["grad_norm"].append(self._optimizer_step(n))
        self.model.eval()
        return {n: {k: sum(v) / len(v) for k, v in st.items()} for n, st in stats.items()}

    def train_policy(self, name: str, rollout: Rollout, scores: torch.Tensor, ref_lp: torch.Tensor, step: int) -> dict:
        """Advantages and the PPO update of one policy from its rows of the rollout; only its
        adapter, value head, optimizer and KL controller change."""
        prep = self.prepare(name, rollout, scores, ref_lp)
        return self.finish(name, rollout, prep, self.update(name, rollout, prep, step))

    def rollout(self) -> Rollout:
        """Sample prompts for every policy and generate all responses (one mixed-adapter call)."""
        ids, mask, names, temps, index = self._prompt_batch()
        rollout = generate_rollout(self.model, ids, mask, names, temps, self.cfg.max_new_tokens,
                                   self.cfg.top_k, self.cfg.top_p, mixed_batch=self.cfg.mixed_batch)
        rollout.prompt_index = index
        return rollout

    def step(self) -> dict:
        """One PPO iteration over every policy; returns metrics keyed `<policy>/<name>`."""
        step = self.step_count + 1
        metrics: dict[str, float] = {"step": step}
        t0 = time.perf_counter()
        rollout = self.rollout()
        t_gen = time.perf_counter()
        scores, components = self.score(rollout, step)
        t_score = time.perf_counter()
        ref_lp = reference_logprobs(self.model, self.ref_adapter, rollout, self.cfg.forward_batch_size,
                                    self.cfg.logprob_chunk_tokens)
        t_ref = time.perf_counter()
        samples = decode_texts(self.model, rollout)[1]
        if self._batched(rollout):
            old_lp, old_values = self._old_pass_all(rollout)
            preps = {n: self.prepare(n, rollout, scores, ref_lp, old=(old_lp[r], old_values[r]))
                     for n in self.policies for r in [rollout.rows(n).to(scores.device)]}
            upds = self.update_together(rollout, preps, step)
        else:
            preps = {n: self.prepare(n, rollout, scores, ref_lp) for n in self.policies}
            upds = {n: self.update(n, rollout, preps[n], step) for n in self.policies}
        for name in self.policies:
            m = self.finish(name, rollout, preps[name], upds[name])
            m.update({f"reward/{k}": float(v[rollout.rows(name)].mean()) for k, v in components.items()})
            texts = [samples[i] for i in rollout.rows(name).tolist()]
            m.update({f"text/{k}": v for k, v in text_stats(texts)._asdict().items()})  # over-optimisation shows here
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
            metrics[f"{name}/sample"] = samples[int(rollout.rows(name)[0])]
        metrics.update({"time/generate": t_gen - t0, "time/score": t_score - t_gen, "time/reference": t_ref - t_score,
                        "time/update": time.perf_counter() - t_ref, "time/step": time.perf_counter() - t0})
        self.step_count = step
        return metrics

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
            from marl.io import save_tensors

            save_tensors(tmp / "rng.safetensors", rng_state(self.generators))
            atomic_write_json(tmp / "state.json", {
                "step": self.step_count, "kl": {n: c.state_dict() for n, c in self.kl_ctl.items()},
                "reward_norm": {n: m.state_dict() for n, m in self.reward_moments.items()},
                "policies": {n: asdict(p) for n, p in self.policies.items()},
            })

    def load_checkpoint(self, folder: Path) -> None:
        from marl.io import load_tensors

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

