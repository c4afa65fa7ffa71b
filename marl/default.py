"""The embedded default: an offline, deterministic sentiment corpus, tokenizer and tiny Llama.

A user with no GPU and no network runs the whole pipeline on these. Everything is
generated from phrase banks with a seeded ``random.Random``, so two machines build
the same corpus; the built artefacts are cached under ``<cache>/default-v2/``.

Public API: ``build_corpus``, ``sentiment_score``, ``ensure_default_data``,
``ensure_default_tokenizer``, ``ensure_default_model``, ``save_tiny_random_llama``,
``default_cache_dir``, ``DEFAULT_MODEL``, ``DEFAULT_DATASET``, and for the instruct-style default
(marl.default_chat) ``review_parts``, ``pretrain``, ``ensure_built``, ``artifact_dir``. Names resolve to
these folders in marl.embedded.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

from .chat import PLAIN

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_DATASET = "default"

# Bump whenever anything below changes what gets built: old caches are then ignored.
BUILDER_VERSION = "default-v2"  # v2: pretraining on one thread (v1 models depended on the caller's threads)
MARKER = "marl_default.json"
SPLIT_FILES = ("sft_train", "sft_test", "reward_train", "reward_test", "prompts_train", "prompts_test")
# The phrase banks and tables read better packed than one item a line.
# fmt: off
SPLIT_SIZES = {
    "sft_train": 4000, "sft_test": 400,
    "reward_train": 2000, "reward_test": 400,
    "prompts_train": 256, "prompts_test": 64,
}

# ---------------------------------------------------------------------------------------------
# Phrase banks. Sentiment words carry a level in {-2, -1, +1, +2}; every other word is neutral,
# so the level of a review is recoverable from its words alone (see sentiment_score).

_ADJ = {
    2: ("great", "wonderful", "beautiful", "brilliant", "superb", "excellent", "amazing", "fantastic",
        "outstanding", "stunning", "magnificent", "perfect", "gorgeous", "incredible", "remarkable",
        "spectacular"),
    1: ("good", "nice", "solid", "enjoyable", "pleasant", "decent", "charming", "fun", "engaging",
        "likable", "clever", "touching", "sweet", "lovely"),
    -1: ("bad", "boring", "weak", "dull", "bland", "flat", "slow", "forgettable", "clumsy", "messy",
         "predictable", "tedious", "uneven", "disappointing", "silly", "lazy"),
    -2: ("terrible", "awful", "horrible", "dreadful", "atrocious", "painful", "unbearable", "abysmal",
         "pathetic", "laughable", "pointless", "unwatchable", "ridiculous", "horrendous"),
}
_VERB = {
    2: ("loved", "adored", "treasured"),
    1: ("enjoyed", "liked", "appreciated"),
    -1: ("disliked", "resented", "regretted"),
    -2: ("hated", "despised", "loathed"),
}
_NOUN = {
    2: ("masterpiece", "gem", "triumph", "marvel"),
    1: ("treat", "pleasure", "delight"),
    -1: ("letdown", "disappointment", "chore"),
    -2: ("disaster", "failure", "catastrophe", "waste"),
}
_INTENS = {2: ("", "absolutely ", "truly ", "simply ", "just "), 1: ("", "quite ", "pretty ", "fairly ", "really ")}
_NEUTRAL_ADJ = ("okay", "average", "ordinary", "standard", "typical", "conventional", "modest", "fine")

# Word forms the banks do not produce but generated text may; same levels.
_EXTRA_LEXICON = {
    "love": 2, "loves": 2, "adore": 2, "best": 2,
    "enjoy": 1, "enjoys": 1, "like": 1, "likes": 1, "recommend": 1, "recommended": 1, "worth": 1,
    "bored": -1, "dislike": -1, "mediocre": -1,
    "hate": -2, "hates": -2, "worst": -2,
}
LEXICON: dict[str, int] = {
    **{w: lvl for bank in (_ADJ, _VERB, _NOUN) for lvl, words in bank.items() for w in words},
    **_EXTRA_LEXICON,
}
_NEGATORS = {"not", "no", "never", "hardly", "nothing"}

_TITLES = (
    "Night Harbor", "The Last Orchard", "Paper Moons", "Iron Valley", "Silver Lake", "The Glass Tower",
    "Northern Lights", "The Long Road Home", "Copper Sky", "Winter Garden", "The Seventh Door",
    "Salt and Stone", "River of Clocks", "The Hollow Crown", "Echo Park", "Blue Meridian",
    "The Lighthouse Keeper", "Dust and Thunder", "A Quiet Town", "The Paper Kingdom", "Red Canyon",
    "Midnight Express", "The Clockmaker", "Harbor Lights", "Ashes of Summer", "The Tin Soldier",
    "Velvet Streets", "The Ninth Planet", "Open Water", "The Old Mill", "Crimson Tide Rising",
    "Shadow Lane", "The Orchard Thief", "Cold Harbor", "Starlight Motel", "The Winter Guest",
    "Golden Fields", "The Deep End", "Lantern Festival", "The Iron Bridge", "Falling Leaves",
    "The Sound of Rain", "Ocean Drive", "The Mapmaker", "Little Italy", "The Far Shore",
    "Stone Circle", "Fireflies", "The Silent Hour", "Neon City",
)
_GENRES = (
    "comedy", "drama", "thriller", "horror film", "romance", "western", "science fiction film",
    "musical", "documentary", "war film", "mystery", "animated film", "fantasy film", "crime drama",
    "family film", "action film",
)
_ASPECTS = (
    "acting", "plot", "script", "dialogue", "soundtrack", "music", "cinematography", "pacing",
    "ending", "cast", "visual style", "direction", "humor", "effects work", "lead actor", "villain",
    "story", "editing", "camera work", "set design",
)
_DURATIONS = ("ninety minutes", "two hours", "two and a half hours", "an hour and a half", "three hours")
_PLACES = ("a small town", "New York", "a space station", "the desert", "Paris", "a fishing village",
           "the nineteenth century", "a boarding school", "a busy hospital", "the far north")
_CHARACTERS = ("a retired detective", "two sisters", "a young chef", "a robot", "a family of farmers",
               "an old sailor", "a rookie cop", "a jazz pianist", "a schoolteacher", "three friends")

# Openings end where a completion can go on: after "was"/"is" comes a predicate ("adj"), after
# "and" a verb phrase ("and"), after ":" or "." a whole sentence ("sent").
_OPENINGS = {
    "adj": ("The movie was", "This film was", "Overall, the film was", "Honestly, the movie was",
            "{title} was", "Honestly, {title} was", "I thought {title} was", "This {genre} was",
            "The acting in {title} was", "The plot of {title} was", "The new {genre} {title} is",
            "{title} is", "In my opinion, {title} is", "As a {genre}, {title} is"),
    "and": ("I watched {title} last night and", "I saw {title} with my family and",
            "We rented {title} on Friday and", "I finally caught {title} at the cinema and",
            "My friends took me to see {title} and", "I streamed {title} over the weekend and",
            "I watched the movie last night and", "We saw this {genre} yesterday and"),
    "sent": ("Review of {title}:", "My thoughts on {title}:", "{title}, a {genre}.",
             "Just got back from {title}.", "I saw {title} this week.",
             "{title} is a {genre} about {character}.", "So, {title}."),
}
_FIRST = {  # the predicate right after an opening; level 0 is "mixed" and never polar
    "adj": {"polar": ("{intens}{adj}.", "{intens}{adj} from start to finish.",
                      "{intens}{adj}, and I {verb} it.", "a {adj} {genre}."),
            0: ("{neutral}.", "{neutral}, nothing more.", "{pos} in places but {neg} in others.")},
    "and": {"polar": ("{verb} it.", "{verb} every minute of it.", "found it {intens}{adj}.",
                      "thought it was {intens}{adj}."),
            0: ("thought it was {neutral}.", "found it {pos} but {neg}.",
                "felt it was {neutral} overall.")},
}
_BODY = {
    "polar": ("The {aspect} was {intens}{adj}.", "The {aspect} and the {aspect2} were {adj}.",
              "I {verb} the {aspect}.", "The {aspect} felt {adj} and the {aspect2} was {adj2}.",
              "It is a real {noun}.", "What a {noun}.", "Overall, it is a {adj} {genre}."),
    0: ("The {aspect} was {neutral}.", "The {aspect} was {pos} but the {aspect2} was {neg}.",
        "Some parts were {pos} and some were {neg}.", "The {aspect} felt {neutral} to me."),
}
_FACTS = ("It runs about {duration}.", "It is set in {place}.", "The story follows {character}.")

_WORD_RANGE = (15, 40)
# fmt: on


def sentiment_score(text: str) -> float:
    """Lexicon sentiment of ``text`` in [-1, 1]: the mean level of its sentiment words, halved.

    A negator ("not", "never", "n't", ...) up to two words before a sentiment word flips it.
    Text without sentiment words scores 0.
    """
    words = re.findall(r"[a-z']+", text.lower())
    levels = []
    for i, word in enumerate(words):
        level = LEXICON.get(word)
        if level is None:
            continue
        if any(w in _NEGATORS or w.endswith("n't") for w in words[max(0, i - 2) : i]):
            level = -level
        levels.append(level)
    return sum(levels) / (2 * len(levels)) if levels else 0.0


# ---------------------------------------------------------------------------------------------
# Corpus generation.


def _fix_articles(text: str) -> str:
    """'a' -> 'an' before a vowel, since templates do not know which word fills a slot."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", lambda m: m.group(1) + "n ", text)


