"""Old TRL's `PPOTrainer` on marl's PPO learner (marl.ppo.learner): one `Learner` per policy it trains."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from marl.errors import MarlError
from marl.ppo.advantages import masked_mean, masked_var
from marl.ppo.rollout import Rollout, pad_rows, reference_logprobs, response_mask
from marl.ppo.learner import Learner
from marl.ppo.policy_state import PolicyState

from .config import PPOConfig
from .model import AutoModelForCausalLMWithValueHead, _upload


def _experience_stats(exp) -> dict:
    """What old TRL reported of an iteration's experience that marl's own metrics do not hold (returns, rollout
    values, advantages, log-probs)."""
    mask = exp.mask
    return {
        "objective/kl_dist": exp.sequence_kl().cpu().numpy(),
        "objective/logprobs": exp.old_logprobs.cpu().numpy(),
        "objective/ref_logprobs": exp.ref_logprobs.cpu().numpy(),
        "objective/entropy": float((-exp.old_logprobs * mask).sum(1).mean()),
        "ppo/policy/advantages": exp.advantages[mask.bool()].cpu().numpy(),
        "ppo/policy/advantages_mean": float(masked_mean(exp.advantages, mask)),
        "ppo/returns/mean": float(masked_mean(exp.returns, mask)),
        "ppo/returns/var": float(masked_var(exp.returns, mask)),
        "ppo/val/mean": float(masked_mean(exp.values, mask)),
        "ppo/val/var": float(masked_var(exp.values, mask)),
    }


def _collate(rows: list):
    """Rows that are dicts: each column as a list (the collator of old TRL's examples: query tensors keep their
    lengths). Other rows (tuples of tensors): torch's default collation, as old TRL's dataloader did."""
    if isinstance(rows[0], dict):
        return {key: [row[key] for row in rows] for key in rows[0]}
    return torch.utils.data.default_collate(rows)


@contextlib.contextmanager
def _checkpointing_kept(base):
    """The body, then the base's own gradient checkpointing as the user left it (on after
    `prepare_model_for_kbit_training`): marl's update switches its own on and off."""
    kept = [(m, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None))
            for m in base.modules() if hasattr(m, "gradient_checkpointing")]
    hooks = getattr(base, "_require_grads_hooks", None)  # enable_input_require_grads' (still registered after)
    try:
        yield
    finally:
        for m, on, func in kept:
            m.gradient_checkpointing = on
            if func is not None:
                m._gradient_checkpointing_func = func
        if hooks:
            base._require_grads_hooks, base._require_grads_hook = hooks, hooks[0]


