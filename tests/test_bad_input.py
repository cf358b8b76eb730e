"""Bad and hostile input through the `jaxlm` entry point (`cli.main`, what the console script
calls): each case exits 2 (1 for a damaged run) with one line naming the file, field or value,
writes nothing, and never shows a traceback. Also: logged throughput against a known clock."""

import json
import shutil

import pytest

from jaxlm import checkpoint, cli, loop
from jaxlm.configs.overrides import load_config
from jaxlm.metrics import flops_per_token
from jaxlm.run import RunPlan

DOC = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.err.strip().splitlines()[-1] if out.err.strip() else "", out


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.py").write_text(DOC * (i + 2))
    return d


# --- files a user hands jaxlm ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"model": {"d_model": 64', "bad.json:1:25: not valid JSON (Expecting ',' delimiter)"),
        ("", "bad.json: empty, expected JSON"),
        ("[1, 2]", "bad.json (a run config) must hold a JSON object, but holds a list"),
        ('{"model": [1]}', "'model' must be a JSON object of ModelConfig's fields, got list"),
        ('{"optim": {"learning_rate": "NaN"}}', "optim.learning_rate='NaN': expected a finite"),
    ],
)
def test_a_bad_config_json_names_the_file_and_the_problem(capsys, tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    rc, last, _ = _cli(capsys, "info", "--config", tmp_path / "bad.json")
    assert rc == 2 and message in last, last


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "results.json: empty, expected JSON"),
        ('[{"name": "a"', "results.json:1:14: not valid JSON (Expecting ',' delimiter)"),
        ('{"rows": []}', "results.json (a results table: a list of one object per run) must hold"),
        ('[{"name": "a"}, 3]', "results.json: row 1 is a int, expected an object"),
    ],
)
def test_a_bad_results_table_names_the_file(capsys, tmp_path, text, message):
    (tmp_path / "results.json").write_text(text)
    rc, last, _ = _cli(capsys, "scaling", "fit", tmp_path / "results.json")
    assert rc == 2 and message in last, last


def test_a_bad_results_csv_names_the_line_and_column(capsys, tmp_path):
    (tmp_path / "r.csv").write_text("name,params,eval_loss\na,100,2.5\nb,lots,2.4\n")
    rc, last, _ = _cli(capsys, "scaling", "fit", tmp_path / "r.csv")
    assert rc == 2 and "r.csv:3: column 'params' holds 'lots', not a number" in last, last


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("data.jsonl", '{"text": "a"}\n{"text": "b",}\n', "data.jsonl:2: not valid JSON"),
        ("data.jsonl", '{"text": "a"}\n\n[1]\n', "data.jsonl:3: each line must be a JSON object"),
        ("data.jsonl", '{"text": 7}\n', "data.jsonl:1: the 'text' field must be a string, got int"),
        ("data.bin", b"\x7fELF\x02\x01\x01\x00\xff\xfe", "data.bin is not UTF-8 text (byte 0xff"),
        (
            "zeros.txt",
            b"ab\x00\x00cd",
            "zeros.txt looks like a binary file (a NUL byte at offset 2)",
        ),
    ],
)
def test_unreadable_data_fails_before_the_workdir_exists(
    capsys, tmp_path, stdlib_cache, name, content, message
):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    work = tmp_path / "work"
    rc, last, _ = _cli(capsys, "train", "--set", f"data.dataset={path}", "--workdir", work)
    assert rc == 2 and message in last, last
    assert not work.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"model_type": "llama",', "config.json:1:24: not valid JSON"),
        ('"llama"', "config.json (a Hugging Face model config) must hold a JSON object"),
    ],
)
def test_a_bad_hugging_face_config_names_the_file(capsys, tmp_path, text, message):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(text)
    rc, last, _ = _cli(capsys, "convert", "--from-hf", tmp_path / "hf", "--to", tmp_path / "w")
    assert rc == 2 and message in last, last
    assert not (tmp_path / "w").exists()


