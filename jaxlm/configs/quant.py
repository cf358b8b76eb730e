"""`QuantConfig`: how a model's projection weights are stored (float, int8, packed int4) or
trained (fake-quantized, QAT), and the checks of its group size against the model's dims."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

QUANT_BITS = (0, 4, 8)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight quantization of every projection (attention, MLP, MoE experts; with `embed`, the
    token embedding and an untied output head too), symmetric, round-to-nearest.

    `bits`: 0 = float weights; 8 = int8; 4 = int4 packed two per byte. `group`: None = one scale
    per output channel (over all of a weight's input dims); g = one scale per g consecutive input
    elements of each output channel. With `qat`, the weights stay float and train, and every
    forward pass uses their quantized values (straight-through gradients): quantization-aware
    training; `jaxlm quantize` then stores them quantized. `int8_dot` (int8, per channel, stored):
    also quantize each token's activations to int8 and multiply in int32 (TPU's integer MXU path).
    """

    bits: int = 0
    group: int | None = None
    embed: bool = False
    qat: bool = False
    int8_dot: bool = False

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS or isinstance(self.bits, bool):
            raise ValueError(
                f"QuantConfig.bits={self.bits!r} is not valid; choose 8 (int8), 4 (packed int4) "
                "or 0 (float weights)"
            )
        if self.group is not None and (
            not isinstance(self.group, int)
            or isinstance(self.group, bool)
            or self.group < 2
            or self.group % 2
        ):
            raise ValueError(
                f"QuantConfig.group={self.group!r} must be an even integer >= 2 (e.g. 32, 64, "
                "128) or None (one scale per output channel)"
            )
        if not self.bits and (self.group is not None or self.embed or self.qat or self.int8_dot):
            raise ValueError(
                "QuantConfig.group/embed/qat/int8_dot need QuantConfig.bits=8 or 4 (bits=0 keeps "
                "float weights)"
            )
        if self.int8_dot and (self.bits != 8 or self.group is not None or self.qat):
            raise ValueError(
                f"QuantConfig.int8_dot=True multiplies stored int8 weights with one scale per "
                f"output channel: it needs bits=8, group=None and qat=False (got bits={self.bits}, "
                f"group={self.group}, qat={self.qat})"
            )

    @property
    def stored(self) -> bool:
        """Whether the parameters are stored quantized (integers and scales)."""
        return bool(self.bits) and not self.qat

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def describe(self) -> str:
        if not self.bits:
            return "float"
        what = f"int{self.bits} " + (f"g{self.group}" if self.group else "per channel")
        return what + (" (QAT: float weights, fake-quantized)" if self.qat else "")


def scale_shape(in_dims: Sequence[int], group: int | None, what: str = "weight") -> tuple[int, ...]:
    """The scale's sizes over a weight's input dims `in_dims` (in weight order): all 1 per
    channel; with `group` g, g consecutive elements of the flattened input dims share one scale,
    so the last dims are divided by g from the right (g <= last: last // g; else the last dim goes
    to 1 and the one before is divided by g // last, ...). Raises naming `what` when g does not
    split the dims that way."""
    if group is None:
        return (1,) * len(in_dims)
    out = _divide(in_dims, group)
    if out is None:
        n = math.prod(in_dims)
        dims = f"{' x '.join(map(str, in_dims))} = {n}" if len(in_dims) > 1 else str(n)
        valid = [c for c in (8, 16, 32, 64, 128, 256) if _divide(in_dims, c) is not None]
        raise ValueError(
            f"QuantConfig.group={group} does not divide the {what}'s input ({dims} elements per "
            f"output channel); valid here: {valid or 'none'} or group=None (per channel)"
        )
    return out


def _divide(in_dims: Sequence[int], group: int) -> tuple[int, ...] | None:
    out, g = list(in_dims), group
    for i in range(len(out) - 1, -1, -1):
        if g == 1:
            break
        if out[i] % g == 0:
            out[i] //= g
            g = 1
        elif g % out[i] == 0:
            g //= out[i]
            out[i] = 1
        else:
            break
    return tuple(out) if g == 1 else None


def quantized_inputs(model: object) -> dict[str, tuple[int, ...]]:
    """The input dims of each kind of weight `model` (a `ModelConfig`) quantizes."""
    cfg = model
    d, f = cfg.d_model, cfg.mlp_dim  # type: ignore[attr-defined]
    dims = {
        "attention query/key/value": (d,),
        "attention output": (cfg.num_heads, cfg.head_dim),  # type: ignore[attr-defined]
        "MLP up/gate": (d,),
        "MLP down": (f,),
    }
    moe = cfg.moe  # type: ignore[attr-defined]
    if moe.enabled:
        dims["expert up/gate"] = (d,)
        dims["expert down"] = (cfg.expert_mlp_dim,)  # type: ignore[attr-defined]
        if moe.num_shared_experts:
            dims["shared expert down"] = (moe.num_shared_experts * cfg.expert_mlp_dim,)  # type: ignore[attr-defined]
    if cfg.quant.embed:  # type: ignore[attr-defined]
        dims["embedding"] = (d,)
    return dims


def check_quant(model: object) -> None:
    """Raise if `model.quant`'s group size or int4 packing does not fit the model's dims."""
    quant: QuantConfig = model.quant  # type: ignore[attr-defined]
    if not quant.bits:
        return
    for what, in_dims in quantized_inputs(model).items():
        scale_shape(in_dims, quant.group, what)
        if quant.bits == 4 and in_dims[-1] % 2:
            raise ValueError(
                f"QuantConfig.bits=4 packs two values per byte along the {what}'s last input "
                f"dim, which is odd ({in_dims[-1]}); use bits=8"
            )
