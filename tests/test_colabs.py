"""The colabs run end to end, headless, with small parameters (a notebook that errors fails)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = Path(__file__).resolve().parents[1] / "colabs"


def _run(name: str, parameters: str, tmp_path: Path) -> nbformat.NotebookNode:
    """Execute `colabs/name` in `tmp_path` with `parameters` placed after its parameters cell
    (as papermill does), on one CPU device like a Colab CPU runtime."""
    nb = nbformat.read(COLABS / name, as_version=4)
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(COLABS.parent))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend turns figures into outputs
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_every_colab_is_committed_without_outputs():
    names = sorted(p.name for p in COLABS.glob("*.ipynb"))
    assert names == [
        "align.ipynb",
        "finetune.ipynb",
        "mup_and_cooldowns.ipynb",
        "quickstart.ipynb",
        "sampling.ipynb",
        "scaling_laws.ipynb",
    ]
    for name in names:
        nb = nbformat.read(COLABS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, name
            assert "from jaxlm." not in cell.source, f"{name} should use the public `jaxlm` API"


def test_quickstart_and_sampling_run(tmp_path, stdlib_cache):
    nb = _run("quickstart.ipynb", 'STEPS = 12\nSAMPLE_TOKENS = 16\nWORKDIR = "run"', tmp_path)
    text = _text(nb)
    assert "held-out loss" in text and "parameters on 1 cpu device(s)" in text
    assert any(
        o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", [])
    )
    # The sampling notebook loads the quickstart's checkpoint (no training of its own).
    nb = _run("sampling.ipynb", 'WORKDIR = "run"\nNEW_TOKENS = 12', tmp_path)
    text = _text(nb)
    assert "streamed == one-shot: True" in text and "Greedy()" in text


@pytest.mark.parametrize("name", ["scaling_laws.ipynb"])
def test_scaling_laws_runs_a_small_study(tmp_path, stdlib_cache, name):
    params = "\n".join(
        [
            'WORKDIR = "sweep"',
            "BUDGETS = [5e8, 1e9, 2e9]",
            "WIDTHS = [16, 24, 32]",
            "SEQ_LEN, BATCH = 32, 8",
            "MIN_STEPS = 3",
            "BOOTSTRAP = 5",
        ]
    )
    nb = _run(name, params, tmp_path)
    text = _text(nb)
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert len(rows) == 9 and all(r["eval_loss"] > 0 for r in rows)
    assert "N_opt = " in text and "chinchilla" in text
    # The figures render as images (a bare Figure shows only its repr without the inline backend).
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "scaling plots did not render"


def test_mup_and_cooldowns_runs_a_small_study(tmp_path, stdlib_cache):
    params = "\n".join(
        [
            'WORKDIR = "study"',
            "COORD_WIDTHS = [32, 128]",
            "COORD_STEPS = 3",
            "LR_WIDTHS = [32, 64]",
            "LEARNING_RATES = [0.01]",
            "LR_STEPS = 12",
            "COOLDOWN_WIDTHS = [8, 16, 24]",
            "TOKENS = [20_000, 40_000]",
            "BOOTSTRAP = 5",
        ]
    )
    nb = _run("mup_and_cooldowns.ipynb", params, tmp_path)
    text = _text(nb)
    assert "change at the widest / at the narrowest width" in text
    lr_rows = json.loads((tmp_path / "study/lr_transfer/results.json").read_text())
    assert len(lr_rows) == 4 and {r["parametrization"] for r in lr_rows} == {"sp", "mup"}
    cooldown = json.loads((tmp_path / "study/cooldowns/results.json").read_text())
    full = json.loads((tmp_path / "study/one_run_per_point/results.json").read_text())
    names = sorted(r["name"] for r in cooldown)
    assert len(names) == 6 and names == sorted(r["name"] for r in full)  # the same points
    assert (tmp_path / "study/cooldowns/d8_stable").is_dir()
    assert "the cooldown grid trained" in text and "alpha = " in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "coordinate check, transfer and loss plots did not render"


def test_finetune_imports_trains_exports_and_transformers_agree(tmp_path, stdlib_cache):
    nb = _run(
        "finetune.ipynb", 'ROOT = "ft"\nCOPY_STEPS = 3\nLORA_STEPS = 3\nHELD_OUT = 4', tmp_path
    )
    text = _text(nb)
    assert "imported:" in text and "reverse exact match after LoRA" in text
    assert text.count("same: True") == 2, text[-3000:]
    assert (tmp_path / "ft/hf_adapter/adapter_model.safetensors").is_file()


def test_align_runs_sft_reward_model_dpo_and_online_rl(tmp_path, stdlib_cache):
    params = "\n".join(
        [
            'ROOT = "align"',
            "SFT_STEPS = 30",
            "RM_STEPS = 4",
            "DPO_STEPS = 4",
            "RL_STEPS = 4",
            'RL_KIND = "ppo"',
        ]
    )
    nb = _run("align.ipynb", params, tmp_path)
    text = _text(nb)
    for line in (
        "SFT greedy replies:",
        "held-out pairwise accuracy:",
        "held-out policy accuracy:",
        "held-out greedy reward:",
        "ppo greedy replies:",
    ):
        assert line in text, line
    assert any(
        o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", [])
    )
