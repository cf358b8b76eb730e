"""Character-level (byte) model on tiny_shakespeare, tuned for time to loss on a 2-core CPU.

Needs `manual_dir` holding Karpathy's input.txt (offline; TFDS builds the dataset once):

    jaxlm train --config experiments/configs/tiny_shakespeare_char.py \
        --set data.manual_dir=/path/with/input.txt/

`experiments/bench/time_to_loss.py` times it against held-out loss. Batch 16 rows of 128 bytes:
at this budget more updates beat bigger batches (300 steps of 32 rows reached 1.81 nats per
byte in 94 s; 350 of 16 reach 1.84 in 56 s; 500 of 16, 1.72 in 80 s). lr 2e-3 and 5e-3 did
worse than 3e-3; a 10-step warmup decaying to 0, and sequences of 64, did worse too.
"""

import dataclasses

from jaxlm.configs import DataConfig, OptimConfig, RunConfig, TrainConfig, get_preset


def get_config() -> RunConfig:
    model = dataclasses.replace(get_preset("small"), max_seq_len=128)
    return RunConfig(
        model=model,
        data=DataConfig(dataset="tfds:tiny_shakespeare", seq_len=128, batch_size=16),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=30),
        train=TrainConfig(
            steps=350, eval_every=350, eval_batches=0, log_every=50, sample_prompt="ROMEO:"
        ),
    )
