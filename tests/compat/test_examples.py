"""TRL 0.11.4's PEFT example scripts as users ran them, their calls in their order, with marl's import:
examples/scripts/ppo.py --use_peft, the stack-llama research project's scripts/rl_training.py (8-bit base,
peft_config, a reward pipeline, Adafactor) and examples/scripts/ppo_multi_adapter.py (4-bit NF4 base, a
2-label reward adapter read at raw_rewards[i, -1, 1]).

What is replaced, and only that: the Hub model and dataset ids by tiny local ones built in code; the script
arguments by an argv; and two transformers 5 changes that are not marl's (a text-classification pipeline no
longer takes `return_all_scores`, `top_k=None` gives all labels sorted by score, so `in_label_order` puts
them back in label order; `load_in_8bit=` is a `BitsAndBytesConfig` in transformers 5). Slow (`make
test-slow`): a few PPO steps each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

pytestmark = pytest.mark.slow

TEXTS = [f"{a} film about {b}, {c}. " * 6 for a in ("A good", "A dull", "An odd", "A warm")
         for b in ("a dog", "the sea", "two friends", "a city") for c in ("I loved it", "it was long")]


def in_label_order(outputs, pipe):
    """transformers 5's all-label output (sorted by score) in label order, as `return_all_scores` gave it."""
    return [sorted(o, key=lambda d: pipe.model.config.label2id[d["label"]]) for o in outputs]


