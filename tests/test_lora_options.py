"""Adapters with peft's other LoRA options, loaded through marl's loading path: the stacked multi-LoRA path
computes each one exactly (equal to peft's own forward), or leaves batches holding it to peft's forward
with one line saying so; an adapter whose loading would change the shared base is refused in one line."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from marl.errors import MarlError
from marl.model import MultiAdapterModel
from marl.multilora import group_layout, grouped_lora

ROWS = 4
LENGTH = 7


def save_peft_adapter(folder, model_dir, seed=1, **options):
    """A LoRA adapter with `options`, saved by plain peft from the tiny base, every weight of it random."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(base, LoraConfig(**{**kw, **options}))
    with torch.no_grad():  # magnitudes, biases, saved modules and token rows unlike their starting values too
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft.save_pretrained(str(folder))
    return folder


def peft_reference(model_dir, folder):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(folder)).eval()


def marl_model(model_dir, folder):
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(model_dir)
    model.add_adapter("plain", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                          init_lora_weights=False))
    plain_before = None
    if folder is not None:
        plain_before = logits_of(model, "plain")
        model.load_adapter(str(folder), name="opt", role="policy")
    return model.eval(), plain_before


def batch(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, len(model.tokenizer), (ROWS, LENGTH), generator=g)
    return ids, torch.ones_like(ids)


def logits_of(model, name):
    ids, mask = batch(model)
    with torch.no_grad():
        return model.policy_forward(name, ids, mask)[0]


EXACT = {
    "rslora": dict(use_rslora=True, lora_alpha=16),
    "rank_and_alpha_patterns": dict(r=2, rank_pattern={"q_proj": 8, "down_proj": 3}, alpha_pattern={"v_proj": 32}),
    "lora_bias": dict(lora_bias=True),
}
ROUTED = {  # the option -> what the one line names
    "dora": (dict(use_dora=True), "use_dora=True"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    "trainable_tokens": (dict(trainable_token_indices=[5, 6, 7]), "trainable_token_indices"),
    "embedding_lora": (dict(target_modules=["q_proj", "embed_tokens"]), "LoRA on a Embedding layer"),
}


@pytest.mark.parametrize("names", [["plain", "plain", "opt", "opt"], ["plain", "opt", "opt", "opt"]])
@pytest.mark.parametrize("option", EXACT)
def test_the_stacked_path_computes_these_options_as_peft_does(tiny_model_dir, tmp_path, option, names, caplog):
    folder = save_peft_adapter(tmp_path / "opt", tiny_model_dir, **EXACT[option])
    model, plain_before = marl_model(tiny_model_dir, folder)
    ids, mask = batch(model)
    with torch.no_grad():
        want_opt = peft_reference(tiny_model_dir, folder)(input_ids=ids, attention_mask=mask).logits
        want_plain = model.policy_forward("plain", ids, mask)[0]
    with caplog.at_level(logging.WARNING, logger="marl.multilora"):
        assert model.stacked_layout(names) is not None
        with torch.no_grad():
            got, _ = model.grouped_policy_forward(names, ids, mask)
    assert "marl: warning" not in caplog.text
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], (want_opt if n == "opt" else want_plain)[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want_plain, plain_before, atol=0, rtol=0)  # loading it changed no other adapter


def test_lora_bias_gradients_and_generation_on_the_stacked_path_equal_peft(tiny_model_dir, tmp_path):
    from tests.test_multilora import _loss_and_grads

    model, _ = marl_model(tiny_model_dir, save_peft_adapter(tmp_path / "opt", tiny_model_dir, lora_bias=True))
    names = ["plain", "opt", "opt"]
    model.set_trainable(["plain", "opt"])
    ids, mask = batch(model)
    ids, mask = ids[:3], mask[:3]
    model.train()
    want = _loss_and_grads(model, names, ids, mask, grouped=False)
    got = _loss_and_grads(model, names, ids, mask, grouped=True)
    assert any("lora_B.opt.bias" in k for k in got) and got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    model.eval()
    kw = {"max_new_tokens": 5, "do_sample": False}
    stacked = model.generate(ids, mask, adapter_names=names, **kw)
    model.multi_lora = "peft"
    assert stacked.tolist() == model.generate(ids, mask, adapter_names=names, **kw).tolist()


