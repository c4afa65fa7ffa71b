"""A sweep's schedule inside `marl ppo`: every `every` iterations the training policies are ranked on held-out
prompts (marl.ppo.population.rank: a policy over `max_kl`, under the distinct-2 floor or with a lost KL
target ranks below every policy within them), then

- `halving`: the best `keep` fraction goes on; each of the others stops training, leaves the rollout (the run
  gets faster) and keeps its adapter and its last evaluation in the run folder;
- `pbt`: each policy of the bottom `pbt_quantile` takes a top policy's weights and training state, then
  perturbs the settings it copied (marl.ppo.population.explore); its lineage records it.

Everything the schedule decided is kept in `Population.state()` (checkpointed with the run), written to
RUN_DIR/population.json, population.md and population.png, and the winner (the first of the last ranking:
the best policy inside the limits, a survivor before a stopped one) is named in the manifest; `marl push
--adapter best` pushes it.
"""

from __future__ import annotations

import dataclasses
import random

from tqdm.auto import tqdm

from marl.config import PPOArgs, ResolvedPolicy
from marl.evaluate import evaluate_adapters
from marl.io import atomic_write_json, atomic_write_text
from marl.ppo.population import exploit_pairs, explore, final_ranking, halve, rank
from marl.ppo.trainer import REWARD_MODEL, MultiPolicyPPOTrainer
from marl.report import plot_population, population_markdown
from marl.run import RunDir
from marl.sweep import sweep_values

POPULATION = "population.json"
RANK_SAMPLES = 2  # answers per ranking prompt


