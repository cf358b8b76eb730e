"""Compression: pure functions from a model's (config, parameters) to a cheaper model's."""
