"""Flax Linen modules of the Transformer; they see only `ModelConfig` and logical axis names."""
