"""The CPU mini IsoFLOP study of colabs/scaling_laws.ipynb: 3 FLOP budgets x 3 tiny models.

jaxlm sweep experiments/sweeps/cpu_isoflop.py      # ~10-20 min on 2 CPU cores
jaxlm scaling fit runs/sweeps/cpu_isoflop --plot runs/sweeps/cpu_isoflop/plots
"""

from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.scaling import SweepRun, isoflop_grid

BUDGETS = [5e10, 1e11, 2e11]  # training FLOPs, 6 N D
WIDTHS = [24, 32, 48]  # d_model of 2-layer GPT-2-style models (~26k, 40k, 78k parameters)


def get_sweep() -> list[SweepRun]:
    base = load_config(
        "tiny",
        [
            "data.seq_len=64",
            "data.batch_size=16",
            "train.eval_every=100000",
            "train.eval_batches=8",
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
