"""A CPU cooldown study: 5 tiny models x 4 token counts from one constant-learning-rate trunk per
model and a 20% warmup-stable-decay cooldown per point (`get_sweep`, 25 runs), and the same 20
points trained one full run each (`get_full_grid`: WSD, or cosine) to compare with.

jaxlm sweep experiments/sweeps/cpu_cooldown.py         # the cooldown grid
jaxlm scaling fit runs/sweeps/cpu_cooldown --bootstrap 100
PYTHONPATH=. python experiments/bench/cooldown_fit.py  # both grids, fits and computes as JSON
"""

from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.scaling import SweepRun, cooldown_grid, token_grid

WIDTHS = [8, 12, 16, 24, 32]  # d_model of 2-layer GPT-2-style models (5k to 40k parameters)
TOKENS = [100_000, 200_000, 400_000, 800_000]
DECAY_FRACTION = 0.2


def _base_and_models():
    base = load_config(
        "tiny",
        [
            "data.seq_len=64",
            "data.batch_size=16",
            "train.eval_every=100000",
            "train.eval_batches=200",
            "train.log_every=100",
            "train.sample_tokens=0",
            "checkpoint.every=1000",
            "optim.warmup_steps=10",
            "optim.schedule=wsd",
            f"optim.decay_fraction={DECAY_FRACTION}",
        ],
    )
    models = {
        f"d{w}": apply_overrides(
            base, [f"model.d_model={w}", f"model.mlp_dim={4 * w}", "model.num_heads=2"]
        ).model
        for w in WIDTHS
    }
    return base, models


def get_sweep() -> list[SweepRun]:
    base, models = _base_and_models()
    return cooldown_grid(base, models, TOKENS, decay_fraction=DECAY_FRACTION)


def get_full_grid(schedule: str = "wsd") -> list[SweepRun]:
    """The same points, each its own run of the same warmup-stable-decay schedule (or another
    `optim.schedule`, e.g. "cosine", the usual one-run-per-point practice)."""
    base, models = _base_and_models()
    return token_grid(apply_overrides(base, [f"optim.schedule={schedule}"]), models, TOKENS)
