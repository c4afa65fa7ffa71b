"""Steps 4 to 7 of a PPO iteration for a population of policies on one shared base: make experience, update,
KL control, report. The trainer (marl.ppo.trainer), the Agent (marl.agent) and old TRL's PPOTrainer
(marl.compat) all train their policies through one `Learner`.

A `Learner` holds one `PolicyState` per policy (marl.ppo.policy_state), keyed by name; the policies' weights
are the model's adapters of the same names. Policies can be added and removed while it trains, and one can
take over another's weights and training state (PBT's exploit, `exploit`).

`train(rollout, scores, ref_lp, step)` is steps 4 to 7 for the policies whose rows a scored rollout holds:

4. `make_experience`: the old-policy pass (log-probs, values), then per policy one `Experience`
   (marl.ppo.experience): KL-penalised token rewards, advantages by the policy's estimator (GAE on its
   critic, or critic-free GRPO / RLOO / REINFORCE++: marl.ppo.estimators) and returns. `old_pass_plan`
   decides where the old log-probs come from: a pass of their own, one stacked pass with the reference
   (`old_and_reference_pass`), or the update's first forward when it covers every row before the first
   optimizer step (its outputs detached are the old ones; the update then reuses that forward); with one
   policy the rows of the update's first micro-batch always come from its forward (`first_rows`);
5. `update`: `ppo_epochs` of clipped-PPO minibatch updates from the experiences, each policy's
   optimizer on its own parameters only; shared passes as `plan_passes` deals them;
6. `kl_step`: each policy's KL controller sees the iteration's KL (marl.ppo.kl);
7. `report`: the metrics of each policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import torch

from marl import dist
from marl.config import PPOArgs, ResolvedPolicy, critic_name
from marl.errors import MarlError
from marl.model import MultiAdapterModel
from marl.multilora import activation_checkpointing
from marl.ppo.advantages import kl_penalty, masked_mean
from marl.ppo.experience import Experience, loss_weight, make_experience, plan_passes
from marl.ppo.logprobs import token_logprobs
from marl.ppo.losses import policy_loss, value_loss
from marl.ppo.policy_state import PolicyState
from marl.ppo.rollout import Rollout


class Learner:
    """Trains the policies of `policies` (adapters already on `model`) from scored rollouts.

    Args:
        model: the shared base with the policies' adapters (and value heads or critics) loaded.
        cfg: the PPO settings the policies share (their own are in each `PolicyState.settings`).
        policies: each policy's effective settings (`cfg.policy(spec)`).
    """

    keep_grads = False
    """Leave each policy's gradients on its parameters after its optimizer step, as old TRL's PPOTrainer did
    (marl.compat sets it: code ported from old TRL reads them after `step`). False frees them: between updates
    a policy holds no gradients (as many bytes as its LoRA and head)."""

    def __init__(self, model: MultiAdapterModel, cfg: PPOArgs, policies: list[ResolvedPolicy] = ()):
        self.model, self.cfg = model, cfg
        self.states: dict[str, PolicyState] = {}
        self.old_pass_seconds = 0.0  # the old-policy passes of the last `make_experience` (0: none of their own)
        # the base's modules whose `gradient_checkpointing` flag transformers' switch sets, found once (adapters add
        # none): reading their flags is cheap, a walk over every module each update is not (~11 ms at 0.5B's shape)
        self._checkpoint_flags = [m for m in model.base.modules() if hasattr(m, "gradient_checkpointing")]
        model.multi_lora = cfg.multi_lora
        for p in policies:
            self.add(p)

    # ------------------------------------------------------------------ the population

    def add(self, settings: ResolvedPolicy) -> PolicyState:
        """Start training policy `settings.name` (its adapter is on the model): a fresh optimizer, KL controller,
        reward moments and generator. Its weights start as the main process's (each process samples its own
        prompts)."""
        if settings.name in self.states:
            raise MarlError(f"policy {settings.name!r} is already training: give each policy its own name")
        self.model.set_trainable([*self.states, settings.name])
        self.states[settings.name] = state = PolicyState.new(self.model, self.cfg, settings)
        dist.broadcast_parameters(self.model.trainable_parameters(settings.name))
        return state

    def remove(self, name: str) -> PolicyState:
        """Stop training policy `name` (its adapter stays on the model, frozen); returns its state."""
        state = self.states.pop(name)
        self.model.set_trainable(list(self.states))
        return state

    @torch.no_grad()
    def exploit(self, name: str, source: str, settings: ResolvedPolicy, step: int) -> None:
        """PBT's exploit and explore: policy `name` takes `source`'s LoRA weights, value head, critic, optimizer
        state, KL controller and reward moments (every tensor equal after the copy; `source` unchanged), then
        trains with `settings` (the source's, perturbed). Recorded in its lineage."""
        model, dst, src = self.model, self.states[name], self.states[source]
        model.copy_adapter_weights(source, name)
        if source in model.value_heads and name in model.value_heads:
            model.value_heads[name].load_state_dict(model.value_heads[source].state_dict())
        if source in model.critic_of and name in model.critic_of:
            model.copy_adapter_weights(model.critic_of[source], model.critic_of[name])
            critic = model.critic_of[name]
            model.value_heads[critic].load_state_dict(model.value_heads[model.critic_of[source]].state_dict())
        dst.copy_from(src)
        dst.apply(dataclasses.replace(settings, name=name, seed=dst.settings.seed))
        dst.lineage.append({"step": step, "from": source, "settings": {
            k: v for k, v in dataclasses.asdict(dst.settings).items() if k != "name"}})

    # ------------------------------------------------------------------ steps 4 to 7

    def train(self, rollout: Rollout, scores: torch.Tensor, ref_lp: torch.Tensor, step: int,
              names: list[str] | None = None, shared: bool = False) -> dict[str, dict]:
        """Make experience, update, KL step and report for the policies `names` (all: None) from their rows of
        a scored rollout; only their adapters, heads, optimizers and KL controllers change. Returns each one's
        metrics (`report`)."""
        experiences = self.make_experience(rollout, scores, ref_lp, names=names, shared=shared)
        stats = self.update(experiences, step, shared=shared)
        out = {}
        for n, exp in experiences.items():
            self.kl_step(exp)
            out[n] = self.report(exp, stats[n])
        return out

    def make_experience(self, rollout: Rollout, scores: torch.Tensor, ref_lp: torch.Tensor,
                        components: dict[str, torch.Tensor] | None = None, names: list[str] | None = None,
                        shared: bool = False, old: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> dict[str, Experience]:
        """The `Experience` of each policy of `names` (all: None) from its rows of the scored rollout.

        First the old log-probs and values, as `old_pass_plan` says: given (`old`, (B, R) each: from
        `old_and_reference_pass`); the update's first forward ("update": run here, its graph kept in the
        experience for the update); or the old-policy pass, with `shared` every row of the rollout under its
        own policy, all policies sharing each pass, else each policy's rows in passes of their own. Then, per
        policy, token rewards with its KL controller's coefficient, advantages and returns
        (marl.ppo.experience.make_experience). `scores` (B,), `ref_lp` (B, R) and each of `components` (B,)
        cover the whole rollout."""
        names = list(self.states) if names is None else names
        rows = {n: rollout.rows(n).to(scores.device) for n in names}
        reused = self.first_rows(rollout, shared, names)  # (name, its rows' indices) the first forward gives
        rest = {n: r for n, r in rows.items()}
        if reused is not None:
            keep = torch.ones(len(rows[reused[0]]), dtype=torch.bool)
            keep[reused[1]] = False
            rest[reused[0]] = rows[reused[0]][keep.to(rows[reused[0]].device)]
        t = time.perf_counter()
        if old is not None:  # from `old_and_reference_pass`, which leaves out the reused rows
            old = {n: (old[0][r], old[1][r]) for n, r in rows.items()}
        elif shared:
            old_lp, old_values = self._old_pass_all(rollout)
            old = {n: (old_lp[r], old_values[r]) for n, r in rows.items()}
        else:
            old = {n: self._old_pass(n, rollout, rest[n]) if len(rest[n]) else None for n in names}
            if reused is not None and len(rest[reused[0]]):  # back to the order of the policy's rows
                n, first_rows = reused
                lp, v = old[n]
                full = (lp.new_zeros(len(rows[n]), lp.shape[1]), v.new_zeros(len(rows[n]), v.shape[1]))
                full[0][keep], full[1][keep] = lp, v
                old[n] = full
        self.old_pass_seconds = time.perf_counter() - t if any(len(r) for r in rest.values()) else 0.0
        first = None
        if reused is not None:
            n, first_rows = reused
            first = self._first_forward(n, rollout, rows[n][first_rows])
            lp, v = (first[0].detach(), first[1].detach().float())
            if old[n] is None:
                old[n] = (lp.new_zeros(len(rows[n]), lp.shape[1]), v.new_zeros(len(rows[n]), v.shape[1]))
            old[n][0][first_rows], old[n][1][first_rows] = lp, v.to(old[n][1].dtype)
        out = {n: make_experience(self.states[n].settings, self.cfg, rollout, rows[n], scores, ref_lp, *old[n],
                                  self.states[n].kl.value, components, reduce=dist.sum_over_processes) for n in names}
        if first is not None:
            out[reused[0]].first_pass, out[reused[0]].first_rows = first, reused[1]
        return out

    def old_pass_plan(self, rollout: Rollout, shared: bool, ref_adapter: str | None, names: list[str] | None = None
                      ) -> str:
        """Where this iteration's old log-probs and values come from, the one decision: "update" (the update's
        first forward, detached: one policy whose first minibatch is all its rows in one micro-batch, no
        dropout; `reuse_first_forward`), "with_reference" (one stacked multi-LoRA pass with the reference as
        one more group of rows, `old_and_reference_pass`; `stack_reference`) or "own" (passes of their own).
        With the last two, the rows of `first_rows` still come from the update's first forward. Each gives the
        same numbers (tests/ppo/test_fused_passes.py)."""
        names = list(self.states) if names is None else names
        reused = self.first_rows(rollout, shared, names)
        if reused is not None and len(reused[1]) == len(rollout.rows(reused[0])):
            return "update"
        if self.cfg.stack_reference and set(rollout.adapter_names) == set(names) and \
                self.model.stacked_layout([*rollout.adapter_names, ref_adapter]) is not None:
            return "with_reference"
        return "own"

    def first_rows(self, rollout: Rollout, shared: bool, names: list[str] | None = None
                   ) -> tuple[str, torch.Tensor] | None:
        """(policy, indices into its rows) whose old log-probs and values the update's first forward gives, or
        None: with `reuse_first_forward`, one policy (one graph kept at a time) updated alone and no dropout in
        the update (the old pass has none), the rows of its first micro-batch, in the order the update takes
        them: before the first optimizer step the policy is the old one, so that forward, detached, is the old
        pass for its rows (all of them with one minibatch of one micro-batch: old_pass_plan "update"). The
        update's shuffle is read from a copy of the policy's generator, which the update then draws the same."""
        names = list(self.states) if names is None else names
        if not self.cfg.reuse_first_forward or shared or len(names) != 1 or not self.cfg.disable_dropout:
            return None
        n = len(rollout.rows(names[0]))
        if n == 0:
            return None
        g = self.states[names[0]].generator
        state = g.get_state()
        perm = torch.randperm(n, generator=g)  # the first epoch's shuffle in `_minibatches`
        g.set_state(state)
        return names[0], perm[:min(self.cfg.mini_batch_size, self._micro_rows())]

    def _first_forward(self, name: str, rollout: Rollout, rows: torch.Tensor):
        """(log-probs, values, entropies) (b, R) with their graph: the update's first forward of policy `name`
        over rollout rows `rows` (its first micro-batch), run as `_update_one` runs it (update mode, gradients
        on)."""
        with torch.enable_grad(), self._update_mode():
            return self._policy_pass(name, rollout, rows, entropy=True)

    @torch.no_grad()
    def old_and_reference_pass(self, rollout: Rollout, ref_adapter: str | None, shared: bool = False
                               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(reference log-probs (B, R), (old log-probs (B, R), old values (B, R))) of every row in stacked
        multi-LoRA passes: each pass holds its rows under their own policies and the same rows again under
        `ref_adapter` (None: the bare base), one more group of the stacked layout, `forward_batch_size` rows
        a pass in all. The numbers of `reference_logprobs` and the old-policy pass, in one pass over the base
        instead of two. The rows whose old log-probs the update's first forward gives (`first_rows`) run under
        the reference only and read 0 in the old ones."""
        B = rollout.prompt_ids.shape[0]
        k = max(1, self.cfg.forward_batch_size // 2)
        old = torch.ones(B, dtype=torch.bool)
        reused = self.first_rows(rollout, shared)
        if reused is not None:
            old[rollout.rows(reused[0])[reused[1]].cpu()] = False
        ref, lps, vals = [], None, None
        with self.model.eval_mode():
            for s in range(0, B, k):
                r = torch.arange(s, min(s + k, B))
                mine = r[old[r]]
                names = [rollout.adapter_names[i] for i in mine.tolist()] + [ref_adapter] * len(r)
                lp, v, _ = self._policy_pass(names, rollout, torch.cat([mine, r]))
                if lps is None:
                    lps, vals = lp.new_zeros(B, lp.shape[1]), lp.new_zeros(B, lp.shape[1], dtype=torch.float32)
                lps[mine.to(lps.device)] = lp[:len(mine)]
                vals[mine.to(lps.device)] = v[:len(mine)].float()
                ref.append(lp[len(mine):])
        return torch.cat(ref), (lps, vals)

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
                             entropy_grad=self._wants_entropy_grad(names))
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
                self.states[name].optimizer.zero_grad(set_to_none=True)
                norm = self._loss_norm(exp, mb)
                for c in self._micro(mb):
                    if exp.first_pass is not None:  # make_experience ran this forward (`first_rows`)
                        if not torch.equal(c, exp.first_rows):
                            raise RuntimeError("the update's first micro-batch is not the one its old pass took")
                        lp, v, ent = exp.first_pass
                        exp.first_pass = None  # consumed: later micro-batches and epochs run forwards of their own
                    else:
                        lp, v, ent = self._policy_pass(name, exp.rollout, exp.rows[c], entropy=True)
                    loss, st = self._losses(lp, v, ent, exp, c, step)
                    (loss * loss_weight(exp.mask[c].sum(), norm)).backward()
                    for k, x in st.items():
                        stats[k].append(x)
                for k, x in self._optimizer_step(name).items():
                    stats[k].append(x)
                if not self.keep_grads:
                    self.states[name].optimizer.zero_grad(set_to_none=True)
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

        def step(n: str) -> None:  # its minibatch is whole: step it and free its gradients, so that one
            for k, x in self._optimizer_step(n).items():  # policy's gradients exist at a time, not every policy's
                stats[n][k].append(x)
            self.states[n].optimizer.zero_grad(set_to_none=True)

        with self._update_mode():
            for mbs in zip(*(self._minibatches(n, len(experiences[n].rows)) for n in names)):
                for n in names:
                    self.states[n].optimizer.zero_grad(set_to_none=True)
                micro = {n: self._micro(mb) for n, mb in zip(names, mbs)}
                micro_stats = {n: [defaultdict(float) for _ in micro[n]] for n in names}
                tokens = {n: experiences[n].mask.sum(1) for n in names}
                norms = {n: self._loss_norm(experiences[n], mb) for n, mb in zip(names, mbs)}
                passes = plan_passes(micro, tokens, self.pass_rows(), norms)
                last_pass = {s.policy: i for i, segments in enumerate(passes) for s in segments}
                for i, segments in enumerate(passes):
                    rows = torch.cat([experiences[s.policy].rows[s.rows] for s in segments])
                    owners = [s.policy for s in segments for _ in s.rows]
                    lp, v, ent = self._policy_pass(owners[0] if len(set(owners)) == 1 else owners, rollout, rows,
                                                   entropy=True)  # one policy's rows: its plain pass
                    total, o = 0.0, 0
                    for s in segments:
                        sl = slice(o, o + len(s.rows))
                        o += len(s.rows)
                        loss, st = self._losses(lp[sl], v[sl], ent[sl], experiences[s.policy], s.rows, step)
                        total = total + loss * s.loss_weight
                        for k, x in st.items():
                            micro_stats[s.policy][s.micro][k] += x * s.share
                    total.backward()  # policy n's parameters receive only the gradient of policy n's loss
                    for n in [n for n in names if last_pass.get(n) == i]:
                        step(n)
                for n in names:
                    if n not in last_pass:  # no rows in any pass: still one step, as every process takes it
                        step(n)
                    for ms in micro_stats[n]:
                        for k, x in ms.items():
                            stats[n][k].append(x)
        return {n: {k: sum(v) / len(v) for k, v in st.items()} for n, st in stats.items()}

    @property
    def update_in_eval_mode(self) -> bool:
        """Whether the update's passes run in eval mode: no dropout to keep, no checkpointing to run (asked for here,
        or turned on on the base by the user's own `gradient_checkpointing_enable()`, which transformers applies
        in training mode only)."""
        if not self.cfg.disable_dropout or self.cfg.gradient_checkpointing:
            return False
        return not any(m.gradient_checkpointing is True for m in self._checkpoint_flags)

    @contextlib.contextmanager
    def _update_mode(self):
        """Training mode for the update passes (activation checkpointing as asked), without dropout when
        `disable_dropout` (the old log-probs came from eval mode); eval mode again afterwards. Without dropout and
        without checkpointing, eval mode computes what that would, and the passes run in it: no walk over every
        module to switch modes and dropouts (tens of ms a step at Qwen2.5-0.5B's shape, docs/speed.md)."""
        if self.update_in_eval_mode:
            with self.model.eval_mode():
                yield
            return
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
            perm = torch.randperm(n, generator=self.states[name].generator)
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
        p = self.states[name].settings
        mask = exp.mask[c]
        pg = policy_loss(lp, exp.old_logprobs[c], exp.advantages[c], mask, p.clip_coef)
        ent = masked_mean(entropy, mask)
        loss = pg.loss
        stats = {"policy_loss": pg.loss, "entropy": ent, "approx_kl": pg.approx_kl, "clipfrac": pg.clipfrac,
                 "ratio": pg.ratio_mean, "policykl": masked_mean(exp.old_logprobs[c] - lp.detach(), mask)}
        if p.kl_in == "loss":  # GRPO: beta * k3 KL(pi || pi_ref) per token, in the loss (Shao et al. 2024, eq. 4)
            k3 = torch.where(mask.bool(), kl_penalty(lp, exp.ref_logprobs[c], "k3"), torch.zeros_like(lp))
            stats["kl_loss"] = masked_mean(k3, mask)
            loss = loss + p.beta * stats["kl_loss"]
        if p.has_critic:  # divided by the policy's return variance of this iteration (value_loss_norm)
            vl = value_loss(v.float(), exp.values[c], exp.returns[c], mask, cfg.vf_clip_coef)
            loss = loss + p.vf_coef * vl.loss / exp.returns_scale
            with torch.no_grad():
                err = masked_mean((v.float() - exp.returns[c]) ** 2, mask)
            stats.update(value_loss=vl.loss, value_clipfrac=vl.clipfrac, vpred=masked_mean(v.float().detach(), mask),
                         value_error=err)
        loss = loss - p.ent_coef * ent
        if not torch.isfinite(loss):
            raise MarlError(f"policy {name}, step {step}: the PPO loss is NaN or infinite; nothing was updated "
                            "and the last good checkpoint is kept: lower learning_rate and resume")
        return loss, {k: float(x.detach()) for k, x in stats.items()}

    def _token_sum(self, name: str) -> bool:
        """Whether policy `name`'s loss is summed over tokens and divided by a constant (Dr. GRPO: grpo without
        the std division) rather than averaged over the minibatch's tokens (`_loss_norm`)."""
        p = self.states[name].settings
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
        self.states[name].optimizer.step()
        return norms

    # ------------------------------------------------------------------ 6. KL control, 7. report

    def kl_step(self, exp: Experience) -> None:
        """The policy's KL controller sees this iteration's mean sequence KL (averaged over the processes, so
        every process keeps the same coefficient) and sets the coefficient of the next iteration."""
        mean_kl = exp.sequence_kl().mean().reshape(1)
        dist.all_reduce_mean([mean_kl])
        self.states[exp.policy].kl.update(float(mean_kl), len(exp.rows))

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


    def _wants_entropy_grad(self, names: str | list[str]) -> bool:
        """Whether a pass over these policies' rows needs the entropy's gradient (some has an ent_coef)."""
        return any(self.states[n].settings.ent_coef != 0 for n in ([names] if isinstance(names, str) else set(names))
                   if n in self.states)  # the reference's rows of a stacked pass: no policy of this learner

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: Path) -> dict:
        """Each policy's adapter (and critic) and optimizer into `folder`; returns the JSON part of the states,
        in the layout of state.json (policies, kl, reward_norm, lineage: each keyed by policy)."""
        parts = {}
        for name, state in self.states.items():
            self.model.save_adapter(name, folder / "adapters" / name)
            if name in self.model.critic_of:
                critic = self.model.critic_of[name]
                self.model.save_adapter(critic, folder / "adapters" / critic)
            parts[name] = state.save(folder)
        return {key: {n: part[field] for n, part in parts.items()} for key, field in
                (("policies", "settings"), ("kl", "kl"), ("reward_norm", "reward_norm"), ("lineage", "lineage"))}

    def load(self, folder: Path, saved: dict) -> None:
        """Restore every policy of the learner from `folder` and the JSON part `saved` (as `save` wrote them)."""
        if set(saved["policies"]) != set(self.states):
            raise MarlError(f"checkpoint {folder} has policies {sorted(saved['policies'])}, the config has "
                            f"{sorted(self.states)}: resume with the same policies")
        for name, state in self.states.items():
            was = saved["policies"][name].get("advantage_estimator", "gae")  # older checkpoints: PPO's gae
            if was != state.settings.advantage_estimator:
                raise MarlError(f"checkpoint {folder} trained {name} with advantage_estimator {was}, the config "
                                f"says {state.settings.advantage_estimator}: resume with the estimator it was "
                                "trained with")
        for name, state in self.states.items():
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
            state.load(folder, {"settings": saved["policies"][name],
                                **{key: saved.get(key, {}).get(name) for key in ("kl", "reward_norm", "lineage")}})


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
