"""Every bad input and every refusal of the machine is one line, the last on stderr, exit code 2;
nothing saved before is changed; a finished stage re-run with the same settings is "up to date".

One test per row of issue 12's table, in its order, then the guarantees around them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marl.cli import main
from marl.errors import from_environment

ROOT = Path(__file__).resolve().parents[1]
# the settings tests/conftest.py's stage_args gives tiny_run, as command-line overrides
SMALL = ["--max_steps", "3", "--max_train_samples", "64", "--per_device_train_batch_size", "8", "--max_length", "64",
         "--report_to", "none", "--logging_steps", "1", "--save_steps", "1000", "--learning_rate", "1e-3"]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path; the writer's lock (.marl.lock, which names the
    process holding it) is not saved work."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != ".marl.lock"}


def assert_kept(folder: Path, before: dict[str, str]) -> None:
    after = snapshot(folder)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"changed or lost: {changed}"


def one_line_error(capsys, *needles: str) -> str:
    """The last stderr line is the error; it names every needle; no traceback was printed."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("marl: error: "), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in last, last
    return last


@pytest.fixture
def run_copy(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


# --------------------------------------------------------------------------- the table, row by row


def test_empty_jsonl_dataset_is_one_line(tmp_path, tiny_model_dir, capsys):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n")):  # datasets 5: StopIteration on the 2nd
        (tmp_path / name).write_text(text)
        rc = main(["sft", "--dataset_name", str(tmp_path / name), "--model_name_or_path", tiny_model_dir,
                   "--run_dir", str(tmp_path / "run")])
        assert rc == 2
        one_line_error(capsys, f"dataset '{tmp_path / name}' is empty: give a dataset with rows")
    assert not (tmp_path / "run").exists()


def test_truncated_adapter_weights_are_one_line(run_copy, capsys):
    weights = run_copy / "adapters/sft/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(run_copy)
    rc = main(["generate", str(run_copy), "--adapter", "sft", "--prompt", "The movie was", "--max_new_tokens", "2"])
    assert rc == 2
    one_line_error(capsys, str(weights), "is not a readable safetensors file", "truncated or corrupt")
    assert_kept(run_copy, before)


@pytest.mark.parametrize("name", ["adapters/sft/adapter_config.json",  # read by peft
                                  "adapters/sft/marl_adapter.json", "manifest.json"])  # read by marl
def test_a_json_file_of_a_run_cut_short_is_one_line_naming_it(run_copy, capsys, name):
    cut = run_copy / name
    cut.write_bytes(cut.read_bytes()[:30])
    before = snapshot(run_copy)
    rc = main(["generate", str(run_copy), "--adapter", "sft", "--prompt", "The movie was", "--max_new_tokens", "2"])
    assert rc == 2  # JSONDecodeError traceback before
    one_line_error(capsys, f"{cut} is not valid JSON (", "it was cut short or edited; restore it or save it again")
    assert_kept(run_copy, before)


def test_a_trainer_checkpoint_whose_marker_is_cut_short_is_incomplete(tmp_path):
    from marl.run import CHECKPOINT_DONE, RunDir

    run = RunDir(tmp_path)
    for step, marker in ((1, '{"step": 1, "files": {}}'), (2, '{"step": 2, "fi')):
        folder = run.checkpoints("sft") / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / CHECKPOINT_DONE).write_text(marker)
    complete, incomplete = run.trainer_checkpoints("sft")
    assert [p.name for p in complete] == ["checkpoint-1"] and [p.name for p in incomplete] == ["checkpoint-2"]


def test_model_folder_without_weights_is_one_line(tmp_path, tiny_model_dir, tiny_run, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", folder)
    for stage in ("sft", "reward"):
        assert main([stage, "--model_name_or_path", str(folder), "--run_dir", str(tmp_path / "run"), *SMALL]) == 2
        one_line_error(capsys, f"model folder {folder} has config.json but no weights")
    assert main(["ppo", "--model_name_or_path", str(folder), "--run_dir", str(tmp_path / "run"),
                 "--reward_adapter", str(tiny_run / "adapters/reward")]) == 2
    one_line_error(capsys, f"model folder {folder} has config.json but no weights")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_unknown_hub_model_offline_is_one_line(tmp_path, tiny_run, monkeypatch, capsys, stage):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = [stage, "--model_name_or_path", "someone/nonexistent-model", "--run_dir", str(tmp_path / "run")]
    argv += ["--reward_adapter", str(tiny_run / "adapters/reward")] if stage == "ppo" else SMALL
    assert main(argv) == 2
    one_line_error(capsys, "'someone/nonexistent-model' is not in the local Hugging Face cache", "give a local folder")
    assert not (tmp_path / "run").exists()


def test_csv_with_invalid_utf8_is_one_line(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "data.csv"
    bad.write_bytes(b"text\nA fine film.\n\xff\xfe caf\xe9 au lait\n")
    rc = main(["sft", "--dataset_name", str(bad), "--model_name_or_path", tiny_model_dir,
               "--run_dir", str(tmp_path / "run")])
    assert rc == 2
    one_line_error(capsys, f"dataset file {bad} is not valid UTF-8", "save it as UTF-8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage, rows, message", [
    ("sft", [{"text": "A fine film."}, {"text": None}, {"label": 1}], "2 of 3 rows have no 'text'"),
    ("reward", [{"chosen": "Good.", "rejected": "Bad."}, {"chosen": "Fine."}], "1 of 2 rows have no 'rejected'"),
])
def test_rows_without_a_value_the_stage_needs_are_one_line(tmp_path, tiny_model_dir, capsys, stage, rows, message):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main([stage, "--dataset_name", str(data), "--model_name_or_path", tiny_model_dir,
               "--run_dir", str(tmp_path / "run")])
    assert rc == 2
    one_line_error(capsys, f"dataset '{data}': {message}: fill those rows or remove them")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage, rows, message", [  # TRL's AttributeError / ValueError deep inside before
    ("sft", [{"text": 5}, {"text": 7}], "column 'text' holds int64 values, `marl sft` needs text"),
    ("sft", [{"messages": ["hi", "there"]}], "column 'messages' holds list<item: string> values, `marl sft` needs "
                                             "a list of {role, content} messages"),
    ("reward", [{"chosen": 1, "rejected": 2}], "column 'chosen' holds int64 values, `marl reward` needs text (or a "
                                               "list of {role, content} messages)"),
])
def test_a_column_of_the_wrong_type_is_one_line(tmp_path, tiny_model_dir, capsys, stage, rows, message):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main([stage, "--dataset_name", str(data), "--model_name_or_path", tiny_model_dir,
               "--run_dir", str(tmp_path / "run")])
    assert rc == 2
    one_line_error(capsys, f"dataset '{data}': {message}: convert the column or pick another dataset")


