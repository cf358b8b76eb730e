"""The frozen, hashable `ModelConfig`: every architectural choice of a Transformer, validated."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from jaxlm.configs.quant import QuantConfig, check_quant

Activation = Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"]
Norm = Literal["layernorm", "rmsnorm"]
PositionKind = Literal["learned", "sinusoidal", "rope", "none"]
RopeScaling = Literal["none", "linear", "llama3"]
InitKind = Literal["normal", "xavier", "kaiming"]
DType = Literal["float32", "bfloat16", "float16"]
Head = Literal["lm", "score", "mlm"]
NormPosition = Literal["pre", "post"]
RematPolicy = Literal["none", "full", "save_dots", "save_dots_no_batch", "save_qkv_proj"]
# The policies `jaxlm plan` tries by default: none, the matmul outputs kept, everything again.
PLAN_REMATS = ("none", "save_dots", "full")
AttentionImpl = Literal["auto", "xla", "splash", "cudnn"]
KVCacheDType = Literal["auto", "int8"]
Parametrization = Literal["sp", "mup"]
ContextAttention = Literal["ring", "all_gather"]

GATED_ACTIVATIONS = ("swiglu", "geglu")
CPU_UNROLL_MAX_LAYERS = 8  # scan_unroll=None unrolls scanned models this deep on CPU


def _check_choice(name: str, value: object, literal: object) -> None:
    valid = get_args(literal)
    if value not in valid:
        raise ValueError(f"ModelConfig.{name}={value!r} is not valid; choose one of {list(valid)}")


def check_positive_ints(config: object, *names: str) -> None:
    """Raise naming `Class.field=value` unless each named field is an int >= 1."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name}={value!r} must be an integer >= 1")


