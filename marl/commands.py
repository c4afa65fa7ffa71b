"""`marl eval | generate | merge | push`: what a user does with a finished run directory.

    marl eval     RUN_DIR [--prompts FILE] [--n N]              reward / KL / length / samples per adapter
    marl generate RUN_DIR --adapter A [--adapter B] --prompt T  several adapters, one mixed-adapter batch
    marl merge    RUN_DIR --adapter NAME --out DIR              a plain transformers model, no peft needed
    marl push     RUN_DIR --adapter NAME --repo-id USER/NAME    to the Hugging Face Hub (+ model card)

Each is `NAME_command(argv) -> exit code`; bad input raises `MarlError`, which the
CLI prints as one line with exit code 2. The work itself lives in the library
(`evaluate_adapters`, `MultiAdapterModel.generate`, `marl.merge`, `marl.hub`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from . import hub
from .chat import encode_prompt, is_conversation
from .config import PPOArgs
from .data import load_split, prompt_texts
from .errors import MarlError
from .hub_download import looks_like_hub_adapter
from .io import atomic_write_json, atomic_write_text, read_json
from .merge import merge_adapter
from .model import MultiAdapterModel
from .report import plot_ppo, population_markdown
from .run import RunDir
from .stages.common import quiet
from .stages.prompts import encode_prompt_rows, held_out_prompts

BASE = "base"  # the adapter name that means "no adapter" in generate
BEST = "best"  # the adapter name that means "the winner of the run's sweep" (population.json)
POPULATION = "population.json"
STAGE_OF_ROLE = {"sft": "sft", "reward": "reward", "policy": "ppo"}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line `MarlError`s (exit 2 through the CLI) instead of usage dumps."""

    def error(self, message):
        raise MarlError(f"{message} (see `{self.prog} --help`)")


def _parse(parser: argparse.ArgumentParser, argv: list[str]):
    """Parsed args, or the exit code when argparse finished the job itself (--help)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)


# --------------------------------------------------------------------------- run directories


def open_run(path: str) -> RunDir:
    """A run directory that exists and holds at least one adapter."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise MarlError(f"run directory {path} does not exist: give the run_dir of a marl run (e.g. runs/default)")
    if not run.adapter_names():
        raise MarlError(f"{path} has no adapters (nothing in {run.adapters}): train some first with "
                        f"`marl sft|reward|ppo --run_dir {path}`")
    return run


def adapter_meta(run: RunDir, name: str) -> dict:
    f = run.adapter(name) / "marl_adapter.json"
    return read_json(f) if f.exists() else {}


def adapter_role(run: RunDir, name: str) -> str:
    return adapter_meta(run, name).get("role") or (name if name in ("sft", "reward") else "policy")


def population(run: RunDir) -> dict | None:
    """The run's population (population.json, written by `marl ppo` with a sweep), or None."""
    f = run.path / POPULATION
    return read_json(f) if f.exists() else None


def resolve_best(run: RunDir, names: list[str]) -> list[str]:
    """`best` -> the winner of the run's sweep (its population's ranking on held-out prompts)."""
    if BEST not in names:
        return names
    pop = population(run)
    if pop is None:
        raise MarlError(f"--adapter {BEST}: {run.path} holds no population (population.json): `best` names the winner "
                        "of a sweep (marl ppo with sweep:); give an adapter name")
    return [pop["winner"] if n == BEST else n for n in names]


def check_adapters(run: RunDir, names: list[str], allow_base: bool = False) -> None:
    known = run.adapter_names()
    for name in names:
        if name not in known and not (allow_base and name == BASE):
            raise MarlError(f"unknown adapter {name!r}: {run.path} has {', '.join(known)}"
                            f"{' (or `base` for no adapter)' if allow_base else ''}")


def stage_config(run: RunDir, *stages: str) -> dict:
    """The config of the first of `stages` that the run finished (empty if none)."""
    done = run.manifest().get("stages", {})
    for s in stages:
        if s in done:
            return done[s].get("config") or {}
    return {}


def base_model_name(run: RunDir) -> str:
    name = run.manifest().get("base_model")
    for adapter in run.adapter_names():
        name = name or adapter_meta(run, adapter).get("base_model")
    if not name:
        raise MarlError(f"{run.path} names no base model (no manifest.json, no marl_adapter.json): "
                        "it was not written by marl")
    return name


