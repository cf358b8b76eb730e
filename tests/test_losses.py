"""Cross-entropy sums against a direct NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.losses import aux_loss, cross_entropy_sums


@pytest.mark.parametrize(
    "t, chunk, dtype", [(10, 4, "float32"), (8, 8, "float32"), (12, 5, "bfloat16")]
)
def test_cross_entropy_sums_match_numpy(t, chunk, dtype):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, t, 11)) * 3
    targets = rng.integers(0, 11, (3, t))
    mask = rng.random((3, t)) > 0.3
    got = cross_entropy_sums(
        jnp.asarray(logits, dtype), jnp.asarray(targets), jnp.asarray(mask), chunk=chunk
    )
    x = np.asarray(jnp.asarray(logits, dtype), np.float64)  # the same rounded inputs
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    nll = lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got["nll"], (nll * mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(got["z"], (lse**2 * mask).sum(), rtol=1e-5)
    assert got["count"] == mask.sum()


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 6, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (2, 6)))
    mask = jnp.ones((2, 6), bool).at[1, 3].set(False)
    grad = jax.grad(lambda x: cross_entropy_sums(x, targets, mask, chunk=4)["nll"])(logits)
    want = (jax.nn.softmax(logits) - jax.nn.one_hot(targets, 7)) * mask[..., None]
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_aux_loss_sums_only_loss_entries():
    aux = {"balance_loss": jnp.array([0.5, 0.25]), "z_loss": jnp.array(1.0), "load": jnp.ones(4)}
    assert float(aux_loss(aux)) == 1.75
