"""Downstream evaluation: log-likelihood scoring (`scoring`), lm-evaluation-harness in process
(`harness`, needs the `eval` extra) and model cards (`card`)."""