def load_run_model(run: RunDir, what: str):
    """The run's base, loaded as the run loaded it (quantization from the ppo, else reward, else sft config)."""
    quiet()
    cfg = stage_config(run, "ppo", "reward", "sft")
    kwargs = {k: cfg[k] for k in ("quantization", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant",
                                  "trust_remote_code", "chat_template") if k in cfg}
    base = base_model_name(run)
    print(f"{what}: loading base {base} ({kwargs.get('quantization', 'none')})", flush=True)
    model = MultiAdapterModel.from_pretrained(base, **kwargs)
    run.check_base(model.base_name, model.fingerprint)
    return model


def check_prompts_file(path: str) -> Path:
    """Fail before any model is loaded when the prompts file is missing."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise MarlError(f"prompts file {path} {what}: give a .txt (one prompt per line) or a "
                        "json/jsonl/csv/parquet file with a `prompt` column")
    return p


def read_prompts(path: str, tokenizer) -> list:
    """Prompts from a .txt file (one per line) or a json/jsonl/csv/parquet file with a prompt or text column
    (a `prompt` may be a conversation: a list of {role, content} messages)."""
    p = check_prompts_file(path)
    if p.suffix in (".txt", ""):
        texts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    else:
        texts = prompt_texts(load_split(str(p), "train", "ppo"), tokenizer)
    texts = [t for t in texts if (isinstance(t, str) and t.strip()) or (is_conversation(t) and t)]
    if not texts:
        raise MarlError(f"prompts file {path} has no prompts: put one prompt per line")
    return texts


# --------------------------------------------------------------------------- eval


def _ppo_args(run: RunDir, base: str):
    """The run's PPO settings (or the defaults, if it has no ppo stage yet) for prompts and sampling."""
    conf = stage_config(run, "ppo") or {k: v for k, v in stage_config(run, "reward", "sft").items()
                                        if k in ("quantization", "bnb_4bit_compute_dtype",
                                                 "bnb_4bit_use_double_quant", "trust_remote_code")}
    known = {f.name for f in dataclasses.fields(PPOArgs)}
    return PPOArgs(**{k: v for k, v in conf.items() if k in known} | {"run_dir": str(run.path),
                                                                         "model_name_or_path": base})


def _reward_source(run: RunDir, cfg) -> str:
    if run.adapter("reward").exists():
        return str(run.adapter("reward"))
    for name in run.adapter_names():
        if adapter_role(run, name) == "reward":
            return str(run.adapter(name))
    if cfg.reward_adapter not in (None, "", "auto", "none", "null"):
        return cfg.reward_adapter
    raise MarlError(f"{run.path} has no reward adapter: run `marl reward --run_dir {run.path}` first")


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)"


def prompt_display(prompt) -> str:
    """A prompt as one line of text: itself, or a conversation's messages as `role: content`."""
    return prompt if isinstance(prompt, str) else " / ".join(f"{m['role']}: {m['content']}" for m in prompt)


def eval_markdown(run: RunDir, results: dict, prompts: list[str], settings: dict) -> str:
    """eval.md: the metrics table, then the first samples of every adapter side by side, per prompt."""
    from .evaluate import markdown_table  # transformers: loaded only by the commands that generate

    lines = [f"# marl eval: {run.path}", "",
             ", ".join(f"{k} {v}" for k, v in settings.items()), "", markdown_table(results), ""]
    n = max((len(r["samples"]) for r in results.values()), default=0)
    if n:
        lines += ["## Samples", ""]
    for i in range(n):
        lines += [f"### Prompt {i + 1}", "", f"> {_cell(prompts[i])}", "", "| adapter | completion |", "| --- | --- |"]
        lines += [f"| {label} | {_cell(r['samples'][i])} |" for label, r in results.items() if i < len(r["samples"])]
        lines.append("")
    return "\n".join(lines)


