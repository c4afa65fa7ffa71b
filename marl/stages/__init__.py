"""The three stages of an RLHF run, each a `run(cfg) -> dict` on one shared base.

    sft.run(SFTArgs)        stage 1: the `sft` LoRA adapter (TRL SFTTrainer)
    reward.run(RewardArgs)  stage 2: the `reward` LoRA adapter and score head (TRL RewardTrainer)
    ppo.run(PPOArgs)        stage 3: several policies side by side (marl.ppo)

`marl sft|reward|ppo` (marl/cli.py) and the repository's stage scripts call these; `common`
holds what the stages share, and `prompts` how the PPO stage picks and encodes its prompts.
The PPO model (base, reward, reference, policies, critics) is put together by marl.build.
"""
