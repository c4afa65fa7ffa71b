"""Every stage on a CUDA GPU: sft, reward, ppo (bf16, 4-bit with bfloat16 compute, checkpointing), eval.

Marked `gpu` (deselected by `make test`, skipped without CUDA); bench/gpu_check.sh runs them with `-m gpu`.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from marl.config import RewardArgs, SFTArgs
from marl.model import MultiAdapterModel

from .conftest import stage_args
from .ppo.test_trainer import ppo_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _bnb_cuda() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def test_sft_and_reward_stages_train_on_the_gpu(tmp_path, tiny_model_dir):
    from pipelines import reward, sft

    sft.run(stage_args(SFTArgs, tmp_path, tiny_model_dir))
    reward.run(stage_args(RewardArgs, tmp_path, tiny_model_dir, lora_dropout=0.0))
    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    assert model.device.type == "cuda"  # load_base places the base on this process's GPU
    model.load_adapter(str(tmp_path / "adapters/reward"), "reward", role="reward")
    scores = model.score_texts(["the movie was great", "bad"])
    assert scores.device.type == "cuda" and torch.isfinite(scores).all()


@pytest.mark.parametrize("quantization", ["bf16", "4bit"])
@pytest.mark.parametrize("multi_lora", ["batched", "peft"])
def test_ppo_on_the_gpu_in_low_precision_with_checkpointing(tmp_path, tiny_model_dir, tiny_run, quantization,
                                                            multi_lora):
    """`marl ppo` end to end: the base on the GPU, losses and log-probs in float32, finite metrics."""
    if quantization == "4bit" and not _bnb_cuda():
        pytest.skip("bitsandbytes is not installed")
    from pipelines import ppo

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "adapters", run / "adapters")
    cfg = ppo_args(run, tiny_model_dir, run, quantization=quantization, bnb_4bit_compute_dtype="bfloat16",
                   gradient_checkpointing=True, multi_lora=multi_lora, total_steps=2, eval_prompts=2)
    ppo.run(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in lines if "step" in m and any(k.endswith("ppo/policy_loss") for k in m)]
    assert steps, lines[:2]
    for m in steps:
        for k, v in m.items():
            if k.endswith(("ppo/policy_loss", "ppo/value_loss", "kl/mean", "reward/mean")):
                assert math.isfinite(v), (k, v)


def test_logprobs_and_values_are_float32_on_a_bf16_base(tiny_model_dir, tiny_run):
    from .ppo.test_trainer import make_trainer

    t = make_trainer(tiny_model_dir, tiny_run)  # loaded in float32: reload the same adapters on a bf16 base
    model = MultiAdapterModel.from_pretrained(tiny_model_dir, quantization="bf16")
    assert model.device.type == "cuda" and model.base.dtype == torch.bfloat16
    model.load_adapter(str(tiny_run / "adapters/reward"), "reward", role="reward")
    model.load_adapter(str(tiny_run / "adapters/sft"), "sft", role="sft")
    for n in t.policies:
        model.add_adapter(n, t.cfg.lora_config(dropout=0.0), init_from="sft")
    from marl.ppo.trainer import MultiPolicyPPOTrainer

    tr = MultiPolicyPPOTrainer(model, t.cfg, list(t.policies.values()), t.prompt_ids, "sft")
    rollout = tr.rollout()
    assert rollout.temperatures.device.type == "cuda"
    lp, values = tr.learner._old_pass_all(rollout)
    assert lp.dtype == values.dtype == torch.float32 and lp.device.type == "cuda"
    metrics = tr.step()
    assert all(math.isfinite(v) for k, v in metrics.items() if k.endswith("ppo/policy_loss"))


def test_eval_on_the_gpu(tiny_model_dir, tiny_run):
    from marl.evaluate import evaluate_adapters

    model = MultiAdapterModel.from_pretrained(tiny_model_dir, quantization="bf16")
    model.load_adapter(str(tiny_run / "adapters/reward"), "reward", role="reward")
    model.load_adapter(str(tiny_run / "adapters/sft"), "sft", role="sft")
    prompts = [model.tokenizer(t)["input_ids"] for t in ["The movie was", "This film is"]]
    out = evaluate_adapters(model, {"sft": "sft", "base": None}, prompts, "sft", max_new_tokens=6, n_samples=1)
    assert abs(out["sft"]["kl_mean"]) < 0.05  # the reference against itself (bf16 passes of other batch shapes)
    assert all(math.isfinite(r["reward_mean"]) for r in out.values())


def test_chunked_logprobs_peak_far_below_full_logits_on_the_gpu():
    from marl.ppo.logprobs import token_logprobs
    from marl.ppo.losses import entropy_from_logits, logprobs_from_logits

    V, H = 151_936, 64
    head = torch.nn.Linear(H, V, bias=False, device="cuda").requires_grad_(False)
    hidden0 = torch.randn(8, 256, H, device="cuda")
    labels = torch.randint(V, (8, 256), device="cuda")
    peaks = {}
    for name in ("full", "chunked"):
        hidden = hidden0.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        if name == "full":
            logits = head(hidden)
            lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
            del logits
        else:
            lp, ent = token_logprobs(hidden, head, labels, entropy=True)
        (lp.sum() + ent.sum()).backward()
        del lp, ent
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - start
    assert peaks["full"] > 2048 * V * 4  # at least one (2048, V) float32 copy: 1.2 GB
    assert peaks["chunked"] < peaks["full"] / 4, peaks


@pytest.mark.parametrize("quantization, tol", [("bf16", 2e-2), ("4bit", 1e-2)])
def test_checkpointed_gradients_equal_the_unchecked_run_on_the_gpu(tiny_model_dir, quantization, tol):
    if quantization == "4bit" and not _bnb_cuda():
        pytest.skip("bitsandbytes is not installed")
    from marl.multilora import activation_checkpointing

    from .test_multilora import _loss_and_grads, make_model

    model = make_model(tiny_model_dir, quantization, names=("p1", "p2"))
    assert model.device.type == "cuda"
    model.set_trainable(["p1", "p2"])
    enc = model.tokenizer(["the movie was great", "a dull film", "I loved it"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].cuda(), enc["attention_mask"].cuda()
    model.train()
    for grouped in (True, False):
        want = _loss_and_grads(model, ["p1", "p2", "p2"], ids, mask, grouped)
        with activation_checkpointing(model.base, model.lora_layers()):
            got = _loss_and_grads(model, ["p1", "p2", "p2"], ids, mask, grouped)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=tol, rtol=tol)