def eval_command(argv: list[str]) -> int:
    p = _Parser(prog="marl eval", description="Held-out reward (mean, std), KL to the reference, response length, "
                "distinct-1/2 and repeated 4-grams of the text (over-optimisation shows there) and samples for the base, the sft adapter and every policy of a run, side by side. Writes "
                "RUN_DIR/eval.md and eval.json, prints the table, and redraws ppo_report.png from the metrics.")
    p.add_argument("run_dir", help="the run directory (holds adapters/ and manifest.json)")
    p.add_argument("--prompts", help="held-out prompts: .txt (one per line) or json/jsonl/csv/parquet with a "
                   "prompt/text column (default: the run's ppo eval split)")
    p.add_argument("--n", type=int, help="number of prompts (default: the ppo config's eval_prompts)")
    p.add_argument("--max_new_tokens", type=int, help="response length limit (default: the ppo config's)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the ppo config's)")
    p.add_argument("--seed", type=int, help="sampling seed (default: the ppo config's)")
    p.add_argument("--samples", type=int, default=3, help="sample completions shown per adapter (default 3)")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    if args.samples < 0:
        raise MarlError(f"--samples {args.samples}: give the number of sample completions to show, >= 0")
    from .evaluate import evaluate_adapters, markdown_table  # transformers: only for the commands that generate

    run = open_run(args.run_dir)
    cfg = _ppo_args(run, base_model_name(run))
    for key in ("max_new_tokens", "temperature", "seed"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    n = args.n if args.n is not None else cfg.eval_prompts
    if n < 1 or cfg.max_new_tokens < 1 or cfg.temperature <= 0:
        raise MarlError("--n and --max_new_tokens must be >= 1 and --temperature > 0")
    if args.prompts:
        check_prompts_file(args.prompts)
    reward = _reward_source(run, cfg)
    model = load_run_model(run, "eval")
    model.load_adapter(reward, "reward", role="reward",
                       score_index=cfg.reward_score_index if reward == cfg.reward_adapter else None)
    labels: dict[str, str | None] = {BASE: None}
    ref = None
    if run.adapter("sft").exists():
        ref = labels["sft"] = model.load_adapter(str(run.adapter("sft")), "sft", role="sft")
    for name in run.adapter_names():
        if adapter_role(run, name) == "policy":
            labels[name] = model.load_adapter(str(run.adapter(name)), name, role="policy")
    model.eval()

    texts = read_prompts(args.prompts, model.tokenizer) if args.prompts else held_out_prompts(cfg, model.tokenizer)
    ids, kept = encode_prompt_rows(model, texts[:n], cfg, "held-out")
    given = [texts[j] for j in kept]
    print(f"eval: {len(ids)} prompts x {len(labels)} adapters ({', '.join(labels)}), "
          f"max_new_tokens {cfg.max_new_tokens}", flush=True)
    results = evaluate_adapters(model, labels, ids, ref, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed,
                                n_samples=args.samples, text_group=cfg.prompts_per_policy, prompts=given)
    prompts = [prompt_display(t) for t in given]
    settings = {"base model": base_model_name(run), "reference": ref or "base (no sft adapter)",
                "reward": reward, "prompts": len(ids), "max_new_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "seed": cfg.seed}
    atomic_write_json(run.path / "eval.json", {"settings": settings, "prompts": prompts, "results": results})
    atomic_write_text(run.path / "eval.md", eval_markdown(run, results, prompts, settings) + "\n")
    print(markdown_table(results))
    pop = population(run)
    if pop is not None:
        print("\n" + population_markdown(pop))
    written = [run.path / "eval.md", run.path / "eval.json"]
    png = plot_ppo(run.read_metrics("ppo"), run.path / "ppo_report.png",
                   sft_distinct_2=results.get("sft", results[BASE]).get("distinct_2"))
    if png is not None:
        written.append(png)
    print(f"eval: wrote {', '.join(str(w) for w in written)}")
    return 0


# --------------------------------------------------------------------------- generate


def generate_command(argv: list[str]) -> int:
    """Several adapters of a run answer the same prompts in one mixed-adapter generate call."""
    args = _parse(_generate_parser(), argv)
    if isinstance(args, int):
        return args
    run = open_run(args.run_dir)
    adapters, hub = _check_generate(run, args)  # everything refusable, before the model loads
    model = load_run_model(run, "generate")
    loaded = _load_generators(model, run, adapters, hub)
    prompts = _generate_prompts(model, args)
    answers = _answers(model, args, prompts, [loaded.get(a) for a in adapters])
    width = max(len(a) for a in adapters)
    for i, prompt in enumerate(prompts):
        print(f"\n[{i + 1}] {prompt_display(prompt)}")
        for j, name in enumerate(adapters):
            print(f"  {name:<{width}} | {answers[j * len(prompts) + i].strip()}")
    if args.output:
        rows = [{"adapter": name, "prompt": prompt, "completion": answers[j * len(prompts) + i]}
                for i, prompt in enumerate(prompts) for j, name in enumerate(adapters)]
        atomic_write_text(Path(args.output).expanduser(), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                  for r in rows))
        print(f"\ngenerate: wrote {len(rows)} rows to {args.output}")
    return 0


def _generate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="marl generate", description="Several adapters of a run answer the same prompts in ONE "
                "mixed-adapter generate call; answers are printed grouped by prompt.")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME",
                   help="an adapter of the run, a Hub adapter id (user/name[/subfolder][@revision]), `base` for no "
                        "adapter, or `best` for the winner of the run's sweep (repeat for several)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", "--prompts_file", dest="prompts_file", metavar="FILE",
                     help=".txt (one per line) or json/jsonl/csv/parquet with a prompt column")
    p.add_argument("--chat", action="store_true", help="send each --prompt as a user message through the "
                   "model's chat template (instruct models); prompts files may hold conversations anyway")
    p.add_argument("--max_new_tokens", type=int, default=64, help="response length limit (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--top_k", type=int, default=0, help="top-k sampling (default 0: off)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--do_sample", dest="do_sample", action="store_true", default=True,
                      help="sample (the default)")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--output", metavar="FILE.jsonl", help="also write one JSON row per (adapter, prompt, "
                   "completion) to this file (written atomically, replacing it)")
    return p