def test_tokenizer_training_refuses_input_without_text(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    for kind in ("bpe", "sentencepiece"):
        args = ["tokenizer", "train", "--kind", kind, "--vocab-size", 300]
        rc, last, _ = _cli(
            capsys, *args, "--input", tmp_path / "empty.txt", "--out", tmp_path / "t"
        )
        assert rc == 2 and "no text in the input (1 file(s), all empty or blank)" in last, last
    assert not (tmp_path / "t").exists()


def test_tokenizer_training_prints_the_vocab_size_to_use(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("hello world, hello again\n" * 50)
    args = ["tokenizer", "train", "--kind", "bpe", "--vocab-size", 300, "--input"]
    rc, _, out = _cli(capsys, *args, tmp_path / "a.txt", "--out", tmp_path / "t")
    assert rc == 0
    size = json.loads((tmp_path / "t" / "tokenizer.json").read_text())["model"]["vocab"]
    assert f"--set model.vocab_size={len(size)} (or more)" in out.out


def test_an_expert_parallel_batch_that_does_not_split_is_refused_first(capsys, tmp_path, corpus):
    work = tmp_path / "work"
    for batch in (6, 7):
        rc, last, _ = _cli(
            capsys,
            "train",
            "--config",
            "tiny-moe",
            *("--set", "mesh.fsdp=2", "--set", "mesh.expert=4", "--set", "mesh.rules=fsdp_ep"),
            *("--set", f"data.batch_size={batch}", "--set", f"data.dataset={corpus}"),
            *("--workdir", work),
        )
        assert rc == 2, last
        assert (
            f"batch_size={batch} is not divisible by the data-parallel size 8 (mesh stage=1 x "
            "data=1 x fsdp=2 x expert=4); use a multiple of 8" in last
        )
        assert not work.exists()


# --- a run: throughput against a known clock, Ctrl-C in the closing sample, damaged checkpoints --

STEPS, FIRST, STEP, EVAL, SAVE = 20, 10.0, 1.0, 5.0, 3.0


class _Clock:
    """A wall clock that moves only when the run computes: each train step takes STEP seconds
    (the first FIRST: compilation), each eval EVAL, each checkpoint write SAVE."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.py").write_text(DOC * (i + 3))
    config = load_config(
        "tiny",
        [
            f"data.dataset={corpus}",
            "data.seq_len=32",
            "data.batch_size=8",
            f"train.steps={STEPS}",
            "train.log_every=5",
            "train.eval_every=10",
            "train.eval_batches=1",
            "train.sample_tokens=8",
            "train.peak_flops_per_device=1e9",
            "checkpoint.every=10",
        ],
    )
    clock = _Clock()
    original_step = RunPlan.train_step
    original_eval = loop.evaluate
    original_save = checkpoint.Checkpointer.save

    def timed_step(plan):
        step = original_step.__get__(plan, RunPlan)

        def run_step(state, batch):
            clock.now += FIRST if clock.now == 0 else STEP
            return step(state, batch)

        return run_step

    def timed_eval(*args, **kwargs):
        clock.now += EVAL
        return original_eval(*args, **kwargs)

    def timed_save(self, *args, **kwargs):
        clock.now += SAVE
        return original_save(self, *args, **kwargs)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    logs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(root / "cache"))
        mp.setattr(loop, "_clock", clock)
        mp.setattr(RunPlan, "train_step", property(timed_step))
        mp.setattr(loop, "evaluate", timed_eval)
        mp.setattr(checkpoint.Checkpointer, "save", timed_save)
        mp.setattr(loop, "generate", interrupt)
        mp.setattr(loop, "_log", logs.append)
        result = loop.train(config, root / "work")
    return config, root / "work", result, logs


def test_logged_throughput_is_steps_times_tokens_over_the_time_those_steps_took(run):
    config, workdir, result, logs = run
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    tokens = config.data.batch_size * config.data.seq_len
    flops = flops_per_token(config.model, config.data.seq_len) * tokens
    # One step per STEP seconds of the clock, whatever surrounds it: the first step's compile,
    # evals and checkpoint writes (at 10 and 20) count for none of the logged intervals.
    for r in train:
        assert r["tokens_per_sec"] == pytest.approx(tokens / STEP), r
        assert r["mfu"] == pytest.approx(flops / STEP / (1e9 * 8)), r
    assert result["history"][0]["first_step_sec"] == FIRST
    assert "step 1: compiled and ran in 10.0 s" in logs


def test_ctrl_c_in_the_closing_sample_keeps_the_finished_run(run):
    _, workdir, result, logs = run
    assert result["step"] == STEPS and result["stopped_by"] is None and result["sample"] == ""
    assert f"interrupted the closing sample; the run is complete and saved at step {STEPS}" in logs
    assert checkpoint.complete_steps(workdir) == [10, 20]


def test_ctrl_c_anywhere_else_exits_130_without_a_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)  # the parser looks it up when built
    rc, last, _ = _cli(capsys, "info")
    assert rc == 130 and last == "jaxlm info: interrupted"


@pytest.fixture(scope="module")
def damaged(run, tmp_path_factory):
    """A copy of the run whose newest checkpoint (step 20) has truncated parameter files."""
    workdir = tmp_path_factory.mktemp("damaged") / "work"
    shutil.copytree(run[1], workdir)
    files = [
        p for p in (workdir / "checkpoints" / "20" / "params").rglob("*") if p.parent.name == "d"
    ]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return workdir


def test_sample_and_eval_skip_a_damaged_newest_checkpoint(capsys, damaged, run):
    rc, _, out = _cli(
        capsys, "sample", "--workdir", damaged, "--prompt", "def", "--max-new-tokens", 4
    )
    assert rc == 0 and out.out.startswith("def")
    assert "checkpoint at step 20 cannot be restored" in out.err
    assert "using step 10" in out.err
    rc, _, out = _cli(capsys, "eval", "--workdir", damaged, "--batches", 1)
    assert rc == 0 and "using step 10" in out.err
    assert json.loads(out.out)["eval_loss"] > 0
    # Nothing was moved: these commands only read.
    assert checkpoint.complete_steps(damaged) == [10, 20]


def test_eval_at_a_named_damaged_step_says_which_steps_are_usable(capsys, damaged):
    rc, last, _ = _cli(capsys, "eval", "--workdir", damaged, "--step", 20)
    assert rc == 1
    assert "the checkpoint at step 20" in last and "cannot be restored" in last, last
    assert "other steps: [10] (--step)" in last
    rc, last, _ = _cli(capsys, "eval", "--workdir", damaged, "--step", 10, "--batches", 1)
    assert rc == 0


def test_eval_at_a_step_that_does_not_exist(capsys, run):
    rc, last, _ = _cli(capsys, "eval", "--workdir", run[1], "--step", 15)
    assert rc == 2 and "no checkpoint at step 15" in last and "steps: [10, 20]" in last


def test_sample_refuses_top_k_beyond_the_vocabulary(capsys, run):
    config = run[0]
    args = ["sample", "--workdir", run[1], "--prompt", "def", "--top-k", 100000]
    rc, last, _ = _cli(capsys, *args)
    assert rc == 2
    assert f"top_k=100000 is more than the model's {config.model.vocab_size} token ids" in last


@pytest.mark.parametrize("kind", ["lm", "sft"])
def test_next_token_training_refuses_a_bidirectional_model(capsys, tmp_path, corpus, kind):
    work = tmp_path / "work"
    rc, last, _ = _cli(
        capsys,
        "train",
        *("--config", "tiny-llama", "--set", "model.causal=false", "--set", f"task.kind={kind}"),
        *("--set", f"data.dataset={corpus}", "--workdir", work),
    )
    assert rc == 2, last
    assert f"task.kind={kind} predicts each next token, but model.causal=False" in last, last
    assert not work.exists()


# --- a second probe: values out of range, user Python files, paths, hints ----------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.b1=1.5", "OptimConfig.b1=1.5 must be in [0, 1)"),
        ("optim.b2=-2", "OptimConfig.b2=-2.0 must be in [0, 1)"),
        ("optim.eps=0", "OptimConfig.eps=0.0 must be > 0"),
        ("train.peak_flops_per_device=-5", "TrainConfig.peak_flops_per_device=-5.0 must be > 0"),
        ("data.seq_len=1", "DataConfig.seq_len=1 must be >= 2"),
        ("model.moe.num_shared_experts=2", "num_shared_experts=2 needs an MoE model"),
        ("model.parametrization=mu", "model.parametrization='mu': expected one of 'sp', 'mup'"),
        ("model.mup_base_width=100000", "ModelConfig.mup_base_width=100000 must be an integer in"),
        ("train.loss_scale=static", "train.loss_scale='static': expected one of 'auto', 'dyn"),
        ("train.loss_scale_init=0.5", "TrainConfig.loss_scale_init=0.5 must be in [1, 2**64]"),
        ("train.loss_scale_init=inf", "train.loss_scale_init='inf': expected a finite"),
        ("train.loss_scale_period=0", "TrainConfig.loss_scale_period=0 must be an integer >= 1"),
    ],
)
def test_values_out_of_range_are_refused(capsys, override, message):
    rc, last, _ = _cli(capsys, "info", "--set", override)
    assert rc == 2 and message in last, last


def test_string_values_keep_their_spaces():
    config = load_config(None, ["train.sample_prompt=def ", "train.steps= 7 "])
    assert config.train.sample_prompt == "def " and config.train.steps == 7


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("syntax.py", "def get_config(:\n", "syntax.py:1: invalid syntax (the file is not valid"),
        (
            "raises.py",
            "def get_config():\n    x = {}\n    return x['oops']\n",
            "raises.py: get_config() failed: line 3: KeyError: 'oops'",
        ),
        ("imports.py", "import no_such_module\n", "line 1: ModuleNotFoundError"),
    ],
)
def test_a_failing_python_config_names_the_file_and_line(capsys, tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    rc, last, _ = _cli(capsys, "info", "--config", tmp_path / name)
    assert rc == 2 and message in last, last


def test_a_failing_sweep_file_names_the_file_and_line(capsys, tmp_path):
    (tmp_path / "sw.py").write_text("def get_sweep():\n    return [1 / 0]\n")
    rc, last, _ = _cli(capsys, "sweep", tmp_path / "sw.py", "--workdir", tmp_path / "w")
    assert rc == 2 and "sw.py: get_sweep() failed: line 2: ZeroDivisionError" in last, last


def test_a_sweep_budget_must_be_a_finite_number():
    from jaxlm.scaling.sweep import SweepRun, check_runs

    with pytest.raises(ValueError, match=r"run 'x': budget=nan must be a finite number"):
        check_runs([SweepRun("x", load_config("tiny"), float("nan"))])


def test_config_of_another_kind_is_named(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("model: {}\n")
    for spec in (tmp_path / "c.yaml", tmp_path):
        rc, last, _ = _cli(capsys, "info", "--config", spec)
        assert rc == 2 and "give a preset name, a .py file with get_config() or a .json" in last


def test_paths_that_cannot_be_used_are_named(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "a.txt").write_text("hello world, hello again\n" * 50)
    rc, last, _ = _cli(capsys, "sample", "--workdir", tmp_path, "--prompt-file", tmp_path)
    assert rc == 2 and f"{str(tmp_path)!r} is a directory, not a file" in last, last
    args = [
        "tokenizer",
        "train",
        "--kind",
        "bpe",
        "--vocab-size",
        300,
        "--input",
        tmp_path / "a.txt",
    ]
    rc, last, _ = _cli(capsys, *args, "--out", tmp_path / "afile")
    assert rc == 2 and "afile' exists and is not a directory" in last, last
    for workdir, what in ((tmp_path / "afile", "is a file"), (tmp_path / "nope", "does not exist")):
        rc, last, _ = _cli(capsys, "sample", "--workdir", workdir, "--prompt", "hi")
        assert rc == 2 and f"{what}: give a jaxlm run directory" in last, last
        rc, last, _ = _cli(capsys, "eval", "--workdir", workdir)
        assert rc == 2 and what in last, last


def test_init_from_step_alone_is_refused(capsys, tmp_path):
    rc, last, _ = _cli(
        capsys, "train", "--set", "train.init_from_step=2", "--workdir", tmp_path / "w"
    )
    assert rc == 2 and "train.init_from_step=2 needs train.init_from" in last, last
    assert not (tmp_path / "w").exists()


def test_scaling_fit_with_nothing_to_fit_is_an_error(capsys, tmp_path):
    (tmp_path / "one.csv").write_text("name,params,tokens,flops,eval_loss\na,100,1000,6e5,2.5\n")
    rc, last, _ = _cli(capsys, "scaling", "fit", tmp_path / "one.csv", "--bootstrap", 0)
    assert rc == 2 and "no fit is possible with 1 run(s) (chinchilla:" in last, last


def test_small_corpora_say_when_fewer_ids_were_possible(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    args = ["tokenizer", "train", "--kind", "bpe", "--vocab-size", 100000, "--input"]
    rc, _, out = _cli(capsys, *args, tmp_path / "a.txt", "--out", tmp_path / "t")
    assert rc == 0 and "fewer than the 100000 asked: the input has no more to merge" in out.out


def test_a_null_completion_names_the_field():
    from jaxlm.data.chat import conversation

    with pytest.raises(ValueError, match="r: 'completion' must be a string, got NoneType"):
        conversation('{"prompt": "hi", "completion": null}', "r")


def test_a_warmup_as_long_as_the_run_is_noted(run):
    assert any("optim.warmup_steps=50 spans the whole 20-step schedule" in m for m in run[3])


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_bad_chat_or_pair_record_is_named_by_its_file_line(capsys, tmp_path, stdlib_cache, kind):
    good = (
        {"prompt": "hi", "completion": "hello"}
        if kind == "sft"
        else {"prompt": "hi", "chosen": "hello", "rejected": "bye"}
    )
    bad = (
        {"messages": [{"role": "robot", "content": "x"}]}
        if kind == "sft"
        else {"prompt": "hi", "chosen": "same", "rejected": "same"}
    )
    lines = [json.dumps(good)] * 60 + [json.dumps(bad)] + [json.dumps(good)] * 10
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    extra = ["--set", "model.lora.rank=4"] if kind == "dpo" else []
    rc, last, _ = _cli(
        capsys,
        "train",
        *("--set", f"task.kind={kind}", "--set", f"data.dataset={tmp_path / 'd.jsonl'}", *extra),
        *("--workdir", tmp_path / "w"),
    )
    assert rc == 2 and f"{tmp_path / 'd.jsonl'}:61: " in last, last
    assert ("unknown role 'robot'" if kind == "sft" else "are the same reply") in last
    assert not (tmp_path / "w").exists()