def test_a_text_field_the_dataset_lacks_is_one_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "A fine film."}\n{"text": "A dull film."}\n')
    rc = main(["sft", "--dataset_name", str(data), "--dataset_text_field", "body", "--model_name_or_path",
               tiny_model_dir, "--run_dir", str(tmp_path / "run")])
    assert rc == 2  # TRL's KeyError: 'body' before
    one_line_error(capsys, "has columns ['text'] but `marl sft` needs body or messages or prompt+completion")


def test_reward_pairs_all_longer_than_max_length_are_one_line(tmp_path, tiny_model_dir, capsys):
    rc = main(["reward", "--model_name_or_path", tiny_model_dir, "--run_dir", str(tmp_path / "run"), *SMALL,
               "--max_length", "4"])
    assert rc == 2  # TRL drops them all; the sampler's ValueError num_samples=0 before
    one_line_error(capsys, "every training pair is longer than max_length=4 tokens: raise --max_length")
    assert not (tmp_path / "run" / "adapters").exists()


@pytest.mark.parametrize("stage", ["sft", "ppo"])
@pytest.mark.parametrize("tracker, message", [
    ("wandb", "report_to: wandb is not installed: pip install wandb, or --report_to none"),
    ("tensorbored", "report_to: 'tensorbored' is not a tracker marl knows: use tensorboard, wandb,"),
])
def test_a_tracker_that_is_unknown_or_not_installed_is_one_line_before_the_model_loads(monkeypatch, capsys, stage,
                                                                                      tracker, message):
    import importlib.util

    from marl import model

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "load_base", no_load)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert main([stage, "--report_to", tracker]) == 2  # the Trainer's RuntimeError / ValueError before
    one_line_error(capsys, message)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "foothing"}, "has model type `foothing` but Transformers does not recognize this architecture"),
    ({"model_type": "xthing", "auto_map": {"AutoConfig": "configuration_x.XConfig"}},
     "contains custom code which must be executed"),
])
def test_a_model_transformers_cannot_build_is_one_line(tmp_path, tiny_model_dir, capsys, change, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    assert main(["sft", "--model_name_or_path", str(folder), "--run_dir", str(tmp_path / "run"), *SMALL]) == 2
    last = one_line_error(capsys, message)  # transformers' ValueError traceback before
    assert last.endswith(("pip install -U transformers, or check model_type in the model's config.json",
                          "pass --trust_remote_code true if you trust that code"))
    assert ".:" not in last


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_quantization_without_bitsandbytes_is_one_line_before_the_model_loads(monkeypatch, capsys, stage):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    assert main([stage, "--quantization", "4bit"]) == 2  # transformers' ImportError while loading before
    one_line_error(capsys, "quantization: 4bit needs bitsandbytes: pip install bitsandbytes, or --quantization none")


def test_model_folder_without_a_tokenizer_is_one_line(tmp_path, tiny_model_dir, capsys):
    import importlib.util

    if importlib.util.find_spec("sentencepiece") or importlib.util.find_spec("tiktoken"):
        pytest.skip("with sentencepiece or tiktoken, transformers tries the slow tokenizer instead")
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("tokenizer*", "*.jinja"))
    assert main(["sft", "--model_name_or_path", str(folder), "--run_dir", str(tmp_path / "run"), *SMALL]) == 2
    one_line_error(capsys, "the model's tokenizer could not be loaded (no tokenizer.json",
                   "copy the base model's tokenizer files into its folder")


