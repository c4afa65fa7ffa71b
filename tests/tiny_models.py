"""Tiny base models for each tokenizer convention real checkpoints use, built in code (no download).

Each builder writes a model folder (weights + tokenizer through `save_pretrained`) that loads back
with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, and returns its path:

| convention           | like                          | pad token         | BOS added | model            |
| -------------------- | ----------------------------- | ----------------- | --------- | ---------------- |
| `gpt2_pad_eos`       | GPT-2 with pad = EOS, Qwen2.5 | = EOS (last id)   | no        | `GPT2LMHeadModel`|
| `llama_bos_no_pad`   | Llama 2 / 3 base checkpoints  | none              | yes       | `LlamaForCausalLM`|
| `marl_default`       | marl's embedded default       | `<pad>` (id 0)    | yes       | `LlamaForCausalLM`|
| `qwen_instruct`      | Qwen2.5-Instruct (ChatML)     | `<|endoftext|>`   | no        | `Qwen2ForCausalLM`|
| `llama3_instruct`    | Llama-3.1-Instruct            | none              | yes       | `LlamaForCausalLM`|

The instruct ones have a chat template, a turn that ends at `<|im_end|>` / `<|eot_id|>`, a list of EOS ids and
their own sampling settings in `generation_config.json`. `gpt2_pad_eos` has GPT-2's dropout 0.1.

The tokenizers are BPEs trained on a slice of marl's default corpus. `vocab_size` sets the model's
vocabulary; past what the BPE learns it is filled with unused tokens (`<unused_N>`, never produced by
encoding), so a 151,936-token model (Qwen2.5's size) is built the same way as the small default.
"""

from __future__ import annotations

import json
from pathlib import Path

CONVENTIONS = ("gpt2_pad_eos", "llama_bos_no_pad", "marl_default")
BPE_MERGES_VOCAB = 400  # what the BPE trainer may learn; the rest of vocab_size is unused filler
_ASCII = [chr(c) for c in range(32, 127)]


def _corpus(n: int = 600) -> list[str]:
    from marl.default import build_corpus

    corpus = build_corpus()
    texts = [r["text"] for r in corpus["sft_train"][:n]]
    texts += [r["prompt"] + r[k] for r in corpus["reward_train"][:n] for k in ("chosen", "rejected")]
    return texts


def _train_bpe(tok, trainer_vocab: int, special: list[str], alphabet: list[str]):
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(vocab_size=trainer_vocab, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def _pad_vocab(tok, size: int):
    """The same tokenizer with BPE vocabulary ids up to `size - 1` (unused tokens: no merge builds them)."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), size):
        vocab[f"<unused_{i}>"] = i
    return Tokenizer.from_str(json.dumps(data))


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    """`save_pretrained`, with a tokenizer class transformers 4.x can load too (docs/known-issues.md #5)."""
    tokenizer.save_pretrained(out_dir)
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def gpt2_tokenizer(vocab_size: int = 512):
    """Byte-level BPE like GPT-2's: `<|endoftext|>` is BOS, EOS, UNK and (as users set it) pad, with the
    last id (GPT-2: 50256); the tokenizer adds no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = _train_bpe(tok, min(BPE_MERGES_VOCAB, vocab_size - 1), [], pre_tokenizers.ByteLevel.alphabet())
    tok = _pad_vocab(tok, vocab_size - 1)
    tok.add_special_tokens([eos])  # id vocab_size - 1
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos,
                                   model_max_length=256)


def llama_tokenizer(vocab_size: int = 512):
    """SentencePiece-style BPE like Llama 2's: `<unk>` 0, `<s>` 1, `</s>` 2, `▁` for spaces, BOS added to
    every text by the post-processor, and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = _train_bpe(tok, min(BPE_MERGES_VOCAB, vocab_size), ["<unk>", "<s>", "</s>"], _ASCII + ["▁"])
    tok = _pad_vocab(tok, vocab_size)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=256)


def gpt2_pad_eos(out_dir, vocab_size: int = 512, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                 seed: int = 0) -> Path:
    """A random tiny `GPT2LMHeadModel` (tied embeddings, bos = eos, no pad id in its config) + `gpt2_tokenizer`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer(vocab_size)
    config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=hidden_size, n_layer=num_layers,
                        n_head=num_heads, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return _save(GPT2LMHeadModel(config), tokenizer, out_dir)


def llama_bos_no_pad(out_dir, vocab_size: int = 512, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                     seed: int = 0) -> Path:
    """A random tiny `LlamaForCausalLM` (no pad id in its config) + `llama_tokenizer` (BOS added, no pad)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = llama_tokenizer(vocab_size)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=None,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(config), tokenizer, out_dir)