def _fill(template: str, level: int, genre: str, rng: random.Random) -> str:
    """Fill a template's slots with words of ``level`` (0: balanced or neutral words)."""
    mag = abs(level) or rng.choice((1, 2))  # the magnitude of a balanced pair in a mixed sentence
    aspect, aspect2 = rng.sample(_ASPECTS, 2)
    slots = {
        "aspect": aspect,
        "aspect2": aspect2,
        "genre": genre,
        "duration": rng.choice(_DURATIONS),
        "place": rng.choice(_PLACES),
        "character": rng.choice(_CHARACTERS),
        "neutral": rng.choice(_NEUTRAL_ADJ),
        "pos": rng.choice(_ADJ[mag]),
        "neg": rng.choice(_ADJ[-mag]),
    }
    if level:
        adj, adj2 = rng.sample(_ADJ[level], 2)
        slots.update(
            adj=adj,
            adj2=adj2,
            verb=rng.choice(_VERB[level]),
            noun=rng.choice(_NOUN[level]),
            intens=rng.choice(_INTENS[abs(level)]),
        )
    return template.format(**slots)


def _opening(rng: random.Random) -> tuple[str, str, str]:
    """A random review opening, its kind ("adj", "and" or "sent") and the film's genre."""
    kind = rng.choice(tuple(_OPENINGS))
    genre = rng.choice(_GENRES)
    text = rng.choice(_OPENINGS[kind]).format(
        title=rng.choice(_TITLES), genre=genre, character=rng.choice(_CHARACTERS)
    )
    return _fix_articles(text), kind, genre


