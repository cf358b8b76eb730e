"""Model size and cost from the config alone: parameter counts, FLOPs per token, memory."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import storage
from jaxlm.configs.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts; `embedding` is the token and position tables plus an untied output."""

    total: int
    embedding: int
    active: int = 0  # used per token (MoE: only the top-k routed experts); = total when dense
    adapters: int = 0  # LoRA matrices and prompt-tuning embeddings (in `total`; they train)

    def __post_init__(self) -> None:
        if not self.active:
            object.__setattr__(self, "active", self.total)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def _moe_layer_params(c: ModelConfig) -> tuple[int, int]:
    """(all, active per token) parameters of one MoE feed-forward block."""
    m, d = c.moe, c.d_model
    f = c.expert_mlp_dim
    expert = (3 if c.gated else 2) * d * f
    shared = (3 if c.gated else 2) * d * f * m.num_shared_experts
    if m.num_shared_experts and m.shared_expert_gate:
        shared += d
    router = d * m.num_experts
    return router + m.num_experts * expert + shared, router + m.top_k * expert + shared


def param_count(config: ModelConfig) -> ParamCount:
    """Exact parameter count of `Transformer(config)`, computed from the shapes alone."""
    c = config
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    norm = d * (2 if c.norm_bias else 1)
    attn = d * n * h + 2 * d * k * h + n * h * d
    if c.attn_bias:
        attn += n * h + 2 * k * h
    if c.use_attn_out_bias:
        attn += d
    if c.qk_norm:
        attn += 2 * h * (2 if c.norm_bias else 1)
    mlp = (3 if c.gated else 2) * d * f
    if c.mlp_bias:
        mlp += (2 if c.gated else 1) * f + d
    num_moe = sum(c.is_moe_layer(i) for i in range(c.num_layers))
    moe_all, moe_active = _moe_layer_params(c) if num_moe else (0, 0)
    dense_layers = (2 * norm + attn + mlp) * (c.num_layers - num_moe)
    moe_layers = (2 * norm + attn) * num_moe
    embedding = c.vocab_size * d
    if c.position == "learned":
        embedding += c.max_seq_len * d
    embedding += c.type_vocab_size * d
    if c.head == "score":
        embedding += d  # the [D, 1] score head in place of any unembedding
    elif not c.tie_embeddings:
        embedding += d * c.vocab_size
    if c.head == "mlm":  # dense [D, D] + bias, its norm, and the output bias [V]
        embedding += d * d + d + norm + c.vocab_size
    # the final norm (pre-LN) and the embedding norm
    top_norms = norm * ((c.norm_position == "pre") + c.embed_norm)
    adapters = _adapter_params(c)
    base = dense_layers + moe_layers + top_norms + embedding + adapters
    return ParamCount(
        total=base + num_moe * moe_all,
        embedding=embedding,
        active=base + num_moe * moe_active,
        adapters=adapters,
    )