@pytest.mark.parametrize("argv, message", [
    (["ppo", "--learning_rate", "-1"], "learning_rate: -1.0 must be > 0"),
    (["ppo", "--total_steps", "0"], "total_steps: 0 must be >= 1"),
    (["ppo", "--mini_batch_size", "0"], "mini_batch_size: 0 must be >= 1"),
    (["ppo", "--max_new_tokens", "0"], "max_new_tokens: 0 must be >= 1"),
    (["ppo", "--temperature", "0"], "temperature: 0.0 must be > 0"),
    (["ppo", "--policies", "[{name: policy_a, learning_rate: -0.1}]"], "policies[policy_a]: learning_rate: -0.1"),
    (["sft", "--max_steps", "0"], "max_steps: 0 must be >= 1, or -1"),
    (["sft", "--max_length", "0"], "max_length: 0 must be > 0"),
    (["reward", "--gradient_accumulation_steps", "0"], "gradient_accumulation_steps: 0 must be >= 1"),
    (["reward", "--learning_rate", "0"], "learning_rate: 0.0 must be > 0"),
    (["sft", "--seed", "-1"], "seed: -1 must be in [0, 2**31)"),  # numpy's ValueError before
    (["sft", "--lr_scheduler_type", "cosine_decay"], "lr_scheduler_type: 'cosine_decay' must be one of linear, "),
    (["sft", "--weight_decay", "-0.1"], "weight_decay: -0.1 must be >= 0"),
    (["ppo", "--kl_coef", "-1"], "kl_coef: -1.0 must be >= 0"),  # the KL controller's ValueError before
    (["ppo", "--policies", "[{name: policy_a, kl_coef: -1, kl_target: null}]"],  # a fixed coefficient
     "policies[policy_a]: kl_coef: -1 must be a number >= 0"),
    (["ppo", "--vf_coef", "-1"], "vf_coef: -1.0 must be >= 0"),  # these trained silently before
    (["ppo", "--reward_clip", "-1"], "reward_clip: -1.0 must be > 0"),
    (["ppo", "--missing_eos_penalty", "-1"], "missing_eos_penalty: -1.0 must be >= 0"),
    (["ppo", "--kl_bound", "0"], "kl_bound: 0.0 must be > 0"),
    (["ppo", "--grace", "-1"], "grace: -1 must be >= 0"),
    (["ppo", "--sweep", "{grid: {learning_rate: [1.0e-4, 1.0e-3]}}", "--schedule", "halving", "--grace", "20",
      "--total_steps", "20"], "grace: 20 >= total_steps (20): schedule halving would never act"),
])
def test_bad_config_values_fail_before_any_model_loads(monkeypatch, capsys, argv, message):
    from marl import model

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "load_base", no_load)
    assert main(argv) == 2
    one_line_error(capsys, message)


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_lengths_past_the_model_context_are_one_line_before_the_model_loads(tmp_path, tiny_model_dir, tiny_run,
                                                                           capsys, monkeypatch, stage):
    from marl import model
    from marl.stages import reward

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "load_base", no_load)
    monkeypatch.setattr(reward, "load_base", no_load)
    context = json.loads((Path(tiny_model_dir) / "config.json").read_text())["max_position_embeddings"]
    argv = [stage, "--model_name_or_path", tiny_model_dir, "--run_dir", str(tmp_path / "run")]
    if stage == "ppo":
        argv += ["--reward_adapter", str(tiny_run / "adapters/reward"), "--max_prompt_length", str(context - 1),
                 "--max_new_tokens", "2"]
        message = f"max_prompt_length + max_new_tokens = {context + 1} exceeds the model's context of {context} " \
                  "tokens: lower one of them"
    else:
        argv += [*SMALL, "--max_length", str(context + 1)]
        message = f"max_length = {context + 1} exceeds the model's context of {context} tokens: set --max_length " \
                  f"{context} or less"
    assert main(argv) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "run" / "adapters").exists()


