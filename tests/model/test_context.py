"""Context parallelism (`jaxlm.model.context`): the sequence split over `mesh.context` on 8 fake
devices gives the logits and gradients of the unsplit model (ring and all-gather attention, with
and without causal load balancing, packed segments, a sliding window, a logit soft-cap, GQA with
kv heads split and copied over `tensor`, prompt tuning), and a whole train step equals the
unsplit step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import cli, sharding
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.configs.run import MeshConfig
from jaxlm.data import to_global
from jaxlm.model import context
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan
from tests.test_checkpoint import _batches

T = 64


def test_balanced_order_gives_every_shard_the_same_causal_work():
    np.testing.assert_array_equal(context.balanced_order(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
    for shards in (2, 4, 8):
        order = context.balanced_order(T, shards)
        assert sorted(order) == list(range(T))
        # Causal work of a shard: the keys each of its queries sees (position + 1), summed.
        work = (order.reshape(shards, -1) + 1).sum(axis=1)
        assert len(set(work)) == 1, work
        contiguous = (np.arange(T).reshape(shards, -1) + 1).sum(axis=1)
        assert contiguous[-1] > 2 * contiguous[0]  # what it fixes
    with pytest.raises(ValueError, match="2 x 4 chunks, which do not divide 60 positions"):
        context.balanced_order(60, 4)


def _model_config(*overrides):
    return load_config(
        "tiny-llama",
        [
            "model.sliding_window=24",
            "model.attn_logit_softcap=30.0",
            "model.max_seq_len=128",
            *overrides,
        ],
    ).model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 300, (4, T)), jnp.int32)
    segments = np.ones((4, T), np.int32)
    segments[:, 20:] = 2
    segments[1, 40:] = 3
    segments[2, 60:] = 0  # padding at the end of a row
    return tokens, jnp.asarray(segments)


def _loss_and_grads(model_cfg, tokens, segments, mesh=None, rules="fsdp"):
    model = Transformer(model_cfg)
    params = model.init(jax.random.key(0), tokens)["params"]

    def loss(p):
        logits = model.apply({"params": p}, tokens, segment_ids_BT=segments)[0]
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None] % 7, -1)
        return -jnp.sum(picked[..., 0] * (segments > 0)), logits

    step = jax.value_and_grad(loss, has_aux=True)
    if mesh is None:
        return step(params), ""
    with sharding.use_mesh(mesh, rules):
        jitted = jax.jit(step)
        return jitted(params), jitted.lower(params).as_text()


@pytest.mark.parametrize(
    "strategy, balance, mesh, prompt",
    [
        ("ring", True, dict(context=2, fsdp=4), 0),
        ("ring", True, dict(context=4, fsdp=2), 0),
        ("ring", True, dict(context=8, fsdp=1), 0),
        ("ring", True, dict(context=2, tensor=4, fsdp=1), 0),  # 2 kv heads copied over 4
        ("ring", False, dict(context=4, fsdp=2), 0),
        ("all_gather", True, dict(context=4, fsdp=2), 0),
        ("all_gather", False, dict(context=8, fsdp=1), 0),
        ("ring", True, dict(context=4, fsdp=2), 8),  # 8 prompt slots + 56 tokens
    ],
)
def test_the_sequence_split_over_context_gives_the_unsplit_logits_and_gradients(
    inputs, strategy, balance, mesh, prompt
):
    tokens, segments = inputs
    tokens, segments = tokens[:, prompt:], segments[:, prompt:]
    cfg = _model_config(
        f"model.context_attention={strategy}",
        f"model.context_load_balance={balance}",
        f"model.prompt_tokens={prompt}",
    )
    ((want_loss, want_logits), want_grads), _ = _loss_and_grads(cfg, tokens, segments)
    rules = "fsdp_tp" if mesh.get("tensor", 1) > 1 else "fsdp"
    split = sharding.make_mesh(MeshConfig(**mesh))
    ((loss, logits), grads), program = _loss_and_grads(cfg, tokens, segments, split, rules)
    # The split really happens: blocks passed around the ring, or gathered.
    assert ("collective_permute" in program) == (strategy == "ring")
    assert ("all_gather" in program) == (strategy == "all_gather")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=0, atol=2e-6)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    assert_grads_close(grads, want_grads)


def assert_grads_close(grads, want_grads):
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True
    ):
        w = np.asarray(w)
        # float32 sums in another order: within 1e-5 of the gradient's own scale.
        np.testing.assert_allclose(
            np.asarray(g),
            w,
            rtol=0,
            atol=1e-5 * np.abs(w).max(),
            err_msg=jax.tree_util.keystr(path),
        )


def _run_config(*overrides):
    return load_config(
        "tiny-llama",
        [
            f"data.seq_len={T}",
            "data.batch_size=8",
            "optim.warmup_steps=0",
            "model.sliding_window=40",
            *overrides,
        ],
    )


def test_a_train_step_split_over_context_equals_the_unsplit_step():
    """Two steps of `RunPlan.train_step` on packed batches: context 2 x fsdp 4, 4 x 2 and 8 x 1
    (ring, load balanced) against fsdp 8 with the sequence whole: the same losses and gradient
    norms, the same parameters after, and the same eval sums."""
    base = _run_config("mesh.fsdp=8")
    batches = _batches(base, 2)

    def run(cfg):
        plan = RunPlan(cfg)
        # The weights are sharded over fsdp x context: one share of the state per chip.
        share = sharding.per_device_fraction(
            plan.abstract_state.params, plan.state_shardings.params
        )
        assert share["embed/embedding"] == 1 / 8, share
        state = plan.init_state()
        metrics = []
        for b in batches:
            state, m = plan.train_step(state, to_global(b, plan.mesh))
            metrics.append([float(m["loss"]), float(m["grad_norm"])])
        sums = plan.eval_step(state.params, to_global(batches[0], plan.mesh))
        metrics.append([float(sums["nll"]), float(sums["count"])])
        return np.array(metrics), jax.device_get(state.params)

    want_metrics, want_params = run(base)
    for c in (2, 4, 8):
        metrics, params = run(apply_overrides(base, [f"mesh.context={c}", f"mesh.fsdp={8 // c}"]))
        np.testing.assert_allclose(metrics, want_metrics, rtol=2e-6)
        # Adam moves a weight by about lr = 3e-3 a step whatever its gradient's size, so float32
        # rounding in a tiny gradient shows: within 1e-5, a 300th of one step's move.
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["mesh.context=8", "mesh.fsdp=1", "data.seq_len=56"],
            "data.seq_len=56 must be a multiple of 16 with mesh.context=8 (causal load balancing "
            "cuts it into 2 chunks per shard); the nearest are 48 and 64 (or set "
            "model.context_load_balance=False)",
        ),
        (
            [
                "mesh.context=8",
                "mesh.fsdp=1",
                "data.seq_len=60",
                "model.context_load_balance=False",
            ],
            "data.seq_len=60 must be a multiple of 8 with mesh.context=8 (one part per shard); "
            "the nearest are 56 and 64",
        ),
        (
            ["mesh.context=2", "mesh.fsdp=4", "model.attention_impl=splash"],
            "model.attention_impl='splash' attends over a whole sequence on one chip, but "
            "mesh.context=2 splits it",
        ),
    ],
)
def test_a_context_split_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(ValueError) as e:
        RunPlan(_run_config(*overrides), check_data=False)
    assert message in str(e.value)


def test_jaxlm_train_refuses_a_bad_split_with_one_line_and_writes_nothing(capsys, tmp_path):
    work = tmp_path / "run"
    argv = ["train", "--config", "tiny-llama", "--workdir", str(work)]
    argv += ["--set", "mesh.context=8", "--set", "mesh.fsdp=1", "--set", "data.seq_len=60"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "data.seq_len=60 must be a multiple of 16 with mesh.context=8" in err.splitlines()[-1]
    assert not work.exists()