RouterScore = Literal["softmax", "sigmoid"]
Dispatch = Literal["dropless", "capacity"]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (see `jaxlm.model.moe`); num_experts=0 = dense.

    Layer i is an MoE layer when i >= first_dense and (i - first_dense + 1) % every == 0
    (every=1, first_dense=0: all layers; every=2: layers 1, 3, 5, ...).
    """

    num_experts: int = 0
    top_k: int = 2
    # Hidden size of each expert (None = ModelConfig.mlp_dim); smaller for fine-grained experts.
    expert_mlp_dim: int | None = None
    num_shared_experts: int = 0  # dense experts every token uses, hidden = this * expert size
    shared_expert_gate: bool = False  # scale the shared output by sigmoid(x w) (Qwen2-MoE)
    score: RouterScore = "softmax"
    renormalize: bool = True  # top-k weights rescaled to sum to 1 (Mixtral: yes, Qwen2-MoE: no)
    router_jitter: float = 0.0  # multiplicative input noise U(1 - j, 1 + j), training only
    dispatch: Dispatch = "dropless"
    capacity_factor: float = 1.25  # capacity dispatch: C = ceil(factor * tokens * top_k / E)
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001
    every: int = 1
    first_dense: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(f"MoEConfig.num_experts={self.num_experts!r} must be >= 0 (0 = dense)")
        check_positive_ints(self, "every")
        if self.first_dense < 0:
            raise ValueError(f"MoEConfig.first_dense={self.first_dense!r} must be >= 0")
        if self.num_experts:
            check_positive_ints(self, "top_k")
            if self.top_k > self.num_experts:
                raise ValueError(
                    f"MoEConfig.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]"
                )
            if self.expert_mlp_dim is not None:
                check_positive_ints(self, "expert_mlp_dim")
        if self.num_shared_experts < 0:
            raise ValueError(
                f"MoEConfig.num_shared_experts={self.num_shared_experts!r} must be >= 0"
            )
        if self.num_shared_experts and not self.num_experts:
            raise ValueError(
                f"MoEConfig.num_shared_experts={self.num_shared_experts} needs an MoE model: set "
                "moe.num_experts > 0 (a dense model has no experts to share)"
            )
        for name, literal in (("score", RouterScore), ("dispatch", Dispatch)):
            value, valid = getattr(self, name), get_args(literal)
            if value not in valid:
                raise ValueError(
                    f"MoEConfig.{name}={value!r} is not valid; choose one of {list(valid)}"
                )
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"MoEConfig.router_jitter={self.router_jitter!r} must be in [0, 1)")
        if not self.capacity_factor > 0:
            raise ValueError(f"MoEConfig.capacity_factor={self.capacity_factor!r} must be > 0")
        for name in ("load_balance_weight", "router_z_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


# Projections LoRA can adapt: attention query/key/value/out, dense MLP gate/up/down, and the MoE
# experts' gate/up/down ("experts": an adapter per expert).
LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down", "experts")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters W + (alpha / rank) · A B on the projections named in `targets`
    (comma-separated `LORA_TARGETS`); rank 0 = none. With adapters only they train."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, training only
    targets: str = "query,value"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"LoRAConfig.rank={self.rank!r} must be an integer >= 1 (0 = off)")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r} must be in [0, 1)")
        names = self.target_names
        unknown = [n for n in names if n not in LORA_TARGETS]
        if unknown or not names:
            raise ValueError(
                f"LoRAConfig.targets={self.targets!r}: "
                f"{', '.join(map(repr, unknown)) or 'no target'} matches no layer; targets are "
                f"comma-separated names from {LORA_TARGETS}"
            )

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.targets.split(",") if n.strip())

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, name: str) -> bool:
        return self.rank > 0 and name in self.target_names


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only Transformer.

    `num_kv_heads`, `head_dim` and `mlp_dim` default (None) to `num_heads`, `d_model // num_heads`
    and `4 * d_model`; after construction they always hold the resolved integers, and an override
    of `d_model` or `num_heads` re-derives the ones that were not given explicitly.
    """

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    activation: Activation = "gelu_tanh"
    norm: Norm = "layernorm"
    norm_bias: bool = True
    norm_eps: float = 1e-5
    # "pre": x + f(norm(x)) in each block and a final norm (GPT-2, Llama); "post": norm(x + f(x))
    # and no final norm (the original Transformer and BERT).
    norm_position: NormPosition = "pre"
    # A norm on the embeddings (token + position + token type) before the first block (BERT).
    embed_norm: bool = False
    # Token-type (segment A/B) embeddings added to the token embeddings; 0 = none. BERT: 2.
    type_vocab_size: int = 0
    position: PositionKind = "learned"
    rope_theta: float = 10_000.0
    # RoPE frequency scaling for long context: "linear" divides every frequency by the factor;
    # "llama3" rescales only the low frequencies (Llama 3.1+), with a smooth band in between.
    rope_scaling: RopeScaling = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 256
    tie_embeddings: bool = True
    qk_norm: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    # How attention is computed: "xla" (einsums and a dense mask, every backend), "splash" (the
    # Pallas TPU kernel; Pallas interpret mode on CPU, for checking), "cudnn" (cuDNN's fused
    # kernel on GPU), or "auto": the fused kernel of the backend where it can express the
    # config and sequence, "xla" elsewhere (`jaxlm info` says which). Decode steps always use
    # "xla"; training, prefill and scoring use the kernel.
    attention_impl: AttentionImpl = "auto"
    # Splash tile sizes (multiples of 128); None = the largest of 512/256/128 that divides the
    # sequence (at most 256 when head_dim > 128).
    attention_block_q: int | None = None
    attention_block_kv: int | None = None
    # Context parallelism (mesh.context > 1, the sequence split over the `context` axis;
    # `jaxlm.model.context`): "ring" passes key/value blocks around the ring of context shards
    # (ppermute) under an online softmax, so no shard ever holds every key; "all_gather" gathers
    # the keys and values of the whole sequence on every shard. `context_load_balance` reorders
    # a causal sequence so that each shard holds one early and one late chunk (equal work);
    # neither changes the result, so both may change when a run resumes.
    context_attention: ContextAttention = "ring"
    context_load_balance: bool = True
    # Pipeline parallelism (mesh.stage > 1, the scanned layers split into consecutive stages;
    # `jaxlm.model.pipeline`): each batch flows through the stages as `pipeline_microbatches`
    # microbatches (None = one per stage) on a GPipe schedule. `pipeline_repeats` > 1 makes it
    # circular: each stage holds that many chunks of layers and the microbatches go round the
    # stages that many times (a smaller bubble: (stages - 1) / (repeats * microbatches + stages
    # - 1) of the time idle). Neither changes the parameters, so both may change on resume.
    pipeline_microbatches: int | None = None
    pipeline_repeats: int = 1
    # True: each stage gathers its layers' weights (split over fsdp) once per step, in the
    # compute dtype, instead of once per microbatch step of the schedule -- (microbatches +
    # stages - 1) times fewer weight all-gathers, for a whole copy of the stage's weights per
    # chip. Also free to change on resume.
    pipeline_gather_weights: bool = False
    # False: bidirectional attention (an encoder, e.g. for masked LM): every token sees its whole
    # segment, before and after it (a sliding window then spans W - 1 tokens on each side). Such
    # a model cannot decode with a KV cache and cannot train for next-token prediction.
    causal: bool = True
    # A prefix LM (T5 / UL2's PrefixLM): attention is bidirectional within each sequence's
    # prefix (training batches mark it; when sampling, the prompt is the prefix) and causal
    # after it. Train with task.kind=prefix_lm.
    prefix_lm: bool = False
    # Dropout on the embeddings and on each attention and MLP output (before the residual sum),
    # while training only (when the step passes a "dropout" rng): BERT's hidden dropout, and
    # the noise that makes SimCSE's two views of a text (task.kind=contrastive).
    dropout: float = 0.0
    attn_bias: bool = True
    # Bias on the attention output projection; None = same as attn_bias. False with attn_bias=True
    # puts biases on the query/key/value projections only (Qwen2).
    attn_out_bias: bool | None = None
    mlp_bias: bool = True
    init: InitKind = "normal"
    init_std: float = 0.02
    # Scale the variance of the residual-stream output projections (attention out, MLP out)
    # by 1 / (2 * num_layers), as GPT-2 does, so the residual stream does not grow with depth.
    depth_scaled_init: bool = True
    # "sp": standard parametrization; "mup": the Maximal Update Parametrization relative to a
    # base model of d_model = mup_base_width (None = this d_model): init and learning-rate
    # multipliers per weight, 1/head_dim attention, logits x base/d_model (`jaxlm.model.mup`),
    # so that hyperparameters tuned at the base width carry over to wider models.
    parametrization: Parametrization = "sp"
    mup_base_width: int | None = None
    # The base model's head_dim, which sets muP's attention scale sqrt(base)/head_dim. None =
    # head_dim * mup_base_width / d_model (head_dim grows with width, heads fixed); set it to
    # head_dim for models that widen by adding heads of a fixed size.
    mup_base_head_dim: int | None = None
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    scan_layers: bool = True
    # Layers per iteration of the scanned loop (the parameters stay stacked either way). None =
    # on CPU, all of them for models of up to CPU_UNROLL_MAX_LAYERS layers (XLA's CPU while loop
    # costs 10-15% of a small model's step), else 1 (compile time flat in depth).
    scan_unroll: int | None = None
    remat: RematPolicy = "none"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    # int8 / int4 weights (stored quantized, or fake-quantized for QAT): `jaxlm quantize`.
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    # The KV cache of sampling and scoring: "auto" = the compute dtype; "int8" = int8 keys and
    # values with one float32 scale per token and kv head (half of bfloat16's bytes, a little
    # more with the scales).
    kv_cache_dtype: KVCacheDType = "auto"
    # Prompt tuning: this many learned embeddings before every sequence (0 = none); with them
    # (and with LoRA adapters) only they train.
    prompt_tokens: int = 0
    # The output: "lm" = logits over the vocabulary; "score" = one scalar per position (a reward
    # model's head, `score` [d_model, 1], as Hugging Face's *ForSequenceClassification with one
    # label), in place of the unembedding; "mlm" = BERT's masked-LM head: logits over the
    # vocabulary from dense + activation + norm, then the (tied) unembedding plus a bias.
    head: Head = "lm"
    # A value head beside the output (`value` [d_model, 1], one scalar per position, in the aux
    # outputs as "values"): the critic of PPO (`task.kind=ppo`), sharing the policy's layers.
    value_head: bool = False
    # Which of num_kv_heads/head_dim/mlp_dim were derived (given as None): overrides re-derive them.
    derived_fields: tuple[str, ...] = dataclasses.field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_positive_ints(self, "vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len")
        derived = tuple(
            n for n in ("num_kv_heads", "head_dim", "mlp_dim") if getattr(self, n) is None
        )
        object.__setattr__(self, "derived_fields", derived)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by "
                    f"num_heads={self.num_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.mlp_dim is None:
            object.__setattr__(self, "mlp_dim", 4 * self.d_model)
        check_positive_ints(self, "num_kv_heads", "head_dim", "mlp_dim", "rope_original_max_len")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be divisible by "
                f"num_kv_heads={self.num_kv_heads}; valid num_kv_heads: "
                f"{[k for k in range(1, self.num_heads + 1) if self.num_heads % k == 0]}"
            )
        for name, literal in (
            ("activation", Activation),
            ("norm", Norm),
            ("position", PositionKind),
            ("rope_scaling", RopeScaling),
            ("init", InitKind),
            ("dtype", DType),
            ("param_dtype", DType),
            ("remat", RematPolicy),
            ("norm_position", NormPosition),
            ("head", Head),
            ("attention_impl", AttentionImpl),
            ("kv_cache_dtype", KVCacheDType),
            ("parametrization", Parametrization),
            ("context_attention", ContextAttention),
        ):
            _check_choice(name, getattr(self, name), literal)
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.head_dim={self.head_dim} must be even with position='rope' "
                "(RoPE rotates pairs of features)"
            )
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} must be even with position='sinusoidal'"
            )
        if self.norm == "rmsnorm" and self.norm_bias:
            # RMSNorm has no bias by definition; make the config say what the model does.
            object.__setattr__(self, "norm_bias", False)
        for name in ("norm_eps", "init_std", "rope_theta", "rope_scaling_factor"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"ModelConfig.{name}={value!r} must be > 0")
        if self.rope_scaling == "llama3" and not (
            self.rope_high_freq_factor > self.rope_low_freq_factor > 0
        ):
            raise ValueError(
                "ModelConfig.rope_high_freq_factor must be > rope_low_freq_factor > 0 for llama3 "
                f"scaling, got high={self.rope_high_freq_factor}, low={self.rope_low_freq_factor}"
            )
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name}={value!r} must be > 0 or None (no cap)")
        if self.sliding_window is not None:
            check_positive_ints(self, "sliding_window")
        if self.scan_unroll is not None:
            check_positive_ints(self, "scan_unroll")
        if self.pipeline_microbatches is not None:
            check_positive_ints(self, "pipeline_microbatches")
        check_positive_ints(self, "pipeline_repeats")
        self._check_attention_impl()
        if self.moe.enabled and self.scan_layers:
            m = self.moe
            if m.first_dense or self.num_layers % m.every:
                raise ValueError(
                    f"scanned layers must repeat one pattern: with moe.every={m.every} and "
                    f"moe.first_dense={m.first_dense}, num_layers={self.num_layers} needs "
                    "first_dense=0 and num_layers divisible by every (or scan_layers=False)"
                )

        if self.mup_base_width is not None or self.mup_base_head_dim is not None:
            self._check_mup()
        if self.lora.rank:
            self._check_lora()
        check_quant(self)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"ModelConfig.dropout={self.dropout!r} must be in [0, 1)")
        if self.prefix_lm and not self.causal:
            raise ValueError(
                "ModelConfig.prefix_lm=True needs causal=True: a prefix LM is causal after its "
                "bidirectional prefix (causal=False makes every token bidirectional already)"
            )
        if (
            not isinstance(self.prompt_tokens, int)
            or not 0 <= self.prompt_tokens < self.max_seq_len
        ):
            raise ValueError(
                f"ModelConfig.prompt_tokens={self.prompt_tokens!r} must be in [0, "
                f"max_seq_len={self.max_seq_len})"
            )
        if (
            not isinstance(self.type_vocab_size, int)
            or isinstance(self.type_vocab_size, bool)
            or self.type_vocab_size < 0
        ):
            raise ValueError(
                f"ModelConfig.type_vocab_size={self.type_vocab_size!r} must be an integer >= 0 "
                "(0 = no token-type embeddings)"
            )
        if self.head == "mlm" and self.gated:
            raise ValueError(
                f"ModelConfig.head='mlm' applies one activation in its dense transform; "
                f"activation={self.activation!r} is gated; choose one of "
                f"{[a for a in get_args(Activation) if a not in GATED_ACTIVATIONS]}"
            )
        if self.value_head and self.head != "lm":
            raise ValueError(
                f"ModelConfig.value_head=True is a language model's critic; model.head="
                f"{self.head!r} has no policy to go with it"
            )

    def fused_attention_blocker(self, impl: str) -> str | None:
        """The feature of this config that fused kernel `impl` ("splash" or "cudnn") cannot
        express, or None when it can express all of them."""
        if self.prefix_lm:
            return "prefix-LM attention (model.prefix_lm=True)"
        if self.prompt_tokens:
            return f"prompt tuning (model.prompt_tokens={self.prompt_tokens}: every token sees it)"
        if impl == "cudnn":
            if self.attn_logit_softcap is not None:
                cap = self.attn_logit_softcap
                return f"the attention-logit soft-cap (model.attn_logit_softcap={cap})"
            if self.dtype == "float32":
                return "float32 compute (cuDNN's kernel takes model.dtype=bfloat16 or float16)"
            if self.sliding_window is not None and not self.causal:
                return "a two-sided sliding window (cuDNN's windows look left only)"
            if self.head_dim > 128 or self.head_dim % 8:
                return f"head_dim={self.head_dim} (cuDNN's kernel takes multiples of 8 up to 128)"
        return None

    def _check_attention_impl(self) -> None:
        for name in ("attention_block_q", "attention_block_kv"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 128 or value % 128
            ):
                raise ValueError(
                    f"ModelConfig.{name}={value!r} must be a multiple of 128 (the TPU's lane "
                    "width; e.g. 128, 256, 512) or None (chosen per sequence length)"
                )
        if self.attention_impl in ("splash", "cudnn"):
            blocker = self.fused_attention_blocker(self.attention_impl)
            if blocker:
                raise ValueError(
                    f"ModelConfig.attention_impl={self.attention_impl!r} cannot express {blocker}; "
                    "use attention_impl='auto' (falls back to 'xla' for this config) or 'xla'"
                )

    def _check_mup(self) -> None:
        for name, top in (("mup_base_width", "d_model"), ("mup_base_head_dim", "head_dim")):
            base, limit = getattr(self, name), getattr(self, top)
            if base is None:
                continue
            if not isinstance(base, int) or isinstance(base, bool) or not 1 <= base <= limit:
                raise ValueError(
                    f"ModelConfig.{name}={base!r} must be an integer in [1, {top}={limit}] "
                    f"(the base model's, where hyperparameters were tuned; None = derived)"
                )

    def _check_lora(self) -> None:
        d, f = self.d_model, self.mlp_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        sizes = {"query": (d, q), "key": (d, kv), "value": (d, kv), "out": (q, d)}
        if not self.moe.enabled or self.moe.every > 1 or self.moe.first_dense:
            sizes |= {"gate": (d, f), "up": (d, f), "down": (f, d)}
        if self.moe.enabled:
            sizes["experts"] = (d, self.expert_mlp_dim)
        for name in self.lora.target_names:
            if name not in sizes:
                raise ValueError(
                    f"LoRAConfig.targets={self.lora.targets!r}: {name!r} matches no layer of this "
                    f"model; adaptable here: {sorted(sizes)}"
                )
            if name == "gate" and not self.gated:
                raise ValueError(
                    f"LoRAConfig.targets={self.lora.targets!r}: 'gate' matches no layer "
                    f"(activation {self.activation!r} has no gate)"
                )
            if self.lora.rank > min(sizes[name]):
                raise ValueError(
                    f"LoRAConfig.rank={self.lora.rank} is larger than the {name} projection "
                    f"({sizes[name][0]} x {sizes[name][1]}); use rank <= {min(sizes[name])}"
                )

    def is_moe_layer(self, i: int) -> bool:
        m = self.moe
        return m.enabled and i >= m.first_dense and (i - m.first_dense + 1) % m.every == 0

    @property
    def expert_mlp_dim(self) -> int:
        return self.moe.expert_mlp_dim or self.mlp_dim

    @property
    def use_attn_out_bias(self) -> bool:
        return self.attn_bias if self.attn_out_bias is None else self.attn_out_bias

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def num_groups(self) -> int:
        """Query heads per kv head (G = N / K)."""
        return self.num_heads // self.num_kv_heads
