"""The names a setting can take: config validates against these lists, and the modules that act on a
setting (marl.model_io, marl.ppo) read the same ones. A leaf: it imports nothing."""

QUANTIZATIONS = ("none", "bf16", "8bit", "4bit")
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")  # advantage_estimator
GROUP_ESTIMATORS = ("grpo", "rloo")  # need num_generations samples of each prompt
KL_ESTIMATORS = ("k1", "k3", "abs", "mse")  # kl_estimator
REWARD_NORMS = ("none", "batch", "running")  # reward_norm
OPTIMIZERS = ("adam", "adamw_8bit")  # optim: each policy's optimizer (marl/ppo/optim.py)
SCHEDULES = ("none", "halving", "pbt")  # schedule: what a sweep does to its population as it trains