@pytest.mark.parametrize("option", ROUTED)
def test_an_adapter_the_stacked_path_cannot_compute_runs_on_peft_with_one_line(tiny_model_dir, tmp_path, option,
                                                                              caplog):
    options, named = ROUTED[option]
    folder = save_peft_adapter(tmp_path / "opt", tiny_model_dir, **options)
    model, plain_before = marl_model(tiny_model_dir, folder)
    reference = peft_reference(tiny_model_dir, folder)
    ids, mask = batch(model)
    names = ["plain", "plain", "opt", "opt"]
    with caplog.at_level(logging.WARNING, logger="marl.multilora"):
        assert model.stacked_layout(names) is None  # the trainer then gives each policy passes of its own
        assert model.stacked_layout(names[::-1]) is None
    notes = [r.getMessage() for r in caplog.records if "marl: warning" in r.getMessage()]
    assert len(notes) == 1 and "'opt'" in notes[0] and named in notes[0] and "\n" not in notes[0], notes
    assert model.stacked_layout(["plain", "plain"]) is None and model.stacked_layout(["plain", None]) is not None
    with torch.no_grad():  # the per-policy pass is peft's own forward
        want = reference(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model.policy_forward("opt", ids, mask)[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(model, "plain"), plain_before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot compute adapter 'opt' exactly"):
        with grouped_lora(model.peft, group_layout(names), layers=model.lora_layers()):
            pass
    kw = {"max_new_tokens": 5, "do_sample": False}
    mixed = model.generate(ids, mask, adapter_names=names, **kw)  # one generate call per adapter
    with torch.no_grad():
        want_opt = reference.generate(input_ids=ids[2:], attention_mask=mask[2:], pad_token_id=0, **kw)
    assert mixed[2:].tolist() == want_opt.tolist()
    assert mixed[:2].tolist() == model.generate(ids[:2], mask[:2], adapter_names="plain", **kw).tolist()


def test_a_rollout_with_such_an_adapter_samples_each_row_at_its_own_temperature(tiny_model_dir, tmp_path):
    from marl.ppo.rollout import generate_rollout

    model, _ = marl_model(tiny_model_dir, save_peft_adapter(tmp_path / "opt", tiny_model_dir, use_dora=True))
    ids, mask = batch(model)
    names = ["plain", "plain", "opt", "opt"]
    temps = [1.0, 0.7, 1.0, 0.7]
    torch.manual_seed(0)
    ro = generate_rollout(model, ids, mask, names, temps, max_new_tokens=4)
    torch.manual_seed(0)
    each = generate_rollout(model, ids, mask, names, temps, max_new_tokens=4, mixed_batch=False)
    assert ro.response_ids.tolist() == each.response_ids.tolist()


def test_an_adapter_with_saved_modules_round_trips_through_marl(tiny_model_dir, tmp_path):
    folder = save_peft_adapter(tmp_path / "opt", tiny_model_dir, modules_to_save=["lm_head"])
    model, _ = marl_model(tiny_model_dir, folder)
    want = logits_of(model, "opt")
    model.save_adapter("opt", tmp_path / "again")
    again, _ = marl_model(tiny_model_dir, tmp_path / "again")
    torch.testing.assert_close(logits_of(again, "opt"), want, atol=0, rtol=0)


def _edited(folder, tmp_path, **changes):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes, message", [
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa', whose initialisation rewrites the base"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora', whose initialisation rewrites the base"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "replicates base layers"),
])
def test_an_adapter_that_would_change_the_shared_base_is_refused(tiny_model_dir, tmp_path, changes, message):
    folder = _edited(save_peft_adapter(tmp_path / "opt", tiny_model_dir), tmp_path, **changes)
    model, plain_before = marl_model(tiny_model_dir, None)
    plain_before = logits_of(model, "plain")
    with pytest.raises(MarlError, match=message) as e:
        model.load_adapter(str(folder), name="opt")
    assert "\n" not in str(e.value) and model.adapter_names == ["plain"]
    torch.testing.assert_close(logits_of(model, "plain"), plain_before, atol=0, rtol=0)


def test_an_adapter_with_its_own_copy_of_the_base_biases_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.attention_bias = True
    torch.manual_seed(0)
    biased = tmp_path / "biased"
    AutoModelForCausalLM.from_config(config).save_pretrained(biased)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(biased)
    folder = save_peft_adapter(tmp_path / "opt", str(biased), bias="all")
    model, _ = marl_model(str(biased), None)
    with pytest.raises(MarlError, match=r"carries its own copy of the base's biases \(bias='all'\)"):
        model.load_adapter(str(folder), name="opt")
    assert model.adapter_names == ["plain"]
