"""Character-level (byte) model on tiny_shakespeare; needs `manual_dir` with input.txt offline.

    jaxlm train --config experiments/configs/tiny_shakespeare_char.py \
        --set data.manual_dir=/path/with/input.txt/
"""

import dataclasses

from jaxlm.configs import DataConfig, OptimConfig, RunConfig, TrainConfig, get_preset


def get_config() -> RunConfig:
    model = dataclasses.replace(
        get_preset("small"), num_layers=6, d_model=192, num_heads=6, num_kv_heads=6, head_dim=32
    )
    return RunConfig(
        model=model,
        data=DataConfig(dataset="tfds:tiny_shakespeare", seq_len=256, batch_size=32),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=100),
        train=TrainConfig(steps=2000, eval_every=250, sample_prompt="ROMEO:"),
    )
