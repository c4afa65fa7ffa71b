"""Stage 3: several PPO policies trained side by side on the shared base.

    marl ppo --config configs/ppo.yaml [--key value ...]

Loads the base once, the `sft` adapter frozen as the reference policy (or no
adapter at all when the run has none), the reward adapter with its score head,
and one LoRA adapter + value head + optimizer per policy of the config (its
`policies` and its `sweep`), each starting from the sft weights (or fresh). Every
iteration generates for all policies in one mixed-adapter batch; a sweep's schedule
(halving, pbt) acts on the population every `every` iterations (marl.stages.population).
Held-out reward and KL are measured before and after training; metrics go to
metrics.jsonl and TensorBoard, curves to ppo_report.png, checkpoints (resumable with
--resume true) to checkpoints/ppo.

`run` reads as its steps: the checks that need no model, then under the run folder's
lock `_build`, `_opening`, `_train_loop` and the closing evaluation and writes.
"""

from __future__ import annotations

import dataclasses
import time

from tqdm.auto import tqdm

from marl import dist
from marl.config import PPOArgs, config_to_dict
from marl.embedded import resolve_model
from marl.errors import MarlError
from marl.evaluate import evaluate_adapters, markdown_table
from marl.io import atomic_write_json, atomic_write_text, read_json
from marl.model import MultiAdapterModel
from marl.ppo.trainer import MultiPolicyPPOTrainer
from marl.report import plot_ppo
from marl.rewards import dataset_columns, load_reward_function
from marl.run import RunDir
from marl.ppo.kl import runaway_warning
from marl.textstats import CollapseWatch

from marl.build import build_ppo_model
from .common import check_context, quiet, report_to, set_threads, up_to_date
from .population import Population
from .prompts import encode_prompt_rows, held_out_prompts, train_prompts


def _adapter_path(value: str | None, run_dir: RunDir, role: str, required: bool) -> str | None:
    if value in (None, "none", "null", ""):
        if required:
            raise MarlError(f"no {role} adapter given: set {role}_adapter to a run's adapters/{role} or a Hub id")
        return None
    if value == "auto":
        path = run_dir.adapter(role)
        if path.exists():
            return str(path)
        if required:
            raise MarlError(f"no {role} adapter at {path}: run `marl {role}` first, or set --{role}_adapter PATH")
        return None
    return value


def _trackers(cfg: PPOArgs, run_dir: RunDir):
    targets = report_to(cfg)
    if not targets:
        return None
    from accelerate import Accelerator

    acc = Accelerator(log_with=targets, project_dir=str(run_dir.logs))
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()}
    acc.init_trackers("ppo", config=flat)
    return acc


def run(cfg: PPOArgs) -> dict:
    quiet()
    set_threads(cfg)
    from transformers import set_seed

    dist.init()
    main = dist.is_main()  # only the main process writes; every process trains
    set_seed(cfg.seed + dist.rank())
    run_dir = RunDir(cfg.run_dir)
    specs = cfg.resolved_policies()
    if not cfg.overwrite:
        try:
            done = up_to_date("ppo", run_dir, [p.name for p in specs], cfg)
        except MarlError:  # a finished stage with other settings (more total_steps): --resume continues it
            if not cfg.resume:
                raise
            done = None
        if done is not None:  # with --resume too: nothing is left to train or to evaluate
            return done
    reward_path = _adapter_path(cfg.reward_adapter, run_dir, "reward", required=True)
    sft_path = _adapter_path(cfg.sft_adapter, run_dir, "sft", required=False)
    ckpt = run_dir.checkpoints("ppo") / "latest"
    if cfg.resume and not (ckpt / "state.json").exists():
        raise MarlError(f"--resume true but {ckpt} holds no checkpoint: run without --resume")


    check_context(resolve_model(cfg.model_name_or_path), cfg.max_prompt_length + cfg.max_new_tokens,
                  "max_prompt_length + max_new_tokens", cfg.trust_remote_code)  # before the model loads
    run_dir.create()
    with run_dir.writing("ppo", hold=main):  # one writing process per run folder
        return _train(cfg, run_dir, specs, reward_path, sft_path, ckpt)