def _adapter_params(c: ModelConfig) -> int:
    """LoRA's r * (in + out) per adapted projection and layer, plus the prompt embeddings."""
    d, q, kv, f = c.d_model, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.mlp_dim
    sides = {"query": d + q, "key": d + kv, "value": d + kv, "out": q + d}
    mlp = {"gate": d + f, "up": d + f, "down": f + d}
    dense = sum(not c.is_moe_layer(i) for i in range(c.num_layers))
    lora = 0
    for name in c.lora.target_names if c.lora.rank else ():
        if name == "experts":  # up, down (and gate) of every expert of every MoE layer
            per_expert = (3 if c.gated else 2) * (d + c.expert_mlp_dim)
            lora += c.lora.rank * per_expert * c.moe.num_experts * (c.num_layers - dense)
        else:
            lora += c.lora.rank * (
                sides[name] * c.num_layers if name in sides else mlp[name] * dense
            )
    return lora + c.prompt_tokens * d


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

    6 * (matmul parameters) + 12 * L * N * H * T, as in PaLM's MFU accounting: 2 FLOPs per
    multiply-add, times 3 for forward + backward. Matmul parameters are every weight used in a
    matrix product, i.e. all non-embedding weights plus the output projection (the tied or
    untied [D, V] logits matmul, or a score head's [D, 1]); embedding lookups and norms/biases
    cost no matmul FLOPs. The attention term counts the full T x T score and value products, as
    XLA computes them (no causal halving, and a sliding window still computes every score before
    masking). MoE layers count their active parameters: the router, top_k experts and the shared
    experts.
    """
    c = config
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    attn = d * n * h + 2 * d * k * h + n * h * d
    num_moe = sum(c.is_moe_layer(i) for i in range(c.num_layers))
    moe_active = _moe_layer_params(c)[1] if num_moe else 0
    matmul = (
        (c.num_layers - num_moe) * (attn + (3 if c.gated else 2) * d * f)
        + num_moe * (attn + moe_active)
        + d * (1 if c.head == "score" else c.vocab_size)
        + d * d * (c.head == "mlm")  # the masked-LM head's dense transform
    )
    attention = 2 * c.num_layers * n * h * seq_len
    return float(6 * matmul + 6 * attention)


def training_state_bytes(config: ModelConfig, optimizer_copies: int = 2) -> dict[str, int]:
    """Bytes of parameters (in `param_dtype`; adapters in float32) and of an Adam-style state
    (f32 moments) of what trains: every parameter, or only the adapters when there are some."""
    counts = param_count(config)
    base = counts.total - counts.adapters
    return {
        "params": base * jnp.dtype(config.param_dtype).itemsize + counts.adapters * 4,
        "optimizer": (counts.adapters or counts.total) * 4 * optimizer_copies,
    }


# Dense bf16 peak FLOP/s per chip, by the start of `device.device_kind`.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def measure_matmul_flops(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a float32 [size x size] matmul on the first device, measured now."""
    # From NumPy: a jax.random draw would compile a program of its own (0.4 s on a CPU).
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            out = matmul(a, a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the override, the table, or a measurement.

    On CPU every fake device shares the same cores, so the measured matmul rate of the host is
    divided among the devices.
    """
    if override:
        return override, "config"
    device = jax.devices()[0]
    for prefix, flops in PEAK_FLOPS_PER_DEVICE.items():
        if device.device_kind.startswith(prefix):
            return flops, device.device_kind
    return measure_matmul_flops() / jax.device_count(), "measured float32 matmul"


METRICS_FILE = "metrics.jsonl"


def drop_records_after(path: str | os.PathLike, step: int) -> None:
    """Remove records with "step" > `step` from a metrics.jsonl (atomically), e.g. those a
    preempted run logged after its last checkpoint, before the resumed run logs them again."""
    path = storage.as_path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
    if len(kept) != len(lines):
        storage.write_text_atomic(path, "".join(kept))


def _summary_writer() -> type:
    """tensorboardX's `SummaryWriter`, imported without PyTorch when that is not loaded yet:
    tensorboardX imports torch (where installed) only to accept torch tensors, which jaxlm never
    passes, and that import alone adds seconds to every run's start."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends one JSON object per record to `metrics.jsonl` and scalars to TensorBoard events.

    In a bucket, both are uploaded every `upload_seconds`, on `flush` (before each checkpoint)
    and on `close`; TensorBoard's events are written to a local temporary directory and its
    files uploaded whole (tensorboardX's own Cloud Storage writer uploads again when garbage
    collected, after the run, which hangs once the storage is out of reach).
    """

    def __init__(
        self, workdir: str | os.PathLike, enabled: bool = True, upload_seconds: float = 30.0
    ) -> None:
        self._enabled = enabled
        self._jsonl: storage.AppendFile | None = None
        self._tb = None
        self._tb_upload: tuple[Path, storage.AnyPath] | None = None
        self._upload_seconds = upload_seconds
        self._uploaded = time.monotonic()
        if enabled:
            workdir = storage.as_path(workdir)
            self._jsonl = storage.AppendFile(workdir / METRICS_FILE, upload_seconds)
            events = workdir / "tensorboard"
            if storage.is_remote(workdir):
                local = Path(tempfile.mkdtemp(prefix="jaxlm-tensorboard-"))
                self._tb_upload = (local, events)
                events = local
            try:
                self._tb = _summary_writer()(os.fspath(events))
            except ImportError:  # TensorBoard events are optional; metrics.jsonl is not
                self._tb = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), int(step))
        if self._tb_upload and time.monotonic() - self._uploaded >= self._upload_seconds:
            self._upload_events()

    def _upload_events(self) -> None:
        if self._tb is not None and self._tb_upload:
            self._tb.flush()
            storage.upload_dir(*self._tb_upload)
        self._uploaded = time.monotonic()

    def flush(self) -> None:
        """Upload what the bucket lacks (on disk, every line is written already)."""
        if self._jsonl:
            self._jsonl.flush()
        if self._tb_upload:
            self._upload_events()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._tb_upload:
            storage.upload_dir(*self._tb_upload)  # the closed writer's whole files
            shutil.rmtree(self._tb_upload[0], ignore_errors=True)
