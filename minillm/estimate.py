"""Memory and cost estimates for deploying an LLM, derived from the model's shapes.

Used by lessons 03 (training vs inference memory) and 13 (hardware and cost) and by
``minillm estimate``. Every function returns plain bytes (GiB = 2**30 bytes, GB = 1e9 bytes;
spec sheets and the course notes mix the two, so the formatting helpers say which).

The three things that occupy accelerator memory at inference time:

- weights: ``n_params * bits / 8``;
- KV cache: ``2 (K and V) * layers * kv_heads * head_dim * tokens * bytes_per_elem``, where
  tokens = sequences * context length; it grows with every generated token;
- activations: the working set of one forward step; it depends on how many tokens one step
  processes, not on the context length (the KV cache holds the context).

Training adds gradients, optimizer states (Adam keeps two per parameter) and the activations
saved for the backward pass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

GIB = 2**30
GB = 10**9

# Storage cost of one weight, scales included. The GGUF block formats store ``block`` weights
# in ``bytes`` bytes (e.g. Q4_0: 32 weights in 18 bytes = 4.5 bits); see formats/blocks.py.
BITS_PER_WEIGHT: dict[str, float] = {
    "fp32": 32, "f32": 32, "fp16": 16, "f16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4,
    "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5,
    "q6_k": 6.5625, "q5_k": 5.5, "q4_k": 4.5, "q3_k": 3.4375, "q2_k": 2.625,
}  # fmt: skip


# ---------------------------------------------------------------------------- input checks
def non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_bits(bits: float | str) -> float:
    """Bits per weight from a number (0 < bits <= 32) or a format name such as "fp16", "q4_k"."""
    if isinstance(bits, str):
        key = bits.strip().lower()
        if key not in BITS_PER_WEIGHT:
            raise ValueError(f"unknown weight format {bits!r}; known: {', '.join(BITS_PER_WEIGHT)}")
        return float(BITS_PER_WEIGHT[key])
    b = non_negative("bits", bits)
    if not 0 < b <= 32:
        raise ValueError(f"bits per weight must be in (0, 32], got {bits}")
    return float(b)


def _elem_bytes(name: str, value: float | str) -> float:
    """Bytes per stored element, from a number of bytes or a format name ("fp16", "int8")."""
    if isinstance(value, str):
        return resolve_bits(value) / 8
    v = non_negative(name, value)
    if v == 0:
        raise ValueError(f"{name} must be > 0")
    return float(v)


# ---------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """The shapes that fix a decoder-only transformer's memory (Llama / Qwen2 layout)."""

    name: str
    n_params: float  # the published parameter count (a nominal 7e9 works too)
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int  # < num_heads with grouped-query attention (GQA)
    head_dim: int
    vocab_size: int
    intermediate_size: int
    context_length: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 puts a bias on q, k and v
    # Mixture of experts (MoE): each layer's MLP is num_experts SwiGLU experts of
    # moe_intermediate_size, of which a router picks experts_per_tok per token; Qwen-MoE adds an
    # always-on shared expert with a sigmoid gate. num_experts = 0 means a dense MLP.
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_params, bool) or not isinstance(self.n_params, numbers.Real):
            raise ValueError(f"n_params must be a number, got {self.n_params!r}")
        if not self.n_params > 0:
            raise ValueError(f"n_params must be > 0, got {self.n_params}")
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "intermediate_size"):  # fmt: skip
            positive_int(f, getattr(self, f))
        if self.context_length is not None:
            positive_int("context_length", self.context_length)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.num_experts:
            positive_int("num_experts", self.num_experts)
            positive_int("moe_intermediate_size", self.moe_intermediate_size)
            if not 1 <= self.experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"experts_per_tok must be in 1..num_experts={self.num_experts}, "
                    f"got {self.experts_per_tok}"
                )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def count_params(self) -> int:
        """Parameters implied by the shapes: embeddings, per-layer attention + SwiGLU MLP (or
        MoE experts, router and shared expert) + two RMSNorms, the final norm, and the LM head
        unless it is tied to the embeddings."""
        return self._count(self.num_experts)

    def active_params(self) -> int:
        """Parameters one token uses: an MoE layer runs only experts_per_tok of its experts.
        Compute per token follows this; memory follows count_params."""
        return self._count(self.experts_per_tok if self.is_moe else 0)

    def _count(self, experts: int) -> int:
        d, v = self.hidden_size, self.vocab_size
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim
        layer = attn + self.mlp_params(experts) + 2 * d
        lm_head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * layer + d + lm_head

    def mlp_params(self, experts: int | None = None) -> int:
        """One layer's MLP parameters; for MoE, with ``experts`` of them (default: all)."""
        d = self.hidden_size
        if not self.is_moe:
            return 3 * d * self.intermediate_size
        n = self.num_experts if experts is None else experts
        mlp = n * 3 * d * self.moe_intermediate_size + self.num_experts * d  # experts + router
        if self.shared_expert_intermediate_size:
            mlp += 3 * d * self.shared_expert_intermediate_size + d  # shared expert + its gate
        return mlp

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None) -> ModelSpec:
        """A spec from any object with the attributes ``num_layers``, ``num_kv_heads``,
        ``head_dim``, ``hidden_size``, ``vocab_size``, ``intermediate_size`` (for example
        ``minillm.config.ModelConfig``). Optional: ``num_heads`` (default hidden/head_dim),
        ``tie_word_embeddings``, ``attention_bias``, ``max_position_embeddings``, ``name``.
        ``n_params`` is counted from the shapes."""
        required = ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size",
                    "intermediate_size")  # fmt: skip
        missing = [a for a in required if not hasattr(cfg, a)]
        if missing:
            raise ValueError(f"config object lacks {', '.join(missing)}")
        fields = {a: getattr(cfg, a) for a in required}
        fields["num_heads"] = getattr(cfg, "num_heads", fields["hidden_size"] // fields["head_dim"])
        moe = {
            "num_experts": int(getattr(cfg, "num_experts", 0) or 0),
            "experts_per_tok": int(getattr(cfg, "num_experts_per_tok", 0) or 0),
            "moe_intermediate_size": int(
                getattr(cfg, "moe_intermediate_size", 0) or fields["intermediate_size"]
            ),
            "shared_expert_intermediate_size": int(
                getattr(cfg, "shared_expert_intermediate_size", 0) or 0
            ),
        }
        if not moe["num_experts"]:
            moe = {}
        spec = cls(
            name=name or str(getattr(cfg, "name", "") or "model"),
            n_params=1,  # placeholder, counted below
            context_length=getattr(cfg, "max_position_embeddings", None),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(cfg, "attention_bias", False)),
            **fields,
            **moe,
        )
        return replace(spec, n_params=spec.count_params())


