"""marl.textstats: diversity and repetition of responses, on hand-worked examples."""

import pytest

from marl.textstats import CollapseWatch, distinct_n, mean_words, repeated_ngram_rate, text_stats, words


def test_words_split_punctuation_and_lower_case():
    assert words("Great film, isn't it?") == ["great", "film", ",", "isn't", "it", "?"]


def test_distinct_n_by_hand():
    texts = ["a b a", "a b c"]
    # unigrams: a b a a b c -> 6, unique {a, b, c} = 3 -> 0.5
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams: (a b) (b a) (a b) (b c) -> 4, unique 3 -> 0.75
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n([], 2) == 0.0 and distinct_n(["one"], 2) == 0.0  # no bigram at all


def test_distinct_n_collapses_when_every_response_is_the_same():
    one = "performance of performance of performance"
    # 5 unigrams, unique {performance, of} -> 0.4; 4 bigrams, unique {(performance of), (of performance)} -> 0.5
    assert distinct_n([one], 1) == pytest.approx(0.4)
    assert distinct_n([one], 2) == pytest.approx(0.5)
    # eight copies: 32 bigrams, still 2 unique -> 1/16
    assert distinct_n([one] * 8, 2) == pytest.approx(2 / 32)


def test_distinct_n_in_groups_compares_sets_of_different_sizes():
    texts = ["a b", "a b", "c d", "e f", "g"]
    # groups of 2: ["a b", "a b"] -> 1/2 ; ["c d", "e f"] -> 2/2 ; the short last group ["g"] is dropped
    assert distinct_n(texts, 2, group=2) == pytest.approx((0.5 + 1.0) / 2)
    assert distinct_n(texts[:2], 2, group=4) == distinct_n(texts[:2], 2)  # fewer texts than a group: one set


def test_repeated_ngram_rate_by_hand():
    # 6 words -> 3 four-grams: (a b c a) (b c a b) (c a b c), all unique -> 0
    # 7 words "x y x y x y x" -> 4 four-grams: (x y x y) (y x y x) (x y x y) (y x y x) -> unique 2 -> 1 - 2/4 = 0.5
    # 2 words -> no four-gram -> 0 ; mean (0 + 0.5 + 0) / 3
    assert repeated_ngram_rate(["a b c a b c", "x y x y x y x", "too short"]) == pytest.approx(0.5 / 3)
    assert repeated_ngram_rate([]) == 0.0


def test_mean_words_and_text_stats_together():
    texts = ["a b a", "a b c"]
    assert mean_words(texts) == 3.0
    st = text_stats(texts)
    assert st == (pytest.approx(0.5), pytest.approx(0.75), 0.0, 3.0)
    assert st._asdict().keys() == {"distinct_1", "distinct_2", "repeat_4", "words"}


def test_collapse_watch_warns_once_when_reward_rises_while_distinct_2_halves():
    watch = CollapseWatch(reference_distinct_2=0.8)  # threshold 0.4
    assert watch.check("policy_a", reward=1.0, distinct_2=0.1) is None  # first reward: nothing to rise from
    assert watch.check("policy_a", reward=0.5, distinct_2=0.1) is None  # reward fell
    assert watch.check("policy_a", reward=2.0, distinct_2=0.45) is None  # diverse enough
    msg = watch.check("policy_a", reward=2.0, distinct_2=0.39)
    assert msg is not None and "policy_a" in msg and "1.000 -> 2.000" in msg and "0.800" in msg
    assert watch.check("policy_a", reward=3.0, distinct_2=0.1) is None  # once per policy
    assert watch.check("policy_b", reward=0.0, distinct_2=0.9) is None  # policies are watched apart
    assert watch.check("policy_b", reward=0.1, distinct_2=0.2) is not None
    assert CollapseWatch(None).check("policy_a", 1.0, 0.0) is None  # no reference measured: no warning
