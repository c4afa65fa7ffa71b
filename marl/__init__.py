"""marl: multi-adapter RLHF on one shared base model."""