def _spec(
    name: str, n_params: int, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int,
    ffn: int, ctx: int, tied: bool = False, bias: bool = False, moe: tuple[int, ...] = (),
) -> ModelSpec:  # fmt: skip
    """moe = (num_experts, experts_per_tok, moe_intermediate_size[, shared_expert_size])."""
    experts = dict(zip(("num_experts", "experts_per_tok", "moe_intermediate_size",
                        "shared_expert_intermediate_size"), moe, strict=False))  # fmt: skip
    return ModelSpec(name, n_params, layers, hidden, heads, kv_heads, hidden // heads, vocab, ffn,
                     ctx, tied, bias, **experts)  # fmt: skip


# Published configs (config.json: num_hidden_layers, hidden_size, num_attention_heads,
# num_key_value_heads, vocab_size, intermediate_size, max_position_embeddings of the Instruct /
# chat releases) and published parameter counts; tests check that the two agree.
# fmt: off
_KNOWN = [
    _spec("SmolLM2-135M", 134_515_008, 30, 576, 9, 3, 49152, 1536, 8192, tied=True),
    _spec("SmolLM2-360M", 361_821_120, 32, 960, 15, 5, 49152, 2560, 8192, tied=True),
    _spec("SmolLM2-1.7B", 1_711_376_384, 24, 2048, 32, 32, 49152, 8192, 8192, tied=True),
    _spec("TinyLlama-1.1B", 1_100_048_384, 22, 2048, 32, 4, 32000, 5632, 2048),
    _spec("Qwen2.5-0.5B", 494_032_768, 24, 896, 14, 2, 151936, 4864, 32768, tied=True, bias=True),
    _spec(
        "Qwen2.5-1.5B", 1_543_714_304, 28, 1536, 12, 2, 151936, 8960, 32768, tied=True, bias=True
    ),
    _spec("Qwen2.5-7B", 7_615_616_512, 28, 3584, 28, 4, 152064, 18944, 32768, bias=True),
    _spec("Qwen2.5-14B", 14_770_033_664, 48, 5120, 40, 8, 152064, 13824, 32768, bias=True),
    _spec("Qwen2.5-32B", 32_763_876_352, 64, 5120, 40, 8, 152064, 27648, 32768, bias=True),
    _spec("Qwen2.5-72B", 72_706_203_648, 80, 8192, 64, 8, 152064, 29568, 32768, bias=True),
    _spec("Llama-2-7B", 6_738_415_616, 32, 4096, 32, 32, 32000, 11008, 4096),
    _spec("Llama-2-13B", 13_015_864_320, 40, 5120, 40, 40, 32000, 13824, 4096),
    _spec("Llama-2-70B", 68_976_648_192, 80, 8192, 64, 8, 32000, 28672, 4096),
    _spec("Llama-3-8B", 8_030_261_248, 32, 4096, 32, 8, 128256, 14336, 8192),
    _spec("Llama-3-70B", 70_553_706_496, 80, 8192, 64, 8, 128256, 28672, 8192),
    _spec("Llama-3.1-405B", 405_853_388_800, 126, 16384, 128, 8, 128256, 53248, 131072),
    # MoE: published totals (46.7B, 14.3B) and active counts (12.9B, 2.7B) match the shapes
    _spec("Mixtral-8x7B", 46_702_792_704, 32, 4096, 32, 8, 32000, 14336, 32768, moe=(8, 2, 14336)),
    _spec("Qwen1.5-MoE-A2.7B", 14_315_784_192, 24, 2048, 16, 16, 151936, 5632, 8192, False, True,
          (60, 4, 1408, 5632)),
]
# fmt: on
KNOWN_MODELS: dict[str, ModelSpec] = {m.name: m for m in _KNOWN}