@pytest.fixture(scope="module")
def sentiment_model(gpt2_dir, tmp_path_factory):
    """A tiny 2-label classifier folder on the GPT-2 tokenizer (for lvwerra/distilbert-imdb and the stack-llama
    reward model)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(
        gpt2_dir, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    out = tmp_path_factory.mktemp("sentiment")
    clf.save_pretrained(out)
    AutoTokenizer.from_pretrained(gpt2_dir).save_pretrained(out)
    return str(out)


def test_ppo_py_use_peft(gpt2_dir, sentiment_model):
    from accelerate import Accelerator, PartialState
    from datasets import Dataset
    from peft import LoraConfig
    from tqdm import tqdm
    from transformers import AutoTokenizer, HfArgumentParser, is_torch_npu_available, is_torch_xpu_available, pipeline

    from marl import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer, set_seed
    from marl.core import LengthSampler

    @dataclass
    class ScriptArguments:
        use_seq2seq: bool = field(default=False, metadata={"help": "whether to use seq2seq"})
        trust_remote_code: bool = field(default=False, metadata={"help": "Enable `trust_remote_code`"})
        use_peft: bool = field(default=False, metadata={"help": "whether to use peft"})
        lora_alpha: Optional[float] = field(default=16, metadata={"help": "the lora alpha parameter"})  # noqa: UP045
        lora_r: Optional[int] = field(default=16, metadata={"help": "the lora r parameter"})  # noqa: UP045

    argv = ["--use_peft", "--model_name", gpt2_dir, "--query_dataset", "imdb", "--reward_model",
            f"sentiment-analysis:{sentiment_model}", "--batch_size", "4", "--mini_batch_size", "2"]
    parser = HfArgumentParser((ScriptArguments, PPOConfig))
    args, ppo_config = parser.parse_args_into_dataclasses(args=argv)
    sent_kwargs = {"top_k": None, "function_to_apply": "none", "batch_size": 16}  # return_all_scores: True
    trl_model_class = AutoModelForCausalLMWithValueHead if not args.use_seq2seq else AutoModelForSeq2SeqLMWithValueHead
    tokenizer = AutoTokenizer.from_pretrained(ppo_config.model_name)
    tokenizer.pad_token = tokenizer.eos_token

    def build_dataset(query_dataset, dataset_num_proc, input_min_text_length=2, input_max_text_length=8):
        ds = Dataset.from_dict({"text": TEXTS[:8]})  # load_dataset(query_dataset, split="train")
        ds = ds.rename_columns({"text": "review"})
        ds = ds.filter(lambda x: len(x["review"]) > 200, num_proc=dataset_num_proc)
        input_size = LengthSampler(input_min_text_length, input_max_text_length)

        def tokenize(sample):
            sample["input_ids"] = tokenizer.encode(sample["review"])[: input_size()]
            sample["query"] = tokenizer.decode(sample["input_ids"])
            return sample

        ds = ds.map(tokenize, num_proc=dataset_num_proc)
        ds.set_format(type="torch")
        return ds

    with PartialState().local_main_process_first():
        dataset = build_dataset(ppo_config.query_dataset, ppo_config.dataset_num_proc)

    def collator(data):
        return {key: [d[key] for d in data] for key in data[0]}

    set_seed(ppo_config.seed)
    if not args.use_peft:
        ref_model = trl_model_class.from_pretrained(ppo_config.model_name, trust_remote_code=args.trust_remote_code)
        device_map = None
        peft_config = None
    else:
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, bias="none", task_type="CAUSAL_LM")
        ref_model = None
        device_map = {"": Accelerator().local_process_index}
    model = trl_model_class.from_pretrained(ppo_config.model_name, trust_remote_code=args.trust_remote_code,
                                            device_map=device_map, peft_config=peft_config)
    tokenizer = AutoTokenizer.from_pretrained(ppo_config.model_name)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    ppo_trainer = PPOTrainer(ppo_config, model, ref_model, tokenizer, dataset=dataset, data_collator=collator)
    device = ppo_trainer.accelerator.device
    if ppo_trainer.accelerator.num_processes == 1:
        if is_torch_xpu_available():
            device = "xpu:0"
        elif is_torch_npu_available():
            device = "npu:0"
        else:
            device = 0 if torch.cuda.is_available() else "cpu"
    ds_plugin = ppo_trainer.accelerator.state.deepspeed_plugin
    task, model_name = ppo_config.reward_model.split(":")
    if ds_plugin is not None and ds_plugin.is_zero3_init_enabled():
        with ds_plugin.zero3_init_context_manager(enable=False):
            sentiment_pipe = pipeline(task, model=model_name, device=device)
    else:
        sentiment_pipe = pipeline(task, model=model_name, device=device)
    if sentiment_pipe.tokenizer.pad_token_id is None:
        sentiment_pipe.tokenizer.pad_token_id = tokenizer.pad_token_id
    if sentiment_pipe.model.config.pad_token_id is None:
        sentiment_pipe.model.config.pad_token_id = tokenizer.pad_token_id
    generation_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                         "pad_token_id": tokenizer.eos_token_id, "max_new_tokens": 32}
    all_stats = []
    for batch in tqdm(ppo_trainer.dataloader):
        query_tensors = batch["input_ids"]
        response_tensors, ref_response_tensors = ppo_trainer.generate(
            query_tensors, return_prompt=False, generate_ref_response=True, **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(response_tensors)
        batch["ref_response"] = tokenizer.batch_decode(ref_response_tensors)
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        pipe_outputs = in_label_order(sentiment_pipe(texts, **sent_kwargs), sentiment_pipe)
        rewards = [torch.tensor(output[1]["score"]) for output in pipe_outputs]
        ref_texts = [q + r for q, r in zip(batch["query"], batch["ref_response"])]
        ref_pipe_outputs = in_label_order(sentiment_pipe(ref_texts, **sent_kwargs), sentiment_pipe)
        ref_rewards = [torch.tensor(output[1]["score"]) for output in ref_pipe_outputs]
        batch["ref_rewards"] = ref_rewards
        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        logged = ppo_trainer.log_stats(stats, batch, rewards,
                                       columns_to_log=["query", "response", "ref_response", "ref_rewards"])
        all_stats.append(stats)

    assert len(all_stats) == 2  # 8 rows in batches of 4
    assert all(math.isfinite(s["ppo/loss/total"]) and math.isfinite(s["objective/kl"]) for s in all_stats)
    assert math.isfinite(logged["env/reward_mean"]) and logged["ppo/loss/policy"] == all_stats[-1]["ppo/loss/policy"]


def test_stack_llama_rl_training_py(gpt2_dir, sentiment_model, tmp_path):
    from accelerate import Accelerator
    from datasets import Dataset
    from peft import LoraConfig
    from tqdm import tqdm
    from transformers import Adafactor, AutoTokenizer, BitsAndBytesConfig, HfArgumentParser, pipeline

    from marl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, set_seed
    from marl.core import LengthSampler

    @dataclass
    class ScriptArguments:  # noqa: UP045 - as the script wrote it
        model_name: Optional[str] = field(default="", metadata={"help": "the model name"})  # noqa: UP045
        tokenizer_name: Optional[str] = field(default="", metadata={"help": "the tokenizer name"})  # noqa: UP045
        reward_model_name: Optional[str] = field(default="", metadata={"help": "the reward model name"})  # noqa: UP045
        log_with: Optional[str] = field(default=None, metadata={"help": "use 'wandb' to log with wandb"})  # noqa: UP045
        learning_rate: Optional[float] = field(default=1.41e-5, metadata={"help": "the learning rate"})  # noqa: UP045
        output_max_length: Optional[int] = field(default=128, metadata={"help": "maximum length for generation"})  # noqa: UP045
        mini_batch_size: Optional[int] = field(default=1, metadata={"help": "the PPO minibatch size"})  # noqa: UP045
        batch_size: Optional[int] = field(default=32, metadata={"help": "the batch size"})  # noqa: UP045
        ppo_epochs: Optional[int] = field(default=4, metadata={"help": "the number of ppo epochs"})  # noqa: UP045
        gradient_accumulation_steps: Optional[int] = field(default=4, metadata={"help": "gradient accumulation"})  # noqa: UP045
        adafactor: Optional[bool] = field(default=False, metadata={"help": "whether to use the adafactor optimizer"})  # noqa: UP045
        early_stopping: Optional[bool] = field(default=False, metadata={"help": "whether to early stop"})  # noqa: UP045
        target_kl: Optional[float] = field(default=0.1, metadata={"help": "kl target for early stopping"})  # noqa: UP045
        reward_baseline: Optional[float] = field(default=0.0, metadata={"help": "subtracted from the reward"})  # noqa: UP045
        batched_gen: Optional[bool] = field(default=False, metadata={"help": "whether to use the batched text gen"})  # noqa: UP045
        save_freq: Optional[int] = field(default=None, metadata={"help": "n steps to save the model"})  # noqa: UP045
        output_dir: Optional[str] = field(default="runs/", metadata={"help": "n steps to save the model"})  # noqa: UP045
        seed: Optional[int] = field(default=0, metadata={"help": "the seed"})  # noqa: UP045
        steps: Optional[int] = field(default=20000, metadata={"help": "number of epochs"})  # noqa: UP045
        init_kl_coef: Optional[float] = field(default=0.2, metadata={"help": "Initial KL penalty coefficient"})  # noqa: UP045
        adap_kl_ctrl: Optional[bool] = field(default=True, metadata={"help": "Use adaptive KL control"})  # noqa: UP045
        load_in_8bit: Optional[bool] = field(default=True, metadata={"help": "whether to load the model in 8bit"})  # noqa: UP045

    argv = ["--model_name", gpt2_dir, "--tokenizer_name", gpt2_dir, "--reward_model_name", sentiment_model,
            "--batch_size", "8", "--mini_batch_size", "1", "--ppo_epochs", "1", "--output_max_length", "36",
            "--adafactor", "True", "--save_freq", "1", "--output_dir", f"{tmp_path}/", "--steps", "16"]
    parser = HfArgumentParser(ScriptArguments)
    script_args: ScriptArguments = parser.parse_args_into_dataclasses(args=argv)[0]
    reward_model_name = script_args.reward_model_name
    config = PPOConfig(
        steps=script_args.steps, model_name=script_args.model_name, learning_rate=script_args.learning_rate,
        log_with=script_args.log_with, batch_size=script_args.batch_size, mini_batch_size=script_args.mini_batch_size,
        gradient_accumulation_steps=script_args.gradient_accumulation_steps, optimize_cuda_cache=True,
        early_stopping=script_args.early_stopping, target_kl=script_args.target_kl, ppo_epochs=script_args.ppo_epochs,
        seed=script_args.seed, init_kl_coef=script_args.init_kl_coef, adap_kl_ctrl=script_args.adap_kl_ctrl,
    )
    train_dataset = Dataset.from_dict({"question": TEXTS})  # lvwerra/stack-exchange-paired, data/rl
    original_columns = train_dataset.column_names
    sent_kwargs = {"top_k": None, "function_to_apply": "none", "batch_size": 16, "truncation": True}
    tokenizer = AutoTokenizer.from_pretrained(script_args.tokenizer_name)
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token

    def build_dataset(tokenizer):
        num_proc = None  # 24 in the script: processes for 100,000 questions

        def preprocess_function(examples):
            new_examples = {"query": [], "input_ids": []}
            for question in examples["question"]:
                query = "Question: " + question[:40] + "\n\nAnswer: "
                tokenized_question = tokenizer(query, truncation=True)
                new_examples["query"].append(query)
                new_examples["input_ids"].append(tokenized_question["input_ids"])
            return new_examples

        ds = train_dataset.map(preprocess_function, batched=True, num_proc=num_proc, remove_columns=original_columns)
        ds = ds.filter(lambda x: len(x["input_ids"]) < 512, batched=False, num_proc=num_proc)
        ds.set_format(type="torch")
        return ds

    dataset = build_dataset(tokenizer)

    def collator(data):
        return {key: [d[key] for d in data] for key in data[0]}

    set_seed(config.seed)
    current_device = Accelerator().local_process_index
    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        config.model_name, load_in_8bit=script_args.load_in_8bit, device_map={"": current_device},
        peft_config=lora_config)
    optimizer = None
    if script_args.adafactor:
        optimizer = Adafactor(filter(lambda p: p.requires_grad, model.parameters()), scale_parameter=False,
                              relative_step=False, warmup_init=False, lr=config.learning_rate)
    ppo_trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer, dataset=dataset,
                             data_collator=collator, optimizer=optimizer)
    device = ppo_trainer.accelerator.device
    if ppo_trainer.accelerator.num_processes == 1:
        device = 0 if torch.cuda.is_available() else "cpu"  # noqa: F841 - as the script
    sentiment_pipe = pipeline(
        "sentiment-analysis", model=reward_model_name,
        device_map={"": current_device if torch.cuda.is_available() else "cpu"},  # the script ran on a GPU
        model_kwargs={"quantization_config": BitsAndBytesConfig(load_in_8bit=script_args.load_in_8bit)},
        tokenizer=tokenizer, return_token_type_ids=False)
    if sentiment_pipe.model.config.pad_token_id is None:
        sentiment_pipe.model.config.pad_token_id = sentiment_pipe.model.config.eos_token_id
    generation_kwargs = {"top_k": 0.0, "top_p": 1.0, "do_sample": True, "pad_token_id": tokenizer.pad_token_id,
                         "eos_token_id": 100_000}
    output_min_length = 32
    output_max_length = script_args.output_max_length
    output_length_sampler = LengthSampler(output_min_length, output_max_length)
    all_stats = []
    for epoch, batch in tqdm(enumerate(ppo_trainer.dataloader)):
        if epoch >= config.total_ppo_epochs:
            break
        question_tensors = batch["input_ids"]
        response_tensors = ppo_trainer.generate(question_tensors, return_prompt=False,
                                                length_sampler=output_length_sampler, **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        pipe_outputs = in_label_order(sentiment_pipe(texts, **sent_kwargs), sentiment_pipe)
        rewards = [torch.tensor(output[0]["score"] - script_args.reward_baseline) for output in pipe_outputs]
        stats = ppo_trainer.step(question_tensors, response_tensors, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)
        all_stats.append(stats)
        if script_args.save_freq and epoch and epoch % script_args.save_freq == 0:
            ppo_trainer.save_pretrained(script_args.output_dir + f"step_{epoch}")

    assert len(all_stats) == 2 == config.total_ppo_epochs  # ceil(16 steps / batch 8)
    assert ppo_trainer.optimizer is optimizer and model.is_loaded_in_8bit
    assert all(32 <= len(r) < 36 for r in response_tensors)  # the length sampler's lengths: no EOS stops them
    assert all(math.isfinite(s["ppo/loss/total"]) for s in all_stats)
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(f"{tmp_path}/step_1")
    saved = dict(model.named_parameters())
    assert all(torch.equal(p, saved[n].float()) for n, p in reloaded.named_parameters() if "lora_" in n or "v_head" in n)


def test_ppo_multi_adapter_py(gpt2_dir, tmp_path):
    from accelerate import PartialState
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from marl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from marl.core import LengthSampler

    rm_adapter = tmp_path / "rm-adapter"  # trl-lib/llama-7b-hh-rm-adapter: a 2-label peft reward adapter
    rm = AutoModelForSequenceClassification.from_pretrained(gpt2_dir, num_labels=2)
    rm.config.pad_token_id = rm.config.eos_token_id
    get_peft_model(rm, LoraConfig(r=8, task_type="SEQ_CLS")).save_pretrained(rm_adapter)

    input_min_text_length, input_max_text_length = 6, 12
    model_name, rm_adapter_id = gpt2_dir, str(rm_adapter)

    def create_and_prepare_dataset(tokenizer, num_proc):
        dataset = Dataset.from_dict({"chosen": TEXTS[:8]})  # load_dataset("Anthropic/hh-rlhf", split="train[:1%]")
        input_size = LengthSampler(input_min_text_length, input_max_text_length)

        def tokenize(example):
            text_size = input_size()
            example["input_ids"] = tokenizer.encode(example["chosen"])[:text_size]
            example["query"] = tokenizer.decode(example["input_ids"])
            return example

        dataset = dataset.map(tokenize, batched=False, num_proc=num_proc)
        dataset.set_format("torch")
        return dataset

    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    nf4_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_name, device_map={"": 0}, peft_config=lora_config, quantization_config=nf4_config,
        reward_adapter=rm_adapter_id, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer.pad_token = tokenizer.eos_token
    with PartialState().local_main_process_first():
        dataset = create_and_prepare_dataset(tokenizer, None)

    def collator(data):
        return {key: [d[key] for d in data] for key in data[0]}

    config = PPOConfig(model_name=model_name, log_with=None, learning_rate=1e-5, batch_size=8, mini_batch_size=2,
                       gradient_accumulation_steps=2, optimize_cuda_cache=True, seed=0, use_score_scaling=False,
                       use_score_norm=False, score_clip=None)
    ppo_trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer, dataset=dataset,
                             data_collator=collator)
    generation_kwargs = {"top_k": 0.0, "top_p": 0.9, "do_sample": True, "pad_token_id": tokenizer.pad_token_id,
                         "max_new_tokens": 32}
    all_stats = []
    for _epoch, batch in tqdm(enumerate(ppo_trainer.dataloader)):
        question_tensors = batch["input_ids"]
        response_tensors = ppo_trainer.generate(question_tensors, return_prompt=False, **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(ppo_trainer.accelerator.device)
        raw_rewards = ppo_trainer.accelerator.unwrap_model(ppo_trainer.model).compute_reward_score(**inputs)
        rewards = [raw_rewards[i, -1, 1] for i in range(len(raw_rewards))]  # take last token
        stats = ppo_trainer.step(question_tensors, response_tensors, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)
        all_stats.append((stats, rewards, texts))

    assert len(all_stats) == 1 and model.is_loaded_in_4bit
    stats, rewards, texts = all_stats[0]
    assert math.isfinite(stats["ppo/loss/total"])
    # the rewards read at [:, -1, 1] of right-padded rows are each text's own score (marl's per-row API, output 1)
    own = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=lora_config,
                                                            reward_adapter=rm_adapter_id, reward_score_index=1)
    torch.testing.assert_close(torch.stack(rewards).float(), own.marl_model.score_texts(texts), atol=0.05, rtol=0)
