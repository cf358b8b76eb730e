"""LoRA: the adapted layer equals W + (alpha/r)·A·B (NumPy), step 0 equals the base model, merging
equals the unmerged model, the base stays frozen, and sharded LoRA steps equal one device."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs import LoRAConfig, get_preset
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, to_global
from jaxlm.model.layers import Einsum
from jaxlm.model.lora import is_adapter, merge_lora
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan
from jaxlm.sample import generate
from jaxlm.sharding import make_mesh
from jaxlm.tasks import param_names, partition

LORA = LoRAConfig(rank=3, alpha=6.0, targets="query,key,value,out,gate,up,down")


@pytest.mark.parametrize(
    ("eqn", "shape", "x_shape"),
    [("BTD,DNH->BTNH", (8, 4, 5), (2, 3, 8)), ("BTNH,NHD->BTD", (4, 5, 8), (2, 3, 4, 5))],
)
def test_adapted_einsum_equals_the_dense_sum(eqn, shape, x_shape):
    layer = Einsum(
        shape, ("embed", "heads", "head_dim")[: len(shape)], nn.initializers.normal(1.0), lora=LORA
    )
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    params = nn.meta.unbox(layer.init(jax.random.key(0), eqn, x))["params"]
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    got = layer.apply({"params": params}, eqn, x)
    # NumPy: x (batch, in) @ [W + s A B] with the weight's dims flattened to (in, out).
    n_in = len(x_shape) - 2
    w = (
        params["w"].reshape(-1, int(np.prod(shape[n_in:])))
        if n_in == 1
        else params["w"].reshape(int(np.prod(shape[:2])), -1)
    )
    a = params["lora_a"].reshape(w.shape[0], LORA.rank)
    b = params["lora_b"].reshape(LORA.rank, w.shape[1])
    want = x.reshape(6, -1) @ (w + LORA.alpha / LORA.rank * a @ b)
    np.testing.assert_allclose(np.asarray(got).reshape(6, -1), want, rtol=1e-5, atol=1e-5)
    assert params["lora_a"].shape == (*shape[:n_in], 3) and params["lora_b"].shape == (
        3,
        *shape[n_in:],
    )


def _noisy_adapters(params):
    """`params` with every B moved off zero, as if the adapters had trained."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
            if "lora_b" in str(p)
            else x
        ),
        params,
    )


def _cfg(scan=True, **lora):
    base = dataclasses.replace(get_preset("tiny-llama"), scan_layers=scan)
    return base, dataclasses.replace(base, lora=dataclasses.replace(LORA, **lora))


@pytest.mark.parametrize("scan", [True, False])
def test_step_zero_equals_the_base_and_merging_equals_the_adapter(scan):
    base, adapted = _cfg(scan)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 12)))
    params = nn.meta.unbox(Transformer(adapted).init(jax.random.key(0), tokens)["params"])
    plain, _ = partition(params, lambda n: not is_adapter(n))
    want = Transformer(base).apply({"params": plain}, tokens)[0]
    got = Transformer(adapted).apply({"params": params}, tokens)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # B = 0: exactly the base
    # With non-zero adapters, the merged plain model computes what the adapted one does.
    noisy = _noisy_adapters(params)
    adapted_logits = Transformer(adapted).apply({"params": noisy}, tokens)[0]
    merged_cfg, merged = merge_lora(adapted, noisy)
    assert merged_cfg == base and not any(is_adapter(n) for n in param_names(merged))
    merged_logits = Transformer(merged_cfg).apply({"params": merged}, tokens)[0]
    assert float(jnp.max(jnp.abs(adapted_logits - want))) > 1e-3  # the adapters do something
    np.testing.assert_allclose(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)
    # Sampling with the unmerged adapter equals sampling the merged model.
    prompts = [[1, 5, 9, 12], [1, 7]]
    assert generate(adapted, noisy, prompts, 8) == generate(merged_cfg, merged, prompts, 8)


def test_bad_lora_settings_are_named():
    with pytest.raises(ValueError, match=r"'attention' matches no layer"):
        LoRAConfig(rank=2, targets="query,attention")
    with pytest.raises(ValueError, match=r"rank=-1 must be an integer >= 1"):
        LoRAConfig(rank=-1)
    with pytest.raises(ValueError, match=r"rank=40 is larger than the key projection"):
        dataclasses.replace(get_preset("tiny-llama"), lora=LoRAConfig(rank=40, targets="key"))
    with pytest.raises(ValueError, match="'gate' matches no layer"):
        dataclasses.replace(get_preset("tiny"), lora=LoRAConfig(rank=2, targets="gate"))


TOK = ByteTokenizer()
DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 5) for i in range(64)]


