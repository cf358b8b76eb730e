"""GPT-2 small on lm1b with a 32k byte-level BPE, fsdp over all devices (for TPU/GPU hosts).

jaxlm tokenizer train --kind bpe --vocab-size 32768 --input 'corpus/*.txt' --out tok/
jaxlm train --config experiments/configs/gpt2_124m_lm1b.py --set data.tokenizer=tok/
"""

import dataclasses

from jaxlm.configs import DataConfig, MeshConfig, OptimConfig, RunConfig, TrainConfig, get_preset


def get_config() -> RunConfig:
    model = dataclasses.replace(
        get_preset("gpt2-124m"), vocab_size=32768, dtype="bfloat16", remat="save_dots"
    )
    return RunConfig(
        model=model,
        data=DataConfig(dataset="tfds:lm1b", seq_len=1024, batch_size=256, worker_count=8),
        optim=OptimConfig(learning_rate=6e-4, warmup_steps=2000, weight_decay=0.1),
        train=TrainConfig(steps=100_000, eval_every=2000, eval_batches=50),
        mesh=MeshConfig(fsdp=-1, rules="fsdp"),
    )
