"""Padding token rows into a batch: prompts on the left, responses on the right (marl.ppo.rollout.pad_rows)."""

from __future__ import annotations

import torch

from marl.ppo.rollout import left_pad, pad_rows


def test_prompts_pad_on_the_left_and_responses_on_the_right():
    rows = [[5, 6, 7], [8]]
    ids, mask = pad_rows(rows, 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows(rows, 9, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_tensor_rows_pad_like_lists_and_land_on_the_device():
    ids, mask = pad_rows([torch.tensor([4]), torch.tensor([1, 2])], 0, "left", torch.device("cpu"))
    assert ids.tolist() == [[0, 4], [1, 2]] and mask.tolist() == [[0, 1], [1, 1]]
    assert [t.tolist() for t in left_pad([[4], [1, 2]], 0, "cpu")] == [ids.tolist(), mask.tolist()]