@dataclasses.dataclass
class _Stage:
    """What the stage's steps share once the model is built."""

    cfg: PPOArgs
    run_dir: RunDir
    model: MultiAdapterModel
    ref: str | None
    trainer: MultiPolicyPPOTrainer
    eval_ids: list[list[int]]
    eval_prompts: list
    main: bool

    def evaluate(self, labels: dict) -> dict:
        """Held-out reward, KL, length and text statistics of `labels` (name -> adapter, None: the base)."""
        return evaluate_adapters(self.model, labels, self.eval_ids, self.ref, self.cfg.max_new_tokens,
                                 self.cfg.temperature, seed=self.cfg.seed, text_group=self.cfg.prompts_per_policy,
                                 prompts=self.eval_prompts)  # distinct-n over sets the size of a rollout


def _train(cfg: PPOArgs, run_dir: RunDir, specs, reward_path: str, sft_path: str | None, ckpt) -> dict:
    """The stage once it knows it must train: build, evaluate, train (with the sweep's schedule), evaluate, write."""
    st, population = _build(cfg, run_dir, specs, reward_path, sft_path)
    before = _opening(st, specs, population, ckpt)
    t_start = time.time()
    lost = _train_loop(st, population, before, ckpt)
    survivors = [st.trainer.policies[n] for n in st.trainer.states]
    dist.write_digest("ppo", [(f"{p.name}.{i}", t) for p in survivors
                              for i, t in enumerate(st.model.trainable_parameters(p.name))])
    after = st.evaluate({"base": None, **({"sft": st.ref} if st.ref else {}), **{p.name: p.name for p in survivors}})
    results = _summarise(before, after, cfg, survivors, st.ref)
    results["train_seconds"] = round(time.time() - t_start, 1)
    if population is not None:
        pop = population.finish(st.trainer.step_count, lost)
        results["population"] = {"winner": pop["winner"], "schedule": cfg.schedule,
                                 "stopped": [n for n, p in pop["policies"].items() if p["status"] == "stopped"]}
    if st.main:
        _write_results(st.model, run_dir, cfg, survivors, before, after, results)
    dist.barrier()
    return results


def _build(cfg: PPOArgs, run_dir: RunDir, specs, reward_path: str, sft_path: str | None):
    """The model (base, reward, reference and every policy), the prompts, the trainer, and the sweep's schedule
    (None without one)."""
    model = MultiAdapterModel.from_pretrained(cfg.model_name_or_path, **cfg.model_kwargs())
    run_dir.check_base(model.base_name, model.fingerprint)  # before any adapter: the clearest refusal
    model, ref = build_ppo_model(cfg, specs, reward_path, sft_path, model=model)

    train_ds, train_texts = train_prompts(cfg, model.tokenizer)
    held_out = held_out_prompts(cfg, model.tokenizer, train_texts)
    if cfg.max_train_samples:
        train_texts = train_texts[: cfg.max_train_samples]
    train_ids, kept = encode_prompt_rows(model, train_texts, cfg, "training")
    columns = ({k: [v[j] for j in kept] for k, v in dataset_columns(train_ds).items()}  # for reward functions
               if cfg.reward_functions else {})
    eval_ids, eval_kept = encode_prompt_rows(model, held_out[: cfg.eval_prompts], cfg, "held-out")
    reward_fns = {name: load_reward_function(spec) for name, spec in cfg.reward_functions.items()}
    trainer = MultiPolicyPPOTrainer(model, cfg, specs, train_ids, ref, reward_fns, prompt_columns=columns,
                                    prompts=[train_texts[j] for j in kept])
    st = _Stage(cfg, run_dir, model, ref, trainer, eval_ids * cfg.eval_samples_per_prompt,
                [held_out[j] for j in eval_kept] * cfg.eval_samples_per_prompt, dist.is_main())
    return st, _population(st, held_out, reward_fns)


