"""`marl eval | generate | merge | push --dry-run` on a tiny run with two PPO policies, and their bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from marl.cli import main
from marl.model import MultiAdapterModel

from .ppo.test_trainer import ppo_args

TEXTS = ["This movie was wonderful and touching.", "A dull, boring film.", "It was okay I guess"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, tiny_run, tiny_model_dir):
    """A copy of tiny_run (sft + reward) plus policy_a and policy_b after one PPO step."""
    from pipelines import ppo

    run = tmp_path_factory.mktemp("cmd") / "run"
    shutil.copytree(tiny_run, run)
    ppo.run(ppo_args(run, tiny_model_dir, run, total_steps=1, eval_prompts=2, max_new_tokens=4))
    return run


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("marl: error: "), err
    return err


def test_eval_prints_and_writes_the_table_for_base_sft_and_each_policy(ppo_run, capsys):
    (ppo_run / "ppo_report.png").unlink()
    assert main(["eval", str(ppo_run), "--n", "3", "--max_new_tokens", "4", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("base", "sft", "policy_a", "policy_b"):
        assert f"| {label} |" in out
    assert "reward" not in [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    data = json.loads((ppo_run / "eval.json").read_text())
    assert set(data["results"]) == {"base", "sft", "policy_a", "policy_b"}
    for r in data["results"].values():
        assert r["n"] == 3 and len(r["samples"]) == 2
        assert {"reward_mean", "reward_std", "kl_mean", "length_mean"} <= set(r)
    assert data["results"]["sft"]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # sft is the reference
    md = (ppo_run / "eval.md").read_text()
    assert "| adapter | reward_mean |" in md and "### Prompt 2" in md and "| policy_b |" in md
    assert (ppo_run / "ppo_report.png").stat().st_size > 0


def test_eval_takes_a_prompts_file(ppo_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The film was\n\nMy favourite part |was\n")
    assert main(["eval", str(ppo_run), "--prompts", str(prompts), "--max_new_tokens", "3", "--seed", "1"]) == 0
    data = json.loads((ppo_run / "eval.json").read_text())
    assert data["prompts"] == ["The film was", "My favourite part |was"]
    assert data["settings"]["seed"] == 1 and data["results"]["policy_a"]["n"] == 2
    assert "My favourite part \\|was" in (ppo_run / "eval.md").read_text()  # escaped in the table


def test_generate_answers_with_all_adapters_in_one_mixed_batch(ppo_run, capsys, monkeypatch):
    calls = []
    original = MultiAdapterModel.generate

    def spy(self, input_ids, attention_mask, adapter_names=None, **kw):
        calls.append(list(adapter_names))
        return original(self, input_ids, attention_mask, adapter_names=adapter_names, **kw)

    monkeypatch.setattr(MultiAdapterModel, "generate", spy)
    rc = main(["generate", str(ppo_run), "--adapter", "policy_a", "--adapter", "base", "--adapter", "sft",
               "--prompt", "The movie was", "--prompt", "I watched it and", "--max_new_tokens", "5",
               "--temperature", "0.7", "--top_p", "0.9", "--top_k", "20"])
    out = capsys.readouterr().out
    assert rc == 0
    assert calls == [["policy_a"] * 2 + [None] * 2 + ["sft"] * 2]  # one call, rows grouped by adapter
    assert out.index("[1] The movie was") < out.index("[2] I watched it and")
    block = out.split("[2] I watched it and")[1].splitlines()[1:4]
    assert [line.split("|")[0].strip() for line in block] == ["policy_a", "base", "sft"]


def test_generate_sends_chat_prompts_through_the_template(ppo_run, tmp_path, capsys, monkeypatch):
    """--chat wraps each --prompt as a user message; a prompts file may hold conversations; both go through the
    tokenizer's chat template with the generation prompt."""
    seen = []
    original = MultiAdapterModel.generate

    def spy(self, input_ids, attention_mask, adapter_names=None, **kw):
        seen.append(self.tokenizer.decode(input_ids[0][attention_mask[0].bool()]))
        return original(self, input_ids, attention_mask, adapter_names=adapter_names, **kw)

    monkeypatch.setattr(MultiAdapterModel, "generate", spy)
    assert main(["generate", str(ppo_run), "--adapter", "sft", "--prompt", "The movie was", "--chat",
                 "--max_new_tokens", "3"]) == 0
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "The movie was"}]}) + "\n")
    assert main(["generate", str(ppo_run), "--adapter", "sft", "--prompts-file", str(f), "--max_new_tokens", "3"]) == 0
    assert seen == ["<s>User: The movie was\nAssistant:", "<s>System: Be brief.\nUser: The movie was\nAssistant:"]
    assert "[1] system: Be brief. / user: The movie was" in capsys.readouterr().out


