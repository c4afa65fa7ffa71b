"""Row 4: what marl's PPO step costs beyond the model passes it needs, and what an adapter
switch costs next to a forward pass.

One process, one policy (reference = the bare base). Each round times one
`MultiPolicyPPOTrainer.step()`, then each bare pass alone on that step's rollout shapes,
called straight on the peft model with the right adapter already active:

- generation: `peft.generate` of the same prompts, exactly as many new tokens as the rollout;
- reward: the decoder with the reward LoRA + score head over prompt + response;
- reference: the LM with adapters disabled over prompt + response (no grad);
- old policy/value: the LM with the policy LoRA, hidden states, value head (no grad);
- update: `ppo_epochs` x minibatches of forward + backward + Adam step on the policy LoRA and value head.

Everything else in a step (decoding and re-tokenizing texts for the reward, log-probs,
GAE, losses, switching, bookkeeping) is overhead.
"""

from __future__ import annotations

import time

import torch

from bench.common import (
    Assets, Row, Settings, fx, main, marl_trainer, md_table, median, ppo_args, run_bench_child, timed,
)

SWITCHES = 200


def child(s: Settings, a: Assets, config: dict) -> dict:
    """The step, bare-pass and switch timings, in this (fresh) process."""
    from marl.model import position_ids_from_mask

    torch.manual_seed(0)
    cfg = ppo_args(a, s, 1)
    model, trainer = marl_trainer(a, cfg)
    name, peft, tok = "policy_0", model.peft, model.tokenizer
    head, score = model.value_heads[name], model.score_heads["reward"]
    captured = {}
    rollout_fn = trainer.rollout

    def capture():
        captured["ro"] = rollout_fn()
        return captured["ro"]

    trainer.rollout = capture  # keep each step's rollout, for the bare passes' shapes
    bare_opt = torch.optim.Adam(model.trainable_parameters(name), lr=cfg.learning_rate)

    def bare(ro) -> dict:
        ids, attn = ro.input_ids, ro.attention_mask
        pos = position_ids_from_mask(attn)
        R = ro.response_ids.shape[1]
        out = {}
        model.eval()
        with torch.no_grad():
            model.set_adapter(name)
            out["generation"] = timed(lambda: peft.generate(
                input_ids=ro.prompt_ids, attention_mask=ro.prompt_mask, max_new_tokens=R, min_new_tokens=R,
                do_sample=True, temperature=1.0, top_k=None, top_p=1.0, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id))
            model.set_adapter("reward")
            out["reward"] = timed(lambda: score(model.backbone(input_ids=ids, attention_mask=attn, position_ids=pos,
                                                               use_cache=False).last_hidden_state))
            model.set_adapter(None)
            out["reference"] = timed(lambda: peft(input_ids=ids, attention_mask=attn, position_ids=pos,
                                                  use_cache=False).logits)
            model.set_adapter(name)
            out["old policy/value"] = timed(lambda: head(peft(
                input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                output_hidden_states=True).hidden_states[-1]))

        def update():
            model.train()
            for _ in range(cfg.ppo_epochs):
                for st in range(0, len(ids), cfg.mini_batch_size):
                    sl = slice(st, st + cfg.mini_batch_size)
                    bare_opt.zero_grad(set_to_none=True)
                    o = peft(input_ids=ids[sl], attention_mask=attn[sl], position_ids=pos[sl], use_cache=False,
                             output_hidden_states=True)
                    (o.logits.float().mean() + head(o.hidden_states[-1]).mean()).backward()
                    bare_opt.step()
            model.eval()

        out["update"] = timed(update)
        return out

    for _ in range(s.warmup_steps):
        trainer.step()
        bare(captured["ro"])
    steps, phases, passes = [], [], []
    for _ in range(s.timed_steps):
        t = time.perf_counter()
        m = trainer.step()
        steps.append(time.perf_counter() - t)
        phases.append({k[5:]: v for k, v in m.items() if k.startswith("time/") and "/" not in k[5:]})
        passes.append(bare(captured["ro"]))

    # adapter switches: how many a step makes, and what one costs next to a forward of one minibatch
    switches = model.switches
    trainer.step()
    switches = model.switches - switches
    ro = captured["ro"]
    mb = slice(0, cfg.mini_batch_size)
    ids, attn = ro.input_ids[mb], ro.attention_mask[mb]
    pos = position_ids_from_mask(attn)
    model.eval()
    with torch.no_grad():
        model.set_adapter(name)
        fwd = [timed(lambda: peft(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False))
               for _ in range(s.repeats)]
    pair = (name, "reward")
    switch = [timed(lambda: [model.set_adapter(pair[i % 2]) for i in range(SWITCHES)]) / SWITCHES
              for _ in range(s.repeats)]
    peft_switch = [timed(lambda: [peft.set_adapter(pair[i % 2]) for i in range(SWITCHES)]) / SWITCHES
                   for _ in range(s.repeats)]
    model.set_adapter(name)
    return {"step_s": steps, "phases": phases, "passes": passes, "switches_per_step": switches,
            "forward_s": fwd, "switch_s": switch, "peft_switch_s": peft_switch,
            "shape": {"rows": int(ro.input_ids.shape[0]), "tokens": int(ro.input_ids.shape[1]),
                      "minibatch": cfg.mini_batch_size}}