def _fail_on_call(n: int, exc: BaseException, before: dict, run: Path, skip: str | None = None):
    """A stand-in that raises `exc` on its n-th call, after recording every file saved so far."""
    calls = []

    def fake(original):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                before.update({k: v for k, v in snapshot(run).items() if not (skip and k.startswith(skip))})
                raise exc
            return original(*args, **kwargs)
        return wrapper
    return fake


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_disk_full_during_a_trainer_checkpoint_loses_nothing_and_resume_works(tmp_path, tiny_model_dir, capsys,
                                                                             monkeypatch, stage):
    from transformers import Trainer

    run = tmp_path / "run"
    argv = [stage, "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), *SMALL, "--save_steps", "1"]
    before: dict = {}
    full = OSError(errno.ENOSPC, "No space left on device",
                   str(run / f"checkpoints/{stage}/checkpoint-2/optimizer.pt"))
    wrap = _fail_on_call(2, full, before, run, skip=f"checkpoints/{stage}/checkpoint-2")
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", wrap(Trainer._save_optimizer_and_scheduler))
    assert main(argv) == 2
    one_line_error(capsys, "no space left on device while writing", "then resume with --resume true (from",
                   "checkpoint-1)", "files saved before are kept")
    assert f"checkpoints/{stage}/checkpoint-1/marl_checkpoint.json" in before
    assert_kept(run, before)
    assert not (run / f"checkpoints/{stage}/checkpoint-2").exists()  # nothing half-made is left
    assert not (run / f"adapters/{stage}").exists()
    monkeypatch.undo()

    # a save cut short without a chance to clean up (kill -9): --resume skips it and says so
    half = run / f"checkpoints/{stage}/checkpoint-2"
    shutil.copytree(run / f"checkpoints/{stage}/checkpoint-1", half)
    (half / "marl_checkpoint.json").unlink()
    (half / "trainer_state.json").unlink()
    assert main(argv + ["--resume", "true"]) == 0
    out = capsys.readouterr().out
    assert f"{stage}: removed incomplete checkpoint-2 (a save that did not finish); resuming from checkpoint-1" in out
    assert (run / f"adapters/{stage}/adapter_model.safetensors").exists()
    state = json.loads((run / f"checkpoints/{stage}/checkpoint-3/trainer_state.json").read_text())
    assert state["global_step"] == 3
    mask = os.umask(0o022)
    os.umask(mask)
    for p in (run / f"checkpoints/{stage}/checkpoint-3").rglob("*"):  # safetensors alone would make them 600
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_resume_without_a_checkpoint_fails_before_anything_loads(tmp_path, tiny_model_dir, capsys, stage):
    run = tmp_path / "run"
    assert main([stage, "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), *SMALL, "--resume", "true"]) == 2
    one_line_error(capsys, f"--resume true but {run / 'checkpoints' / stage} has no complete checkpoint: run without "
                           "--resume")
    assert not run.exists()


def test_disk_full_while_replacing_an_adapter_keeps_the_old_one(run_copy, tiny_model_dir, capsys, monkeypatch):
    from marl import model_io

    before = snapshot(run_copy)
    old_metrics = (run_copy / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(model_io, "save_tensors", _fail_on_call(1, OSError(errno.ENOSPC, "No space left on device"),
                                                                {}, run_copy)(model_io.save_tensors))
    rc = main(["sft", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run_copy), *SMALL, "--max_steps", "1",
               "--overwrite", "true"])
    assert rc == 2
    one_line_error(capsys, "no space left on device")
    assert (run_copy / "metrics.jsonl").read_bytes().startswith(old_metrics)  # the log is only appended to
    before.pop("metrics.jsonl")
    assert_kept(run_copy, before)
    assert not [p for p in (run_copy / "adapters").iterdir() if p.name.startswith(".")]  # no temp folders left


def _disk_full_under(folder: Path, original):
    """`original` (a save function) that raises ENOSPC instead of writing anywhere under `folder`."""
    def wrapper(*args, **kwargs):
        if any(str(a).startswith(str(folder)) for a in (*args, *kwargs.values()) if isinstance(a, (str, Path))):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_disk_full_while_saving_the_adapter_leaves_nothing_half_made_and_resume_finishes(
        tmp_path, tiny_model_dir, capsys, monkeypatch, stage):
    import peft.peft_model

    from marl import model_io

    run = tmp_path / "run"
    argv = [stage, "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), *SMALL]
    if stage == "sft":  # marl saves the sft adapter; the reward adapter is saved by peft, as TRL does
        monkeypatch.setattr(model_io, "save_tensors", _disk_full_under(run / "adapters", model_io.save_tensors))
    else:
        monkeypatch.setattr(peft.peft_model, "safe_save_file",
                            _disk_full_under(run / "adapters", peft.peft_model.safe_save_file))
    assert main(argv) == 2
    last = one_line_error(capsys, "no space left on device while writing",
                          f"then resume with --resume true (from {run / 'checkpoints' / stage / 'checkpoint-3'})")
    assert last.endswith("files saved before are kept")
    assert list((run / "adapters").iterdir()) == []  # no adapter folder, finished or half-made
    assert not (run / "manifest.json").exists()  # the stage is not recorded as done
    before = snapshot(run / "checkpoints")
    monkeypatch.undo()

    assert main(argv + ["--resume", "true"]) == 0  # the checkpoint is at the last step: only the save is left
    assert (run / f"adapters/{stage}/adapter_model.safetensors").exists()
    assert stage in json.loads((run / "manifest.json").read_text())["stages"]
    assert_kept(run / "checkpoints", before)


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_disk_full_while_recording_the_stage_and_the_suggested_resume_finishes(tmp_path, tiny_model_dir, capsys,
                                                                               monkeypatch, stage):
    from marl import run as run_module

    run = tmp_path / "run"
    argv = [stage, "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), *SMALL]
    monkeypatch.setattr(run_module, "atomic_write_json",
                        _disk_full_under(run / "manifest.json", run_module.atomic_write_json))
    assert main(argv) == 2  # the adapter is saved, the manifest cannot be written
    one_line_error(capsys, "no space left on device while writing", "then resume with --resume true")
    assert (run / f"adapters/{stage}").exists() and not (run / "manifest.json").exists()
    monkeypatch.undo()

    assert main(argv + ["--resume", "true"]) == 0
    assert stage in json.loads((run / "manifest.json").read_text())["stages"]
    assert main(argv) == 0  # and now it is up to date
    assert f"{stage}: up to date" in capsys.readouterr().out


def test_disk_full_in_ppo_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, tiny_run, tiny_model_dir, capsys,
                                                                       monkeypatch):
    from marl import model_io
    from marl.ppo.trainer import MultiPolicyPPOTrainer

    run = tmp_path / "run"
    latest = run / "checkpoints/ppo/latest"
    argv = ["ppo", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), "--report_to", "none",
            "--reward_adapter", str(tiny_run / "adapters/reward"), "--sft_adapter", str(tiny_run / "adapters/sft"),
            "--total_steps", "2", "--save_steps", "1", "--prompts_per_policy", "2", "--mini_batch_size", "2",
            "--eval_prompts", "2", "--eval_samples_per_prompt", "1", "--max_new_tokens", "2", "--lora_r", "4",
            "--policies", "[{name: policy_a}, {name: policy_b}]"]
    saved: dict = {}
    save_checkpoint = MultiPolicyPPOTrainer.save_checkpoint

    def second_save_fails(self, folder, extra=None):  # the disk fills up after policy_a of the step-2 checkpoint is written
        if (folder / "state.json").exists():
            saved.update(snapshot(run))
            monkeypatch.setattr(model_io, "save_tensors", _disk_full_under(folder.parent, model_io.save_tensors))
        return save_checkpoint(self, folder, extra)

    monkeypatch.setattr(MultiPolicyPPOTrainer, "save_checkpoint", second_save_fails)
    assert main(argv) == 2
    one_line_error(capsys, "no space left on device while writing", f"then resume with --resume true (from {latest})")
    assert_kept(run, {k: v for k, v in saved.items() if k != "metrics.jsonl"})  # the step-1 checkpoint
    assert json.loads((latest / "state.json").read_text())["step"] == 1
    assert os.listdir(latest.parent) == ["latest"] and not (run / "adapters").exists()  # nothing half-made
    monkeypatch.undo()

    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "ppo", "step": 2, "policy_a/rew')  # the disk also cut the step-2 record short
    policy_b_temp = run / "adapters/.policy_b"  # the temp folder policy_b is written into, then renamed
    monkeypatch.setattr(model_io, "save_tensors", _disk_full_under(policy_b_temp, model_io.save_tensors))
    assert main(argv + ["--resume", "true"]) == 2  # now the disk fills up while the policies are written
    one_line_error(capsys, "no space left on device while writing", f"then resume with --resume true (from {latest})")
    assert sorted(os.listdir(run / "adapters")) == ["policy_a"] and not (run / "manifest.json").exists()
    monkeypatch.undo()

    assert main(argv + ["--resume", "true"]) == 0
    assert f"ppo: resumed from {latest} at step 2" in capsys.readouterr().out
    assert sorted(os.listdir(run / "adapters")) == ["policy_a", "policy_b"]
    assert "ppo" in json.loads((run / "manifest.json").read_text())["stages"]
    from marl.run import RunDir

    assert [r["step"] for r in RunDir(run).read_metrics("ppo") if "step" in r] == [1, 2]


@pytest.mark.parametrize("exc, message", [
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x/manifest.json"),
     "permission denied (/runs/x/manifest.json): fix the permissions or choose a --run_dir you can write to"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/a.safetensors"),
     "no space left on device while writing (/runs/x/a.safetensors): free some space"),
    (OSError(errno.EROFS, "Read-only file system", "/runs/x"), "read-only file system (/runs/x)"),
    (MemoryError(), "out of memory: lower the batch sizes"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/file/checkpoints"),
     "not a folder (/runs/file/checkpoints): a path given as a folder"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), "is a folder (/data): a path given as a file"),
])
def test_errors_of_the_machine_are_one_line_at_the_boundary(monkeypatch, capsys, exc, message):
    import marl.stages.sft

    def run(cfg):
        raise exc

    monkeypatch.setattr(marl.stages.sft, "run", run)
    assert main(["sft"]) == 2
    one_line_error(capsys, message)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_run_dir_that_is_a_file_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, stage):
    from marl import model

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "load_base", no_load)
    (tmp_path / "notes.txt").write_text("mine")
    assert main([stage, "--run_dir", str(tmp_path / "notes.txt")]) == 2
    one_line_error(capsys, f"{tmp_path / 'notes.txt'} is a file, not a run folder: choose a folder (--run_dir)")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_a_run_dir_that_cannot_be_made_is_one_line_before_the_model_loads(tiny_run, monkeypatch, capsys, stage):
    from marl import model

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model, "load_base", no_load)
    reward = ["--reward_adapter", str(tiny_run / "adapters/reward")] if stage == "ppo" else []
    assert main([stage, "--run_dir", "/proc/marl-run", *reward]) == 2  # /proc takes no new folders, even as root
    one_line_error(capsys, "cannot create the run folder /proc/marl-run (No such file or directory): choose a "
                   "folder you can write (--run_dir)")