def _answers(out: str) -> dict[str, list[str]]:
    """adapter -> its answer to each prompt, from generate's output."""
    answers: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("  "):
            name, text = line.split("|", 1)
            answers.setdefault(name.strip(), []).append(text.strip())
    return answers


def test_greedy_mixed_batch_gives_each_adapter_its_own_answer(ppo_run, tiny_model_dir, tmp_path, capsys):
    """In one batch, each row must be answered by its own adapter: same as asking that adapter alone,
    also when the adapters have different LoRA ranks (sft r=16, policy_r4 r=4)."""
    from marl.config import PPOArgs

    run = tmp_path / "run"
    shutil.copytree(ppo_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    model.add_adapter("policy_r4", PPOArgs(lora_r=4).lora_config(dropout=0.0))
    with torch.no_grad():
        for p in model.trainable_parameters("policy_r4"):
            p.normal_(0.0, 0.5)
    model.save_adapter("policy_r4", run / "adapters/policy_r4")

    args = ["--prompt", "The movie was", "--prompt", "I watched it", "--max_new_tokens", "6", "--greedy"]
    for group in (["policy_a", "base", "sft"], ["sft", "policy_r4", "base"]):
        assert main(["generate", str(run), *[x for a in group for x in ("--adapter", a)], *args]) == 0
        mixed = _answers(capsys.readouterr().out)
        for name in group:
            assert main(["generate", str(run), "--adapter", name, *args]) == 0
            assert _answers(capsys.readouterr().out)[name] == mixed[name], name


def test_generate_output_writes_one_json_row_per_adapter_and_prompt(ppo_run, tmp_path, capsys):
    out = tmp_path / "gen" / "rows.jsonl"
    assert main(["generate", str(ppo_run), "--adapter", "policy_a", "--adapter", "sft", "--prompt", "The movie was",
                 "--prompt", "I watched it", "--max_new_tokens", "4", "--greedy", "--output", str(out)]) == 0
    printed = _answers(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["adapter"], r["prompt"]) for r in rows] == [("policy_a", "The movie was"), ("sft", "The movie was"),
                                                           ("policy_a", "I watched it"), ("sft", "I watched it")]
    assert {a: [r["completion"].strip() for r in rows if r["adapter"] == a] for a in printed} == printed
    assert [p.name for p in out.parent.iterdir()] == ["rows.jsonl"]  # written through a temp file and a rename


def test_ppo_rerun_is_up_to_date_with_the_same_settings_and_names_the_keys_otherwise(ppo_run, tiny_model_dir,
                                                                                    capsys):
    from marl.errors import MarlError
    from pipelines import ppo

    before = {p: p.read_bytes() for p in ppo_run.rglob("*") if p.is_file()}
    recorded = json.loads((ppo_run / "manifest.json").read_text())["stages"]["ppo"]["results"]
    same = ppo_args(ppo_run, tiny_model_dir, ppo_run, total_steps=1, eval_prompts=2, max_new_tokens=4,
                    torch_threads=1, log_samples=3)  # how it runs and logs does not count
    assert ppo.run(same) == recorded
    assert f"ppo: up to date: {ppo_run / 'adapters/policy_a'}, {ppo_run / 'adapters/policy_b'}" in \
        capsys.readouterr().out
    with pytest.raises(MarlError, match=r"made with other settings \(kl_coef: 0.05 -> 0.2\).*--overwrite true"):
        ppo.run(ppo_args(ppo_run, tiny_model_dir, ppo_run, total_steps=1, eval_prompts=2, max_new_tokens=4,
                         kl_coef=0.2))
    assert {p: p.read_bytes() for p in ppo_run.rglob("*") if p.is_file()} == before


def test_merged_policy_matches_the_adapter_model(ppo_run, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", str(ppo_run), "--adapter", "policy_a", "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())

    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    model.load_adapter(str(ppo_run / "adapters/policy_a"), "policy_a")
    model.eval()
    ids = model.tokenizer("The movie was great and I", return_tensors="pt")["input_ids"]
    with torch.no_grad(), model.use_adapter("policy_a"):
        expected = model(ids, torch.ones_like(ids)).logits
    with torch.no_grad(), model.use_adapter(None):
        base = model(ids, torch.ones_like(ids)).logits
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - base).abs().max() > 1e-4  # the merge changed the weights

    capsys.readouterr()
    assert main(["merge", str(ppo_run), "--adapter", "policy_a", "--out", str(out)]) == 2
    assert "already exists: pass --overwrite" in _one_line_error(capsys)
    assert main(["merge", str(ppo_run), "--adapter", "policy_a", "--out", str(out), "--overwrite"]) == 0