def _population(st: _Stage, held_out: list, reward_fns: dict) -> Population | None:
    """The sweep's schedule, ranking on held-out prompts after the first eval_prompts when there are enough
    (so the final evaluation is not what selected), else on the first ones."""
    cfg = st.cfg
    if cfg.schedule == "none":
        return None
    start = cfg.eval_prompts if len(held_out) >= cfg.eval_prompts + cfg.rank_prompts else 0
    if start == 0 and st.main:
        tqdm.write(f"ppo: the held-out set has {len(held_out)} prompts, fewer than eval_prompts + rank_prompts = "
                   f"{cfg.eval_prompts + cfg.rank_prompts}: the rankings use prompts the final evaluation uses too")
    texts = held_out[start: start + cfg.rank_prompts]
    ids, kept = encode_prompt_rows(st.model, texts, cfg, "ranking")
    return Population(cfg, st.trainer, st.run_dir, ids, [texts[j] for j in kept], st.ref, reward_fns,
                      write=st.main)


def _opening(st: _Stage, specs, population: Population | None, ckpt) -> dict:
    """The held-out evaluation before training, or, resuming, the checkpoint (and the schedule's state)."""
    cfg, run_dir, trainer = st.cfg, st.run_dir, st.trainer
    before_file = run_dir.path / "ppo_eval_before.json"
    if cfg.resume:
        if population is not None:
            population.restore(read_json(ckpt / "state.json").get("extra", {})["population"])
        trainer.load_checkpoint(ckpt)
        if st.main:
            _truncate_metrics(run_dir, trainer.step_count)
        before = read_json(before_file)
        tqdm.write(f"ppo: resumed from {ckpt} at step {trainer.step_count}")
    else:
        labels = {"base": None, **({"sft": st.ref} if st.ref else {})}
        before = st.evaluate(labels | {p.name: p.name for p in specs if not (p.init_from_sft and st.ref)})
        if st.main:
            _truncate_metrics(run_dir, 0)
            run_dir.log_metrics({"stage": "ppo", "config": config_to_dict(cfg)})
            atomic_write_json(before_file, before)
            tqdm.write("ppo: held-out before training\n" + markdown_table(before))
    if population is not None:
        population.set_reference(before.get("sft" if st.ref else "base", {}).get("distinct_2"))
    return before