def test_a_background_writer_on_a_full_disk_is_one_warning_line_and_silent_after_the_error(tmp_path, monkeypatch,
                                                                                          capsys):
    import threading

    import marl.stages.sft

    def in_thread(exc):
        def fail():
            raise exc
        t = threading.Thread(target=fail)
        t.start()
        t.join()

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/logs/sft/events.out.tfevents")

    def run(cfg):  # tensorboard's event writer thread fills the disk first, then the stage does
        in_thread(full)
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/sft/checkpoint-2/optimizer.pt")

    monkeypatch.setattr(marl.stages.sft, "run", run)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's printer, put back after
    assert main(["sft", "--run_dir", str(tmp_path)]) == 2
    in_thread(full)  # and once more as the writer is closed at exit: nothing after the last line
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == [
        "marl: warning: a background writer stopped: no space left on device while writing "
        "(/runs/x/logs/sft/events.out.tfevents): free some space or choose a --run_dir on another disk; files "
        "saved before are kept",
        "marl: error: no space left on device while writing (/runs/x/checkpoints/sft/checkpoint-2/optimizer.pt): "
        "free some space or choose a --run_dir on another disk; files saved before are kept"]
    in_thread(ValueError("a bug in a thread"))  # keeps its traceback
    assert "ValueError: a bug in a thread" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    import marl.stages.sft

    def run(cfg):
        raise ValueError("a bug")

    monkeypatch.setattr(marl.stages.sft, "run", run)
    with pytest.raises(ValueError, match="a bug"):
        main(["sft"])


def test_lora_target_modules_that_match_nothing_are_one_line(tmp_path, tiny_model_dir, capsys):
    rc = main(["sft", "--model_name_or_path", tiny_model_dir, "--run_dir", str(tmp_path / "run"), *SMALL,
               "--lora_target_modules", "[c_attn]"])
    assert rc == 2
    one_line_error(capsys, "Target modules {'c_attn'} not found in the base model",
                   "set --lora_target_modules to module names of this base, or all-linear")