def test_merged_reward_model_gives_the_reward_adapter_scores(ppo_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    assert main(["merge", str(ppo_run), "--adapter", "reward", "--out", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    model.load_adapter(str(ppo_run / "adapters/reward"), "reward", role="reward")
    expected = model.score_texts(TEXTS)
    eos = model.tokenizer.eos_token
    with torch.no_grad():
        got = torch.stack([merged(**model.tokenizer(t + eos, return_tensors="pt")).logits[0, 0] for t in TEXTS])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_merging_a_quantized_run_says_the_result_is_full_precision(ppo_run, tmp_path, capsys):
    run = tmp_path / "q"
    shutil.copytree(ppo_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["sft"]["config"]["quantization"] = "4bit"
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["merge", str(run), "--adapter", "sft", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "4bit base; the merged model is full precision (float32)" in out
    assert json.loads((tmp_path / "m/marl_merged.json").read_text())["dtype"] == "float32"


def test_push_dry_run_lists_every_file_and_needs_no_token(tiny_run, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["push", str(tiny_run), "--adapter", "reward", "--adapter", "sft", "--repo-id", "me/run",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("reward", "sft"):
        for f in ("adapter_config.json", "adapter_model.safetensors", "marl_adapter.json"):
            assert re.search(rf"{tiny_run}/adapters/{name}/{f} +-> +me/run-{name}/{f} ", out)
        assert re.search(rf"\(generated model card\) +-> +me/run-{name}/README.md ", out)
    assert "me/run-reward/README.md" in out and "nothing is uploaded" in out

    assert main(["push", str(tiny_run), "--adapter", "reward", "--adapter", "sft", "--repo-id", "me/run",
                 "--subfolders", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "me/run/reward/adapter_model.safetensors" in out and "me/run/sft/README.md" in out
    assert "me/run/README.md" in out and "me/run-" not in out


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}/nope"], "run directory {tmp}/nope does not exist"),
    (["eval", "{empty}"], "has no adapters"),
    (["push", "{empty}", "--adapter", "sft", "--repo-id", "me/x"], "has no adapters"),
    (["generate", "{run}", "--adapter", "nope", "--prompt", "hi"], "unknown adapter 'nope': {run} has reward, sft"),
    (["generate", "{run}", "--adapter", "reward", "--prompt", "hi"], "'reward' is the reward model, not a policy"),
    (["merge", "{run}", "--adapter", "nope", "--out", "{tmp}/m"], "unknown adapter 'nope'"),
    (["push", "{run}", "--adapter", "nope", "--repo-id", "me/x", "--dry-run"], "unknown adapter 'nope'"),
    (["push", "{run}", "--adapter", "sft", "--repo-id", "noslash", "--dry-run"], "is not USER/NAME"),
    (["push", "{run}", "--adapter", "sft", "--repo-id", "a/b/c"], "is not USER/NAME"),
    (["push", "{run}", "--adapter", "sft", "--repo-id", "me/bad name"], "is not USER/NAME"),
    (["generate", "{run}", "--adapter", "sft"], "one of the arguments --prompt --prompts-file"),
    (["generate", "{run}", "--adapter", "sft", "--prompts-file", "{tmp}/none.txt"], "prompts file"),
    (["merge", "{run}", "--adapter", "sft", "--out", "{run}"], "would replace the run directory"),
    (["eval", "{run}", "--bogus"], "unrecognized arguments: --bogus"),
    (["eval", "{run}", "--samples", "-1"], "--samples -1: give the number of sample completions to show, >= 0"),
    (["eval", "{run}", "--prompts", "{empty}"], "prompts file {empty} is a folder, not a file"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fill = dict(tmp=tmp_path, empty=tmp_path / "empty", run=tiny_run)
    before = sorted(p.name for p in tiny_run.rglob("*"))
    assert main([a.format(**fill) for a in argv]) == 2
    assert message.format(**fill) in _one_line_error(capsys)
    assert sorted(p.name for p in tiny_run.rglob("*")) == before


@pytest.mark.parametrize("command", ["eval", "generate", "merge", "push"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: marl {command}" in capsys.readouterr().out
