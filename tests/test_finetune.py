"""Fine-tuning learns: on a synthetic instruction task with a checkable answer ("reverse abc"),
held-out exact match goes from about 0 to >= 90% with full fine-tuning and with LoRA, both
started (`init_from`) from a base that was taught another task ("copy abc")."""

import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import loop
from jaxlm.configs.overrides import load_config
from jaxlm.model.lora import is_adapter
from jaxlm.run import load_for_eval
from jaxlm.sharding import use_mesh
from jaxlm.tasks import param_names
from jaxlm.tasks.sft import generate_replies

OPS = {"copy": lambda w: w, "reverse": lambda w: w[::-1]}


def _words():
    r = random.Random(0)
    words = sorted(
        {"".join(r.choice("abcdef") for _ in range(r.randint(3, 5))) for _ in range(4000)}
    )
    r.shuffle(words)
    return words[:100], words[100:]  # held out, train


def _data(root, op):
    _, train = _words()
    path = root / f"{op}.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{op} {w}", "completion": OPS[op](w)}) + "\n" for w in train)
    )
    return path


def _config(data, steps, *overrides):
    return load_config(
        "tiny-llama",
        [
            "model.d_model=128",
            "model.num_layers=4",
            "task.kind=sft",
            f"data.dataset={data}",
            "data.seq_len=64",
            "data.batch_size=32",
            f"train.steps={steps}",
            "train.eval_every=100000",
            "train.eval_batches=1",
            "train.sample_tokens=0",
            "train.log_every=50",
            "optim.warmup_steps=20",
            "optim.learning_rate=3e-3",
            "checkpoint.every=100000",
            *overrides,
        ],
    )


def _exact_match(workdir, op):
    held_out, _ = _words()
    config, mesh, params, tokenizer = load_for_eval(workdir)
    chats = [[{"role": "user", "content": f"{op} {w}"}] for w in held_out]
    with use_mesh(mesh, config.mesh.rules):
        replies = generate_replies(config, params, tokenizer, chats, max_new_tokens=12)
    return np.mean([r == OPS[op](w) for r, w in zip(replies, held_out, strict=True)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXLM_CACHE", str(root / "cache"))
    loop.train(_config(_data(root, "copy"), 150), root / "base")
    yield root
    mp.undo()


def test_base_copies_and_cannot_reverse(base):
    assert _exact_match(base / "base", "copy") > 0.5
    assert _exact_match(base / "base", "reverse") < 0.1  # palindromes only


def test_full_fine_tuning_learns_to_reverse(base):
    loop.train(_config(_data(base, "reverse"), 250), base / "full", init_from=base / "base")
    assert _exact_match(base / "full", "reverse") >= 0.9


def test_lora_learns_to_reverse_with_the_base_frozen(base):
    lora = ["model.lora.rank=8", "model.lora.targets=query,key,value,out,gate,up,down"]
    cfg = _config(_data(base, "reverse"), 300, *lora)
    loop.train(cfg, base / "lora", init_from=base / "base")
    assert _exact_match(base / "lora", "reverse") >= 0.9
    _, _, before, _ = load_for_eval(base / "base")
    _, _, after, _ = load_for_eval(base / "lora")
    names = [n for n in param_names(after) if not is_adapter(n)]
    assert len(names) == len(jax.tree.leaves(before))
    for name, a, b in zip(
        names,
        jax.tree.leaves(before),
        [x for n, x in zip(param_names(after), jax.tree.leaves(after), strict=True) if n in names],
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # The CLI answers a chat with the run's template and stops at the end of the turn.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm",
            "sample",
            "--workdir",
            str(base / "lora"),
            "--chat",
            "reverse abcde",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "edcba"
