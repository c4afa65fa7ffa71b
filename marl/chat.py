"""Prompts and conversations: the chat template a run uses, prompts through it, and the token ids the
reward adapter scores, built exactly as TRL's RewardTrainer built its training pairs.

A prompt is text (`str`) or a conversation (a list of `{"role", "content"}` messages, TRL's
conversational format). A conversation goes through the tokenizer's chat template with the
generation prompt; text is tokenized as it is.

What RewardTrainer (TRL 1.16) trained on, and so what the reward adapter must score
(docs/known-issues.md #2):

- text: `prompt + completion + eos_token` (EOS appended unless the text ends in it), tokenized as
  one text (BOS if the tokenizer adds one);
- conversational: `apply_chat_template(prompt + [{"role": "assistant", "content": completion}])`,
  tokenized, no generation prompt and no EOS appended: the template's own end-of-turn tokens
  (`<|im_end|>`, `<|eot_id|>`) are what the score is read after.

The completion is the response's text before its first stop token, decoded with its special tokens
kept, so nothing the template or the policy wrote is lost between sampling and scoring.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from .errors import MarlError

Prompt = str | list  # text, or a list of {"role", "content"} messages

# ChatML as Qwen2.5-Instruct writes it (a default system message when the conversation has none).
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# marl's plain template (the embedded default model's): any tokenizer with an EOS token can use it.
PLAIN = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    # The space belongs to the answer: byte-level BPE attaches it to the answer's first word.
    "Assistant:{% generation %} {{ message['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "plain": PLAIN}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def is_conversation(prompt) -> bool:
    """Whether `prompt` is a conversation: a list of messages with a role and content."""
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def set_chat_template(tokenizer, value: str | None) -> None:
    """Give `tokenizer` the chat template the config names: None keeps the tokenizer's own; `chatml`
    (Qwen2.5-Instruct's); `plain` (`User: ...` / `Assistant: ...<eos>`, for any tokenizer); or a .jinja file. A named template whose special tokens the vocabulary lacks is refused."""
    if value in (None, "", "none", "null"):
        return
    if value in NAMED_TEMPLATES:
        if value == "chatml":
            missing = [t for t in CHATML_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
            if missing:
                raise MarlError(f"chat_template: chatml needs the tokens {', '.join(CHATML_TOKENS)}, which this "
                                f"tokenizer lacks ({missing[0]}): give a .jinja file written for this tokenizer")
        tokenizer.chat_template = NAMED_TEMPLATES[value]
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise MarlError(f"chat_template: {value!r} is neither a template name ({', '.join(NAMED_TEMPLATES)}) nor a "
                        "file: give a .jinja file, a name, or null for the tokenizer's own")
    tokenizer.chat_template = path.read_text()


def template_stop_ids(tokenizer) -> set[int]:
    """Stop tokens a chat template implies beyond the tokenizer's EOS: ChatML's `<|im_end|>` when the
    template writes it (a base tokenizer given `chat_template: chatml` ends turns there)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "<|im_end|>" in template:
        i = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if i is not None and i != tokenizer.unk_token_id:
            return {i}
    return set()


def turn_end_ids(tokenizer) -> list[int]:
    """The tokens the chat template writes after an assistant message's content (ChatML: `<|im_end|>\\n`,
    Llama 3: `<|eot_id|>`), or [] without a template. A sequence ending in them is a conversation formatted
    as RewardTrainer formats one: no EOS is appended to it (docs/known-issues.md #14)."""
    if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
        return []
    sentinel = "\u2063marl\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}],
                                         tokenize=False)
    if sentinel not in text:
        return []
    tail = text[text.rindex(sentinel) + len(sentinel):]
    return list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """A prompt's token ids: a conversation through the chat template with the generation prompt, text as is."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not tokenizer.chat_template:
        raise MarlError("the prompts are conversations (lists of messages) but the tokenizer has no chat template: "
                        "set chat_template (chatml, or a .jinja file), or give text prompts")
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def completion_text(tokenizer, ids: Sequence[int], stop_ids: Collection[int]) -> str:
    """The text of a response (token ids without padding): what comes before its first stop token, with
    any other special token kept as written (the reward adapter's input is built from it)."""
    ids = list(ids)
    for i, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=False)


def reward_ids(tokenizer, prompt: Prompt, completion: str) -> list[int]:
    """The token ids TRL's RewardTrainer would have made of (prompt, completion): see the module docstring."""
    if isinstance(prompt, str):
        text = prompt + completion
        eos = tokenizer.eos_token or ""
        return list(tokenizer(text if text.endswith(eos) else text + eos)["input_ids"])
    messages = [*prompt, {"role": "assistant", "content": completion}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def completion_for_functions(prompt: Prompt, completion: str):
    """A completion as TRL hands it to reward functions: text, or `[{"role": "assistant", "content": ...}]`
    when the prompt is a conversation."""
    return completion if isinstance(prompt, str) else [{"role": "assistant", "content": completion}]


def prompt_from_ids(tokenizer, ids: Sequence[int]) -> str:
    """A text prompt back from its token ids (no padding), for callers that kept only ids: decoded with special
    tokens, less the BOS the tokenizer adds again when the text is encoded."""
    ids = list(ids)
    bos = tokenizer.bos_token_id
    if ids and bos is not None and ids[0] == bos and _adds_bos(tokenizer):
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
