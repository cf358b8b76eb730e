"""Harness tasks while training (`train.eval_tasks`: logged beside the loss, redone after an
interruption, never half-logged) and `jaxlm eval --tasks / --card` on the run."""

import json
import os
import subprocess
import sys

import pytest

from jaxlm import cli, loop
from jaxlm.configs.overrides import load_config
from jaxlm.evals import harness
from jaxlm.evals.harness import JaxlmLM, headline, run_tasks
from jaxlm.metrics import param_count
from tests.evals.test_harness import MC_DOCS, mc_task

STEPS = ["train.steps=4", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1"]
COMMON = [
    *STEPS,
    "train.sample_tokens=0",
    "checkpoint.every=2",
    "checkpoint.async_save=false",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "data.batch_size=8",
]


def _mc_task(directory):
    return mc_task(
        directory,
        "sums_mc",
        MC_DOCS,
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )


def _records(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _session_cache):
    """A 4-step tiny run with a harness task every 2 steps; its first attempt is interrupted
    in the middle of the step-4 task evaluation and then rerun."""
    root = tmp_path_factory.mktemp("train-eval")
    task = _mc_task(root)
    config = load_config("tiny", [*COMMON, f"train.eval_tasks={task}", "train.eval_tasks_limit=6"])
    calls = []

    def interrupted(lm, *args, **kwargs):
        calls.append(lm)
        if len(calls) == 2:  # step 4, after step 2's tasks and checkpoint
            raise KeyboardInterrupt("killed during the step-4 task evaluation")
        return run_tasks(lm, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(_session_cache))
        mp.setattr(harness, "run_tasks", interrupted)
        with pytest.raises(KeyboardInterrupt):
            loop.train(config, root / "run")
        first = _records(root / "run")
        mp.setattr(harness, "run_tasks", run_tasks)
        result = loop.train(config, root / "run")
    return root, task, first, result


def test_task_metrics_are_logged_at_each_eval_and_redone_after_an_interruption(trained):
    root, task, first, result = trained
    assert [r["step"] for r in first if "tasks/sums_mc/acc" in r] == [2]
    records = _records(root / "run")
    tasks = [r for r in records if "tasks/sums_mc/acc" in r]
    assert [r["step"] for r in tasks] == [2, 4]  # step 4 once: redone, not half-logged
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    # The logged figures are the harness's on the final parameters, evaluated on their own.
    config = load_config("tiny", COMMON)
    lm = JaxlmLM(config, result["state"].params, harness_tokenizer(root / "run"))
    want = headline(run_tasks(lm, [str(task)], limit=6))
    assert tasks[-1]["tasks/sums_mc/acc"] == pytest.approx(want["sums_mc/acc"])
    assert tasks[-1]["tasks/sums_mc/acc_norm"] == pytest.approx(want["sums_mc/acc_norm"])


def harness_tokenizer(workdir):
    from jaxlm.run import load_for_eval

    return load_for_eval(workdir)[3]


def _jaxlm(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxlm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_eval_cli_runs_tasks_and_writes_results_next_to_the_run(trained):
    root, task, _, _ = trained
    out = _jaxlm("eval", "--workdir", str(root / "run"), "--tasks", str(task), "--limit", "5")
    assert out.returncode == 0, out.stderr[-3000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    saved = json.loads((root / "run" / "evals" / "step4_sums_mc.json").read_text())
    assert saved["results"]["sums_mc"]["sample_len"] == 5
    assert printed == {"step": 4, **headline(saved)}
    lm = JaxlmLM.from_workdir(root / "run")
    assert headline(run_tasks(lm, [str(task)], limit=5)) == headline(saved)


def test_eval_card_reports_the_model_and_its_figures(trained):
    root, task, _, _ = trained
    run = str(root / "run")
    out = _jaxlm("eval", "--workdir", run, "--card", "--tasks", str(task), "--batches", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    card = json.loads(out.stdout)
    config = load_config("tiny", COMMON)
    count = param_count(config.model)
    assert card["parameters"]["total"] == count.total
    assert card["training"]["step"] == 4
    assert card["training"]["tokens"] == 4 * 8 * 64
    held_out = loop.eval_workdir(root / "run", 2)
    for key, value in held_out.items():
        assert card["held_out"][key] == pytest.approx(value, rel=1e-6)
    assert card["tasks"] == headline(run_tasks(JaxlmLM.from_workdir(root / "run"), [str(task)]))
    assert card["speed"]["decode_tokens_per_s"] > 0 and card["speed"]["decode_new_tokens"] > 0


def test_bad_eval_options_are_refused_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    assert cli.main(["eval", "--workdir", missing, "--tasks", "a.yaml", "--limit", "0"]) == 2
    assert "--limit 0 must be >= 1" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", missing, "--tasks", ","]) == 2
    assert "names no task" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", missing, "--limit", "3"]) == 2
    assert "go with --tasks" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", missing, "--tasks", str(tmp_path / "t.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_tasks_limit=-1 must be >= 0"):
        load_config("tiny", ["train.eval_tasks_limit=-1"])
    bert = load_config("tiny-bert", ["task.kind=mlm", "train.eval_tasks=x.yaml"])
    with pytest.raises(ValueError, match="needs a causal model"):
        loop.train(bert, tmp_path / "bert")
    assert not (tmp_path / "bert").exists()