class Population:
    """The schedule of a run's policies (`schedule`, `every`, `keep`, `pbt_quantile`, `rank_by`, `max_kl`,
    `min_distinct_2`).

    Args:
        cfg: the run's PPO settings.
        trainer: the run's trainer; its policies are the population.
        run_dir: where stopped policies' adapters and the report go (main process only writes).
        rank_ids: token ids of the held-out ranking prompts; `rank_prompts`: the same prompts as given.
        ref: the reference adapter (KL), or None.
        rank_fns: reward functions by name, for `rank_by` other than reward_model.
        write: whether this process writes (the main one).
    """

    def __init__(self, cfg: PPOArgs, trainer: MultiPolicyPPOTrainer, run_dir: RunDir, rank_ids: list[list[int]],
                 rank_prompts: list, ref: str | None, rank_fns: dict | None = None, write: bool = True):
        self.cfg, self.trainer, self.run_dir, self.ref, self.write = cfg, trainer, run_dir, ref, write
        self.rank_ids = rank_ids * RANK_SAMPLES
        self.rank_prompts = rank_prompts * RANK_SAMPLES
        self.rank_fns = {k: v for k, v in (rank_fns or {}).items() if k == cfg.rank_by}
        self.floor: float | None = None  # the distinct-2 floor (set_reference)
        self.values = sweep_values(cfg.sweep) if cfg.sweep else {}
        self.rng = random.Random(cfg.seed)  # PBT's choices (checkpointed)
        self.policies = {n: {"settings": {k: v for k, v in e.items() if k != "name"}, "status": "training",
                             "lineage": []} for n, e in ((e["name"], e) for e in cfg.policy_entries())}
        self.rankings: list[dict] = []
        self.last: dict[str, dict] = {}  # each policy's last ranking evaluation

    def set_reference(self, distinct_2: float | None) -> None:
        """The reference's held-out distinct-2: the ranking's floor is `min_distinct_2` times it."""
        if self.cfg.min_distinct_2 is not None and distinct_2 is not None:
            self.floor = self.cfg.min_distinct_2 * distinct_2

    @property
    def metric(self) -> str:
        return "reward_mean" if self.cfg.rank_by == REWARD_MODEL else f"{self.cfg.rank_by}_mean"

    def due(self, step: int) -> bool:
        """Whether the schedule acts after iteration `step` (not after the last one: the final evaluation ranks)."""
        return self.cfg.schedule != "none" and step % self.cfg.every == 0 and step < self.cfg.total_steps

    def act(self, step: int, lost: set[str]) -> list[str]:
        """Rank the training policies on the held-out prompts, then halve or exploit and explore (from iteration
        `grace` on; before it the ranking is a report). Returns one line per action (for the log)."""
        ranking = self.rank(step, lost)
        if step < self.cfg.grace:  # a report only: the schedule acts from iteration `grace` on
            actions = []
        elif self.cfg.schedule == "halving":
            actions = [self.stop(name, step) for name in halve(ranking, self.cfg.keep)[1]]
        else:
            actions = [self.exploit(loser, source, step)
                       for loser, source in exploit_pairs(ranking, self.cfg.pbt_quantile, self.rng)]
        self.rankings[-1]["actions"] = actions
        return actions

    def rank(self, step: int, lost: set[str]) -> list:
        """Evaluate every training policy on the ranking prompts (one mixed-adapter batch) and rank them."""
        names = list(self.trainer.states)
        evals = evaluate_adapters(self.trainer.model, {n: n for n in names}, self.rank_ids, self.ref,
                                  self.cfg.max_new_tokens, self.cfg.temperature, seed=self.cfg.seed + step, n_samples=1,
                                  text_group=self.cfg.prompts_per_policy, prompts=self.rank_prompts,
                                  reward_fns=self.rank_fns)
        self.last.update({n: {k: v for k, v in e.items() if k not in ("samples",)} for n, e in evals.items()})
        ranking = rank(evals, self.metric, self.cfg.max_kl, self.floor, set(lost) & set(names))
        self.rankings.append({"step": step, "standings": [dataclasses.asdict(s) for s in ranking], "actions": []})
        return ranking

    def stop(self, name: str, step: int) -> str:
        """Halving: policy `name` stops training; its adapter and last evaluation go to the run folder, and it
        leaves the model (its weights and its rows of the rollout)."""
        model = self.trainer.model
        if self.write:
            model.save_adapter(name, self.run_dir.adapter(name), overwrite=True, extra_meta={
                "stage": "ppo", "population": {"stopped_at": step, "last_eval": self.last.get(name)}})
        self.trainer.remove_policy(name)
        model.delete_adapter(name)
        self.policies[name].update(status="stopped", stopped_at=step)
        return f"{name} stopped"

    def exploit(self, loser: str, source: str, step: int) -> str:
        """PBT: `loser` takes `source`'s weights and training state, then the source's settings perturbed."""
        src = self.trainer.states[source].settings
        swept = {k: v for k, v in dataclasses.asdict(src).items() if k in self.values}
        explored = explore(swept, self.values, self.rng)
        settings: ResolvedPolicy = dataclasses.replace(src, **explored)
        self.trainer.learner.exploit(loser, source, settings, step)
        self.policies[loser]["lineage"] = self.trainer.states[loser].lineage
        self.policies[loser]["settings"] = {k: getattr(settings, k) for k in self.policies[loser]["settings"]}
        changed = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in explored.items())
        return f"{loser} copied {source} ({changed})"

    # ------------------------------------------------------------------ resume, report

    def state(self) -> dict:
        """What a checkpoint keeps of the schedule (JSON)."""
        return {"rng": _rng_to_json(self.rng.getstate()), "policies": self.policies, "rankings": self.rankings,
                "last": self.last}

    def restore(self, state: dict) -> None:
        """Continue a checkpointed schedule: the stopped policies leave the trainer and the model again."""
        self.rng.setstate(_rng_from_json(state["rng"]))
        self.policies, self.rankings, self.last = state["policies"], state["rankings"], state["last"]
        for name, p in self.policies.items():
            if p["status"] == "stopped" and name in self.trainer.states:
                self.trainer.remove_policy(name)
                self.trainer.model.delete_adapter(name)

    def finish(self, step: int, lost: set[str]) -> dict:
        """The last ranking (marl.ppo.population.final_ranking): the policies still training, ranked on the
        ranking prompts as every ranking, and the stopped ones by their last ranking, every policy inside the
        limits above every policy outside them; population.json / .md / .png; returns the population record,
        whose `winner` ranks first."""
        survivors = self.rank(step, lost)
        stopped = rank({n: self.last[n] for n, p in self.policies.items() if p["status"] == "stopped"},
                       self.metric, self.cfg.max_kl, self.floor, set(lost))
        ranking = final_ranking(survivors, stopped)
        pop = {"schedule": self.cfg.schedule, "every": self.cfg.every, "grace": self.cfg.grace,
               "rank_by": self.cfg.rank_by, "max_kl": self.cfg.max_kl, "min_distinct_2": self.floor,
               "winner": ranking[0].name, "ranking": [dataclasses.asdict(s) for s in ranking],
               "rankings": self.rankings, "policies": self.policies}
        if self.write:
            atomic_write_json(self.run_dir.path / POPULATION, pop)
            atomic_write_text(self.run_dir.path / "population.md", population_markdown(pop))
            plot_population(pop, self.run_dir.path / "population.png")
            tqdm.write(population_markdown(pop))
        return pop


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
