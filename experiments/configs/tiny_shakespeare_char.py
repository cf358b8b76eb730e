"""Character-level (byte) model on tiny_shakespeare, tuned for time to loss on a 2-core CPU.

Needs `manual_dir` holding Karpathy's input.txt (offline; TFDS builds the dataset once):

    jaxlm train --config experiments/configs/tiny_shakespeare_char.py \
        --set data.manual_dir=/path/with/input.txt/

`experiments/bench/time_to_loss.py` times it against held-out loss.
"""

import dataclasses

from jaxlm.configs import DataConfig, OptimConfig, RunConfig, TrainConfig, get_preset


def get_config() -> RunConfig:
    model = dataclasses.replace(get_preset("small"), max_seq_len=128)
    return RunConfig(
        model=model,
        data=DataConfig(dataset="tfds:tiny_shakespeare", seq_len=128, batch_size=32),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=30),
        train=TrainConfig(
            steps=300, eval_every=300, eval_batches=0, log_every=50, sample_prompt="ROMEO:"
        ),
    )