def _train_config(*overrides):
    return load_config(
        "tiny-llama",
        [
            "model.lora.rank=4",
            "model.lora.targets=query,value,out,up,down,gate",
            "data.seq_len=32",
            "data.batch_size=8",
            "optim.warmup_steps=0",
            "optim.learning_rate=1e-2",
            *overrides,
        ],
    )


def _train(cfg, devices, steps=3):
    plan = RunPlan(cfg, mesh=make_mesh(cfg.mesh, devices))
    ds = build_dataset(DOCS, TOK, seq_len=32, batch_size=8, seed=0)
    it = DataIterator(ds)
    state = plan.init_state()
    start = jax.device_get(state.params)
    losses = []
    for _ in range(steps):
        state, metrics = plan.train_step(state, to_global(next(it), plan.mesh))
        losses.append(float(metrics["loss"]))
    return plan, start, state, losses


@pytest.fixture(scope="module")
def one_device():
    return _train(_train_config("mesh.fsdp=1"), jax.devices()[:1])


def test_lora_trains_only_adapters_with_their_optimizer_state_only(one_device):
    _, start, state, losses = one_device
    assert losses[-1] < losses[0]
    end = jax.device_get(state.params)
    names = param_names(start)
    for name, a, b in zip(names, jax.tree.leaves(start), jax.tree.leaves(end), strict=True):
        if is_adapter(name):
            assert "lora_a" in name or not np.array_equal(a, b), name  # B leaves zero
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)  # the base: bitwise unchanged
    adapter = sum(
        x.size for n, x in zip(names, jax.tree.leaves(start), strict=True) if is_adapter(n)
    )
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == 2 * adapter


@pytest.mark.parametrize(
    "overrides",
    [("mesh.fsdp=8",), ("mesh.fsdp=4", "mesh.tensor=2", "mesh.rules=fsdp_tp")],
)
def test_sharded_lora_steps_equal_one_device(one_device, overrides):
    _, _, want_state, want = one_device
    _, _, state, losses = _train(_train_config(*overrides), jax.devices())
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    # Adam divides by the gradient's own size, so where a gradient is near zero a sharded sum's
    # rounding can move a weight by a small fraction of the learning rate (1e-2): atol is lr/100.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
        jax.device_get(state.params),
        jax.device_get(want_state.params),
    )
    # Adapters are sharded like the weights they adapt (the fsdp axis splits `embed`).
    a = state.params["layers"]["attn"]["query"]["lora_a"]
    w = state.params["layers"]["attn"]["query"]["w"]
    assert a.sharding.spec[:2] == w.sharding.spec[:2]


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_expert_adapters_merge_into_the_experts(dispatch):
    from jaxlm.configs import MoEConfig

    base = dataclasses.replace(
        get_preset("tiny-moe"),
        moe=dataclasses.replace(get_preset("tiny-moe").moe, dispatch=dispatch),
    )
    adapted = dataclasses.replace(base, lora=LoRAConfig(rank=2, targets="experts,query"))
    assert isinstance(adapted.moe, MoEConfig)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 12)))
    params = nn.meta.unbox(Transformer(adapted).init(jax.random.key(0), tokens)["params"])
    names = [n for n in param_names(params) if is_adapter(n)]
    assert any(n.endswith("up_lora_a") for n in names) and any("query/lora_b" in n for n in names)
    plain, _ = partition(params, lambda n: not is_adapter(n))
    want = Transformer(base).apply({"params": plain}, tokens)[0]
    np.testing.assert_array_equal(Transformer(adapted).apply({"params": params}, tokens)[0], want)
    noisy = _noisy_adapters(params)
    got = Transformer(adapted).apply({"params": noisy}, tokens)[0]
    merged_cfg, merged = merge_lora(adapted, noisy)
    assert float(jnp.max(jnp.abs(got - want))) > 1e-3
    np.testing.assert_allclose(
        Transformer(merged_cfg).apply({"params": merged}, tokens)[0], got, atol=1e-5, rtol=1e-5
    )
    from jaxlm.metrics import param_count

    assert param_count(adapted).adapters == sum(
        x.size
        for n, x in zip(param_names(params), jax.tree.leaves(params), strict=True)
        if is_adapter(n)
    )


def test_a_bfloat16_base_trains_float32_adapters():
    cfg = _train_config("model.param_dtype=bfloat16", "model.dtype=bfloat16")
    _, start, state, losses = _train(cfg, jax.devices(), steps=2)
    dtypes = {n: x.dtype for n, x in zip(param_names(start), jax.tree.leaves(start), strict=True)}
    assert all((d == jnp.float32) == is_adapter(n) for n, d in dtypes.items()), dtypes
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    assert {str(x.dtype) for x in jax.tree.leaves(state.opt_state) if x.ndim} == {"float32"}
