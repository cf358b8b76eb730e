"""Data pipeline throughput on the default corpus, against a small model's training step.

Prints one JSON object as its last line: `pipeline_tokens_per_s` (Grain pipeline alone: read,
tokenize, pack, batch), `step_tokens_per_s` (forward + backward of a small model on batches of
the same shape, measured in the same process) and their ratio `pipeline_over_step`; above 1 means
the loader is not what limits training on this machine.

    python experiments/bench/data_pipeline.py [--seq-len 256] [--batch 16] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.configs import DataConfig, ModelConfig
from jaxlm.data import ByteTokenizer, make_iterator
from jaxlm.model.transformer import Transformer, init_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    tok = ByteTokenizer()
    cfg = DataConfig(seq_len=args.seq_len, batch_size=args.batch, worker_count=args.workers)
    it = make_iterator(cfg, tok)
    next(it)  # warm up (prepares the corpus on first use)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    pipeline = args.batches * args.batch * args.seq_len / (time.perf_counter() - start)

    # The benchmark model of the training issue: vocab 1024, d 256, 4 layers, 4 heads, MLP 1024.
    model_cfg = ModelConfig(
        vocab_size=1024,
        d_model=256,
        num_layers=4,
        num_heads=4,
        mlp_dim=1024,
        max_seq_len=args.seq_len,
    )
    params = init_params(model_cfg, jax.random.key(0))

    @jax.jit
    def grad_step(p, b):
        def loss(p):
            logits = Transformer(model_cfg).apply(
                {"params": p}, b["tokens"], b["positions"], b["segment_ids"]
            )[0]
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
            return jnp.sum(nll * b["mask"]) / jnp.maximum(b["mask"].sum(), 1)

        return jax.grad(loss)(p)

    device_batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "target_bytes"}
    jax.block_until_ready(grad_step(params, device_batch))
    steps = 5
    start = time.perf_counter()
    for _ in range(steps):
        grads = grad_step(params, device_batch)
    jax.block_until_ready(grads)
    step = steps * args.batch * args.seq_len / (time.perf_counter() - start)
    print(
        json.dumps(
            {
                "seq_len": args.seq_len,
                "batch": args.batch,
                "workers": args.workers,
                "pipeline_tokens_per_s": round(pipeline),
                "step_tokens_per_s": round(step),
                "pipeline_over_step": round(pipeline / step, 2),
                "tokens_in_last_batch": int(np.asarray(batch["mask"]).sum()),
            }
        )
    )


if __name__ == "__main__":
    main()