def _completion(kind: str, genre: str, level: int, n_more: int, rng: random.Random) -> str:
    """What follows an opening of ``kind``: a first predicate at ``level`` plus ``n_more`` sentences."""
    group = 0 if level == 0 else "polar"
    first = rng.choice(_BODY[group] if kind == "sent" else _FIRST[kind][group])
    # Neutral facts among the later sentences make reviews less formulaic without changing their
    # sentiment; no template twice in one review.
    more = rng.sample([t for t in _BODY[group] + _FACTS if t != first], n_more)
    sentences = [_fill(t, level, genre, rng) for t in [first, *more]]
    return _fix_articles("".join(" " + s for s in sentences))


def _in_range(*texts: str) -> bool:
    lo, hi = _WORD_RANGE
    return all(lo <= len(t.split()) <= hi for t in texts)


def review_parts(rng: random.Random) -> tuple[str, str]:
    """One review at a uniformly drawn level, 15-40 words, as (opening, completion): the completion starts
    with a space and goes on where the opening stops."""
    level = rng.choice((-2, -1, 0, 1, 2))
    while True:
        opening, kind, genre = _opening(rng)
        completion = _completion(kind, genre, level, rng.choice((1, 2)), rng)
        if _in_range(opening + completion):
            return opening, completion


def _review(rng: random.Random) -> str:
    """One review at a uniformly drawn level, 15-40 words."""
    return "".join(review_parts(rng))


# Pairs differ by at least two levels, so chosen is clearly the more positive one.
_PAIR_LEVELS = ((2, 0), (2, -1), (2, -2), (1, -1), (1, -2), (0, -2))


def _pair(rng: random.Random) -> dict:
    """A preference pair: one opening, two completions of the same shape at different levels."""
    hi, lo = rng.choice(_PAIR_LEVELS)
    while True:
        prompt, kind, genre = _opening(rng)
        n_more = rng.choice((1, 2))  # shared, so chosen and rejected have the same length profile
        chosen, rejected = (_completion(kind, genre, lvl, n_more, rng) for lvl in (hi, lo))
        if _in_range(prompt + chosen, prompt + rejected):
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _unique(make: Callable[[], object], n: int) -> list:
    """``n`` distinct items drawn from ``make`` (deduplicated, first occurrence kept)."""
    seen, items = set(), []
    while len(items) < n:
        item = make()
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            items.append(item)
    return items


