"""jaxlm: JAX/TPU-first language models."""
