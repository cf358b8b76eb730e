"""Sweeps: grids hit their budgets, `jaxlm sweep` finishes, skips done runs, resumes killed ones;
`jaxlm scaling fit` reads the table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlm import checkpoint, cli, storage
from jaxlm.configs import RunConfig
from jaxlm.configs.overrides import load_config
from jaxlm.metrics import param_count
from jaxlm.scaling import (
    best_learning_rates,
    isoflop_grid,
    load_results,
    load_sweep,
    lr_grid,
    run_sweep,
    token_grid,
)
from jaxlm.scaling.sweep import check_runs

ROOT = Path(__file__).resolve().parents[2]

SWEEP_FILE = """
from jaxlm.configs.overrides import load_config
from jaxlm.scaling import SweepRun

def _config(d_model, steps):
    return load_config("tiny", [
        f"model.d_model={d_model}", "model.num_heads=2", f"model.mlp_dim={4 * d_model}",
        "data.seq_len=32", "data.batch_size=8", f"train.steps={steps}", "train.eval_every=1000",
        "train.eval_batches=1", "train.log_every=1", "train.sample_tokens=0",
        "checkpoint.every=2", "optim.warmup_steps=2",
    ])

SWEEP = [
    SweepRun("d16", _config(16, 4), budget=None),
    SweepRun("d32", _config(32, {steps_2}), budget=None),
    SweepRun("d48", _config(48, 4), budget=None),
]
"""


def _models(*widths):
    return {
        f"d{w}": load_config(
            "tiny", [f"model.d_model={w}", f"model.mlp_dim={4 * w}", "model.num_heads=2"]
        ).model
        for w in widths
    }


def test_isoflop_grid_trains_each_model_for_its_budget():
    base = load_config("tiny", ["data.seq_len=32", "data.batch_size=8"])
    models = _models(16, 32, 64)
    runs = isoflop_grid(base, models, [3e8, 1e9], min_steps=5)
    per_step = 32 * 8
    for run in runs:
        m = run.config.model
        # Parameters counted by hand from the architecture (GPT-2 block, tied embeddings).
        d, f, v, t, layers = m.d_model, m.mlp_dim, m.vocab_size, m.max_seq_len, m.num_layers
        block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        n = v * d + t * d + layers * block + 2 * d
        c = 6 * n * run.config.train.steps * per_step
        assert abs(c - run.budget) <= 6 * n * per_step / 2 + 1, (run.name, c, run.budget)
        assert run.config.train.steps >= 5
    # The widest model gets 2 < 5 steps at 3e8 FLOPs, so it is left out of that budget only.
    names = {r.name for r in runs}
    assert "C3e+08_d64" not in names and "C1e+09_d64" in names and len(runs) == 5
    with pytest.raises(ValueError, match=r"FLOP budget -1 must be > 0"):
        isoflop_grid(base, models, [-1])
    with pytest.raises(ValueError, match=r"no model trains >= 5 steps"):
        isoflop_grid(base, models, [1e3], min_steps=5)
    grid = token_grid(base, models, [2560])
    assert [r.config.train.steps for r in grid] == [10, 10, 10]


def test_bad_sweeps_are_refused(tmp_path):
    run = load_sweep(_write_sweep(tmp_path, 4))[0]
    with pytest.raises(ValueError, match=r"run name 'd16' appears twice"):
        check_runs([run, run])
    with pytest.raises(ValueError, match=r"run name 'a/b' must be letters"):
        check_runs([type(run)("a/b", run.config)])
    with pytest.raises(TypeError, match=r"sweep entry 0 is a RunConfig, expected SweepRun"):
        check_runs([RunConfig()])
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match=r"must define get_sweep\(\) or SWEEP"):
        load_sweep(tmp_path / "empty.py")
    assert cli.main(["sweep", str(tmp_path / "missing.py")]) == 2


def _write_sweep(tmp_path: Path, steps_2: int) -> Path:
    path = tmp_path / f"sweep_{steps_2}.py"
    path.write_text(SWEEP_FILE.replace("{steps_2}", str(steps_2)))
    return path


def test_sweep_finishes_skips_finished_runs_and_resumes_a_killed_one(tmp_path):
    sweep_file = _write_sweep(tmp_path, 40)
    workdir = tmp_path / "sweep"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=str(ROOT),
    )
    cmd = [sys.executable, "-m", "jaxlm", "sweep", str(sweep_file), "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill -9 once the second run has a checkpoint but is not done.
    deadline = time.monotonic() + 240
    while not checkpoint.complete_steps(workdir / "d32"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint of run 2: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = checkpoint.complete_steps(workdir / "d32")[-1]
    assert killed_at < 40
    assert [r["name"] for r in load_results(workdir)] == ["d16"]

    messages: list[str] = []
    rows = run_sweep(load_sweep(sweep_file), workdir, log=messages.append)
    assert [r["name"] for r in rows] == ["d16", "d32", "d48"]
    assert messages[0].startswith("sweep 1/3: d16 done")
    assert messages[1].startswith("sweep 2/3: d32 (N=")
    assert (workdir / "d32" / "checkpoints" / "40").is_dir()
    records = [json.loads(x) for x in (workdir / "d32" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 41)), "a resumed run logs each step once"

    # Each row matches its run's own final eval record and configuration.
    for row in rows:
        final = [r for r in map(json.loads, (workdir / row["name"] / "metrics.jsonl").open())]
        assert row["eval_loss"] == [r for r in final if "eval_loss" in r][-1]["eval_loss"]
        assert row["tokens"] == row["steps"] * 32 * 8
        assert row["flops"] == 6 * row["params"] * row["tokens"]
    csv_rows = load_results(workdir / "results.csv")
    for a, b in zip(rows, csv_rows, strict=True):
        assert a["name"] == b["name"]
        np.testing.assert_allclose(a["eval_loss"], b["eval_loss"], rtol=1e-12)

    # Rerun: nothing trains, the table is unchanged.
    before = (workdir / "results.json").read_text()
    messages.clear()
    run_sweep(load_sweep(sweep_file), workdir, log=messages.append, train_fn=_must_not_train)
    assert all(" done (eval loss " in m for m in messages) and len(messages) == 3
    assert (workdir / "results.json").read_text() == before


def test_a_sweep_in_a_bucket_writes_its_runs_and_tables_there_and_skips_them_on_rerun(
    tmp_path, gcs_bucket, stdlib_cache
):
    """`run_sweep` into gs:// (the Cloud Storage emulator): every run's checkpoints and metrics
    and the results tables in the bucket; a rerun finds the finished runs there."""
    sweep_file = _write_sweep(tmp_path, 4)
    workdir = f"{gcs_bucket}/sweep"
    rows = run_sweep(
        load_sweep(sweep_file), workdir, overrides=["checkpoint.every=4"], log=lambda m: None
    )
    assert [r["name"] for r in rows] == ["d16", "d32", "d48"]
    for row in rows:
        run = storage.as_path(f"{workdir}/{row['name']}")
        assert checkpoint.complete_steps(run)[-1] == 4
        final = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert row["eval_loss"] == [r for r in final if "eval_loss" in r][-1]["eval_loss"]
    assert load_results(workdir) == rows
    csv_rows = load_results(f"{workdir}/results.csv")
    assert [r["name"] for r in csv_rows] == [r["name"] for r in rows]
    np.testing.assert_allclose(
        [r["eval_loss"] for r in csv_rows], [r["eval_loss"] for r in rows], rtol=1e-12
    )
    messages: list[str] = []
    run_sweep(load_sweep(sweep_file), workdir, log=messages.append, train_fn=_must_not_train)
    assert all(" done (eval loss " in m for m in messages) and len(messages) == 3


def _must_not_train(config, workdir):
    raise AssertionError(f"{workdir} was trained again")


def _chinchilla_rows(rng):
    """An IsoFLOP table from the law L = 1.8 + 400/N^0.35 + 1200/D^0.3 with 0.5% noise."""
    rows = []
    for c in (1e17, 1e18, 1e19, 1e20):
        n_mid = 0.1 * (c / 6) ** 0.46
        for n in n_mid * np.logspace(-0.8, 0.8, 7):
            d = c / (6 * n)
            loss = (1.8 + 400 / n**0.35 + 1200 / d**0.3) * np.exp(rng.normal(0, 0.005))
            rows.append(
                {"name": f"{c:.0e}_{n:.3g}", "budget": c, "params": n, "tokens": d,
                 "flops": c, "eval_loss": loss}
            )  # fmt: skip
    return rows


def test_scaling_fit_cli_reports_the_fits_and_writes_plots(tmp_path, capsys):
    rows = _chinchilla_rows(np.random.default_rng(0))
    (tmp_path / "results.json").write_text(json.dumps(rows))
    out_dir = tmp_path / "plots"
    args = ["scaling", "fit", str(tmp_path), "--plot", str(out_dir), "--bootstrap", "5"]
    assert cli.main([*args, "--target", "1e21"]) == 0
    summary = json.loads(capsys.readouterr().out)
    alpha, beta = summary["chinchilla"]["alpha"], summary["chinchilla"]["beta"]
    # (tests/scaling/test_fits.py checks recovery to 5% on a designed grid; this is the CLI.)
    assert abs(alpha - 0.35) < 0.1 * 0.35 and abs(beta - 0.3) < 0.1 * 0.3
    assert abs(summary["isoflop"]["a"] - 0.3 / 0.65) < 0.05
    (recommendation,) = summary["compute_optimal"]
    assert recommendation["flops"] == 1e21
    n_opt = recommendation["chinchilla"]["params"]
    # Independent check: brute-force the law along C = 6 N D.
    grid = np.logspace(6, 13, 20001)
    brute = grid[np.argmin(400 / grid**0.35 + 1200 / (1e21 / (6 * grid)) ** 0.3)]
    assert abs(np.log(n_opt / brute)) < 0.35  # fitted law, not the true one: within ~40%
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "isoflops.png",
        "loss_vs_compute.png",
        "optimal_allocation.png",
    ]
    assert cli.main(["scaling", "fit", str(tmp_path / "nothing.json")]) == 2
    assert cli.main([*args[:3], "--params", "params_active"]) == 2
    assert "have no 'params_active' column" in capsys.readouterr().err


def _notebook_runs() -> list:
    """The runs colabs/scaling_laws.ipynb builds with its default parameters (cells executed up
    to the grid, no training)."""
    import nbformat

    nb = nbformat.read(ROOT / "colabs" / "scaling_laws.ipynb", as_version=4)
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    namespace: dict = {}
    for cell in nb.cells[index : index + 2]:
        code = "\n".join(line for line in cell.source.splitlines() if not line.startswith("%"))
        exec(compile(code, "scaling_laws.ipynb", "exec"), namespace)
    return namespace["runs"]


def test_shipped_sweeps_load_and_the_cpu_sweep_is_the_colab_grid(capsys):
    cpu = load_sweep(ROOT / "experiments" / "sweeps" / "cpu_isoflop.py")
    notebook = _notebook_runs()
    capsys.readouterr()
    assert [r.name for r in cpu] == [r.name for r in notebook]
    assert all(a.config == b.config for a, b in zip(cpu, notebook, strict=True))
    assert len(cpu) == 15 and len({r.config.model for r in cpu}) == 5
    tpu = load_sweep(ROOT / "experiments" / "sweeps" / "tpu_ladder.py")
    assert {r.budget for r in tpu} == {1e17, 3e17, 1e18, 3e18}
    for run in [*cpu, *tpu]:
        tokens_per_step = run.config.data.seq_len * run.config.data.batch_size
        n = param_count(run.config.model).total
        # 6 N D within half a step of the budget (no override in the file changed the steps).
        assert abs(6 * n * run.config.train.steps * tokens_per_step - run.budget) <= (
            3 * n * tokens_per_step + 1
        ), run.name


def test_lr_grid_runs_through_the_sweep_and_the_best_rates_are_read_back(tmp_path):
    base = load_config(
        "tiny",
        [
            "model.num_heads=2",
            "model.mlp_dim=None",
            "data.seq_len=32",
            "data.batch_size=8",
            "train.steps=3",
            "train.eval_batches=1",
            "train.sample_tokens=0",
            "optim.warmup_steps=1",
        ],
    )
    runs = lr_grid(base, [16, 32], [1e-3, 4e-3])
    assert [r.name for r in runs] == [
        "sp_w16_lr0.001", "sp_w16_lr0.004", "sp_w32_lr0.001", "sp_w32_lr0.004",
        "mup_w16_lr0.001", "mup_w16_lr0.004", "mup_w32_lr0.001", "mup_w32_lr0.004",
    ]  # fmt: skip
    for run in runs:
        m = run.config.model
        assert (m.parametrization, m.d_model, m.mlp_dim, m.mup_base_width) == (
            run.name.split("_")[0], int(run.name.split("_")[1][1:]), 4 * m.d_model, 16
        )  # fmt: skip
        assert run.config.optim.learning_rate == float(run.name.split("_lr")[1])
    # Two of them trained by the sweep: the table carries each run's parametrization and rate.
    rows = run_sweep([runs[3], runs[6]], tmp_path, log=lambda _: None)
    assert [(r["parametrization"], r["d_model"], r["learning_rate"]) for r in rows] == [
        ("sp", 32, 4e-3), ("mup", 32, 1e-3)
    ]  # fmt: skip
    assert load_results(tmp_path / "results.csv")[1]["parametrization"] == "mup"

    made_up = [
        {"parametrization": p, "d_model": w, "learning_rate": lr, "eval_loss": loss}
        for p, w, lr, loss in [
            ("sp", 16, 1e-3, 3.0), ("sp", 16, 4e-3, 2.5), ("sp", 32, 1e-3, 2.4),
            ("sp", 32, 4e-3, float("nan")), ("mup", 16, 1e-3, 3.1), ("mup", 16, 4e-3, 2.6),
            ("mup", 32, 1e-3, None), ("mup", 32, 4e-3, 2.2),
        ]
    ]  # fmt: skip
    best = best_learning_rates(made_up)
    assert {
        p: {w: (b["learning_rate"], b["eval_loss"]) for w, b in at.items()}
        for p, at in best.items()
    } == {
        "sp": {16: (4e-3, 2.5), 32: (1e-3, 2.4)},
        "mup": {16: (4e-3, 2.6), 32: (4e-3, 2.2)},
    }

    with pytest.raises(ValueError, match="mup_base_width=64 is larger than the narrowest width 16"):
        lr_grid(load_config("tiny", ["model.mup_base_width=64"]), [16, 64], [1e-3])
    with pytest.raises(ValueError, match=r"learning rate -0\.1 must be"):
        lr_grid(base, [16], [-0.1])


def test_the_shipped_mup_transfer_and_cooldown_sweeps():
    cooldown = load_sweep(ROOT / "experiments" / "sweeps" / "cpu_cooldown.py")
    trunks = [r for r in cooldown if not r.results]
    assert len(cooldown) == 25 and len(trunks) == 5
    for trunk in trunks:  # its checkpoints are the branch points of its model's branches
        branches = [r for r in cooldown if r.branch_of == trunk.name]
        assert len(branches) == 4 and {r.config.model for r in branches} == {trunk.config.model}
        assert trunk.config.checkpoint.kept_steps == tuple(
            r.config.train.branch_from_step for r in branches
        )
    runs = load_sweep(ROOT / "experiments" / "sweeps" / "cpu_mup_transfer.py")
    assert len(runs) == 56
    assert {r.config.model.mup_base_width for r in runs} == {32}
    assert {(r.config.model.d_model, r.config.model.head_dim) for r in runs} == {
        (32, 8), (64, 16), (128, 32), (256, 64)
    }  # fmt: skip
