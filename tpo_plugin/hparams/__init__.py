"""The `tpo_*` keys, and LLaMA-Factory's fine-tuning arguments extended with them and with `stage: tpo`."""