def _train_loop(st: _Stage, population: Population | None, before: dict, ckpt) -> set[str]:
    """The iterations: a step, the warnings, the logs, the schedule, a checkpoint. Returns the policies whose
    KL target was lost."""
    cfg, trainer, main = st.cfg, st.trainer, st.main
    watch = CollapseWatch(before.get("sft" if st.ref else "base", {}).get("distinct_2"))
    lost: set[str] = set()  # policies warned about a KL target lost (once each)
    acc = _trackers(cfg, st.run_dir) if main else None
    bar = tqdm(total=cfg.total_steps, initial=trainer.step_count, desc="ppo", unit="step", disable=not main)
    try:  # the bar is closed before any error or interrupt message is printed
        while trainer.step_count < cfg.total_steps:
            m = trainer.step()
            _warn(m, trainer.policies.values(), watch, lost, main)
            if main:
                st.run_dir.log_metrics({"stage": "ppo", **m})
            if acc is not None:
                acc.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m["step"])
            bar.update(1)
            bar.set_postfix(_postfix(m, list(trainer.policies)))
            if main and cfg.log_samples and (m["step"] % max(1, cfg.total_steps // 5) == 0 or m["step"] == 1):
                for name in trainer.policies:
                    tqdm.write(f"  step {m['step']} {name}: {m[f'{name}/sample'][:120]!r}")
            if population is not None and population.due(m["step"]):
                for line in population.act(m["step"], lost):
                    if main:
                        tqdm.write(f"ppo: step {m['step']}: {line}")
            if main and (m["step"] % cfg.save_steps == 0 or m["step"] == cfg.total_steps):
                trainer.save_checkpoint(ckpt, extra={"population": population.state()} if population else None)
            dist.barrier()
    finally:
        bar.close()
    if acc is not None:  # not acc.end_training(): it also ends the process group (docs/known-issues.md #15)
        for tracker in acc.trackers:
            tracker.finish()
    return lost


def _warn(m: dict, policies, watch: CollapseWatch, lost: set[str], main: bool) -> None:
    """Over-optimisation (the reward rises while the text collapses) and a lost KL target, once per policy,
    into the metrics and the log."""
    for p in policies:
        warning = watch.check(p.name, m.get(f"{p.name}/reward/reward_model", m[f"{p.name}/reward/mean"]),
                              m[f"{p.name}/text/distinct_2"])
        if warning is None and p.name not in lost:
            warning = runaway_warning(p.name, m[f"{p.name}/kl/mean"], m[f"{p.name}/kl/coef"], p.kl_target)
            if warning is not None:
                lost.add(p.name)
        if warning is not None:
            m[f"{p.name}/warning"] = warning
            if main:
                tqdm.write(f"ppo: warning, step {m['step']}: {warning}")


def _postfix(m: dict, names: list[str]) -> dict:
    """The progress bar's reward and KL: each policy's, or for more than four the best reward's."""
    if len(names) > 4:
        best = max(names, key=lambda n: m[f"{n}/reward/mean"])
        names = [best]
    return {n: f"r={m[f'{n}/reward/mean']:.2f} kl={m[f'{n}/kl/mean']:.2f}" for n in names}


def _write_results(model, run_dir: RunDir, cfg: PPOArgs, specs, before: dict, after: dict, results: dict) -> None:
    for p in specs:
        model.save_adapter(p.name, run_dir.adapter(p.name), overwrite=True,
                           extra_meta={"stage": "ppo", "results": after[p.name] | {"samples": None}})
    atomic_write_json(run_dir.path / "ppo_eval.json", {"before": before, "after": after, "summary": results})
    table = markdown_table({f"{k} (before)": v for k, v in before.items()} | after)
    atomic_write_text(run_dir.path / "ppo_eval.md", table + "\n")
    plot_ppo(run_dir.read_metrics("ppo"), run_dir.path / "ppo_report.png",
             sft_distinct_2=before.get("sft", before.get("base", {})).get("distinct_2"))
    run_dir.record_stage("ppo", model.base_name, model.fingerprint, config_to_dict(cfg), results)
    tqdm.write("ppo: held-out after training\n" + markdown_table(after))
    for p in specs:
        tqdm.write(f"  {p.name}: reward {results[p.name]['reward_before']:.3f} -> {results[p.name]['reward_after']:.3f}"
                   f" ({results[p.name]['gain_in_sft_std']:+.2f} sft std), KL {results[p.name]['kl_after']:.3f}, "
                   f"distinct-2 {after[p.name]['distinct_2']:.3f} (start {results[p.name]['distinct_2_start'] or 0:.3f})")
    tqdm.write(f"ppo: wrote {', '.join(str(run_dir.adapter(p.name)) for p in specs)} and {run_dir.path}/ppo_report.png")


def _summarise(before: dict, after: dict, cfg: PPOArgs, specs, ref) -> dict:
    start = before.get("sft" if ref else "base")
    out = {}
    for p in specs:
        b = start if (p.init_from_sft and ref) else before[p.name]
        std = max(start["reward_std"], 1e-8)
        out[p.name] = {"reward_before": b["reward_mean"], "reward_after": after[p.name]["reward_mean"],
                       "gain_in_sft_std": (after[p.name]["reward_mean"] - b["reward_mean"]) / std,
                       "kl_after": after[p.name]["kl_mean"], "kl_bound": cfg.kl_bound,
                       "kl_coef": p.kl_coef, "kl_target": p.kl_target, "reward_norm": p.reward_norm,
                       "distinct_2_after": after[p.name].get("distinct_2"), "distinct_2_start": start.get("distinct_2"),
                       "repeat_4_after": after[p.name].get("repeat_4")}
    return out


def _truncate_metrics(run_dir: RunDir, step: int) -> None:
    """Drop PPO records past `step` (they belong to a run that is being resumed or redone)."""
    f = run_dir.metrics_file
    if not f.exists():
        return
    import json

    keep = []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a full disk or a kill
            continue
        if rec.get("stage") == "ppo" and (step == 0 or rec.get("step", 0) > step):
            continue
        keep.append(line)
    atomic_write_text(f, "\n".join(keep) + ("\n" if keep else ""))

