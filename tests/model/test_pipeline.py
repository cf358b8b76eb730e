"""Pipeline parallelism (`jaxlm.model.pipeline`): the layers split into stages over `mesh.stage`
on 8 fake devices give the logits and gradients of the unsplit model (GPipe 2 x 4 fsdp and
4 x 2, circular repeats with tensor parallelism inside a stage and remat, data parallelism, MoE
layers whose auxiliary losses are each microbatch's); a whole train step equals the unsplit
step; a run saved with stages resumes without them; bad pipelines are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import aot, checkpoint, cli, hlo, loop, sharding
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.configs.run import MeshConfig
from jaxlm.data import to_global
from jaxlm.model import pipeline
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan, abstract_train_state
from tests.model.test_context import assert_grads_close
from tests.test_checkpoint import _assert_trees_equal, _batches, _loop_config

B, T = 8, 32


def test_the_schedule_and_its_bubble():
    # GPipe, 2 stages x 3 microbatches: stage 1 starts one step late and ends one step later.
    np.testing.assert_array_equal(pipeline.schedule(2, 3), [[0, -1], [1, 0], [2, 1], [-1, 2]])
    # Circular, 2 stages x 2 microbatches x 2 trips: microbatch m's second trip starts on stage 0
    # right after its first ended on stage 1.
    np.testing.assert_array_equal(
        pipeline.schedule(2, 2, 2), [[0, -1], [1, 0], [0, 1], [1, 0], [-1, 1]]
    )
    for s, m, r in [(2, 3, 1), (4, 4, 1), (4, 8, 2), (8, 8, 4)]:
        table = pipeline.schedule(s, m, r)
        assert (table >= 0).sum() == s * m * r  # every stage runs every microbatch every trip
        idle = (table < 0).mean()
        assert pipeline.bubble_fraction(s, m, r) == pytest.approx(idle)
    assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert pipeline.bubble_fraction(1, 4) == 0.0


def _model_config(*overrides):
    return load_config(
        "tiny-llama",
        [
            "model.num_layers=4",
            "model.sliding_window=24",
            "model.attn_logit_softcap=30.0",
            "model.max_seq_len=64",
            *overrides,
        ],
    ).model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 300, (B, T)), jnp.int32)
    segments = np.ones((B, T), np.int32)
    segments[:, 20:] = 2
    segments[1, 25:] = 3
    segments[2, 28:] = 0  # padding at the end of a row
    return tokens, jnp.asarray(segments)


def _cross_entropy(model, p, tokens, segments):
    logits, _, aux = model.apply({"params": p}, tokens, segment_ids_BT=segments)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None] % 7, -1)
    return -jnp.sum(picked[..., 0] * (segments > 0)), logits, aux


def _aux_loss(aux):  # MoE's auxiliary losses take part in the gradients too
    if "moe_lb_loss" not in aux:
        return 0.0
    return 10.0 * jnp.sum(aux["moe_lb_loss"]) + jnp.sum(aux["moe_z_loss"])


def _objective(model, p, tokens, segments):
    ce, logits, aux = _cross_entropy(model, p, tokens, segments)
    return ce + _aux_loss(aux), (logits, aux)


def _loss_and_grads(model_cfg, tokens, segments, mesh=None, rules="fsdp"):
    model = Transformer(model_cfg)
    params = model.init(jax.random.key(0), tokens)["params"]
    step = jax.value_and_grad(lambda p: _objective(model, p, tokens, segments), has_aux=True)
    if mesh is None:
        return step(params), ""
    with sharding.use_mesh(mesh, rules):
        jitted = jax.jit(step)
        return jitted(params), jitted.lower(params).compile().as_text()


@pytest.mark.parametrize(
    "mesh, rules, overrides",
    [
        (dict(stage=2, fsdp=4), "fsdp", ["model.pipeline_microbatches=2"]),
        (dict(stage=4, fsdp=2), "fsdp", []),  # one microbatch per stage by default
        # Circular: 4 chunks of one layer, 2 per stage; tensor parallel within a stage; remat.
        (
            dict(stage=2, fsdp=2, tensor=2),
            "fsdp_tp",
            ["model.pipeline_repeats=2", "model.pipeline_microbatches=4", "model.remat=full"],
        ),
        (dict(stage=4, data=2, fsdp=1), "dp", ["model.pipeline_microbatches=4"]),
        (
            dict(stage=2, fsdp=2, tensor=2),
            "fsdp_tp",
            ["model.pipeline_microbatches=2", "model.pipeline_gather_weights=True"],
        ),
    ],
    ids=[
        "gpipe-2x4fsdp",
        "gpipe-4x2fsdp",
        "circular-2x2fsdp2tensor",
        "gpipe-4x2data",
        "gathered-2x2fsdp2tensor",
    ],
)
def test_the_layers_split_into_stages_give_the_unsplit_logits_and_gradients(
    inputs, mesh, rules, overrides
):
    tokens, segments = inputs
    cfg = _model_config(*overrides)
    ((want_loss, (want_logits, _)), want_grads), _ = _loss_and_grads(cfg, tokens, segments)
    split = sharding.make_mesh(MeshConfig(**mesh))
    ((loss, (logits, _)), grads), program = _loss_and_grads(cfg, tokens, segments, split, rules)
    # Stages hand activations on to the next (and back, for the gradients) as collective
    # permutes; each chip runs one stage's share of a microbatch: its layers' dots see
    # B / microbatches / (data-parallel ways) rows of T tokens.
    assert "collective-permute" in program
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=0, atol=2e-6)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    assert_grads_close(grads, want_grads)


def test_gathering_a_stages_weights_once_sends_fewer_bytes():
    """A train step compiled for TPU v5e:2x2 (2 stages x 2 fsdp, 4 microbatches, so 5 steps of
    the schedule): gathered once per step, the weight all-gathers send less than a third of
    the bytes they send gathered at every schedule step, as the compiled program's
    collectives show."""
    devices = aot.topology_devices("v5e:2x2")
    sent = {}
    for gather in (False, True):
        config = _run_config(
            "mesh.stage=2",
            "mesh.fsdp=2",
            "model.d_model=256",
            "model.mlp_dim=1024",
            "model.pipeline_microbatches=4",
            f"model.pipeline_gather_weights={gather}",
        )
        plan = RunPlan(config, mesh=sharding.make_mesh(config.mesh, devices), check_data=False)
        sent[gather] = hlo.collective_bytes(aot.lower_train_step(plan).compile().as_text())
    assert sent[True]["ici"] < sent[False]["ici"] / 3, sent


@pytest.mark.parametrize("every", [1, 2])
def test_moe_layers_in_a_pipeline_give_each_microbatchs_auxiliary_losses(inputs, every):
    """MoE through 2 stages x 2 microbatches (experts split over `expert` within a stage): the
    logits of the unsplit model (dropless dispatch routes each token on its own), and each MoE
    layer's auxiliary losses the mean of the unsplit model's on each microbatch alone (rows
    m, m + 2, ...) -- as gradient accumulation over microbatches would give them."""
    tokens, segments = inputs
    cfg = load_config(
        "tiny-moe",
        ["model.num_layers=4", f"model.moe.every={every}", "model.pipeline_microbatches=2"],
    ).model
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), tokens)["params"]

    def reference(p):
        ce, logits, _ = _cross_entropy(model, p, tokens, segments)
        alone = [_cross_entropy(model, p, tokens[m::2], segments[m::2])[2] for m in range(2)]
        aux = jax.tree.map(lambda *a: sum(a) / 2, *alone)
        return ce + _aux_loss(aux), (logits, aux)

    (want_loss, (want_logits, want_aux)), want_grads = jax.value_and_grad(reference, has_aux=True)(
        params
    )
    split = sharding.make_mesh(MeshConfig(stage=2, expert=2, fsdp=2))
    ((loss, (logits, aux)), grads), _ = _loss_and_grads(cfg, tokens, segments, split, "fsdp_ep")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=0, atol=2e-6)
    for k in ("moe_lb_loss", "moe_z_loss", "moe_expert_load", "moe_router_entropy"):
        np.testing.assert_allclose(aux[k], want_aux[k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    assert_grads_close(grads, want_grads)


def _run_config(*overrides):
    return load_config(
        "tiny-llama",
        [
            f"data.seq_len={T}",
            f"data.batch_size={B}",
            "model.num_layers=4",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )


def test_a_train_step_through_stages_equals_the_unsplit_step():
    """Two steps of `RunPlan.train_step`: 2 stages x 4 fsdp, 4 stages x 2 fsdp and 2 stages x
    2 fsdp x 2 tensor (circular, 2 trips) against fsdp 8: the same losses and gradient norms,
    the same parameters after, and the same eval sums; each chip holds its stage's layers
    only."""
    base = _run_config("mesh.fsdp=8")
    batches = _batches(base, 2)

    def run(cfg):
        plan = RunPlan(cfg)
        share = sharding.per_device_fraction(
            plan.abstract_state.params, plan.state_shardings.params
        )
        assert share["layers/attn/query/w"] == 1 / 8, share  # stage x fsdp
        assert share["embed/embedding"] == 1 / 8, share  # fsdp x stage
        state = plan.init_state()
        if plan.mesh.shape["stage"] > 1:  # the step really pipelines: stages pass activations
            with sharding.use_mesh(plan.mesh, plan.rules):
                lowered = plan.train_step.jitted.lower(plan.abstract_state, plan.abstract_batch())
            assert "collective-permute" in lowered.compile().as_text()
        metrics = []
        for b in batches:
            state, m = plan.train_step(state, to_global(b, plan.mesh))
            metrics.append([float(m["loss"]), float(m["grad_norm"])])
        sums = plan.eval_step(state.params, to_global(batches[0], plan.mesh))
        metrics.append([float(sums["nll"]), float(sums["count"])])
        return np.array(metrics), jax.device_get(state.params)

    want_metrics, want_params = run(base)
    for overrides in (
        ["mesh.stage=2", "mesh.fsdp=4", "model.pipeline_microbatches=2"],
        ["mesh.stage=4", "mesh.fsdp=2"],
        [
            "mesh.stage=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "mesh.rules=fsdp_tp",
            "model.pipeline_repeats=2",
        ],
    ):
        metrics, params = run(apply_overrides(base, overrides))
        np.testing.assert_allclose(metrics, want_metrics, rtol=2e-6)
        # Adam moves a weight by about lr = 3e-3 a step whatever its gradient's size, so float32
        # rounding in a tiny gradient shows: within 1e-5, a 300th of one step's move.
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_a_run_with_stages_resumes_and_restores_without_them(tmp_path, stdlib_cache):
    """`jaxlm train` through 2 stages x 4 fsdp, cut at step 4 and resumed on fsdp 8 (no stages):
    its checkpoint restores onto the stageless mesh as saved, and the resumed run ends where a
    whole stageless run does."""
    cfg = _loop_config("model.num_layers=4", "checkpoint.every=4")
    staged = apply_overrides(cfg, ["mesh.stage=2", "mesh.fsdp=4", "model.pipeline_microbatches=2"])
    cut = loop.train(apply_overrides(staged, ["train.steps=4"]), tmp_path / "cut")["state"]
    flat = apply_overrides(cfg, ["mesh.fsdp=8"])
    mesh = sharding.make_mesh(flat.mesh)
    ckpt = checkpoint.Checkpointer(tmp_path / "cut", flat.checkpoint, read_only=True)
    restored, _ = ckpt.restore(4, abstract_train_state(flat, mesh))
    ckpt.close()
    _assert_trees_equal(restored.params, cut.params)
    _assert_trees_equal(restored.opt_state, cut.opt_state)

    resumed = loop.train(flat, tmp_path / "cut")["state"]
    whole = loop.train(flat, tmp_path / "whole")["state"]
    for got, want in zip(
        jax.tree.leaves(resumed.params), jax.tree.leaves(whole.params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["mesh.stage=8", "mesh.fsdp=1", "model.num_layers=6"],
            "mesh.stage=8 x model.pipeline_repeats=1 does not divide the 6 layers "
            "(model.num_layers=6); stage counts that do: [1, 2, 3, 6]",
        ),
        (
            ["mesh.stage=2", "mesh.fsdp=4", "model.pipeline_repeats=4"],
            "mesh.stage=2 x model.pipeline_repeats=4 does not divide the 4 layers",
        ),
        (
            ["mesh.stage=2", "mesh.fsdp=4", "model.pipeline_repeats=2"],
            None,  # fine: 2 microbatches by default, one per stage
        ),
        (
            [
                "mesh.stage=4",
                "mesh.fsdp=2",
                "model.num_layers=8",
                "model.pipeline_repeats=2",
                "model.pipeline_microbatches=2",
            ],
            "a circular pipeline (model.pipeline_repeats=2) needs at least one microbatch per "
            "stage: model.pipeline_microbatches=2 < mesh.stage=4",
        ),
        (
            ["mesh.stage=2", "mesh.fsdp=4", "model.pipeline_microbatches=4"],
            "the batch of 8 rows per step cannot be cut into model.pipeline_microbatches=4 "
            "microbatches split 4 ways (the data-parallel axes within a stage); use a multiple "
            "of 16 rows",
        ),
        (
            ["mesh.stage=2", "mesh.context=2", "mesh.fsdp=2"],
            "mesh.stage=2 with mesh.context=2: pipeline and context parallelism do not combine",
        ),
        (
            ["mesh.stage=2", "mesh.fsdp=4", "model.dropout=0.1"],
            "model.dropout=0.1 draws random numbers inside the layers, which the pipeline "
            "(mesh.stage=2) does not pass to its stages; set it to 0",
        ),
        (
            ["mesh.stage=2", "mesh.fsdp=4", "model.scan_layers=False"],
            "mesh.stage=2 splits the scanned layers into stages; set model.scan_layers=True",
        ),
        (["model.pipeline_microbatches=0"], "ModelConfig.pipeline_microbatches=0 must be"),
        (["model.pipeline_repeats=-1"], "ModelConfig.pipeline_repeats=-1 must be"),
        (["mesh.stage=0"], "MeshConfig.stage=0 must be an integer >= 1, or -1"),
    ],
)
def test_a_pipeline_that_cannot_work_is_refused(overrides, message):
    if message is None:
        RunPlan(_run_config(*overrides), check_data=False)
        return
    with pytest.raises(ValueError) as e:
        RunPlan(_run_config(*overrides), check_data=False)
    assert message in str(e.value)


def test_jaxlm_info_prints_the_pipeline(capsys):
    rc = cli.main(
        [
            "info",
            "--config",
            "tiny-llama",
            *("--set", "model.num_layers=8", "--set", "mesh.stage=4"),
            *("--set", "model.pipeline_microbatches=4", "--set", "model.pipeline_repeats=2"),
        ]
    )
    assert rc == 0
    # Idle: (S - 1) / (R M + S - 1) = 3 / 11 of the stage-steps.
    assert "pipeline:                   4 stages of 2 layers, 4 microbatches, 2 trips " in (
        capsys.readouterr().out
    )
    assert pipeline.bubble_fraction(4, 4, 2) == pytest.approx(3 / 11)