def _check_generate(run: RunDir, args) -> tuple[list[str], list[str]]:
    """(the adapters to answer, those of them that are Hub ids); refuses a reward adapter, bad settings, a
    missing prompts file and an --output that is a folder."""
    adapters = list(dict.fromkeys(resolve_best(run, args.adapter)))
    known = run.adapter_names()
    hub = [a for a in adapters if a not in known and a != BASE and looks_like_hub_adapter(a)]
    check_adapters(run, [a for a in adapters if a not in hub], allow_base=True)
    for name in adapters:
        if name != BASE and name not in hub and adapter_role(run, name) == "reward":
            raise MarlError(f"{name!r} is the reward model, not a policy: generate with sft, a policy or base "
                            "(`marl eval` scores answers with it)")
    if args.max_new_tokens < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise MarlError("need --max_new_tokens >= 1, --temperature > 0, 0 < --top_p <= 1, --top_k >= 0")
    if args.prompts_file:
        check_prompts_file(args.prompts_file)
    if args.output and Path(args.output).expanduser().is_dir():
        raise MarlError(f"--output {args.output} is a folder: give a file name, e.g. generations.jsonl")
    return adapters, hub


def _load_generators(model, run: RunDir, adapters: list[str], hub: list[str]) -> dict[str, str]:
    """Load the adapters onto `model`: --adapter -> its name on the model (Hub ids are not valid module names;
    `base` is none); the model in eval mode."""
    loaded = {}
    for i, name in enumerate(adapters):
        if name in hub:
            loaded[name] = model.load_adapter(name, f"hub_{i}")  # same base checks as a local adapter
            if model.roles[loaded[name]] == "reward":
                raise MarlError(f"{name!r} is a reward adapter, not a policy: generate with sft, a policy or base")
        elif name != BASE:
            loaded[name] = model.load_adapter(str(run.adapter(name)), name, role=adapter_role(run, name))
    model.eval()
    return loaded


def _generate_prompts(model, args) -> list:
    """The prompts, from --prompt or --prompts-file; with --chat, text prompts become user messages."""
    prompts = read_prompts(args.prompts_file, model.tokenizer) if args.prompts_file else args.prompt
    if not all(t.strip() if isinstance(t, str) else t for t in prompts):
        raise MarlError("--prompt is empty: give some text")
    if args.chat:
        prompts = [[{"role": "user", "content": t}] if isinstance(t, str) else t for t in prompts]
    return prompts