def build_corpus(seed: int = 0) -> dict[str, list[dict]]:
    """The default corpus in memory: the six splits of ``SPLIT_FILES``, train and test disjoint.

    ``sft_*`` rows are ``{"text"}``, ``reward_*`` rows ``{"prompt", "chosen", "rejected"}`` (the
    completions start with a space and exclude the prompt), ``prompts_*`` rows ``{"prompt"}``.
    """
    rng = random.Random(seed)
    out = {}
    for stage, make in (
        ("sft", lambda: {"text": _review(rng)}),
        ("reward", lambda: _pair(rng)),
        ("prompts", lambda: {"prompt": _opening(rng)[0]}),
    ):
        n_train, n_test = SPLIT_SIZES[f"{stage}_train"], SPLIT_SIZES[f"{stage}_test"]
        rows = _unique(make, n_train + n_test)
        out[f"{stage}_train"], out[f"{stage}_test"] = rows[:n_train], rows[n_train:]
    return out


@functools.lru_cache(maxsize=1)
def _corpus_hash() -> str:
    """Hash of the default corpus: a cache built from another corpus is stale."""
    return hashlib.sha256(json.dumps(build_corpus(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Cache: one directory per artefact, built in a temp dir beside it and renamed into place under
# an exclusive file lock; the marker file is written last, so its presence means "complete".


def default_cache_dir() -> Path:
    """``$MARL_CACHE`` if set, else ``~/.cache/marl``."""
    return Path(os.environ.get("MARL_CACHE") or Path.home() / ".cache" / "marl")


def artifact_dir(name: str, cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / BUILDER_VERSION / name


def _fingerprint(recipe: dict) -> str:
    """What a cached artefact was built from: builder version, corpus and the artefact's recipe."""
    key = {"builder_version": BUILDER_VERSION, "corpus_hash": _corpus_hash(), **recipe}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _is_complete(target: Path, fingerprint: str) -> bool:
    try:
        return json.loads((target / MARKER).read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Atomically make ``target`` the directory that ``write(tmp_dir)`` fills, replacing any old one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _own_random_streams():
    """Run a cache build without touching the caller's random streams (python, numpy, torch CPU).

    Building the default model seeds and draws from torch's RNG. A stage that seeded itself and
    then built the cache (a cold cache) would otherwise train differently from the same stage
    on a warm cache: the sft adapter of `make sft` differed between the two.
    """
    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def ensure_built(target: Path, build: Callable[[Path], dict], recipe: dict) -> Path:
    """Return ``target``, first running ``build(tmp_dir) -> marker info`` unless it is complete and
    was built from the same ``recipe`` (JSON-able settings that change what ``build`` makes)."""
    fingerprint = _fingerprint(recipe)
    if _is_complete(target, fingerprint):
        return target

    def write(tmp: Path) -> None:
        with _own_random_streams():
            built = build(tmp)
        info = {
            "fingerprint": fingerprint,
            "builder_version": BUILDER_VERSION,
            "corpus_hash": _corpus_hash(),
            **recipe,
            **built,
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _is_complete(target, fingerprint):  # else another process built it while we waited
            _replace_dir(target, write)
    return target


def ensure_default_data(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the default corpus as ``<split>.jsonl`` files (see ``build_corpus``)."""

    def build(tmp: Path) -> dict:
        for split, rows in build_corpus().items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {}

    return ensure_built(artifact_dir("data", cache_dir), build, {"sizes": SPLIT_SIZES})


# ---------------------------------------------------------------------------------------------
# Tokenizer.

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
VOCAB_SIZE = 1536
CHAT_TEMPLATE = PLAIN  # "User: ...\nAssistant: ...</s>" (marl.chat)
_TOKENIZER_RECIPE = {"vocab_size": VOCAB_SIZE, "chat_template": CHAT_TEMPLATE}


def _corpus_texts(corpus: dict[str, list[dict]], splits: tuple[str, ...]) -> list[str]:
    """Every text in ``splits``: SFT texts, both full texts of each preference pair, prompts."""
    texts = []
    for split in splits:
        for row in corpus[split]:
            if "text" in row:
                texts.append(row["text"])
            elif "chosen" in row:
                texts += [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
            else:
                texts.append(row["prompt"])
    return texts


def _build_tokenizer():
    """A byte-level BPE trained on the whole corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat roles are in the training text too, so chat-formatted prompts tokenize compactly.
    chat = ["System: You are a movie critic.\nUser: Review a film.\nAssistant: Sure.\n"] * 50
    tok.train_from_iterator(_corpus_texts(build_corpus(), SPLIT_FILES) + chat, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=CHAT_TEMPLATE, model_max_length=256, **SPECIAL_TOKENS
    )


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """``save_pretrained``, readable by transformers 4.x too (e.g. beside old TRL, for comparisons).

    transformers 5 names its own backend class and keeps the chat template in a separate file;
    4.x knows neither, so name the class both understand and inline the template as well.
    """
    tokenizer.save_pretrained(out_dir)
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=tokenizer.chat_template)
    path.write_text(json.dumps(config, indent=2) + "\n")


def ensure_default_tokenizer(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the default tokenizer (loadable with ``AutoTokenizer.from_pretrained``)."""

    def build(tmp: Path) -> dict:
        tokenizer = _build_tokenizer()
        save_tokenizer(tokenizer, tmp)
        return {"vocab_size": len(tokenizer)}

    return ensure_built(artifact_dir("tokenizer", cache_dir), build, _TOKENIZER_RECIPE)


# ---------------------------------------------------------------------------------------------
# Model.

MODEL_SHAPE = {"hidden_size": 128, "num_layers": 4, "num_heads": 4}
PRETRAIN = {"seed": 0, "epochs": 4, "block_size": 128, "batch_size": 16, "lr": 3e-3, "warmup": 0.05}


def _llama(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, seed: int):
    """A freshly initialised Llama whose special token ids are those of the default tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # The default tokenizer's special tokens are trained first, in SPECIAL_TOKENS order.
    pad_id, bos_id, eos_id = 0, 1, 2
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _blocks(token_lists: list[list[int]], block_size: int, rng: random.Random):
    """One epoch of LM training blocks: the documents shuffled, concatenated, cut to ``block_size``."""
    import torch

    order = list(range(len(token_lists)))
    rng.shuffle(order)
    stream = [t for i in order for t in token_lists[i]]
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size]).view(n, block_size)


def _pretrain(model, tokenizer) -> float:
    """Train all weights as a causal LM on the train reviews; return the final smoothed loss."""
    texts = _corpus_texts(build_corpus(), ("sft_train", "reward_train"))
    # bos from the post-processor, eos appended: the model learns where a review ends.
    return pretrain(model, [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]])


def pretrain(model, docs: list[list[int]], what: str = "the default model", recipe: dict = PRETRAIN) -> float:
    """Train all weights of `model` as a causal LM on token-id documents (shuffled and concatenated into
    blocks each epoch, `recipe` as PRETRAIN); return the final smoothed loss.

    It runs on one CPU thread whatever the caller set: a matmul's float sums depend on how many threads
    split it, so the built model would otherwise depend on who built it first (a stage with
    `torch_threads: 1`, or the bench and the tests with torch's default, gave two different models)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_loop(model, docs, what, recipe)
    finally:
        torch.set_num_threads(threads)


def _pretrain_loop(model, docs: list[list[int]], what: str, recipe: dict) -> float:
    import torch
    from tqdm.auto import tqdm

    rng = random.Random(recipe["seed"])
    epochs = [_blocks(docs, recipe["block_size"], rng) for _ in range(recipe["epochs"])]
    batches = [b for blocks in epochs for b in blocks.split(recipe["batch_size"])]

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, int(recipe["warmup"] * len(batches)))

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, len(batches) - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    smoothed = None
    bar = tqdm(batches, desc=f"marl: pretraining {what}", unit="step")
    for batch in bar:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the default base model and its tokenizer, pretrained on first use (~1-2 min).

    Loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer

    tokenizer_dir = ensure_default_tokenizer(cache_dir)

    def build(tmp: Path) -> dict:
        logger.info("Building the embedded default model (once, cached in %s)", tmp.parent)
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = _llama(len(tokenizer), **MODEL_SHAPE, seed=PRETRAIN["seed"])
        loss = _pretrain(model, tokenizer)
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        seconds = round(time.perf_counter() - start, 1)
        logger.info("Default model pretrained in %.0f s, final train loss %.3f", seconds, loss)
        return {"final_train_loss": round(loss, 4), "build_seconds": seconds}

    recipe = {"tokenizer": _TOKENIZER_RECIPE, "model_shape": MODEL_SHAPE, "pretrain": PRETRAIN}
    return ensure_built(artifact_dir("model", cache_dir), build, recipe)


def save_tiny_random_llama(
    out_dir: str | os.PathLike,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    vocab_from_default: bool = True,
) -> Path:
    """Save a random-init tiny Llama (for fast tests) to ``out_dir``, atomically; no pretraining.

    With ``vocab_from_default`` the default tokenizer is saved beside it and sizes its vocabulary;
    without, the model has a 256-token vocabulary and no tokenizer is written.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_tokenizer()) if vocab_from_default else None
    model = _llama(len(tokenizer) if tokenizer is not None else 256, hidden_size, num_layers, num_heads, seed)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)

    _replace_dir(Path(out_dir), write)
    return Path(out_dir)
