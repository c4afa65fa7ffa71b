"""Row 6: does sharing the base cost anything in learning? The same PPO run with one shared
base (marl; with the value head on the policy's LoRA, its default, and with a separate critic
adapter, `value_model: adapter`) and with separate model copies (bench/separate.py, which has
a separate value network), several seeds each, on the default task; final held-out reward and KL.

    python -m bench.learning [--quick]

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

import math
import time
from pathlib import Path

from bench.common import (
    CACHE,
    REPO,
    Assets,
    BenchError,
    Row,
    Settings,
    main,
    md_table,
    run_bench_child,
    settings_from_json,
    settings_to_json,
)


ARMS = {"shared": "shared base, value head on the policy (default)",
        "critic": "shared base, critic adapter (value_model: adapter)",
        "critic_rm": "shared base, critic adapter started from the reward adapter (critic_init: reward)",
        "separate": "separate copies"}
SHARED = ("shared", "critic", "critic_rm")  # the arms trained by `marl ppo` on one shared base


def _model(s: Settings, a: Assets | None) -> str:
    """`default` (the embedded model, built here once if needed), or with --quick the tiny bench model."""
    if s.quick:
        return a.base
    from marl.default import ensure_default_model

    ensure_default_model()
    return "default"


def _ppo_cfg(s: Settings, model: str, run_dir: Path, arm: str):
    from marl.config import PPOArgs, load_config

    over = {"run_dir": str(run_dir), "model_name_or_path": model, "sft_adapter": "none", "reward_adapter": "auto",
            "report_to": "none", "overwrite": "true", "log_samples": "0", "save_steps": "1000",
            "total_steps": str(s.learning_steps)}
    if s.quick:
        over.update(prompts_per_policy="8", mini_batch_size="8", max_new_tokens="8", ppo_epochs="1",
                    eval_prompts="16")
    if arm in ("critic", "critic_rm"):  # the shared base with a separate critic adapter per policy
        over["value_model"] = "adapter"
        over["critic_init"] = "reward" if arm == "critic_rm" else "policy"
    cfg = load_config(PPOArgs, str(REPO / "configs" / "ppo.yaml"), [f"--{k}={v}" for k, v in over.items()])
    cfg.policies = [{"name": f"{arm}_s{seed}", "seed": seed} for seed in s.learning_seeds]
    return cfg


def _prompts(model, cfg):
    """(training, held-out) prompt ids, as `marl ppo` chooses them."""
    from marl.stages.prompts import encode_prompts, held_out_prompts, train_prompts

    train = train_prompts(cfg, model.tokenizer)[1]
    held = held_out_prompts(cfg, model.tokenizer, train)
    return (encode_prompts(model, train, cfg, "training"),
            encode_prompts(model, held[: cfg.eval_prompts], cfg, "held-out"))


def child(config: dict) -> dict:
    s, arm, run_dir, model = settings_from_json(config["settings"]), config["arm"], Path(config["run_dir"]), config["model"]
    t0 = time.perf_counter()
    if arm in SHARED:
        from marl.stages import ppo

        ppo.run(_ppo_cfg(s, model, run_dir, arm))
        return {"seconds": time.perf_counter() - t0}
    if arm == "separate":
        from transformers import set_seed

        from bench.separate import SeparateCopiesPPO

        cfg = _ppo_cfg(s, model, run_dir, "separate")
        set_seed(cfg.seed)
        specs = [cfg.policy(p) for p in cfg.policies]
        sep = SeparateCopiesPPO(model, str(run_dir / "adapters" / "reward"), cfg, specs, prompt_ids=[])
        sep.prompt_ids = _prompts(sep.reward, cfg)[0]
        for _ in range(cfg.total_steps):
            sep.step()
        for p in specs:
            sep.save_adapter(p.name, run_dir / "separate" / p.name)
        return {"seconds": time.perf_counter() - t0}
    # arm == "eval": every adapter of both arms in one evaluation
    from marl.evaluate import evaluate_adapters
    from marl.model import MultiAdapterModel

    cfg = _ppo_cfg(s, model, run_dir, "shared")
    m = MultiAdapterModel.from_pretrained(model)
    m.load_adapter(str(run_dir / "adapters" / "reward"), "reward", role="reward")
    labels: dict[str, str | None] = {"base": None}
    for seed in s.learning_seeds:
        for a in ARMS:
            name, folder = f"{a}_s{seed}", run_dir / ("adapters" if a in SHARED else "separate")
            m.load_adapter(str(folder / name), name, role="policy")
            labels[name] = name
    m.eval()
    eval_ids = _prompts(m, cfg)[1]
    res = evaluate_adapters(m, labels, eval_ids, None, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
    return {k: {"reward": v["reward_mean"], "kl": v["kl_mean"], "length": v["length_mean"], "n": v["n"]}
            for k, v in res.items()}


def _ensure_reward(s: Settings, model: str, run_dir: Path) -> None:
    """Train the reward adapter once (marl.stages.reward.run on configs/reward.yaml)."""
    if (run_dir / "adapters" / "reward" / "adapter_config.json").exists():
        return
    from marl.config import RewardArgs, load_config
    from marl.stages import reward

    over = {"run_dir": str(run_dir), "model_name_or_path": model, "report_to": "none", "overwrite": "true"}
    if s.quick:
        over.update(max_steps="4", max_train_samples="128")
    reward.run(load_config(RewardArgs, str(REPO / "configs" / "reward.yaml"), [f"--{k}={v}" for k, v in over.items()]))


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def run(s: Settings, a: Assets) -> Row:
    """Row 6: learning with one shared base vs separate copies."""
    t0 = time.perf_counter()
    budget = s.learning_budget_min * 60
    model = _model(s, a)
    run_dir = CACHE / "learning" / ("quick" if s.quick else "default")
    title = "6. Learning: shared base vs separate copies"
    target = "final rewards within seed noise (abs(difference of means) < 2 standard errors)"
    _ensure_reward(s, model, run_dir)
    out = {}
    for arm in (*ARMS, "eval"):
        left = budget - (time.perf_counter() - t0)
        if left <= 0:
            return Row("learning", title, "", target, f"not finished within its budget of {s.learning_budget_min:g} "
                       f"min (stopped before {arm})", None, seconds=time.perf_counter() - t0)
        s_arm = settings_from_json({**settings_to_json(s), "child_timeout_s": int(left)})
        try:
            out[arm] = run_bench_child("learning", {"settings": settings_to_json(s), "arm": arm,
                                                    "run_dir": str(run_dir), "model": model}, s_arm, f"learning-{arm}")
        except BenchError as e:
            return Row("learning", title, "", target, f"not measured: {e}", None, seconds=time.perf_counter() - t0)
    ev = out["eval"]
    rows, stats = [], {}
    for arm in ARMS:
        r = [ev[f"{arm}_s{seed}"]["reward"] for seed in s.learning_seeds]
        k = [ev[f"{arm}_s{seed}"]["kl"] for seed in s.learning_seeds]
        stats[arm] = {"reward": _mean_se(r), "kl": _mean_se(k), "seconds": out[arm]["seconds"]}
        rows.append([ARMS[arm], *[f"{x:.3f}" for x in r], stats[arm]["reward"][0], stats[arm]["reward"][1],
                     *[f"{x:.3f}" for x in k], stats[arm]["kl"][0], stats[arm]["kl"][1], out[arm]["seconds"]])
    seeds = [f"seed {x}" for x in s.learning_seeds]
    detail = md_table(["arm", *[f"reward, {x}" for x in seeds], "reward mean", "reward SE",
                       *[f"KL, {x}" for x in seeds], "KL mean", "KL SE", "wall seconds"], rows)
    detail += f"\n\nThe base model before training: reward {ev['base']['reward']:.3f} ({ev['base']['n']} held-out prompts)."

    def compare(metric, arm="critic"):
        (m1, se1), (m2, se2) = stats[arm][metric], stats["separate"][metric]
        d, se = m1 - m2, math.sqrt(se1 ** 2 + se2 ** 2)
        return d, se

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
    return Row("learning", title, (
        f"{s.learning_steps} PPO iterations (configs/ppo.yaml's shared settings, whose KL control it had then; no "
        f"sft adapter) per arm and seed ({len(s.learning_seeds)} seeds), then one held-out evaluation of all "
        "adapters together: mean reward-adapter score and mean KL to the reference per adapter."),
        target, f"reward: shared base (critic adapter) - separate = {d:+.3f}, two standard errors {2 * se:.3f}; "
        f"value head on the policy trunk - separate = {dh:+.3f}", meets, detail, notes,
        raw={"eval": ev, "stats": stats}, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main(run, child)
