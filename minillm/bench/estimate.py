"""Memory estimator: how many bytes a model needs to serve, before any code runs (chapter 1).

Serving memory has two big parts:

* weights: every parameter once, `num_params x bytes_per_param` (fp32 4, fp16/bf16 2, fp8/int8 1, int4 0.5);
* the KV cache: for every token of every sequence in the batch, each layer keeps one key and one value vector per
  KV head, so `2 x num_layers x num_kv_heads x head_dim x bytes x context x batch`.

Weights are fixed; the KV cache grows with context x batch, and at long context or big batches it is larger than the
weights. That is why grouped-query attention (fewer KV heads), paged KV and KV quantization matter (chapters 2-5).

Sizes are in decimal gigabytes (1 GB = 1e9 bytes), the unit of the seed table: a "70B" model holds 70e9 parameters,
so 140 / 70 / 35 GB at FP16 / INT8 / INT4. A preset also knows its real architecture, from which the parameter
count is *counted* (Llama-2-70B really has 68.98e9 parameters, 137.96 GB at FP16): `estimate()` uses the counted
number unless `num_params` is given, and `seed_table()` shows both side by side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
GB = 1e9  # decimal gigabyte, as GPU vendors and the seed table count


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder that decide its memory."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    nominal_params: float | None = None  # the number in the model's name ("70B" -> 70e9)

    @property
    def counted_params(self) -> int:
        """Parameters counted from the shapes: attention q/k/v/o, SwiGLU gate/up/down, two RMSNorms per layer,
        the final norm, the embedding and (unless tied) the LM head. Llama has no biases."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d + 2 * h * self.num_kv_heads * d + self.num_heads * d * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in [
        ModelShape("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, nominal_params=7e9),
        ModelShape("llama-2-13b", 40, 5120, 40, 40, 128, 13824, 32000, nominal_params=13e9),
        ModelShape("llama-2-70b", 80, 8192, 64, 8, 128, 28672, 32000, nominal_params=70e9),
        ModelShape("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, nominal_params=8e9),
        ModelShape("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256, nominal_params=70e9),
        ModelShape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, tie_word_embeddings=True, nominal_params=135e6),
    ]
}


def get_preset(name: str) -> ModelShape:
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[key]


def dtype_bytes(dtype: str) -> float:
    key = dtype.lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


# The range of each input: far past any real model or GPU at the top, and small enough there that every product
# below (2 x layers x kv_heads x head_dim x bytes x context x batch; the total over a GPU's memory) stays a
# finite float: a context of 1e310 tokens was an OverflowError, 1e308 parameters printed "inf GB" and "nan GPUs".
LIMITS: dict[str, tuple[float, float]] = {
    "num_params": (1, 1e15), "num_layers": (1, 10_000), "num_kv_heads": (1, 10_000), "head_dim": (1, 100_000),
    "context": (1, 10**9), "batch": (1, 10**6), "gpu_gb": (0.001, 100_000)}


def _in_limits(name: str, value: float, integer: bool = True) -> None:
    """ValueError unless `value` is a number in LIMITS[name] (an integer if `integer`), naming value and range."""
    low, high = LIMITS[name]
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    # compared before int(), which raises on nan and inf (math.isfinite raised on an int too large for a float)
    if not (number and low <= value <= high and (not integer or int(value) == value)):
        span = f"an integer in [{low:,}, {high:,}]" if integer else f"a number in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {span}, got {_shown(value)}")


