"""The CPU mini IsoFLOP study of colabs/scaling_laws.ipynb: 3 FLOP budgets x 5 tiny models.

jaxlm sweep experiments/sweeps/cpu_isoflop.py      # about 10 min on 2 CPU cores
jaxlm scaling fit runs/sweeps/cpu_isoflop --plot runs/sweeps/cpu_isoflop/plots
"""

from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.scaling import SweepRun, isoflop_grid

BUDGETS = [1e11, 2e11, 4e11]  # training FLOPs, 6 N D
WIDTHS = [8, 12, 16, 24, 32]  # d_model of 2-layer GPT-2-style models (5k to 40k parameters)


def get_sweep() -> list[SweepRun]:
    base = load_config(
        "tiny",
        [
            "data.seq_len=64",
            "data.batch_size=16",
            "train.eval_every=100000",
            # 200 x 1024 held-out tokens: fewer made the loss differences between sizes noise.
            "train.eval_batches=200",
            "train.log_every=50",
            "train.sample_tokens=0",
            "checkpoint.every=500",
            "optim.warmup_steps=10",
        ],
    )
    models = {
        f"d{w}": apply_overrides(
            base, [f"model.d_model={w}", f"model.mlp_dim={4 * w}", "model.num_heads=2"]
        ).model
        for w in WIDTHS
    }
    return isoflop_grid(base, models, BUDGETS, min_steps=20)
