"""Random (not init-distributed) parameters, so reference comparisons exercise every weight."""

import flax.linen as nn
import jax
import numpy as np

from jaxlm.model.transformer import abstract_params


def random_params(cfg, seed: int = 0, shardings=None, embed_std: float = 0.5):
    """A parameter tree for `cfg` (placed on `shardings` if given), without running init.

    Norm scales ~ 1 + 0.2 N(0, 1), embedding tables ~ embed_std N(0, 1), others ~ 0.1 N(0, 1).
    """
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(abstract_params(cfg))

    def one(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        noise = rng.standard_normal(x.shape)
        if name.endswith("scale"):
            value = 1.0 + 0.2 * noise
        elif name.endswith("embedding"):
            value = embed_std * noise
        else:
            value = 0.1 * noise
        return np.asarray(value, dtype=x.dtype)

    params = jax.tree_util.tree_map_with_path(one, shapes)
    return jax.device_put(params, shardings) if shardings is not None else jax.device_put(params)
