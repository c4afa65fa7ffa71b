"""The experience record and the plan of the shared update passes: hand-worked small inputs, no model."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from marl.config import PPOArgs
from marl.multilora import Execution, Layout
from marl.ppo.advantages import masked_whiten
from marl.ppo.estimators import reinforce_pp_advantages
from marl.ppo.experience import make_experience, plan_passes
from marl.ppo.losses import returns_scale
from marl.ppo.rollout import Rollout


def rollout_of_two_policies() -> Rollout:
    """3 rows, R = 2: policy p owns rows 0 and 2, q row 1. Row 0 ends with EOS (id 2); row 2 stops after one
    token (its second is padding)."""
    return Rollout(prompt_ids=torch.tensor([[9], [9], [9]]), prompt_mask=torch.ones(3, 1, dtype=torch.long),
                   response_ids=torch.tensor([[5, 2], [5, 6], [6, 0]]),
                   response_mask=torch.tensor([[1, 1], [1, 1], [1, 0]]), adapter_names=["p", "q", "p"],
                   temperatures=torch.ones(3))


def experience_of_p(**policy):
    cfg = PPOArgs(policies=[{"name": "p", **policy}], gamma=1.0, gae_lambda=1.0, whiten_advantages=False,
                  prompts_per_policy=2, mini_batch_size=2, num_generations=2)
    rollout = rollout_of_two_policies()
    rows = rollout.rows("p")
    scores = torch.tensor([1.0, 9.0, -1.0])
    ref_lp = torch.tensor([[-1.5, -1.0], [0.0, 0.0], [-0.5, 0.0]])
    old_lp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])  # p's rows 0 and 2
    values = torch.tensor([[0.5, 0.25], [0.25, 9.0]])  # 9.0 sits on padding: never read
    components = {"reward_model": torch.tensor([3.0, 4.0, 5.0])}
    return make_experience(cfg.policy(cfg.policies[0]), cfg, rollout, rows, scores, ref_lp, old_lp, values,
                           kl_coef=0.1, components=components)


def test_make_experience_with_a_critic_hand_worked():
    exp = experience_of_p()
    # k1 KL = old - ref: row 0 [0.5, -1.0]; row 2 [0.0, padding 0]
    torch.testing.assert_close(exp.kl, torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
    # -0.1 * KL per token, the score at the last valid token: row 0 [-0.05, 0.1 + 1], row 2 [0 - 1, 0]
    torch.testing.assert_close(exp.token_rewards, torch.tensor([[-0.05, 1.1], [-1.0, 0.0]]))
    # GAE, gamma = lambda = 1: row 0 delta_1 = 1.1 - 0.25 = 0.85, delta_0 = -0.05 + 0.25 - 0.5 = -0.3,
    # A = [-0.3 + 0.85, 0.85]; row 2 delta_0 = -1 - 0.25; returns = A + V = the rewards to go
    torch.testing.assert_close(exp.advantages, torch.tensor([[0.55, 0.85], [-1.25, 0.0]]))
    torch.testing.assert_close(exp.returns, torch.tensor([[1.05, 1.1], [-1.0, 0.0]]))
    assert exp.policy == "p" and exp.rows.tolist() == [0, 2] and exp.kl_coef == 0.1
    assert exp.scores.tolist() == [1.0, -1.0] and exp.components["reward_model"].tolist() == [3.0, 5.0]
    assert exp.mask.tolist() == [[1.0, 1.0], [1.0, 0.0]] and exp.ref_logprobs.tolist() == [[-1.5, -1.0], [-0.5, 0.0]]
    assert exp.values.tolist() == [[0.5, 0.25], [0.25, 9.0]]
    torch.testing.assert_close(exp.sequence_kl(), torch.tensor([-0.5, 0.0]))
    assert exp.has_eos(2).tolist() == [True, False]


def test_make_experience_without_a_critic_and_the_kl_in_the_loss_hand_worked():
    exp = experience_of_p(advantage_estimator="rloo", kl_in="loss", beta=0.2, kl_target=None)
    # no KL in the rewards: row 0 [0, 1], row 2 [-1, 0]; the KL itself is still measured
    torch.testing.assert_close(exp.token_rewards, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    torch.testing.assert_close(exp.kl, torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
    # RLOO, one group of G = 2: A_i = r_i - r_other = 1 - (-1) and -1 - 1, on the valid tokens
    torch.testing.assert_close(exp.advantages, torch.tensor([[2.0, 2.0], [-2.0, 0.0]]))
    assert exp.values is None and exp.returns is None and exp.kl_coef == 0.2  # the loss's beta


def test_the_pass_plan_deals_rows_policy_by_policy_and_weights_them_by_their_tokens():
    # a: micro-batches [0, 1] (3 + 1 tokens) and [2] (2 tokens): 6 in its minibatch; b: one micro-batch [1, 0]
    # (2 + 2 tokens)
    micro = {"a": [torch.tensor([0, 1]), torch.tensor([2])], "b": [torch.tensor([1, 0])]}
    tokens = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([2.0, 2.0])}
    # dealt: a0 a1 a2 | b1 b0 -> pass 1 holds all of a's minibatch (its two micro-batches), pass 2 all of b's.
    # Every token weighs the same in its minibatch's loss: a's segments 4 / 6 and 2 / 6 of its 6 tokens, b's 4 / 4
    passes = plan_passes(micro, tokens, cap=3)
    got = [[(s.policy, s.micro, s.rows.tolist(), s.share, s.loss_weight) for s in p] for p in passes]
    assert got == [[("a", 0, [0, 1], 1.0, pytest.approx(4 / 6)), ("a", 1, [2], 1.0, pytest.approx(2 / 6))],
                   [("b", 0, [1, 0], 1.0, 1.0)]]
    # cap 2: a0 a1 | a2 b1 | b0 -> b's micro-batch is split over passes 2 and 3 (2 of its 4 tokens in each)
    passes = plan_passes(micro, tokens, cap=2)
    got = [[(s.policy, s.micro, s.rows.tolist(), s.share, s.loss_weight) for s in p] for p in passes]
    assert got == [[("a", 0, [0, 1], 1.0, pytest.approx(4 / 6))],
                   [("a", 1, [2], 1.0, pytest.approx(2 / 6)), ("b", 0, [1], 0.5, 0.5)],
                   [("b", 0, [0], 0.5, 0.5)]]
    # b's loss a token sum over a constant (Dr. GRPO: max_new_tokens 4 x 2 rows = 8): its segments 2 / 8 each
    passes = plan_passes(micro, tokens, cap=2, norms={"b": 8.0})
    assert [[s.loss_weight for s in p] for p in passes] == [[pytest.approx(4 / 6)], [pytest.approx(2 / 6), 0.25],
                                                            [0.25]]
    assert [[s.share for s in p] for p in passes] == [[1.0], [1.0, 0.5], [0.5]]  # the statistics keep the shares


def test_the_shared_update_steps_each_policy_when_its_minibatch_is_whole():
    """With one policy's micro-batch per pass (the default), each policy's optimizer steps right after its own
    pass and its gradients are freed: one policy's gradients exist at a time."""
    micro = {n: [torch.tensor([0, 1])] for n in ("a", "b", "c")}
    tokens = {n: torch.tensor([1.0, 1.0]) for n in micro}
    passes = plan_passes(micro, tokens, cap=2)
    assert [[s.policy for s in p] for p in passes] == [["a"], ["b"], ["c"]]


