"""marl.ppo.reward_norm: batch and running normalisation of reward-model scores, by hand."""

import json
import math

import pytest
import torch

from marl import dist
from marl.ppo.reward_norm import RunningMoments, normalize_scores


def test_running_moments_by_hand_equal_the_moments_of_everything_seen():
    m = RunningMoments()
    m.update(torch.tensor([1.0, 3.0]))
    # n 2, mean 2, M2 = 1 + 1 = 2, sample var 2 / 1 = 2
    assert (m.count, m.mean, m.m2) == (2.0, 2.0, 2.0)
    m.update(torch.tensor([5.0, 7.0, 9.0]))
    # batch: n 3, mean 7, M2 = 4 + 0 + 4 = 8; d = 5; n = 5, mean = 2 + 5 * 3 / 5 = 5,
    # M2 = 2 + 8 + 25 * 2 * 3 / 5 = 40 -> sample var 40 / 4 = 10 (= var of 1, 3, 5, 7, 9)
    assert m.count == 5.0 and m.mean == pytest.approx(5.0) and m.m2 == pytest.approx(40.0)
    assert m.std == pytest.approx(math.sqrt(10.0))
    allx = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])
    assert m.std == pytest.approx(float(allx.std()))


def test_batch_norm_by_hand():
    out = normalize_scores(torch.tensor([1.0, 2.0, 3.0]), "batch")
    # mean 2, sample std 1 -> -1, 0, 1
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 1.0]))


def test_running_norm_uses_every_score_so_far_including_this_batch():
    m = RunningMoments()
    first = normalize_scores(torch.tensor([0.0, 2.0]), "running", m)  # mean 1, std sqrt(2)
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]) / math.sqrt(2.0))
    second = normalize_scores(torch.tensor([4.0]), "running", m)  # all: 0, 2, 4 -> mean 2, std 2
    torch.testing.assert_close(second, torch.tensor([1.0]))


def test_none_leaves_scores_alone_and_a_single_score_is_only_centred():
    x = torch.tensor([3.0, -1.0])
    assert normalize_scores(x, "none") is x
    torch.testing.assert_close(normalize_scores(torch.tensor([5.0]), "batch"), torch.tensor([0.0]))


def test_state_round_trips_through_json():
    m = RunningMoments()
    m.update(torch.tensor([0.5, 1.5, -2.0]))
    fresh = RunningMoments()
    fresh.load_state_dict(json.loads(json.dumps(m.state_dict())))
    x = torch.tensor([1.0, 4.0])
    torch.testing.assert_close(normalize_scores(x, "running", fresh), normalize_scores(x, "running", m))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="reward_norm"):
        normalize_scores(torch.tensor([1.0]), "whiten")


class _Reduced(Exception):
    pass


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_the_batch_sums_are_all_reduced_on_the_scores_device(monkeypatch, mode):
    """NCCL all-reduces CUDA tensors only: the sums must live where the scores do (here the meta device
    stands in for a GPU; the fake all-reduce records the device and stops there)."""
    seen = []

    def fake_all_reduce(tensors):
        seen.extend(t.device for t in tensors)
        raise _Reduced

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", fake_all_reduce, raising=False)
    monkeypatch.setattr(dist, "all_reduce_mean", fake_all_reduce)
    with pytest.raises(_Reduced):
        normalize_scores(torch.ones(4, device="meta"), mode, RunningMoments())
    assert seen == [torch.device("meta")]


def test_two_processes_normalise_with_the_moments_of_both(monkeypatch):
    # process 0 holds 1, 3; process 1 holds 5, 7, 9 (its sums: n 3, sum 21, sum of squares 155)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum",
                        lambda ts: [t.add_(torch.tensor([3.0, 21.0, 155.0], dtype=t.dtype)) for t in ts])
    out = normalize_scores(torch.tensor([1.0, 3.0]), "batch")
    # all five: mean 5, sample std sqrt(10) -> (1 - 5) / sqrt 10, (3 - 5) / sqrt 10
    torch.testing.assert_close(out, torch.tensor([-4.0, -2.0]) / math.sqrt(10.0))