class PPOTrainer:
    """Old TRL's `PPOTrainer` for a model from marl's `AutoModelForCausalLMWithValueHead`.

    `step` trains the model's active policy adapter: select it with `model.set_adapter(name)` (or
    `compute_reward_score(..., ppo_adapter_name=name)`) before its step. Each policy keeps its own
    optimizer, KL controller and step count; only its LoRA and value head change. The reference is
    the same base with every adapter disabled, so `ref_model` must be None.
    """

    def __init__(self, config: PPOConfig | None = None, model: AutoModelForCausalLMWithValueHead | None = None,
                 ref_model=None, tokenizer=None, dataset=None, optimizer=None, data_collator=None,
                 lr_scheduler=None):
        if ref_model is not None:
            raise MarlError("ref_model must be None: marl trains LoRA adapters, not full models, and the reference is "
                            "the same base with the adapters disabled (old TRL's for peft models); pass ref_model=None")
        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            raise MarlError("model must come from marl's AutoModelForCausalLMWithValueHead.from_pretrained(...)")
        self.config = config or PPOConfig()
        self.args = self.config.to_ppo_args()
        self.model, self.ref_model = model, None
        self.tokenizer = tokenizer or model.marl_model.tokenizer
        self.dataset = dataset
        self.data_collator = data_collator or _collate
        self.dataloader = self.prepare_dataloader(dataset, self.data_collator) if dataset is not None else None
        self.lr_scheduler = lr_scheduler
        self.current_step = 0
        self._learners: dict[str, Learner] = {}  # one per policy trained: old TRL trained the active adapter
        self._steps: dict[str, int] = {}
        self._last_adapter: str | None = None
        # A given optimizer (and its scheduler) belongs to the policy active now; others get Adam.
        self._optimizer_owner = self._policy_name("PPOTrainer")
        if optimizer is not None:
            self._policy(self._optimizer_owner).optimizer = optimizer
        self.accelerator, self._jsonl = self._trackers()

    # ---- data, trackers

    def prepare_dataloader(self, dataset, data_collator=None):
        """Shuffled batches of `config.batch_size` rows, the last partial one dropped (as old TRL)."""
        return torch.utils.data.DataLoader(dataset, batch_size=self.config.batch_size, shuffle=True, drop_last=True,
                                           collate_fn=data_collator or _collate,
                                           generator=torch.Generator().manual_seed(self.config.seed))

    def _trackers(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        wanted = cfg.log_with if isinstance(cfg.log_with, list) else [cfg.log_with] if cfg.log_with else []
        trackers = [t for t in wanted if t != "jsonl"]
        accelerator = Accelerator(log_with=trackers or None, project_config=ProjectConfiguration(**cfg.project_kwargs),
                                  **cfg.accelerator_kwargs)
        if trackers:
            accelerator.init_trackers(cfg.tracker_project_name, config=cfg.to_dict(), init_kwargs=cfg.tracker_kwargs)
        if "jsonl" not in wanted:
            return accelerator, None
        folder = cfg.project_kwargs.get("logging_dir") or cfg.project_kwargs.get("project_dir")
        if not folder:
            raise MarlError("log_with='jsonl' needs a folder: PPOConfig(project_kwargs={'logging_dir': DIR})")
        return accelerator, Path(folder) / "metrics.jsonl"

    # ---- policies

    def _policy_name(self, where: str) -> str:
        name = self.model.active_adapter
        if name not in self.model.policy_adapters:
            raise MarlError(f"{where}: the active adapter is {name!r}, not a policy: call "
                            f"model.set_adapter(name) with one of {self.model.policy_adapters}")
        return name

    def _learner(self, name: str) -> Learner:
        if name not in self._learners:
            self._learners[name] = learner = Learner(self.model.marl_model, self.args, [self.args.policy({"name": name})])
            learner.keep_grads = True  # old TRL left the gradients after `step`; ported code reads them
            self._steps[name] = 0
        return self._learners[name]

    def _policy(self, name: str) -> PolicyState:
        return self._learner(name).states[name]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The active policy's optimizer."""
        return self._policy(self._policy_name("optimizer")).optimizer

    @property
    def kl_ctl(self):
        """The active policy's KL controller (`.value` is the current coefficient)."""
        return self._policy(self._policy_name("kl_ctl")).kl

    # ---- generation

    @torch.no_grad()
    def generate(self, query_tensor, length_sampler=None, batch_size: int = 4, return_prompt: bool = True,
                 generate_ref_response: bool = False, **generation_kwargs):
        """Responses of the active policy (and, with `generate_ref_response`, of the reference).

        A 1-D query gives a (1, L) tensor, as old TRL did. A list of queries gives a list of 1-D
        tensors, generated `batch_size` at a time with left padding, each cut after its first EOS.
        `length_sampler()`, if given, draws max_new_tokens for each batch.
        """
        policy = self._policy_name("generate")
        adapters = [policy, None] if generate_ref_response else [policy]  # None: adapters disabled
        if isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1:
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            ids = query_tensor[None].to(self.model.marl_model.device)
            outs = [self.model.marl_model.generate(ids, torch.ones_like(ids), adapter_names=a, **generation_kwargs)
                    for a in adapters]
            outs = [o if return_prompt else o[:, ids.shape[1]:] for o in outs]
        else:
            outs = [self._generate_batched(list(query_tensor), a, batch_size, return_prompt, length_sampler,
                                           generation_kwargs) for a in adapters]
        return tuple(outs) if generate_ref_response else outs[0]

    def _generate_batched(self, queries, adapter, batch_size, return_prompt, length_sampler, generation_kwargs):
        marl_model = self.model.marl_model
        # a response ends at the first stop token: the caller's eos_token_id, else the model's list (EOS and
        # every id of the checkpoint's generation_config.eos_token_id, `MultiAdapterModel.stop_token_ids`)
        stop = generation_kwargs.get("eos_token_id", marl_model.stop_token_ids)
        out = []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start:start + batch_size]
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            ids, mask = pad_rows(chunk, marl_model.tokenizer.pad_token_id, "left")
            generated = marl_model.generate(ids.to(marl_model.device), mask.to(marl_model.device),
                                            adapter_names=adapter, **generation_kwargs)[:, ids.shape[1]:]
            keep = response_mask(generated, stop).sum(1)
            for query, response, n in zip(chunk, generated, keep.tolist()):
                response = response[:n]
                out.append(torch.cat([query.to(response.device), response]) if return_prompt else response)
        return out

    # ---- the PPO step

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores) -> dict[str, float]:
        """One PPO update of the active policy from `config.batch_size` (query, response, score) rows.

        Args:
            queries: 1-D token ids per row, unpadded.
            responses: 1-D ids of the generated tokens only; every token given is trained on.
            scores: one number per row (0-d tensors, floats, or a (B,) tensor).

        Returns old TRL's statistics (`ppo/loss/policy`, `objective/kl`, ...): floats, and numpy arrays for
        the per-row and per-token ones (`objective/kl_dist`, `objective/logprobs`, `objective/ref_logprobs`,
        `ppo/policy/advantages`), as old TRL gave them.
        """
        t0 = time.perf_counter()
        name = self._policy_name("step")
        learner = self._learner(name)
        step = self._steps[name] + 1
        where = f"policy {name}, step {step}"
        scores = self._check_inputs(where, queries, responses, scores)
        if self.config.score_clip is not None:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        rollout = self._rollout(name, queries, responses)
        t_ref = time.perf_counter()
        ref_lp = reference_logprobs(self.model.marl_model, None, rollout)
        t_update = time.perf_counter()
        self.model.marl_model.set_trainable([name])
        base = self.model.marl_model.base
        self.args.gradient_checkpointing = (self.config.gradient_checkpointing or self.model.gradient_checkpointing
                                            or any(getattr(m, "gradient_checkpointing", False) is True
                                                   for m in base.modules()))  # the user's, e.g. for k-bit training
        with _checkpointing_kept(base):
            exp = learner.make_experience(rollout, scores, ref_lp, names=[name])
            update = learner.update(exp, step)
            learner.kl_step(exp[name])
            m = learner.report(exp[name], update[name])
        t_stats = time.perf_counter()
        self._steps[name] = step
        self.current_step += 1
        self._last_adapter = name
        learning_rate = learner.states[name].optimizer.param_groups[0]["lr"]  # this step's, before the scheduler
        if self.lr_scheduler is not None and name == self._optimizer_owner:
            self.lr_scheduler.step()
        q_len = torch.tensor([len(q) for q in queries], dtype=torch.float)
        r_len = torch.tensor([len(r) for r in responses], dtype=torch.float)
        stats = {
            "objective/kl": m["kl/mean"], "objective/kl_coef": m["kl/coef"],
            "ppo/mean_non_score_reward": -m["kl/coef"] * m["kl/mean"],
            "ppo/mean_scores": m["reward/mean"], "ppo/std_scores": m["reward/std"],
            "ppo/loss/policy": m["ppo/policy_loss"], "ppo/loss/value": m["ppo/value_loss"],
            "ppo/loss/total": m["ppo/policy_loss"] + self.args.vf_coef * m["ppo/value_loss"],
            "ppo/policy/entropy": m["ppo/entropy"], "ppo/policy/approxkl": m["ppo/approx_kl"],
            "ppo/policy/policykl": m["ppo/policykl"],
            "ppo/policy/clipfrac": m["ppo/clipfrac"], "ppo/policy/ratio": m["ppo/ratio"],
            "ppo/val/vpred": m["ppo/vpred"], "ppo/val/error": m["ppo/value_error"],
            "ppo/val/clipfrac": m["ppo/value_clipfrac"], **_experience_stats(exp[name]),
            "ppo/learning_rate": learning_rate,
            "tokens/queries_len_mean": float(q_len.mean()), "tokens/queries_len_std": float(q_len.std()),
            "tokens/responses_len_mean": float(r_len.mean()), "tokens/responses_len_std": float(r_len.std()),
            # marl computes the token rewards inside the update's experience: their time is in optimize_step
            "time/ppo/forward_pass": t_update - t_ref, "time/ppo/compute_rewards": 0.0,
            "time/ppo/optimize_step": t_stats - t_update,
        }
        returns_var = stats["ppo/returns/var"]
        stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / returns_var if returns_var > 0 else 0.0
        stats["time/ppo/calc_stats"] = time.perf_counter() - t_stats
        stats["time/ppo/total"] = time.perf_counter() - t0
        return stats

    def _check_inputs(self, where: str, queries, responses, scores) -> torch.Tensor:
        """The scores as a (B,) float tensor on the model's device, after checking every input."""
        if not all(isinstance(x, (list, tuple)) for x in (queries, responses)) or not (
                isinstance(scores, (list, tuple)) or (isinstance(scores, torch.Tensor) and scores.dim() == 1)):
            raise MarlError(f"{where}: queries and responses must be lists of tensors, scores a list or a 1-D tensor")
        counts = {"queries": len(queries), "responses": len(responses), "scores": len(scores)}
        if len(set(counts.values())) > 1:
            raise MarlError(f"{where}: one query, response and score per row, got "
                            + ", ".join(f"{n} {k}" for k, n in counts.items()))
        if counts["queries"] != self.config.batch_size:
            raise MarlError(f"{where}: got {counts['queries']} rows but PPOConfig.batch_size is "
                            f"{self.config.batch_size}: pass exactly batch_size rows")
        for what, rows in (("queries", queries), ("responses", responses)):
            for i, t in enumerate(rows):
                if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0 or t.is_floating_point():
                    raise MarlError(f"{where}: {what}[{i}] must be a non-empty 1-D tensor of token ids")
        try:
            values = torch.stack([torch.as_tensor(s).detach().float().cpu().reshape(()) for s in scores])
        except (RuntimeError, TypeError, ValueError):
            raise MarlError(f"{where}: each score must be one number (a float or a 0-d tensor; of compute_reward_score's "
                            "(B, T, num_labels) output pass raw[:, -1, k])") from None
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise MarlError(f"{where}: the score of row {bad[0]} is {values[bad[0]].item()} ({len(bad)} NaN or "
                            "infinite in all): fix the reward before calling step; nothing was trained")
        return values.to(self.model.marl_model.device)

    def _rollout(self, name: str, queries, responses) -> Rollout:
        """Queries left-padded, responses right-padded, in marl's rollout layout; temperature 1 as old TRL."""
        pad, device = self.model.marl_model.tokenizer.pad_token_id, self.model.marl_model.device
        q_ids, q_mask = pad_rows(list(queries), pad, "left")
        r_ids, r_mask = pad_rows(list(responses), pad, "right")
        return Rollout(q_ids.to(device), q_mask.to(device), r_ids.to(device), r_mask.to(device),
                       [name] * len(queries), torch.ones(len(queries)))

    # ---- logging, saving

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log=("query", "response")) -> dict[str, float]:
        """Log a step's statistics and the mean / std of its rewards to `config.log_with`.

        The first policy's keys are old TRL's; any other policy's get its name as a prefix
        (`policy_1/ppo/loss/policy`), so several policies share one tracker. A jsonl log also gets
        the `columns_to_log` of each row with its reward. Returns the scalars logged.
        """
        name = self._last_adapter or self.model.active_adapter
        r = torch.stack([torch.as_tensor(x).detach().float().cpu().reshape(()) for x in rewards])
        logs = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        logs.update({"env/reward_mean": float(r.mean()), "env/reward_std": float(r.std()) if len(r) > 1 else 0.0})
        if name != self.model.policy_adapter_name:
            logs = {f"{name}/{k}": v for k, v in logs.items()}
        step = self._steps.get(name, 0)
        if self.accelerator.trackers:
            self.accelerator.log(logs, step=step)
        if self._jsonl is not None:
            columns = [c for c in columns_to_log if c in batch]
            samples = [dict(zip(columns, row), reward=float(x)) for row, x in zip(zip(*(batch[c] for c in columns)), r)]
            self._jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(self._jsonl, "a") as f:
                f.write(json.dumps({"step": step, "adapter": name, **logs, "samples": samples}, default=str) + "\n")
        return logs

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """The model's policy adapters with their value heads, and the tokenizer."""
        self.model.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(str(save_directory))

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload policy adapters with marl",
                    private: bool | None = None, token: str | None = None):
        """Upload what `save_pretrained` writes to the Hub repo `repo_id` (created if missing)."""
        return _upload(self.save_pretrained, repo_id, commit_message, private, token)