def test_the_pass_plan_keeps_each_policy_contiguous_and_in_order_within_a_pass():
    # cap 4 takes a0 b0 a1 b1: b's rows come after a's whatever the dealing order
    micro = {"a": [torch.tensor([1, 0])], "b": [torch.tensor([0]), torch.tensor([1])]}
    tokens = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0, 4.0])}
    (only,) = plan_passes(micro, tokens, cap=4)
    assert [(s.policy, s.micro, s.rows.tolist()) for s in only] == [("a", 0, [1, 0]), ("b", 0, [0]), ("b", 1, [1])]
    # b's first micro-batch has no token: share 0 and weight 0 (not 0 / 0); its second holds all 4 of b's tokens
    assert [(s.share, s.loss_weight) for s in only] == [(1.0, 1.0), (0.0, 0.0), (1.0, 1.0)]


@pytest.mark.parametrize("seed", range(5))
def test_the_pass_plan_holds_every_row_once_and_at_most_cap_rows_a_pass(seed):
    rng = random.Random(seed)
    micro, tokens = {}, {}
    for n in ("a", "b", "c")[:rng.randint(1, 3)]:
        rows = list(range(rng.randint(1, 9)))
        rng.shuffle(rows)
        size = rng.randint(1, 4)
        micro[n] = [torch.tensor(rows[i:i + size]) for i in range(0, len(rows), size)]
        tokens[n] = torch.tensor([float(rng.randint(0, 5)) for _ in rows])
    cap = rng.randint(1, 6)
    passes = plan_passes(micro, tokens, cap)
    assert all(sum(len(s.rows) for s in p) <= cap for p in passes)
    seen = [(s.policy, s.micro, int(i)) for p in passes for s in p for i in s.rows]
    assert sorted(seen) == sorted((n, ci, int(i)) for n in micro for ci, c in enumerate(micro[n]) for i in c)
    for n in micro:  # each micro-batch's shares add up to 1 (or 0 without tokens): the whole micro-batch counts once
        for ci, c in enumerate(micro[n]):
            total = sum(s.share for p in passes for s in p if (s.policy, s.micro) == (n, ci))
            assert total == pytest.approx(1.0 if tokens[n][c].sum() > 0 else 0.0)
        # and the loss weights of a minibatch add up to 1 (or 0 without tokens): its token mean
        weights = sum(s.loss_weight for p in passes for s in p if s.policy == n)
        assert weights == pytest.approx(1.0 if tokens[n].sum() > 0 else 0.0)


