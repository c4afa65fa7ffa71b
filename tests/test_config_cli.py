"""Configs: every shipped YAML loads; overrides are typed; unknown keys and bad values fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from marl.cli import main
from marl.config import STAGES, PPOArgs, SFTArgs, config_to_dict, load_config
from marl.errors import MarlError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_shipped_config_loads_and_names_its_command(stage):
    path = CONFIGS / f"{stage}.yaml"
    cfg = load_config(STAGES[stage], str(path))
    assert path.read_text().startswith(f"# marl {stage} --config configs/{stage}.yaml")
    assert cfg.model_name_or_path == "default"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_chat_config_loads_and_names_its_command(stage):
    path = CONFIGS / "chat" / f"{stage}.yaml"
    cfg = load_config(STAGES[stage], str(path))
    assert path.read_text().startswith(f"# marl {stage} --config configs/chat/{stage}.yaml")
    assert cfg.model_name_or_path == "default-chat" and cfg.dataset_name == "default-chat"


def test_the_sweep_config_loads_and_names_its_command():
    path = CONFIGS / "sweep.yaml"
    cfg = load_config(PPOArgs, str(path))
    assert path.read_text().startswith("# marl ppo --config configs/sweep.yaml")
    assert len(cfg.policy_entries()) == 8 and cfg.schedule == "halving"


def test_overrides_are_typed():
    cfg = load_config(SFTArgs, None, ["--learning_rate", "3e-4", "--max-steps=7", "--overwrite", "true",
                                      "--lora_target_modules", "[q_proj, v_proj]", "--max_train_samples", "null"])
    assert cfg.learning_rate == 3e-4 and cfg.max_steps == 7 and cfg.overwrite is True
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.max_train_samples is None
    ppo = load_config(PPOArgs, None, ["--policies", "[{name: p1, kl_coef: 0.1}, {name: p2}]"])
    assert ppo.policy(ppo.policies[0]).kl_coef == 0.1 and ppo.policy(ppo.policies[1]).kl_coef == ppo.kl_coef


def test_kl_target_is_held_by_default_and_an_explicit_null_keeps_a_policys_kl_coef_fixed():
    from marl.ppo.kl import AdaptiveKLController, FixedKLController, make_kl_controller

    ppo = load_config(PPOArgs, None, ["--policies", "[{name: a}, {name: b, kl_target: null, kl_coef: 0.2}, "
                                                    "{name: c, kl_target: 6}]"])
    a, b, c = (ppo.policy(p) for p in ppo.policies)
    assert (a.kl_target, b.kl_target, c.kl_target) == (2.0, None, 6) and b.kl_coef == 0.2
    assert isinstance(make_kl_controller(a.kl_coef, a.kl_target), AdaptiveKLController)
    assert isinstance(make_kl_controller(b.kl_coef, b.kl_target), FixedKLController)
    assert load_config(PPOArgs, None, ["--kl_target", "null"]).policy({"name": "x"}).kl_target is None


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "1"], "unknown config key 'learning_rat' for sft; did you mean 'learning_rate'"),
    (["--max_steps", "two"], "max_steps: expected an integer"),
    (["--overwrite", "maybe"], "overwrite: expected true or false"),
    (["--quantization", "3bit"], "quantization: '3bit' is not one of"),
    (["--max_steps"], "--max_steps needs a value"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_config_values(argv, message):
    with pytest.raises(MarlError, match=message):
        load_config(SFTArgs, None, argv)


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nlearningrate: 1\n")
    with pytest.raises(MarlError, match="unknown config key 'learningrate'"):
        load_config(SFTArgs, str(bad))


@pytest.mark.parametrize("argv, message", [
    (["sft", "--config", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
    (["sft", "--bogus", "1"], "unknown config key 'bogus'"),
    (["reward", "--config", str(CONFIGS / "reward.yaml"), "--lora_r", "0"], "lora_r: 0 must be a positive"),
    (["ppo", "--policies", "[{name: a}, {name: a}]"], "duplicate policy name"),
    (["fly"], "unknown command 'fly'"),
    (["ppo", "--kl_estimator", "k2"], "kl_estimator: 'k2' must be k1, k3, abs or mse"),
    (["ppo", "--update_pass_rows", "-1"], "update_pass_rows: -1 must be >= 0"),
    (["ppo", "--forward_batch_size", "0"], "forward_batch_size: 0 must be >= 1"),
    (["ppo", "--value_model", "critic"], "value_model: 'critic' must be head or adapter"),
])
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("marl: error:") and message in err and "\n" not in err


def test_cli_help_lists_keys(capsys):
    assert main(["ppo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--kl_coef" in out and "--policies" in out


def test_disable_dropout_changes_what_ppo_makes_so_a_finished_run_compares_it():
    from marl.run import NOT_COMPARED, config_differences

    assert PPOArgs().disable_dropout is True and "disable_dropout" not in NOT_COMPARED
    recorded = config_to_dict(PPOArgs())
    assert config_differences(recorded, PPOArgs(disable_dropout=False)) == {"disable_dropout": (True, False)}
    assert config_differences(recorded, PPOArgs()) == {}
