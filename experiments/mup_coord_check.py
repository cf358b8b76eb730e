"""The muP coordinate check at CPU size: a 2-layer model at widths 32-256, 4 AdamW steps at
lr 0.01 under SP and under muP (base width 32); prints, as JSON, each layer's output change
(and size) at the widest width over the narrowest.

    python experiments/mup_coord_check.py
"""

import json

from jaxlm.configs.overrides import apply_overrides
from jaxlm.configs.run import RunConfig
from jaxlm.scaling import coord_check, coord_growth

BASE = [
    "model.num_layers=2",
    "model.num_heads=4",
    "model.vocab_size=256",
    "model.max_seq_len=32",
    "model.mup_base_width=32",
    "data.seq_len=32",
    "data.batch_size=8",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "optim.learning_rate=0.01",
    "optim.weight_decay=0.0",
    "train.steps=10",
]

if __name__ == "__main__":
    out = {}
    for p in ("sp", "mup"):
        config = apply_overrides(RunConfig(), [*BASE, f"model.parametrization={p}"])
        rows = coord_check(config, [32, 64, 128, 256], steps=4)
        out[p] = {
            "update_growth": coord_growth(rows, "update"),
            "size_growth": coord_growth(rows, "size"),
        }
    print(json.dumps(out))