def run(s: Settings, a: Assets) -> Row:
    """Row 4: PPO step time over the sum of its bare passes; adapter-switch cost."""
    r = run_bench_child("overhead", s, "overhead", a)
    step = median(r["step_s"])
    bare = {k: median([p[k] for p in r["passes"]]) for k in r["passes"][0]}
    phase = {k: median([p[k] for p in r["phases"]]) for k in r["phases"][0]}
    total = sum(bare.values())
    marl_of = {"generation": phase.get("generate"), "reward": phase.get("score"), "reference": phase.get("reference"),
               "old policy/value": None, "update": phase.get("update")}
    rows = [[k, v, marl_of[k] if marl_of[k] is not None else "(in update)", v / total] for k, v in bare.items()]
    rows.append(["**sum of bare passes** / marl's whole step", total, step, 1.0])
    detail = md_table(["pass", "bare (s)", "marl's timer for that phase (s)", "share of bare sum"], rows)
    ratio = step / total
    fwd, sw, psw = median(r["forward_s"]), median(r["switch_s"]), median(r["peft_switch_s"])
    per_step = r["switches_per_step"] * sw
    detail += "\n\n" + md_table(["adapter switch", "value"], [
        ["one `MultiAdapterModel.set_adapter` (ms)", sw * 1e3],
        ["one bare `peft.set_adapter` (ms)", psw * 1e3],
        [f"one forward of a minibatch, {r['shape']['minibatch']} x {r['shape']['tokens']} tokens (ms)", fwd * 1e3],
        ["**switch / forward**", sw / fwd],
        ["switches in one PPO step (counted)", r["switches_per_step"]],
        ["switching share of the step", per_step / step],
    ])
    meets = bool(ratio <= 1.15 and sw / fwd <= 0.01)
    notes = [
        "marl's own phase timers (`time/*` in the metrics) are shown beside the bare passes; its `update` phase "
        "holds the old policy/value pass, advantages and the minibatch updates.",
        "The bare update's loss is a plain mean of logits and values (same backward through the LM head and value "
        "head); PPO's losses themselves count as overhead.",
        "A switch relative to a forward depends on the batch: the forward here is one PPO minibatch, the unit "
        "marl switches around; a single-token decode step would make switches look larger.",
    ]
    return Row("overhead", (
        f"One policy, {s.prompts_per_policy} prompts, {s.max_new_tokens} new tokens, {s.ppo_epochs} PPO epochs of "
        f"minibatch {s.mini_batch_size}; {s.timed_steps} rounds of one `trainer.step()` then each bare pass alone "
        "(see `bench/overhead.py`), medians. Switch: the mean of "
        f"{SWITCHES} alternating `set_adapter` calls between the policy and the reward adapter."),
        f"step / bare sum = {fx(ratio)}; switch / forward = {sw / fwd:.2%}", meets, detail, notes, raw=r)


if __name__ == "__main__":
    main(run, child)