def marl_default(out_dir, vocab_size: int | None = None, hidden_size: int = 32, num_layers: int = 2,
                 num_heads: int = 4, seed: int = 0) -> Path:
    """`marl.default.save_tiny_random_llama` (pad `<pad>` 0, BOS 1 added, EOS 2); a `vocab_size` above the
    default tokenizer's 1,536 grows the embeddings (the extra ids are never produced by encoding)."""
    from transformers import AutoModelForCausalLM

    from marl.default import save_tiny_random_llama

    out = save_tiny_random_llama(out_dir, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                 seed=seed)
    if vocab_size is None:
        return out
    model = AutoModelForCausalLM.from_pretrained(out)
    if vocab_size != model.config.vocab_size:
        if vocab_size < model.config.vocab_size:
            raise ValueError(f"marl_default: vocab_size must be at least {model.config.vocab_size}")
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        model.save_pretrained(out)
    return out


LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                  "<|eot_id|>"]
# the instruct checkpoints' own sampling settings, which marl must not apply to its rollouts
LLAMA3_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}


def llama3_tokenizer(vocab_size: int = 512):
    """Byte-level BPE like Llama 3's: `<|begin_of_text|>` added to every text (BOS), a turn ends at `<|eot_id|>`
    (the tokenizer's EOS), `<|end_of_text|>` and `<|eom_id|>` listed as EOS in the generation config only, no pad
    token, Llama 3's chat template (contents trimmed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n = vocab_size - len(LLAMA3_SPECIAL)
    tok = _train_bpe(tok, min(BPE_MERGES_VOCAB, n), [], pre_tokenizers.ByteLevel.alphabet())
    tok = _pad_vocab(tok, n)
    tok.add_special_tokens(LLAMA3_SPECIAL)  # ids n .. vocab_size - 1
    bos = LLAMA3_SPECIAL[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                   chat_template=LLAMA3_TEMPLATE, model_max_length=256)


def llama3_instruct(out_dir, vocab_size: int = 512, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                    seed: int = 0) -> Path:
    """A random tiny `LlamaForCausalLM` with Llama-3.1-Instruct's conventions: BOS added, `<|eot_id|>` ends a
    turn, an EOS list of three ids and its own sampling settings in generation_config.json, no pad token."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = llama3_tokenizer(vocab_size)
    eos = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=None,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               **LLAMA3_GENERATION)
    return _save(model, tokenizer, out_dir)


def qwen_instruct(out_dir, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, seed: int = 0) -> Path:
    """A random tiny `Qwen2ForCausalLM` with Qwen2.5-Instruct's conventions (marl.default_chat): ChatML, EOS
    `<|im_end|>`, pad `<|endoftext|>`, no BOS, an EOS list and its own sampling settings in generation_config.json."""
    from marl.default_chat import save_tiny_random_chat

    return save_tiny_random_chat(out_dir, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                 seed=seed)


BUILDERS = {"gpt2_pad_eos": gpt2_pad_eos, "llama_bos_no_pad": llama_bos_no_pad, "marl_default": marl_default,
            "qwen_instruct": qwen_instruct, "llama3_instruct": llama3_instruct}
INSTRUCT_CONVENTIONS = ("qwen_instruct", "llama3_instruct")


def build(convention: str, out_dir, **kwargs) -> Path:
    """The model folder of one of `CONVENTIONS` or `INSTRUCT_CONVENTIONS` (kwargs: vocab_size, hidden_size, num_layers, num_heads, seed)."""
    return BUILDERS[convention](out_dir, **kwargs)


def _save(model, tokenizer, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _save_tokenizer(tokenizer, out)
    return out