def test_an_output_path_through_a_file_is_one_line(run_copy, tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    rc = main(["generate", str(run_copy), "--adapter", "sft", "--prompt", "The movie was", "--max_new_tokens", "2",
               "--output", str(tmp_path / "notes/gen.jsonl")])
    assert rc == 2  # FileExistsError traceback before
    one_line_error(capsys, f"{tmp_path / 'notes'} is a file where a folder is needed: choose another path")
    assert (tmp_path / "notes").read_text() == "mine"
    assert from_environment(FileExistsError(errno.EEXIST, "File exists", str(tmp_path))) is None  # a folder: a bug


def test_torch_and_safetensors_disk_full_errors_are_recognised():
    torch_msg = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert "no space left on device" in str(from_environment(torch_msg))
    assert "permission denied (/x)" in str(from_environment(PermissionError(errno.EACCES, "denied", "/x")))
    assert from_environment(RuntimeError("shape mismatch")) is None  # a bug keeps its traceback
    # tokenizers (Rust) saving tokenizer.json into a Trainer checkpoint: a plain Exception, the errno in its text
    assert "no space left on device" in str(from_environment(Exception("No space left on device (os error 28)")))
    assert "permission denied" in str(from_environment(Exception("Permission denied (os error 13)")))


def test_adapter_from_another_base_without_marl_metadata_is_refused(tmp_path, tiny_run, tiny_model_dir,
                                                                   other_model_dir, capsys):
    reward = tmp_path / "reward"
    shutil.copytree(tiny_run / "adapters/reward", reward)
    (reward / "marl_adapter.json").unlink()  # a plain peft adapter
    config = json.loads((reward / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = other_model_dir
    (reward / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(reward)
    rc = main(["ppo", "--model_name_or_path", tiny_model_dir, "--run_dir", str(tmp_path / "run"),
               "--reward_adapter", str(reward), "--sft_adapter", "none", "--report_to", "none"])
    assert rc == 2
    one_line_error(capsys, f"was trained on base {other_model_dir!r}", f"--model_name_or_path {other_model_dir}")
    assert_kept(reward, before)


def test_adapter_naming_a_base_that_is_not_here_loads_with_a_warning_or_is_refused_by_shape(
        tmp_path, tiny_run, tiny_model_dir, caplog):
    from peft import LoraConfig, get_peft_model

    from marl.default import save_tiny_random_llama
    from marl.errors import MarlError
    from marl.model import MultiAdapterModel

    same_shape = tmp_path / "same"
    shutil.copytree(tiny_run / "adapters/sft", same_shape)
    (same_shape / "marl_adapter.json").unlink()
    config = json.loads((same_shape / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/unavailable-base"
    (same_shape / "adapter_config.json").write_text(json.dumps(config))
    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    with caplog.at_level("WARNING", logger="marl.model"):
        model.load_adapter(str(same_shape), "sft", role="sft")
    assert "names base 'someone/unavailable-base', which is not here to compare" in caplog.text

    config["target_modules"] = ["c_attn"]  # GPT-2's attention: no such module in a Llama
    (same_shape / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MarlError, match=r"its target modules \['c_attn'\] are not in it\): load it onto its base "
                                        "'someone/unavailable-base'"):
        model.load_adapter(str(same_shape), "gpt2_lora", role="policy")
    assert "gpt2_lora" not in model.adapter_names

    wider = save_tiny_random_llama(tmp_path / "wider", hidden_size=48, num_layers=2)
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(wider),
                                LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.peft_config["default"].base_model_name_or_path = "someone/wider-base"
    peft_model.save_pretrained(tmp_path / "wider_adapter")
    with pytest.raises(MarlError, match="does not fit base .* load it onto its base 'someone/wider-base'"):
        model.load_adapter(str(tmp_path / "wider_adapter"), "wide", role="policy")
    assert "wide" not in model.adapter_names


def _interrupt_at_step(monkeypatch, step: int):
    from transformers import Trainer

    original = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


def test_ctrl_c_before_any_checkpoint_does_not_suggest_resume(tmp_path, tiny_model_dir, capsys, monkeypatch):
    _interrupt_at_step(monkeypatch, 1)
    rc = main(["sft", "--model_name_or_path", tiny_model_dir, "--run_dir", str(tmp_path / "run"), *SMALL])
    assert rc == 130
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert last == "marl: interrupted before the first checkpoint: nothing to resume; finished adapters are kept"
    assert not (tmp_path / "run/adapters").exists() and not list((tmp_path / "run/checkpoints/sft").glob("check*"))


def test_ctrl_c_after_a_checkpoint_suggests_resume_from_it(tmp_path, tiny_model_dir, capsys, monkeypatch):
    _interrupt_at_step(monkeypatch, 3)
    run = tmp_path / "run"
    rc = main(["sft", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), *SMALL, "--save_steps", "1"])
    assert rc == 130
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert last.endswith(f"resume from {run / 'checkpoints/sft/checkpoint-2'} with --resume true")


def _tiny_ppo(run, tiny_run, tiny_model_dir, total_steps: int) -> list[str]:
    """`marl ppo` argv for a run of `total_steps` tiny iterations in `run`, a checkpoint after each."""
    return ["ppo", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), "--report_to", "none",
            "--reward_adapter", str(tiny_run / "adapters/reward"), "--total_steps", str(total_steps),
            "--save_steps", "1", "--prompts_per_policy", "2", "--mini_batch_size", "2", "--eval_prompts", "2",
            "--eval_samples_per_prompt", "1", "--max_new_tokens", "2", "--lora_r", "4"]


def test_ctrl_c_in_ppo_suggests_resume_only_from_a_checkpoint_and_the_resume_finishes(tmp_path, tiny_run,
                                                                                     tiny_model_dir, capsys,
                                                                                     monkeypatch):
    from marl.ppo.trainer import MultiPolicyPPOTrainer

    run = tmp_path / "run"
    argv = _tiny_ppo(run, tiny_run, tiny_model_dir, total_steps=2)
    step = MultiPolicyPPOTrainer.step
    for at, last in ((1, "marl: interrupted before the first checkpoint: nothing to resume; finished adapters are "
                         "kept"),
                     (2, "marl: interrupted; finished adapters and checkpoints are kept: resume from "
                         f"{run / 'checkpoints/ppo/latest'} with --resume true")):
        def interrupted(self, at=at):
            if self.step_count + 1 == at:
                raise KeyboardInterrupt
            return step(self)

        monkeypatch.setattr(MultiPolicyPPOTrainer, "step", interrupted)
        assert main(argv) == 130
        assert capsys.readouterr().err.rstrip("\n").splitlines()[-1] == last
    monkeypatch.undo()
    assert main(argv + ["--resume", "true"]) == 0
    assert "at step 1" in capsys.readouterr().out
    assert (run / "adapters/policy_a/adapter_model.safetensors").exists()


def test_resume_of_a_finished_ppo_stage_is_up_to_date_and_a_longer_run_continues_it(tmp_path, tiny_run,
                                                                                       tiny_model_dir, capsys):
    run = tmp_path / "run"
    argv = _tiny_ppo(run, tiny_run, tiny_model_dir, total_steps=1)
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--resume", "true"]) == 0
    assert capsys.readouterr().out.startswith("ppo: up to date:")  # not evaluated again
    assert main(argv + ["--resume", "true", "--total_steps", "2"]) == 0  # other settings: continue from step 1
    assert "at step 1" in capsys.readouterr().out
    from marl.run import RunDir

    assert max(r.get("step", 0) for r in RunDir(run).read_metrics("ppo")) == 2


def _marl() -> list[str]:
    script = Path(sys.executable).parent / "marl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "marl.cli"]


@pytest.mark.parametrize("reader", ["head -1", "true"])  # `true` never reads: the pipe is closed for sure
def test_help_into_a_closed_pipe_prints_no_traceback(tmp_path, reader):
    cmd = " ".join(_marl()) + f" sft --help 2>{tmp_path / 'err'} | {reader}"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert (tmp_path / "err").read_text() == ""
    if reader == "head -1":
        assert out.stdout.startswith("usage: marl sft")


@pytest.mark.parametrize("exc, last", [
    (OSError(errno.ENOSPC, "No space left on device"), "marl: error: no space left on device"),
    (KeyboardInterrupt(), "marl: interrupted"),
])
def test_ppo_progress_bar_is_closed_before_the_last_line(tmp_path, tiny_run, tiny_model_dir, capsys, monkeypatch,
                                                         exc, last):
    from marl.ppo.trainer import MultiPolicyPPOTrainer

    def step(self):
        raise exc

    monkeypatch.setattr(MultiPolicyPPOTrainer, "step", step)
    rc = main(["ppo", "--model_name_or_path", tiny_model_dir, "--run_dir", str(tmp_path / "run"),
               "--reward_adapter", str(tiny_run / "adapters/reward"), "--sft_adapter", str(tiny_run / "adapters/sft"),
               "--report_to", "none", "--total_steps", "3", "--prompts_per_policy", "2", "--mini_batch_size", "2",
               "--eval_prompts", "2", "--eval_samples_per_prompt", "1", "--max_new_tokens", "2", "--lora_r", "4"])
    assert rc == (130 if isinstance(exc, KeyboardInterrupt) else 2)
    err = capsys.readouterr().err
    assert "ppo:" in err and "0/3" in err  # the bar was drawn ...
    assert err.rstrip("\n").splitlines()[-1].startswith(last)  # ... and closed before the last line


def test_files_marl_writes_follow_the_umask(tmp_path, tiny_model_dir):
    from marl.io import atomic_dir, atomic_write_json, save_tensors

    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        with atomic_dir(tmp_path / "folder") as tmp:
            save_tensors(tmp / "inner.safetensors", {"w": torch.zeros(2)})
            (tmp / "sub").mkdir()
    finally:
        os.umask(old)
    for f in ("a.json", "t.safetensors", "folder/inner.safetensors"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o640, f
    for d in ("folder", "folder/sub"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o750, d


def test_under_umask_022_everything_a_run_holds_is_readable_by_others(tmp_path, tiny_run, tiny_model_dir):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(["sft", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), *SMALL,
                     "--save_steps", "1"]) == 0
        assert main(["ppo", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run), "--report_to", "none",
                     "--reward_adapter", str(tiny_run / "adapters/reward"), "--total_steps", "1",
                     "--prompts_per_policy", "2", "--mini_batch_size", "2", "--eval_prompts", "2",
                     "--eval_samples_per_prompt", "1", "--max_new_tokens", "2", "--lora_r", "4"]) == 0
    finally:
        os.umask(old)
    paths = list(run.rglob("*"))
    assert {"checkpoints/sft/checkpoint-3/optimizer.pt", "checkpoints/ppo/latest/state.json",
            "adapters/policy_a/adapter_model.safetensors", "ppo_eval.json", "manifest.json"} <= \
        {str(p.relative_to(run)) for p in paths}
    wrong = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in paths
             if p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)}
    assert not wrong


def test_the_adapters_of_a_run_follow_the_umask(tiny_run):
    mask = os.umask(0o022)
    os.umask(mask)  # the umask tiny_run was written under (usually 022: 755 folders, 644 files)
    for p in (tiny_run / "adapters").rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, p


# --------------------------------------------------------------------------- re-running a finished stage


def test_a_finished_stage_rerun_with_the_same_settings_is_up_to_date(run_copy, tiny_model_dir, capsys):
    before = snapshot(run_copy)
    assert main(["sft", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run_copy), *SMALL]) == 0
    assert main(["reward", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run_copy), *SMALL,
                 "--lora_dropout", "0", "--torch_threads", "1"]) == 0  # torch_threads does not count
    out = capsys.readouterr().out
    assert f"sft: up to date: {run_copy / 'adapters/sft'} was made with the same settings" in out
    assert f"reward: up to date: {run_copy / 'adapters/reward'}" in out
    assert_kept(run_copy, before)
    assert snapshot(run_copy) == before


