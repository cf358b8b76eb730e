"""An IsoFLOP study over the scaling-ladder presets for a TPU VM (hours; resumable).

jaxlm sweep experiments/sweeps/tpu_ladder.py --workdir /mnt/shared/sweeps/ladder
jaxlm scaling fit /mnt/shared/sweeps/ladder --plot plots/
"""

from jaxlm.configs import get_preset
from jaxlm.configs.overrides import load_config
from jaxlm.scaling import SweepRun, isoflop_grid

BUDGETS = [1e17, 3e17, 1e18, 3e18]


def get_sweep() -> list[SweepRun]:
    base = load_config(
        "ladder-0",
        [
            "data.seq_len=1024",
            "data.batch_size=256",
            "train.eval_every=1000000",
            "train.eval_batches=50",
            "train.sample_tokens=0",
            "checkpoint.every=1000",
        ],
    )
    models = {f"ladder-{i}": get_preset(f"ladder-{i}") for i in range(7)}
    return isoflop_grid(base, models, BUDGETS, min_steps=500)
