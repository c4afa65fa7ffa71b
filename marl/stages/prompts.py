"""The PPO stage's prompts: which are trained on, which are held out, and their token ids.

`marl ppo`, `marl eval` and the benchmarks choose and encode prompts here, so an
evaluation after training sees exactly the prompts the run held out.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from marl.chat import encode_prompt, is_conversation
from marl.data import load_split, prompt_texts
from marl.errors import MarlError


def train_prompts(cfg, tokenizer):
    """(dataset, texts) of the training split (every row; `max_train_samples` is the caller's)."""
    train = load_split(cfg.dataset_name, cfg.train_split, "ppo", cfg.dataset_config)
    if train is None:
        raise MarlError(f"dataset {cfg.dataset_name!r} has no split {cfg.train_split!r}: set --train_split")
    return train, prompt_texts(train, tokenizer)


def held_out_prompts(cfg, tokenizer, train_texts: list[str] | None = None) -> list[str]:
    """The held-out prompt texts: the eval split's, else the last `eval_prompts` training prompts.

    Callers take the first `eval_prompts` (or `marl eval --n`) of them. `train_texts` saves
    reading the training split again when the caller has it.
    """
    eval_ds = load_split(cfg.dataset_name, cfg.eval_split, "ppo", cfg.dataset_config)
    if eval_ds is not None:
        return prompt_texts(eval_ds, tokenizer)
    if train_texts is None:
        train = load_split(cfg.dataset_name, cfg.train_split, "ppo", cfg.dataset_config)
        if train is None:
            raise MarlError(f"dataset {cfg.dataset_name!r} has neither split {cfg.eval_split!r} nor "
                            f"{cfg.train_split!r}: set --eval_split (marl eval: give --prompts FILE)")
        train_texts = prompt_texts(train, tokenizer)
    return train_texts[-cfg.eval_prompts:]


def encode_prompts(model, texts: list, cfg, what: str) -> list[list[int]]:
    """Token ids of each prompt (text, or a conversation through the chat template with the generation prompt:
    marl.chat.encode_prompt); prompts over max_prompt_length tokens are dropped (and counted)."""
    return encode_prompt_rows(model, texts, cfg, what)[0]


def encode_prompt_rows(model, texts: list, cfg, what: str) -> tuple[list[list[int]], list[int]]:
    """`encode_prompts`, and the index in `texts` of each prompt kept (to carry its dataset columns)."""
    context = getattr(model.base.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and cfg.max_prompt_length + cfg.max_new_tokens > context:
        raise MarlError(f"max_prompt_length + max_new_tokens = {cfg.max_prompt_length + cfg.max_new_tokens} exceeds "
                        f"the model's context of {context} tokens: lower one of them")
    rows = [(j, encode_prompt(model.tokenizer, t)) for j, t in enumerate(texts)
            if (isinstance(t, str) or is_conversation(t)) and t]
    kept = [(j, i) for j, i in rows if 0 < len(i) <= cfg.max_prompt_length]
    if not kept:
        longest = max((len(i) for _, i in rows), default=0)
        raise MarlError(f"every {what} prompt is longer than max_prompt_length={cfg.max_prompt_length} tokens "
                        f"(longest {longest}) or empty: raise max_prompt_length or use shorter prompts")
    if len(kept) < len(rows):
        tqdm.write(f"ppo: dropped {len(rows) - len(kept)} of {len(rows)} {what} prompts longer than "
                   f"{cfg.max_prompt_length} tokens")
    return [i for _, i in kept], [j for j, _ in kept]