def get_model(name: str) -> ModelSpec:
    """A KNOWN_MODELS entry by name, case-insensitively."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    for key, spec in KNOWN_MODELS.items():
        if key.lower() == name.strip().lower():
            return spec
    raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")


# ---------------------------------------------------------------------------- inference memory
def weights_bytes(n_params: float, bits: float | str = 16) -> float:
    """Bytes to store ``n_params`` weights at ``bits`` each (a number or a format name)."""
    return non_negative("n_params", n_params) * resolve_bits(bits) / 8


def kv_bytes_per_token(spec: ModelSpec, bytes_per_elem: float | str = 2) -> float:
    """K and V of one token in every layer: 2 * layers * kv_heads * head_dim * bytes."""
    return 2 * spec.num_layers * spec.kv_dim * _elem_bytes("bytes_per_elem", bytes_per_elem)


def kv_cache_bytes(
    spec: ModelSpec, seq_len: int, batch: int = 1, bytes_per_elem: float | str = 2
) -> float:
    """KV cache of ``batch`` sequences of ``seq_len`` tokens (fp16 by default)."""
    tokens = non_negative("seq_len", seq_len) * non_negative("batch", batch)
    return tokens * kv_bytes_per_token(spec, bytes_per_elem)


def activation_bytes(spec: ModelSpec, num_tokens: int, bytes_per_elem: float | str = 4) -> float:
    """The course notes' rule of thumb: one hidden-state vector (fp32) per token in flight.

    At inference nothing is kept for a backward pass, so this is the residual stream of the
    tokens one forward step processes. It is a floor: see ``forward_working_set_bytes``.
    """
    n = non_negative("num_tokens", num_tokens)
    return n * spec.hidden_size * _elem_bytes("bytes_per_elem", bytes_per_elem)


def forward_working_set_bytes(
    spec: ModelSpec, num_tokens: int, bytes_per_elem: float | str = 4, logits_rows: int = 1
) -> float:
    """Peak live tensors of one forward step over ``num_tokens`` tokens.

    Layers run one after another, so the peak is one layer's: the residual stream and its
    normalised copy (2h) plus the larger of the attention phase (q, k, v and the attention
    output: 2*q_dim + 2*kv_dim) and the MLP phase (gate, up and their product: 3*intermediate).
    Add fp32 logits for the ``logits_rows`` positions that are sampled. Attention scores are
    left out: paged / flash attention computes them tile by tile. This is why engines cap the
    tokens per step (vLLM's max_num_batched_tokens).
    """
    n = non_negative("num_tokens", num_tokens)
    per_token = 2 * spec.hidden_size + max(
        2 * spec.q_dim + 2 * spec.kv_dim, 3 * spec.intermediate_size
    )
    logits = non_negative("logits_rows", logits_rows) * spec.vocab_size * 4
    return n * per_token * _elem_bytes("bytes_per_elem", bytes_per_elem) + logits


@dataclass(frozen=True)
class InferenceMemory:
    weights: float
    kv_cache: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    def __str__(self) -> str:
        return (
            f"weights {format_gib(self.weights)} + KV cache {format_gib(self.kv_cache)} + "
            f"activations {format_gib(self.activations)} = {format_gib(self.total)}"
        )


def inference_total(
    spec: ModelSpec,
    *,
    bits: float | str = 16,
    batch: int = 1,
    seq_len: int = 2048,
    kv_bytes_per_elem: float | str = 2,
    activation_bytes_per_elem: float | str = 4,
) -> InferenceMemory:
    """Weights + KV cache for ``batch`` full contexts + activations (the notes' rule, with all
    ``batch * seq_len`` prompt tokens in one step: the worst case without chunked prefill)."""
    return InferenceMemory(
        weights_bytes(spec.n_params, bits),
        kv_cache_bytes(spec, seq_len, batch, kv_bytes_per_elem),
        activation_bytes(spec, batch * seq_len, activation_bytes_per_elem),
    )


def rule_of_thumb_bytes(n_params: float, bits: float | str = 16, overhead: float = 1.2) -> float:
    """The quick estimate of the course notes: weights times 1.2 to 1.5 for KV cache and runtime."""
    if non_negative("overhead", overhead) < 1:
        raise ValueError(f"overhead is a factor >= 1, got {overhead}")
    return weights_bytes(n_params, bits) * overhead


# ---------------------------------------------------------------------------- training memory
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd_momentum": 1, "sgd": 0}


@dataclass(frozen=True)
class TrainingMemory:
    weights: float
    gradients: float
    optimizer_states: float
    master_weights: float
    activations: float

    @property
    def total(self) -> float:
        return (
            self.weights + self.gradients + self.optimizer_states + self.master_weights
            + self.activations
        )  # fmt: skip


def training_bytes(
    n_params: float,
    *,
    weight_bytes: float = 2,
    grad_bytes: float = 2,
    optimizer: str = "adamw",
    state_bytes: float = 4,
    master_weights: bool = True,
    activations: float = 0,
) -> TrainingMemory:
    """Memory to train ``n_params`` parameters on one device (no sharding).

    The default is mixed-precision Adam as in the ZeRO paper (Rajbhandari et al., 2020):
    16-bit weights and gradients (2 + 2 bytes), fp32 m and v (4 + 4) and an fp32 master copy
    of the weights (4): 16 bytes per parameter before activations.
    """
    n = non_negative("n_params", n_params)
    key = optimizer.strip().lower()
    if key not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_STATES)}")
    return TrainingMemory(
        weights=n * _elem_bytes("weight_bytes", weight_bytes),
        gradients=n * _elem_bytes("grad_bytes", grad_bytes),
        optimizer_states=n * OPTIMIZER_STATES[key] * _elem_bytes("state_bytes", state_bytes),
        master_weights=n * 4 if master_weights else 0,
        activations=non_negative("activations", activations),
    )


def training_activation_bytes(
    spec: ModelSpec, batch: int, seq_len: int, flash_attention: bool = True
) -> float:
    """Activations saved for backward, 16-bit, no recomputation, no tensor parallelism.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
    count ``s*b*h*(34 + 5*a*s/h)`` bytes per GPT layer; the ``5*a*s/h`` term is the attention
    score matrices, which flash attention does not store. An estimate for Llama-style layers.
    """
    s, b = non_negative("seq_len", seq_len), non_negative("batch", batch)
    h, a = spec.hidden_size, spec.num_heads
    per_layer = s * b * h * (34 + (0 if flash_attention else 5 * a * s / h))
    return spec.num_layers * per_layer


# ---------------------------------------------------------------------------- hardware
PRICE_SOURCE = (
    "example on-demand USD/hour figures quoted in course note 004 (no provider, region or date "
    "given); real prices vary widely, so pass your own"
)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # nominal capacity; the driver reports slightly less as usable
    bandwidth_gb_s: float  # peak memory bandwidth from the vendor's spec sheet, GB/s
    price_per_hour: float | None = None  # USD, see PRICE_SOURCE; None when the notes give none

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("T4", 16, 320, 0.53),  # note 004 lists 300 GB/s; the T4 datasheet says 320
        GPU("L4", 24, 300, 0.81),
        GPU("A10", 24, 600),
        GPU("RTX-3060", 12, 360),
        GPU("RTX-4090", 24, 1008),
        GPU("A100-40GB", 40, 1555, 3.67),
        GPU("A100-80GB", 80, 2039, 5.12),
        GPU("H100-80GB", 80, 3350, 8.50),  # SXM
        GPU("H200", 141, 4800),
    ]
}


def get_gpu(gpu: GPU | str) -> GPU:
    """A GPUS entry by name, case-insensitively (a GPU passes through)."""
    if isinstance(gpu, GPU):
        return gpu
    if not isinstance(gpu, str):
        raise TypeError(f"gpu must be a GPU or a name, got {type(gpu).__name__}")
    for key, g in GPUS.items():
        if key.lower() == gpu.strip().lower():
            return g
    raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")


def fits(
    gpu: GPU | str, required_bytes: float, num_gpus: int = 1, utilization: float = 1.0
) -> bool:
    """Whether ``required_bytes`` fit in ``num_gpus`` such GPUs, using a fraction of each
    (vLLM's gpu_memory_utilization defaults to 0.9)."""
    g = get_gpu(gpu)
    need = non_negative("required_bytes", required_bytes)
    num = positive_int("num_gpus", num_gpus)
    if not 0 < non_negative("utilization", utilization) <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    return need <= num * g.memory_bytes * utilization


def gpus_needed(gpu: GPU | str, required_bytes: float, utilization: float = 1.0) -> int:
    """The fewest such GPUs whose memory holds ``required_bytes`` (ignoring how it splits)."""
    g = get_gpu(gpu)
    fits(g, required_bytes, 1, utilization)  # validates the inputs
    return max(1, math.ceil(required_bytes / (g.memory_bytes * utilization)))


# ---------------------------------------------------------------------------- speed and cost
def decode_bytes_per_step(
    spec: ModelSpec,
    bits: float | str = 16,
    context_len: int = 0,
    batch: int = 1,
    kv_bytes_per_elem: float | str = 2,
) -> float:
    """Bytes one decode step reads: every weight once, plus each sequence's KV cache."""
    return weights_bytes(spec.n_params, bits) + kv_cache_bytes(
        spec, context_len, batch, kv_bytes_per_elem
    )


def decode_tokens_per_s_roofline(bandwidth_gb_s: float, bytes_per_token: float) -> float:
    """Upper bound on decode speed when memory-bound: bandwidth / bytes read per token.

    For a batch, bytes_per_token = decode_bytes_per_step(...) / batch: the weights are read
    once per step and shared by every sequence in it, which is why batching raises throughput.
    """
    bw = non_negative("bandwidth_gb_s", bandwidth_gb_s)
    if non_negative("bytes_per_token", bytes_per_token) == 0:
        raise ValueError("bytes_per_token must be > 0")
    return bw * GB / bytes_per_token


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float) -> float:
    """Dollars per 1M generated tokens for a machine billed by the hour at a steady rate."""
    price = non_negative("price_per_hour", price_per_hour)
    if non_negative("tokens_per_s", tokens_per_s) == 0:
        raise ValueError("tokens_per_s must be > 0")
    return price / (tokens_per_s * 3600) * 1_000_000


# ---------------------------------------------------------------------------- formatting
def format_gib(num_bytes: float) -> str:
    """'13.0 GiB': bytes in binary gigabytes with one decimal."""
    return f"{non_negative('num_bytes', num_bytes) / GIB:.1f} GiB"


def format_bytes(num_bytes: float) -> str:
    """The largest binary unit that keeps the number >= 1: '512 B', '1.5 MiB', '2.0 GiB'."""
    n = non_negative("num_bytes", num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
