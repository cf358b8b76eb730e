"""Learning-rate transfer, standard parametrization against muP: 4 widths x 7 learning rates x
2 parametrizations of a 2-layer Llama-style model, 150 steps each (56 runs).

jaxlm sweep experiments/sweeps/cpu_mup_transfer.py     # about 20 min on 2 CPU cores
python -c "from jaxlm.scaling import *; rows = load_results('runs/sweeps/cpu_mup_transfer'); \
    print(best_learning_rates(rows)); plot_lr_transfer(rows, path='lr_transfer.png')"

Under SP the best learning rate falls as the width grows; under muP (base width 32, the
narrowest) it stays within one grid step.
"""

from jaxlm.configs.overrides import load_config
from jaxlm.scaling import SweepRun, lr_grid

WIDTHS = [32, 64, 128, 256]  # d_model; head_dim and mlp_dim grow with it (4 heads)
LEARNING_RATES = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064]


def get_sweep() -> list[SweepRun]:
    base = load_config(
        "tiny-llama",
        [
            "model.num_heads=4",
            "model.num_kv_heads=4",
            "model.mlp_dim=None",  # 4 * d_model at every width
            "model.max_seq_len=64",
            "data.seq_len=64",
            "data.batch_size=16",
            "train.steps=150",
            "train.eval_every=100000",  # the final eval only
            "train.eval_batches=50",
            "train.log_every=50",
            "train.sample_tokens=0",
            "checkpoint.every=1000",
            "optim.warmup_steps=10",
            "optim.weight_decay=0.0",
        ],
    )
    return lr_grid(base, WIDTHS, LEARNING_RATES)