def test_the_shipped_sft_reward_ppo_commands_twice_in_a_row(tmp_path, tiny_model_dir, capsys):
    """`make sft reward ppo` twice, on the tiny base with fewer steps: the second time every stage is up to date."""
    run = tmp_path / "run"
    common = ["--run_dir", str(run), "--model_name_or_path", tiny_model_dir, "--report_to", "none"]
    trainer = ["--max_steps", "2", "--max_train_samples", "32", "--per_device_train_batch_size", "8"]
    small = {"sft": trainer, "reward": trainer,
             "ppo": ["--total_steps", "1", "--prompts_per_policy", "2", "--mini_batch_size", "2", "--ppo_epochs", "1",
                     "--max_new_tokens", "2", "--eval_prompts", "2", "--lora_r", "4"]}
    commands = [[stage, "--config", str(ROOT / f"configs/{stage}.yaml"), *common, *small[stage]]
                for stage in ("sft", "reward", "ppo")]
    for argv in commands:
        assert main(argv) == 0
    first = snapshot(run)
    capsys.readouterr()
    for argv in commands:
        assert main(argv) == 0
    out = capsys.readouterr().out
    adapters = run / "adapters"
    for line in (f"sft: up to date: {adapters / 'sft'} was made", f"reward: up to date: {adapters / 'reward'} was",
                 f"ppo: up to date: {adapters / 'policy_a'}, {adapters / 'policy_b'} were made"):
        assert line in out
    assert snapshot(run) == first


