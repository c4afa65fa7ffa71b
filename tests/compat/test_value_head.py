"""The causal-LM tests of TRL 0.11.4's tests/test_modeling_value_head.py (it has no PEFT or multi-adapter
test of its own: these are the ones a PEFT user's model meets), and old TRL's usages that marl does not
implement by design, each a one-line MarlError naming what to do instead (docs/migrating-from-trl.md)."""

from __future__ import annotations

import pytest
import torch

from marl import AutoModelForCausalLMWithValueHead
from marl.errors import MarlError

from .conftest import lora_config


@pytest.fixture(scope="module")
def model(gpt2_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config())


def test_value_head_of_a_loaded_model(gpt2_dir):  # test_value_head, test_value_head_shape, _not_str
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLMWithValueHead.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir),
                                                              peft_config=lora_config())
    assert hasattr(model, "v_head") and model.v_head.summary.weight.shape[0] == 1


def test_value_head_init(model):  # test_value_head_init_random: old TRL's bias was random, marl's starts at 0
    assert torch.equal(model.v_head.summary.bias, torch.zeros(1)) and model.v_head.summary.weight.abs().sum() > 0


def test_inference_gives_logits_loss_and_values(model):  # test_inference
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    outputs = model(input_ids)
    assert len(outputs) == 3
    logits, loss, values = outputs
    assert logits.shape[:2] == values.shape == (1, 10) and loss is None


def test_generate(model):  # test_generate
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    out = model.generate(input_ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 13) and torch.equal(out[:, :10], input_ids)


def test_bf16_kwargs(gpt2_dir):  # test_transformers_bf16_kwargs
    trl_model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config(),
                                                                  torch_dtype=torch.bfloat16)
    assert trl_model.pretrained_model.lm_head.weight.dtype == torch.bfloat16
    trl_model(torch.LongTensor([[0, 1, 0, 1]]))


# --------------------------------------------------------------------------- not in marl, by design


def test_a_model_without_lm_head_is_refused(gpt2_dir):  # test_raise_error_not_causallm (ValueError there)
    from transformers import AutoModelForCausalLM

    pretrained_model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    with pytest.raises(MarlError, match="GPT2Model has no language-model head: pass the AutoModelForCausalLM"):
        AutoModelForCausalLMWithValueHead.from_pretrained(pretrained_model.transformer)


def test_seq2seq_models_are_refused():  # Seq2SeqValueHeadModelTester; examples/scripts/ppo.py --use_seq2seq
    from transformers import T5Config, T5ForConditionalGeneration

    from marl import AutoModelForSeq2SeqLMWithValueHead

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0))
    with pytest.raises(MarlError, match="T5ForConditionalGeneration is an encoder-decoder .* use a causal LM"):
        AutoModelForCausalLMWithValueHead.from_pretrained(t5, peft_config=lora_config())
    with pytest.raises(MarlError, match="marl trains decoder-only causal LMs.*AutoModelForCausalLMWithValueHead"):
        AutoModelForSeq2SeqLMWithValueHead.from_pretrained("t5-small")


def test_full_fine_tuning_is_refused_with_the_alternative(model):  # ReferenceModelTest; ppo.py without --use_peft
    from marl import PPOTrainer, create_reference_model

    with pytest.raises(MarlError, match="create_reference_model: marl trains LoRA adapters.*pass ref_model=None"):
        create_reference_model(model)
    with pytest.raises(MarlError, match="ref_model must be None: marl trains LoRA adapters, not full models"):
        PPOTrainer(model=model, ref_model=model)


@pytest.mark.parametrize("kwargs", [{"summary_dropout_prob": 0.5}, {"v_head_init_strategy": "normal"}])
def test_value_head_options_are_refused(gpt2_dir, kwargs):  # test_dropout_config, test_dropout_kwargs
    with pytest.raises(MarlError, match=f"{next(iter(kwargs))}: marl's value heads are one linear layer"):
        AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config(), **kwargs)


def test_pickle_files_are_refused(model, tmp_path):
    """Old TRL wrote the value head into pytorch_model.bin, older peft adapter_model.bin: marl reads no pickle."""
    model.save_pretrained(tmp_path)
    (tmp_path / "value_head.safetensors").rename(tmp_path / "pytorch_model.bin")  # the layout old TRL saved
    with pytest.raises(MarlError, match="pytorch_model.bin .* is a pickle file.*delete it to reload the adapter"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(MarlError, match="no adapter_model.safetensors .*save the adapter again with peft"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path))
    with pytest.raises(MarlError, match="no adapter_model.safetensors .*adapter_model.bin is a pickle file"):
        AutoModelForCausalLMWithValueHead.from_pretrained(model.marl_model.base_name, peft_config=lora_config(),
                                                          reward_adapter=str(tmp_path))


def test_other_bad_arguments_are_one_line_errors(gpt2_dir, model):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with pytest.raises(MarlError, match="reward_adapter is a dict: give the folder or Hub id"):
        AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, reward_adapter={})
    with pytest.raises(MarlError, match="peft_config is a PromptTuningConfig: marl's policies are LoRA adapters"):
        AutoModelForCausalLMWithValueHead.from_pretrained(
            gpt2_dir, peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    prompt_model = get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_dir),
                                  PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(MarlError, match="adapter 'default' of the peft model is a PROMPT_TUNING adapter"):
        AutoModelForCausalLMWithValueHead.from_pretrained(prompt_model)
    with pytest.raises(MarlError, match="load_in_8bit: the model is already loaded"):
        AutoModelForCausalLMWithValueHead.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir),
                                                          load_in_8bit=True)
    with pytest.raises(MarlError, match="from_pretrained got a int"):
        AutoModelForCausalLMWithValueHead.from_pretrained(3)
    with pytest.raises(MarlError, match=r"of compute_reward_score's \(B, T, num_labels\) output pass raw\[:, -1, k\]"):
        from marl import PPOConfig, PPOTrainer

        trainer = PPOTrainer(PPOConfig(batch_size=1, mini_batch_size=1), model)
        trainer.step([torch.tensor([1, 2])], [torch.tensor([3])], [torch.zeros(4, 1)])
