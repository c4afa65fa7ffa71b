"""Held-out evaluation of several adapters side by side: reward, KL to the reference, length, diversity and
repetition of the text (marl.textstats), samples."""

from __future__ import annotations

import torch

from .model import MultiAdapterModel
from .rewards import call_reward_function
from .textstats import text_stats
from .ppo.rollout import (
    completion_strings, decode_texts, generate_rollout, left_pad, reference_logprobs, rollout_logprobs, score_rollout,
)


@torch.no_grad()
def evaluate_adapters(model: MultiAdapterModel, adapters: dict[str, str | None], prompt_ids: list[list[int]],
                      ref_adapter: str | None, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                      n_samples: int = 3, batch_size: int = 256, text_group: int | None = 32,
                      extra_scores: dict | None = None, prompts: list | None = None,
                      reward_fns: dict | None = None) -> dict[str, dict]:
    """For each label -> adapter (None: the bare base), sample answers to every prompt and
    report the reward adapter's mean and std score, the mean per-sequence KL to
    `ref_adapter` (sum over response tokens of log p - log p_ref, an unbiased estimate
    under samples from the adapter), the response length, a few samples, and the text statistics of
    all responses (distinct-1/2 over groups of `text_group` responses, repeat_4, words; marl.textstats).
    `extra_scores`: name -> fn(completion) -> float, reported as `<name>_mean` and `<name>_std` (e.g. a
    gold reward the policies never saw). `prompts`: each prompt of `prompt_ids` as the dataset gave it (text
    or messages), for the reward adapter to score the conversation as it was trained; None: decoded from the ids.
    `reward_fns`: name -> a reward function with TRL's signature (marl.rewards), called on each batch of
    (prompts, completions) as PPO calls it, reported as `<name>_mean` and `<name>_std`.

    Runs under a forked RNG, so evaluating never changes a training run's random stream.
    """
    labels = list(adapters)
    given = prompts if prompts is not None else [None] * len(prompt_ids)
    rows = [(label, p, g) for label in labels for p, g in zip(prompt_ids, given, strict=True)]
    out: dict[str, dict] = {label: {"scores": [], "kl": [], "length": [], "samples": [], "texts": [],
                                    **{name: [] for name in reward_fns or {}}} for label in labels}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            ids, mask = left_pad([p for _, p, _ in chunk], model.tokenizer.pad_token_id, model.device)
            names = [adapters[label] for label, _, _ in chunk]
            temps = torch.full((len(chunk),), float(temperature))
            ro = generate_rollout(model, ids, mask, names, temps, max_new_tokens)
            ro.prompts = [g for _, _, g in chunk] if prompts is not None else None
            scores = score_rollout(model, ro)
            ref_lp = reference_logprobs(model, ref_adapter, ro)
            own_lp = torch.zeros_like(ref_lp)
            for name in dict.fromkeys(names):
                idx = ro.rows(name).to(ref_lp.device)
                with model.use_adapter(name):
                    own_lp[idx] = rollout_logprobs(model, ro, idx)
            rmask = ro.response_mask.float()
            kl = ((own_lp - ref_lp) * rmask).sum(1)
            given, trl_completions = decode_texts(model, ro)
            completions = completion_strings(trl_completions)
            fn_scores = {name: call_reward_function(fn, name, given, trl_completions)
                         for name, fn in (reward_fns or {}).items()}
            for i, (label, _, _) in enumerate(chunk):
                for name, vals in fn_scores.items():
                    out[label][name].append(vals[i])
                o = out[label]
                o["scores"].append(float(scores[i]))
                o["kl"].append(float(kl[i]))
                o["length"].append(float(rmask[i].sum()))
                o["texts"].append(completions[i])
                if len(o["samples"]) < n_samples:
                    o["samples"].append(completions[i])
    result = {}
    for label, o in out.items():
        sc = torch.tensor(o["scores"])
        result[label] = {"reward_mean": float(sc.mean()), "reward_std": float(sc.std()) if len(sc) > 1 else 0.0,
                         "kl_mean": float(torch.tensor(o["kl"]).mean()),
                         "length_mean": float(torch.tensor(o["length"]).mean()),
                         "n": len(sc), **text_stats(o["texts"], group=text_group)._asdict(), "samples": o["samples"]}
        for name in reward_fns or {}:
            xs = torch.tensor(o[name])
            result[label] |= {f"{name}_mean": float(xs.mean()), f"{name}_std": float(xs.std()) if len(xs) > 1 else 0.0}
        for name, fn in (extra_scores or {}).items():
            xs = torch.tensor([float(fn(t)) for t in o["texts"]])
            result[label] |= {f"{name}_mean": float(xs.mean()), f"{name}_std": float(xs.std()) if len(xs) > 1 else 0.0}
    return result


def markdown_table(results: dict[str, dict], columns=("reward_mean", "reward_std", "kl_mean", "length_mean",
                                                     "distinct_1", "distinct_2", "repeat_4")) -> str:
    """One row per adapter; a column an older result lacks reads `-`."""
    head = "| adapter | " + " | ".join(columns) + " |"
    sep = "| --- |" + " ---: |" * len(columns)
    body = ["| " + label + " | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in columns) + " |"
            for label, r in results.items()]
    return "\n".join([head, sep, *body])