def _answers(model, args, prompts: list, names: list[str | None]) -> list[str]:
    """Every prompt answered by every adapter of `names` (None: the bare base) in one generate call; the
    answers adapter by adapter (all prompts of the first, then of the second, ...), stop tokens dropped."""
    from .ppo.rollout import left_pad, response_mask  # transformers: only for the commands that generate

    encoded = [encode_prompt(model.tokenizer, t) for t in prompts]
    longest = max(len(e) for e in encoded)
    context = getattr(model.base.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and longest + args.max_new_tokens > context:
        raise MarlError(f"longest prompt ({longest} tokens) + --max_new_tokens "
                        f"{args.max_new_tokens} exceeds the model's context of {context}: shorten one of them")
    # rows grouped by adapter: the layout the stacked multi-LoRA path runs in one pass
    ids, mask = left_pad(encoded * len(names), model.tokenizer.pad_token_id, model.device)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample)  # stop tokens: the model's list
    if args.do_sample:
        gen.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    print(f"generate: {len(prompts)} prompts x {len(names)} adapters in one batch", flush=True)
    torch.manual_seed(args.seed)
    responses = model.generate(ids, mask, adapter_names=[n for n in names for _ in prompts], **gen)[:, ids.shape[1]:]
    keep = response_mask(responses, model.stop_token_ids).bool()
    stop = set(model.stop_token_ids)
    return [model.tokenizer.decode([t for t in r[k].tolist() if t not in stop], skip_special_tokens=True)
            for r, k in zip(responses, keep)]


# --------------------------------------------------------------------------- merge


def merge_command(argv: list[str]) -> int:
    p = _Parser(prog="marl merge", description="Fuse one adapter into the base and save a plain transformers "
                "model + tokenizer (AutoModelForCausalLM; AutoModelForSequenceClassification with the score head "
                "for the reward adapter) that loads without peft. A quantized base is merged in full precision.")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--adapter", required=True, metavar="NAME", help="the adapter to merge (e.g. policy_a; `best`: "
                   "the winner of the run's sweep)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the merged model to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (auto: bfloat16 for a bf16 run, else float32)")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    quiet()
    run = open_run(args.run_dir)
    args.adapter = resolve_best(run, [args.adapter])[0]
    check_adapters(run, [args.adapter])
    out = Path(args.out).expanduser()
    if out.resolve() == run.path.resolve() or out.resolve() in run.path.resolve().parents:
        raise MarlError(f"--out {out} would replace the run directory {run.path}: choose another folder")
    meta = adapter_meta(run, args.adapter)
    stage = meta.get("stage") or STAGE_OF_ROLE.get(adapter_role(run, args.adapter), "ppo")
    cfg = stage_config(run, stage)
    quant = cfg.get("quantization", "none")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if quant == "bf16" else "float32")
    if quant in ("4bit", "8bit"):
        print(f"merge: note: the run trained on a {quant} base; the merged model is full precision ({dtype}), "
              "the LoRA added to the original unquantized weights", flush=True)
    merge_adapter(run.adapter(args.adapter), base_model_name(run), out, dtype=dtype, overwrite=args.overwrite,
                  trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    return 0


# --------------------------------------------------------------------------- push


def push_command(argv: list[str]) -> int:
    p = _Parser(prog="marl push", description="Upload adapters to the Hugging Face Hub with everything needed to "
                "use them again: peft files, value/score head, marl_adapter.json and a generated model card. "
                "The token comes from HF_TOKEN or `hf auth login` and is never printed.")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME",
                   help="adapter to upload (repeat for several: one repo each, USER/NAME-<adapter>); `best`: the "
                        "winner of the run's sweep")
    p.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, metavar="USER/NAME",
                   help="the target repo")
    p.add_argument("--subfolders", action="store_true", help="several adapters: one repo, a folder per adapter")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    p.add_argument("--commit-message", "--commit_message", dest="commit_message", help="commit message")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="list what would be uploaded where; upload nothing (no token needed)")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    hub.check_repo_id(args.repo_id)
    run = open_run(args.run_dir)
    args.adapter = resolve_best(run, args.adapter)
    check_adapters(run, args.adapter)
    plans = hub.plan_push(run, args.adapter, args.repo_id, subfolders=args.subfolders, revision=args.revision)
    if args.dry_run:
        print("push: dry run, nothing is uploaded\n" + hub.describe_plan(plans, args.private, args.revision))
        return 0
    token = hub.hub_token()
    hub.push(plans, token, private=args.private, revision=args.revision, commit_message=args.commit_message)
    return 0


__all__ = ["eval_command", "generate_command", "merge_command", "push_command"]
