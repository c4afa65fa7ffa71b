"""The instruct-style embedded default (`default-chat`): a tiny Qwen2 with Qwen2.5-Instruct's conventions
and the default corpus as conversations, built offline, deterministically, and cached like marl.default.

The conventions, as Qwen2.5-Instruct has them:

- the ChatML template (marl.chat.CHATML) with a default system message;
- `<|im_start|>` / `<|im_end|>` special tokens; EOS `<|im_end|>`; pad `<|endoftext|>`; no BOS;
- `generation_config.json` lists `<|im_end|>` and `<|endoftext|>` as EOS and sets its own sampling
  (`GENERATION`), which marl never applies to rollouts (marl.model: only marl's sampling settings);
- tied input and output embeddings.

The conversations: the user asks to continue a review's opening, the assistant writes the rest.

- sft: `messages` [user, assistant], (opening, completion) pairs of every sentiment level;
- reward: `prompt` [user], `chosen` / `rejected` [assistant]: the default corpus's pairs;
- prompts: `prompt` [user]: the default corpus's openings.

Public API: ``build_chat_corpus``, ``ensure_chat_data``, ``chat_tokenizer``, ``ensure_chat_model``,
``save_tiny_random_chat``, ``CHAT_MODEL``, ``CHAT_DATASET``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from .chat import CHATML
from .default import (MODEL_SHAPE, PRETRAIN, SPLIT_SIZES, artifact_dir, build_corpus, ensure_built,
                      ensure_default_tokenizer, pretrain, review_parts, save_tokenizer)

CHAT_MODEL = "default-chat"
CHAT_DATASET = "default-chat"
INSTRUCTION = "Continue this movie review: "
CHAT_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5-Instruct's own sampling settings: a rollout that obeyed them would not be the softmax PPO trains
GENERATION = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
# conversations are about twice as long as the reviews in them: half the epochs cost what the default's cost
CHAT_PRETRAIN = PRETRAIN | {"epochs": 2}
_RECIPE = {"corpus": "chat-v1", "instruction": INSTRUCTION, "template": CHATML, "special": CHAT_SPECIAL,
           "generation": GENERATION, "model_shape": MODEL_SHAPE, "pretrain": CHAT_PRETRAIN}


def user(opening: str) -> list[dict]:
    return [{"role": "user", "content": INSTRUCTION + opening}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text.strip()}]


def build_chat_corpus(seed: int = 1) -> dict[str, list[dict]]:
    """The six splits of the default corpus as conversations (train and test disjoint)."""
    corpus = build_corpus()
    out: dict[str, list[dict]] = {}
    rng, seen, sft = random.Random(seed), set(), []
    while len(sft) < SPLIT_SIZES["sft_train"] + SPLIT_SIZES["sft_test"]:
        opening, completion = review_parts(rng)
        if (opening, completion) not in seen:
            seen.add((opening, completion))
            sft.append({"messages": user(opening) + assistant(completion)})
    out["sft_train"], out["sft_test"] = sft[:SPLIT_SIZES["sft_train"]], sft[SPLIT_SIZES["sft_train"]:]
    for split in ("train", "test"):
        out[f"reward_{split}"] = [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]),
                                   "rejected": assistant(r["rejected"])} for r in corpus[f"reward_{split}"]]
        out[f"prompts_{split}"] = [{"prompt": user(r["prompt"])} for r in corpus[f"prompts_{split}"]]
    return out


def ensure_chat_data(cache_dir=None) -> Path:
    """Directory holding the conversational corpus as ``<split>.jsonl`` files (see ``build_chat_corpus``)."""

    def build(tmp: Path) -> dict:
        for split, rows in build_chat_corpus().items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {}

    return ensure_built(artifact_dir("chat-data", cache_dir), build, {"sizes": SPLIT_SIZES, **_RECIPE})


def chat_tokenizer():
    """The default tokenizer's BPE with Qwen2.5-Instruct's special tokens and conventions (see the module)."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(ensure_default_tokenizer())
    tok = Tokenizer.from_str(base.backend_tokenizer.to_str())
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS
    tok.add_special_tokens(list(CHAT_SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=256)


def _qwen2(tokenizer, hidden_size: int, num_layers: int, num_heads: int, seed: int):
    """A freshly initialised Qwen2 for `tokenizer`, with its generation config (EOS list, sampling settings)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    end_of_text, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=end_of_text, eos_token_id=im_end)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=end_of_text, pad_token_id=end_of_text,
                                               eos_token_id=[im_end, end_of_text], **GENERATION)
    return model


def _write(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)


def ensure_chat_model(cache_dir=None) -> Path:
    """Directory of the instruct-style default model and its tokenizer, pretrained on the conversations of
    the sft and reward training splits on first use (a few minutes on a CPU)."""

    def build(tmp: Path) -> dict:
        start = time.perf_counter()
        tokenizer = chat_tokenizer()
        model = _qwen2(tokenizer, **MODEL_SHAPE, seed=PRETRAIN["seed"])
        corpus = build_chat_corpus()
        conversations = [r["messages"] for r in corpus["sft_train"]]
        conversations += [r["prompt"] + r[k] for r in corpus["reward_train"] for k in ("chosen", "rejected")]
        end = tokenizer.pad_token_id  # <|endoftext|> between documents, as in Qwen's pretraining
        docs = [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) + [end]
                for c in conversations]
        loss = pretrain(model, docs, "the instruct-style default model", CHAT_PRETRAIN)
        _write(model, tokenizer, tmp)
        return {"final_train_loss": round(loss, 4), "build_seconds": round(time.perf_counter() - start, 1)}

    return ensure_built(artifact_dir("chat-model", cache_dir), build, _RECIPE)


def save_tiny_random_chat(out_dir, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                          seed: int = 0) -> Path:
    """A random-init tiny Qwen2 with the instruct conventions (for fast tests), saved to `out_dir`."""
    tokenizer = chat_tokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(_qwen2(tokenizer, hidden_size, num_layers, num_heads, seed), tokenizer, out)
    return out