def _shown(value: object) -> str:
    """repr(value), a huge integer as its order of magnitude (10**310 is 311 digits: too long for an error)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"about {'-' if value < 0 else ''}10**{int(value.bit_length() * math.log10(2))}"
    return repr(value)


@dataclass(frozen=True)
class MemoryEstimate:
    model: str
    num_params: float
    dtype: str
    kv_dtype: str
    context: int
    batch: int
    weight_bytes: float
    kv_cache_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_cache_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_cache_bytes / (self.context * self.batch)


def weight_bytes(num_params: float, dtype: str) -> float:
    """Bytes for the weights alone: params x bytes per param."""
    _in_limits("num_params", num_params, integer=False)
    return num_params * dtype_bytes(dtype)


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str, context: int, batch: int) -> float:
    """2 (a key and a value) x layers x kv_heads x head_dim x bytes x context x batch."""
    for name, v in [("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("context", context), ("batch", batch)]:
        _in_limits(name, v)
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes(dtype) * context * batch


def default_kv_dtype(dtype: str) -> str:
    """Weight-only integer quantization (int8/int4) keeps activations, and so the KV cache, in fp16; a float
    weight dtype is used for the cache too. Pass kv_dtype to choose otherwise (e.g. an fp8 KV cache)."""
    return "fp16" if dtype.lower() in ("int8", "int4") else dtype.lower()


def estimate(model: str | ModelShape, dtype: str = "fp16", context: int = 4096, batch: int = 1,
             kv_dtype: str | None = None, num_params: float | None = None) -> MemoryEstimate:
    """Weights + KV cache for a preset name or a ModelShape. `num_params` overrides the counted parameters
    (e.g. 70e9 to reproduce a nominal "70B" figure)."""
    shape = get_preset(model) if isinstance(model, str) else model
    dtype_bytes(dtype)
    kv_dtype = default_kv_dtype(dtype) if kv_dtype is None else kv_dtype
    if num_params is None:  # a custom shape (hidden_size 0) carries only its given count
        num_params = shape.counted_params if shape.hidden_size > 0 else shape.nominal_params
    params = num_params
    return MemoryEstimate(
        model=shape.name, num_params=params, dtype=dtype.lower(), kv_dtype=kv_dtype.lower(), context=context,
        batch=batch, weight_bytes=weight_bytes(params, dtype),
        kv_cache_bytes=kv_cache_bytes(shape.num_layers, shape.num_kv_heads, shape.head_dim, kv_dtype, context, batch))


def custom_shape(num_params: float, num_layers: int, num_kv_heads: int, head_dim: int,
                 name: str = "custom") -> ModelShape:
    """A shape from explicit sizes, for a model that is not a preset (only what the memory formula needs)."""
    for n, v in [("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)]:
        _in_limits(n, v)
    _in_limits("num_params", num_params, integer=False)
    return ModelShape(name, num_layers, 0, num_kv_heads, num_kv_heads, head_dim, 0, 0, nominal_params=num_params)


def format_estimate(e: MemoryEstimate, gpu_gb: float = 80.0) -> str:
    """A small table: weights, KV cache, total, and how many `gpu_gb` GPUs that fills."""
    _in_limits("gpu_gb", gpu_gb, integer=False)
    rows = [("model", e.model), ("parameters", f"{e.num_params / 1e9:.3f} B"),
            ("weights dtype", f"{e.dtype} ({DTYPE_BYTES[e.dtype]:g} bytes/param)"),
            ("KV cache dtype", f"{e.kv_dtype} ({DTYPE_BYTES[e.kv_dtype]:g} bytes/value)"),
            ("context x batch", f"{e.context} x {e.batch}"),
            ("KV cache per token", f"{e.kv_bytes_per_token / 2**10:.1f} KiB"),
            ("weights", f"{e.weight_bytes / GB:.2f} GB"), ("KV cache", f"{e.kv_cache_bytes / GB:.2f} GB"),
            ("total", f"{e.total_bytes / GB:.2f} GB"),
            (f"{gpu_gb:g} GB GPUs needed", f"{-(-e.total_bytes // (gpu_gb * GB)):.0f} (ignoring activations)")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def seed_table(dtypes: tuple[str, ...] = ("fp16", "int8", "int4")) -> list[dict[str, float | str]]:
    """The seed's 70B weights table: a nominal 70e9-parameter model (140 / 70 / 35 GB), with Llama-2-70B's
    counted parameters beside it to show what the round number hides."""
    real = get_preset("llama-2-70b")
    return [{"dtype": d, "bytes_per_param": dtype_bytes(d),
             "nominal_70b_gb": weight_bytes(70e9, d) / GB,
             "llama2_70b_gb": weight_bytes(real.counted_params, d) / GB} for d in dtypes]


def format_seed_table(dtypes: tuple[str, ...] = ("fp16", "int8", "int4")) -> str:
    real = get_preset("llama-2-70b").counted_params
    head = f"{'dtype':<6} {'bytes/param':>11} {'70B (70e9 params)':>18} {f'Llama-2-70B ({real / 1e9:.2f}e9)':>22}"
    lines = [head, "-" * len(head)]
    for r in seed_table(dtypes):
        lines.append(f"{r['dtype'].upper():<6} {r['bytes_per_param']:>11g} {r['nominal_70b_gb']:>15.0f} GB"
                     f" {r['llama2_70b_gb']:>19.2f} GB")
    return "\n".join(lines)
