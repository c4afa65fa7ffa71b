"""Row 6: does sharing the base cost anything in learning? The same PPO run with one shared
base (marl; with the value head on the policy's LoRA, its default, and with a separate critic
adapter, `value_model: adapter`) and with separate model copies (bench/separate.py, which has
a separate value network), several seeds each, on the default task; final held-out reward and KL.

1. A reward adapter is trained once with `marl.stages.reward.run` (configs/reward.yaml) on the
   default model (`marl.default.ensure_default_model()`; --quick: the tiny random bench model).
2. Shared base: `marl.stages.ppo.run` (configs/ppo.yaml, the user's path) with one policy per
   seed, all side by side on one base. Separate copies: the same settings, each seed on its
   own policy and value copies. No sft adapter: the reference is the bare base.
3. One evaluation of all adapters together (`marl.evaluate.evaluate_adapters`, the held-out
   prompts, one sampling seed): mean reward and KL per adapter; per arm the mean over seeds
   and its standard error; the difference of means against two standard errors of it.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import CACHE, Assets, BenchError, Row, Settings, main, md_table, run_bench_child
from bench.runs import ensure_adapters, ppo_config
from marl.stats import difference, mean_se

ARMS = {"shared": "shared base, value head on the policy (default)",
        "critic": "shared base, critic adapter (value_model: adapter)",
        "critic_rm": "shared base, critic adapter started from the reward adapter (critic_init: reward)",
        "separate": "separate copies"}
SHARED = ("shared", "critic", "critic_rm")  # the arms trained by `marl ppo` on one shared base


# --------------------------------------------------------------------------- what rows 6 and 9 share


def ppo_cfg(s: Settings, model: str, run_dir: Path, arm: str, **extra):
    """configs/ppo.yaml as rows 6 and 9 run it: no sft adapter, `learning_steps` iterations (--quick: small
    shapes), one policy `<arm>_s<seed>` per seed."""
    quick = dict(prompts_per_policy=8, mini_batch_size=8, max_new_tokens=8, ppo_epochs=1, eval_prompts=16)
    return ppo_config(run_dir, [{"name": f"{arm}_s{seed}", "seed": seed} for seed in s.learning_seeds],
                      model_name_or_path=model, sft_adapter="none", reward_adapter="auto", overwrite="true",
                      total_steps=s.learning_steps, **(quick if s.quick else {}), **extra)


def prompts(model, cfg):
    """(training, held-out) prompt ids, as `marl ppo` chooses them."""
    from marl.stages.prompts import encode_prompts, held_out_prompts, train_prompts

    train = train_prompts(cfg, model.tokenizer)[1]
    held = held_out_prompts(cfg, model.tokenizer, train)
    return (encode_prompts(model, train, cfg, "training"),
            encode_prompts(model, held[: cfg.eval_prompts], cfg, "held-out"))


def evaluate(s: Settings, model: str, run_dir: Path, adapters: dict[str, Path]) -> dict:
    """One held-out evaluation of the bare base and every adapter together (one sampling seed): mean reward, KL
    and length per adapter."""
    from marl.evaluate import evaluate_adapters
    from marl.model import MultiAdapterModel

    cfg = ppo_cfg(s, model, run_dir, "eval")
    m = MultiAdapterModel.from_pretrained(model)
    m.load_adapter(str(run_dir / "adapters" / "reward"), "reward", role="reward")
    labels = {"base": None, **{n: m.load_adapter(str(f), n, role="policy") for n, f in adapters.items()}}
    m.eval()
    res = evaluate_adapters(m, labels, prompts(m, cfg)[1], None, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
    return {k: {"reward": v["reward_mean"], "kl": v["kl_mean"], "length": v["length_mean"], "n": v["n"]}
            for k, v in res.items()}


def measure_arms(key: str, s: Settings, a: Assets, arms, t0: float) -> tuple[dict, Row | None]:
    """Train each arm, then evaluate them all, each in a child (`python -m bench.<key>`), within the row's budget
    from `t0`, after training the reward adapter once: (results per arm and "eval", None), or (what was
    measured, the row that says why it stopped)."""
    if s.quick:
        model = a.base  # the tiny bench model
    else:
        from marl.default import ensure_default_model

        ensure_default_model()  # the embedded default model, built here once if needed
        model = "default"
    run_dir = CACHE / key / ("quick" if s.quick else "default")
    ensure_adapters(run_dir, ("reward",), model_name_or_path=model, overwrite="true",
                    **(dict(max_steps=4, max_train_samples=128) if s.quick else {}))
    out = {}
    for arm in (*arms, "eval"):
        left = s.learning_budget_min * 60 - (time.perf_counter() - t0)
        if left <= 0:
            return out, Row(key, "", f"not finished within its budget of {s.learning_budget_min:g} min (stopped "
                            f"before {arm})", None, seconds=time.perf_counter() - t0)
        try:
            out[arm] = run_bench_child(key, s, f"{key}-{arm}", timeout=int(left), arm=arm, run_dir=str(run_dir),
                                       model=model)
        except BenchError as e:
            return out, Row(key, "", f"not measured: {e}", None, seconds=time.perf_counter() - t0)
    return out, None


def seed_table(ev: dict, labels: dict[str, str], seeds, seconds: dict[str, float], first: str, last: str):
    """(a table of each arm's per-seed reward and KL, their means and standard errors, and its `seconds`;
    per arm {"reward": (mean, SE), "kl": (mean, SE), "seconds"})."""
    rows, stats = [], {}
    for arm, label in labels.items():
        r = [ev[f"{arm}_s{x}"]["reward"] for x in seeds]
        k = [ev[f"{arm}_s{x}"]["kl"] for x in seeds]
        stats[arm] = {"reward": mean_se(r), "kl": mean_se(k), "seconds": seconds[arm]}
        rows.append([label, *[f"{x:.3f}" for x in r], *stats[arm]["reward"], *[f"{x:.3f}" for x in k],
                     *stats[arm]["kl"], seconds[arm]])
    names = [f"seed {x}" for x in seeds]
    return md_table([first, *[f"reward, {x}" for x in names], "reward mean", "reward SE",
                     *[f"KL, {x}" for x in names], "KL mean", "KL SE", last], rows), stats


# --------------------------------------------------------------------------- row 6


def child(s: Settings, a: Assets | None, config: dict) -> dict:
    arm, run_dir, model = config["arm"], Path(config["run_dir"]), config["model"]
    t0 = time.perf_counter()
    if arm in SHARED:  # the shared base; critic arms with a separate critic adapter per policy
        from marl.stages import ppo

        critic = {"value_model": "adapter", "critic_init": "reward" if arm == "critic_rm" else "policy"}
        ppo.run(ppo_cfg(s, model, run_dir, arm, **(critic if arm != "shared" else {})))
        return {"seconds": time.perf_counter() - t0}
    if arm == "separate":
        from transformers import set_seed

        from bench.separate import SeparateCopiesPPO

        cfg = ppo_cfg(s, model, run_dir, "separate")
        set_seed(cfg.seed)
        specs = cfg.resolved_policies()
        sep = SeparateCopiesPPO(model, str(run_dir / "adapters" / "reward"), cfg, specs, prompt_ids=[])
        sep.prompt_ids = prompts(sep.reward, cfg)[0]
        for _ in range(cfg.total_steps):
            sep.step()
        for p in specs:
            sep.save_adapter(p.name, run_dir / "separate" / p.name)
        return {"seconds": time.perf_counter() - t0}
    return evaluate(s, model, run_dir, {f"{arm}_s{seed}": run_dir / ("adapters" if arm in SHARED else "separate")
                                        / f"{arm}_s{seed}" for seed in s.learning_seeds for arm in ARMS})


def run(s: Settings, a: Assets) -> Row:
    """Row 6: learning with one shared base vs separate copies."""
    t0 = time.perf_counter()
    out, failed = measure_arms("learning", s, a, ARMS, t0)
    if failed:
        return failed
    ev = out["eval"]
    detail, stats = seed_table(ev, ARMS, s.learning_seeds, {arm: out[arm]["seconds"] for arm in ARMS}, "arm",
                               "wall seconds")
    detail += f"\n\nThe base model before training: reward {ev['base']['reward']:.3f} ({ev['base']['n']} held-out prompts)."

    def compare(metric, arm="critic"):
        return difference(stats[arm][metric], stats["separate"][metric])

    d, se = compare("reward")
    dk, sek = compare("kl")
    dh, seh = compare("reward", "shared")
    dhk, sehk = compare("kl", "shared")
    drm, serm = compare("reward", "critic_rm")
    drmk, sermk = compare("kl", "critic_rm")
    meets = None if se != se else bool(abs(d) < 2 * se)
    notes = [
        "Like for like: the separate-copies arm gives each policy its own value network (a copy of the base with "
        "a LoRA and value head), as four-model PPO does; marl's `value_model: adapter` gives each policy a critic "
        "LoRA with its value head on the same shared base. The result compares these two.",
        f"KL, shared base (critic adapter) - separate: {dk:+.3f}, two standard errors {2 * sek:.3f}.",
        f"marl's default `value_model: head` (the value head on the policy's own LoRA, as old TRL): reward "
        f"{dh:+.3f} against separate copies (two standard errors {2 * seh:.3f}), KL {dhk:+.3f} ({2 * sehk:.3f}). "
        "A difference there is the value loss reaching the policy through the shared trunk, not base sharing.",
        f"The critic adapter started from the reward adapter and its score head (`critic_init: reward`): reward "
        f"{drm:+.3f} against separate copies (two standard errors {2 * serm:.3f}), KL {drmk:+.3f} ({2 * sermk:.3f}).",
        "Shared base: all seeds train side by side on one base in one `marl ppo` run (mixed-adapter rollouts); "
        "separate copies: each seed on its own copies. Per-seed rewards are means over the held-out prompts; the "
        "standard errors are over seeds, so they hold the seed-to-seed and evaluation noise together.",
        "Wall seconds of the shared arm include `marl ppo`'s own held-out evaluations before and after training.",
        f"Budget {s.learning_budget_min:g} min; this row took {(time.perf_counter() - t0) / 60:.1f} min.",
    ]
    return Row("learning", (
        f"{s.learning_steps} PPO iterations (configs/ppo.yaml's shared settings, whose KL control it had then; no "
        f"sft adapter) per arm and seed ({len(s.learning_seeds)} seeds), then one held-out evaluation of all "
        "adapters together: mean reward-adapter score and mean KL to the reference per adapter."),
        f"reward: shared base (critic adapter) - separate = {d:+.3f}, two standard errors {2 * se:.3f}; "
        f"value head on the policy trunk - separate = {dh:+.3f}", meets, detail, notes,
        raw={"eval": ev, "stats": stats}, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main(run, child)