@pytest.mark.parametrize("multi_lora, names, want", [
    ("batched", ["a", "a", "b"], Layout(("a", "b"), (2, 1))),
    ("batched", [None, "a", "a"], Layout((None, "a"), (1, 2))),  # generate: bare-base rows in the stack
    ("batched", ["a", "b", "a"], None),  # a's rows not contiguous: one pass per adapter
    ("batched", ["a", "a"], None),  # one adapter: its own pass, nothing to stack
    ("peft", ["a", "a", "b"], None),
])
def test_the_one_decision_of_stacked_or_per_adapter_passes(multi_lora, names, want):
    assert Execution(multi_lora).layout(names) == want  # what model.stacked_layout asks


def two_processes(*jobs):
    """Run job(reduce) of two "processes" in two threads; their reduce sums a tensor over both, as an
    all-reduce does. Returns each job's result."""
    barrier, slots, out = threading.Barrier(2, timeout=30), [None, None], [None, None]

    def reducer(i):
        def reduce(t):
            slots[i] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read the slots before either writes the next
            return total
        return reduce

    def run(i):
        out[i] = jobs[i](reducer(i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_two_processes_whiten_as_one_process_on_all_the_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    halves = [slice(0, 2), slice(2, 6)]  # unequal: 2 and 4 rows
    got = two_processes(*[lambda reduce, h=h: masked_whiten(x[h], mask[h], reduce=reduce) for h in halves])
    torch.testing.assert_close(torch.cat(got), masked_whiten(x, mask), atol=1e-6, rtol=1e-6)
    got = two_processes(*[lambda reduce, h=h: reinforce_pp_advantages(x[h], mask[h], reduce) for h in halves])
    torch.testing.assert_close(torch.cat(got), reinforce_pp_advantages(x, mask), atol=1e-6, rtol=1e-6)
    got = two_processes(*[lambda reduce, h=h: returns_scale(x[h], mask[h], reduce) for h in halves])
    assert got[0] == got[1] == pytest.approx(returns_scale(x, mask), rel=1e-6)
    # by hand: 1, 3 on one process and 5 on the other: n 3, mean 3, M2 4 + 0 + 4 = 8, unbiased var 4, std 2
    one, two = torch.tensor([[1.0, 3.0]]), torch.tensor([[5.0, 0.0]])
    got = two_processes(lambda r: masked_whiten(one, torch.ones(1, 2), reduce=r),
                        lambda r: masked_whiten(two, torch.tensor([[1.0, 0.0]]), reduce=r))
    torch.testing.assert_close(got[0], torch.tensor([[-1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], torch.tensor([[1.0, 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("estimator", ["gae", "reinforce_pp"])
def test_two_processes_make_the_experience_of_one_process_on_the_same_rows(estimator):
    """Under DDP each process holds some of a policy's rows: whitened GAE advantages, REINFORCE++'s batch
    normalisation and the value loss's divisor must be those of all the rows (make_experience's reduce)."""
    g = torch.Generator().manual_seed(1)
    B, R = 6, 4
    cfg = PPOArgs(policies=[{"name": "p", "advantage_estimator": estimator}], prompts_per_policy=B, mini_batch_size=B)
    policy = cfg.policy(cfg.policies[0])
    mask = torch.ones(B, R, dtype=torch.long)
    mask[1, 2:] = 0
    mask[4, 1:] = 0
    data = dict(scores=torch.randn(B, generator=g) * 5, ref=torch.randn(B, R, generator=g),
                old=torch.randn(B, R, generator=g), values=torch.randn(B, R, generator=g))

    def experience(h, reduce=None):
        n = len(range(B)[h])
        rollout = Rollout(prompt_ids=torch.full((n, 1), 9), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                          response_ids=torch.full((n, R), 5), response_mask=mask[h], adapter_names=["p"] * n,
                          temperatures=torch.ones(n))
        return make_experience(policy, cfg, rollout, torch.arange(n), data["scores"][h], data["ref"][h],
                               data["old"][h], data["values"][h], 0.1, reduce=reduce)

    want = experience(slice(0, B))
    got = two_processes(lambda r: experience(slice(0, 2), r), lambda r: experience(slice(2, B), r))
    torch.testing.assert_close(torch.cat([e.advantages for e in got]), want.advantages, atol=1e-5, rtol=1e-5)
    assert got[0].returns_scale == got[1].returns_scale == pytest.approx(want.returns_scale, rel=1e-6)
    if estimator == "gae":
        assert want.returns_scale > 1  # the returns' variance, not the floor
