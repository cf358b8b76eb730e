"""The `jaxlm` command line, run as a user would: in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm.configs import get_preset
from jaxlm.metrics import flops_per_token, param_count


def _run(*args, module=True):
    cmd = [sys.executable, "-m", "jaxlm", *args] if module else [*args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_info_json_reports_the_published_gpt2_size():
    out = _run("info", "--config", "gpt2-124m", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["params"] == 124_439_808
    assert info["params_non_embedding"] == 85_056_000
    assert info["flops_per_token"] == flops_per_token(get_preset("gpt2-124m"), 1024)
    assert info["params_and_adam_bytes"] == 124_439_808 * 12
    assert info["params_active"] == info["params"]  # dense: every parameter is used


def test_info_reports_moe_active_parameters():
    out = _run("info", "--config", "mixtral-small", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    cfg = get_preset("mixtral-small")
    # 6 of the 8 experts (3 weight matrices each) in each of the 16 layers are not used per token.
    unused = 16 * 6 * 3 * cfg.d_model * cfg.mlp_dim
    assert info["params"] - info["params_active"] == unused


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "jaxlm"
    script = script if script.exists() else shutil.which("jaxlm")
    assert script, "the jaxlm console script is not installed"
    out = _run(
        str(script), "info", "--config", "tiny-llama", "--set", "model.num_layers=4", module=False
    )
    assert out.returncode == 0, out.stderr
    assert f"{param_count(get_preset('tiny-llama')).total:,}" not in out.stdout  # 4 layers now
    assert "parameters:" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--set", "model.d_modl=8"],
            "unknown config key 'model.d_modl'. Did you mean model.d_model",
        ),
        (["--config", "gpt3"], "unknown model preset 'gpt3'"),
        (["--seq-len", "0"], "--seq-len 0 must be in [1, model.max_seq_len=256]"),
        (["--set", "model.num_heads=3"], "model.num_heads='3'"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, message):
    out = _run("info", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_no_subcommand_prints_usage():
    out = _run()
    assert out.returncode == 2
    assert "usage: jaxlm" in out.stderr


def test_tokenizer_train_writes_a_loadable_tokenizer(tmp_path):
    from jaxlm.data import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "def f(x):\n    return x + 1\n" * 200 + "".join(chr(c) for c in range(32, 400))
    )
    out = _run(
        "tokenizer",
        "train",
        "--kind",
        "bpe",
        "--vocab-size",
        "300",
        "--input",
        str(tmp_path / "*.txt"),
        "--out",
        str(tmp_path / "tok"),
    )
    assert out.returncode == 0, out.stderr
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 300 and tok.decode(tok.encode("return x + 1")) == "return x + 1"
    bad = _run(
        "tokenizer",
        "train",
        "--kind",
        "sentencepiece",
        "--vocab-size",
        "10",
        "--input",
        str(corpus),
        "--out",
        str(tmp_path / "t2"),
    )
    assert bad.returncode == 2 and "vocab size 10 is too small" in bad.stderr