def test_a_finished_stage_rerun_with_other_settings_names_the_keys(run_copy, tiny_model_dir, capsys):
    before = snapshot(run_copy)
    rc = main(["sft", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run_copy), *SMALL,
               "--learning_rate", "2e-3", "--lora_r", "8"])
    assert rc == 2
    one_line_error(capsys, "already holds a finished sft adapter made with other settings",
                   "learning_rate: 0.001 -> 0.002", "lora_r: 16 -> 8", "--overwrite true")
    assert_kept(run_copy, before)


def test_a_finished_stage_on_a_base_with_other_weights_is_not_up_to_date(run_copy, tiny_model_dir, capsys):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["base_fingerprint"] = "0123456789abcdef"  # the run was made on other weights under the same name
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(run_copy)
    assert main(["sft", "--model_name_or_path", tiny_model_dir, "--run_dir", str(run_copy), *SMALL]) == 2
    one_line_error(capsys, "belongs to base", "(fingerprint 0123456789abcdef)")
    assert_kept(run_copy, before)


def test_no_command_prints_the_usage_and_one_error_line(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: marl COMMAND")
    assert captured.err == "marl: error: no command given: use one of sft, reward, ppo, eval, generate, merge, push\n"


def test_debug_shows_the_traceback_above_the_line(tmp_path, capsys, monkeypatch):
    assert main(["sft", "--total_steps", "1", "--debug"]) == 2  # an sft key that does not exist
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("marl: error: unknown config key")
    monkeypatch.setenv("MARL_DEBUG", "1")
    assert main(["ppo", "--total_steps", "0"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_saves_cut_short_by_a_kill_are_not_adapters_of_the_run(run_copy):
    from marl.run import RunDir

    # atomic_dir's temp folder, and the old folder it moved aside and had not yet deleted when killed
    for leftover in (".sft.k2j4x.tmp", ".sft.old"):
        shutil.copytree(run_copy / "adapters/sft", run_copy / "adapters" / leftover)
    assert RunDir(run_copy).adapter_names() == ["reward", "sft"]


def test_an_overwrite_killed_between_its_two_renames_loses_nothing(run_copy):
    from marl.io import atomic_dir
    from marl.run import RunDir

    adapters = run_copy / "adapters"
    saved = (adapters / "sft/adapter_model.safetensors").read_bytes()
    os.replace(adapters / "sft", adapters / ".sft.old")  # moved aside; the kill came before the new one was in
    assert RunDir(run_copy).adapter_names() == ["reward", "sft"]  # put back when the run is read
    assert (adapters / "sft/adapter_model.safetensors").read_bytes() == saved and not (adapters / ".sft.old").exists()
    os.replace(adapters / "sft", adapters / ".sft.old")
    assert (RunDir(run_copy).adapter("sft") / "adapter_model.safetensors").read_bytes() == saved
    os.replace(adapters / "sft", adapters / ".sft.old")
    with pytest.raises(FileExistsError):  # put back before the new save: without overwrite it is kept
        with atomic_dir(adapters / "sft") as tmp:
            (tmp / "x").write_text("new")
    assert (adapters / "sft/adapter_model.safetensors").read_bytes() == saved


def test_metrics_with_a_last_line_cut_by_a_full_disk_still_read(tmp_path):
    from marl.run import RunDir

    run = RunDir(tmp_path)
    run.log_metrics({"stage": "ppo", "step": 1})
    with open(run.metrics_file, "a") as f:
        f.write('{"stage": "ppo", "st')  # the append that the disk cut short
    assert run.read_metrics("ppo") == [{"stage": "ppo", "step": 1}]
    run.log_metrics({"stage": "ppo", "step": 2})  # the next record starts on a line of its own
    assert run.read_metrics("ppo") == [{"stage": "ppo", "step": 1}, {"stage": "ppo", "step": 2}]
    assert run.metrics_file.read_text().endswith('"st\n{"stage": "ppo", "step": 2}\n')


# --------------------------------------------------------------------------- one writer per run folder

_HOLDER = """
import sys, time
from marl.run import RunDir
with RunDir(sys.argv[1]).writing("ppo"):
    print("holding", flush=True)
    time.sleep(120)
"""


def _hold(run: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock, as a running `marl ppo` does."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_is_refused_with_nothing_changed_and_a_kill_leaves_no_lock(run_copy, capsys, tiny_model_dir):
    before = snapshot(run_copy)
    holder = _hold(run_copy)
    try:
        for stage in ("sft", "reward"):
            code = main([stage, "--run_dir", str(run_copy), "--model_name_or_path", tiny_model_dir, *SMALL,
                         "--overwrite", "true"])
            assert code == 2
            one_line_error(capsys, str(run_copy), f"pid {holder.pid}", "marl ppo", "another --run_dir")
        assert_kept(run_copy, before)
    finally:
        holder.kill()  # SIGKILL: the kernel releases the flock
        holder.wait()
    from marl.run import RunDir

    with RunDir(run_copy).writing("sft"):  # taken at once: no stale lock
        with RunDir(run_copy).writing("sft"):  # nested in one process: the same hold
            pass


def test_readers_are_not_blocked_by_a_writer(run_copy, capsys):
    holder = _hold(run_copy)
    try:
        assert main(["generate", str(run_copy), "--adapter", "sft", "--prompt", "The movie was",
                     "--max_new_tokens", "2"]) == 0
    finally:
        holder.kill()
        holder.wait()
