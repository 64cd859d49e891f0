"""Rotary position embeddings (RoPE), chapter 1.

RoPE encodes a token's position by rotating pairs of channels of its query and key by angles
`position * inv_freq[i]`; the dot product q.k then depends only on the *distance* between the two
positions. Llama pairs channel i with channel i + D/2 ("rotate half", the layout of Hugging Face and
vLLM's `is_neox_style=True`), not adjacent channels (GPT-J style): a checkpoint trained one way is wrong
the other way.

`apply_rotary` is exercise ch01.rope. `RotaryEmbedding` precomputes cos/sin for every position once
(a [max_position, D] cache, cos half then sin half) and rotates q and k of a packed batch by their
positions. Long-context checkpoints rescale the frequencies: "linear" (divide every frequency by a
factor) and Llama 3.1's "llama3" (leave high frequencies alone, divide low ones, interpolate between).
With the "triton" backend ("auto" on a GPU) q and k are rotated in place by one kernel,
minillm.kernels.fused.rotary_embedding_, that reads the same cos|sin cache; the torch backend calls the
exercise function (ch01.rope) through `dispatch`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from minillm.layers.backend import OperatorModule, use_triton
from minillm.hooks import dispatch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# >>> exercise ch01.rope
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channels of `x` by the per-token angles whose cos and sin are given ("rotate half").

    Channel i (for i < D/2) is paired with channel i + D/2, and each pair (x1, x2) is rotated by the
    angle theta_i of its token:

        out[..., :D/2] = x1 * cos - x2 * sin
        out[..., D/2:] = x2 * cos + x1 * sin

    with x1 = x[..., :D/2], x2 = x[..., D/2:]. (Equivalently, out = x * [cos, cos] + rotate_half(x) * [sin, sin]
    with rotate_half(x) = [-x2, x1], the way Hugging Face writes it.)

    Args:
        x: [T, H, D] queries or keys of T packed tokens, H heads, head dim D (D even).
        cos: [T, D/2] cos(position_t * inv_freq_i), one row per token, shared by every head.
        sin: [T, D/2] sin(position_t * inv_freq_i).

    Returns:
        [T, H, D], same dtype as `x`.

    Dtype advice: do the multiply-adds in fp32 (cos/sin are fp32) and cast the result back to x's dtype.
    Broadcast cos/sin over the head dimension with `unsqueeze(-2)`; do not loop over heads.
    """
    # >>> solution
    half = x.shape[-1] // 2
    x32 = x.to(torch.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    cos = cos.to(torch.float32).unsqueeze(-2)  # [T, 1, D/2]: the same angle for every head
    sin = sin.to(torch.float32).unsqueeze(-2)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
    # <<< solution
# <<< exercise


_EXERCISE_ROPE = apply_rotary  # the function as written here, even where a test has patched the module's name


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """The D/2 rotation frequencies inv_freq[i] = base ** (-2i / D), rescaled as `rope_scaling` asks (fp32)."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary head_dim must be an even integer >= 2, got {head_dim}")
    if not base > 0:
        raise ValueError(f"rope base (rope_theta) must be > 0, got {base}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    rope_type = _rope_type(rope_scaling)
    if rope_type == "default":
        return inv_freq
    factor = float(_scaling_field(rope_scaling, "factor"))
    if not factor > 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {factor}")
    if rope_type == "linear":
        # Position p with factor f gets the angles position p / f had: the context is stretched f times.
        return inv_freq / factor
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, base, factor, rope_scaling)
    # llama3: wavelengths shorter than original_len / high_freq_factor (local detail) are kept, those longer
    # than original_len / low_freq_factor (long range) are divided by `factor`, and the band in between is
    # a linear blend in 1/wavelength, so no frequency jumps.
    low = float(_scaling_field(rope_scaling, "low_freq_factor"))
    high = float(_scaling_field(rope_scaling, "high_freq_factor"))
    original = float(_scaling_field(rope_scaling, "original_max_position_embeddings"))
    if not high > low:
        raise ValueError(f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, base: float, factor: float,
                   rope_scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (Peng et al. 2023), "NTK-by-parts": frequency i turns original_len * inv_freq[i] / 2 pi times over the
    original context. Dimensions that turn more than beta_fast times there (high frequencies: local order) keep
    their frequency (extrapolate), those turning fewer than beta_slow times are divided by `factor`
    (interpolate, as linear scaling does), and a linear ramp over dimension index blends the band between."""
    original = float(rope_scaling.get("original_max_position_embeddings") or 0)
    if not original > 0:
        raise ValueError(f"yarn rope_scaling needs original_max_position_embeddings > 0, got {rope_scaling}")
    beta_fast, beta_slow = float(rope_scaling.get("beta_fast") or 32), float(rope_scaling.get("beta_slow") or 1)

    def dim_turning(turns: float) -> float:  # the (fractional) dimension index whose frequency turns `turns` times
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))
    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # (a ramp needs a width)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide it by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(rope_scaling: dict[str, Any] | None) -> float:
    """What cos and sin are multiplied by (so q.k by its square): 1, except for YaRN, whose interpolated angles
    flatten attention; its "mscale" 0.1 ln(factor) + 1 sharpens it back (DeepSeek's mscale / mscale_all_dim
    variant, or an explicit attention_factor, where the config gives them)."""
    if _rope_type(rope_scaling) != "yarn":
        return 1.0
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    factor = float(_scaling_field(rope_scaling, "factor"))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    m, m_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, float(m)) / mscale(factor, float(m_all))
    return mscale(factor)


def _rope_type(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    # HF configs spell it "rope_type" (new) or "type" (old)
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; minillm supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    return rope_type


def _scaling_field(rope_scaling: dict[str, Any] | None, key: str) -> Any:
    if rope_scaling is None or key not in rope_scaling:
        raise ValueError(f"rope_scaling of type {_rope_type(rope_scaling)!r} needs the field {key!r}; got {rope_scaling}")
    return rope_scaling[key]


class RotaryEmbedding(OperatorModule):
    """Rotates q [T, H, D] and k [T, KVH, D] by each token's position, from a precomputed cos/sin cache."""

    def __init__(self, head_dim: int, max_position: int, base: float = 10000.0,
                 rope_scaling: dict[str, Any] | None = None, backend: str = "auto") -> None:
        super().__init__(backend)
        if max_position < 1:
            raise ValueError(f"rotary max_position must be >= 1, got {max_position}")
        self.head_dim = head_dim
        self.max_position = max_position
        self.base = base
        self.rope_scaling = rope_scaling
        inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [P, D/2]
        # fp32 even when the model runs in bf16: angles of large positions need the mantissa.
        # Not persistent: it is derived from the config, not a weight to save or load.
        scale = rope_attention_factor(rope_scaling)  # 1 but for YaRN: every path reads this table
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1) * scale,
                             persistent=False)
        self._cos_sin_memo: tuple | None = None  # (positions, cos, sin) during a forward, see remember_positions

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, D/2] each, for the given positions [T]."""
        if positions.device.type == "cpu" and positions.numel():
            # On a GPU this check would sync; there the engine validates lengths before scheduling.
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0 or hi >= self.max_position:
                raise ValueError(f"rotary positions must lie in [0, {self.max_position}), got min {lo}, max {hi}")
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"rotary expects q [T, H, {self.head_dim}] and k [T, KVH, {self.head_dim}], "
                             f"got {tuple(q.shape)} and {tuple(k.shape)}")
        if positions.shape != (q.shape[0],):
            raise ValueError(f"positions must be [T] = [{q.shape[0]}], got shape {tuple(positions.shape)}")
        if use_triton(self.backend, q):
            from minillm.kernels.fused import rotary_embedding_
            # in place: q and k are views of the qkv projection's output, nobody else reads the unrotated values
            # (positions are not range-checked here: that would sync with the GPU; the engine checks lengths)
            rotary_embedding_(positions, q, k, self.cos_sin_cache)
            return q, k
        rope_fn = dispatch("ch01.rope", apply_rotary)
        if rope_fn is _EXERCISE_ROPE and self.backend != "reference" and q.dtype == k.dtype == torch.float32:
            return self._rotate_fp32(positions, q, k)  # no override active: the same arithmetic in fewer ops
        cos, sin = self._step_cos_sin(positions)
        # q and k rotated by one call: the same angles for every head, and each small op costs more in dispatch
        # than in arithmetic on a CPU (fewer calls per layer is what the torch path's speed is made of)
        qk = rope_fn(torch.cat((q, k), dim=1), cos, sin)
        return qk[:, :q.shape[1]], qk[:, q.shape[1]:]

    def _rotate_fp32(self, positions: torch.Tensor, q: torch.Tensor,
                     k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`apply_rotary` on q and k in four tensor ops, bit for bit (a test checks), for fp32 on the torch path.

        With full-width tables cos2 = [cos, cos] and sin2 = [-sin, sin], rotate-half is a roll by D/2:

            out = x * cos2 + roll(x, D/2) * sin2        (roll(x, D/2) = [x2, x1])

        which is x1 cos + x2 (-sin) = x1 cos - x2 sin and x2 cos + x1 sin: the exercise's products and sums,
        rounded the same way. When q and k are neighbouring views of one qkv projection output (the model's
        case) they are rotated in place through one view of both, as the Triton kernel does: no concatenation,
        no new q and k; otherwise (tests, other callers) q and k are left as they are and new tensors returned."""
        cos2, sin2 = self._step_rotation_tables(positions)
        num_heads, head_dim = q.shape[1], self.head_dim
        # (one token: the stride of its size-1 row dimension means nothing and may differ between q and k)
        in_place = ((q.stride(0) == k.stride(0) or q.shape[0] == 1) and q.stride(2) == k.stride(2) == 1
                    and q.stride(1) == k.stride(1) == head_dim
                    and k.data_ptr() == q.data_ptr() + num_heads * head_dim * q.element_size()
                    and k.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
                    and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)))
        if in_place:
            qk = q.as_strided((q.shape[0], num_heads + k.shape[1], head_dim), q.stride())
        else:
            qk = torch.cat((q, k), dim=1)
        rolled = qk.roll(head_dim // 2, dims=-1).mul_(sin2)
        qk.mul_(cos2).add_(rolled)
        return qk[:, :num_heads], qk[:, num_heads:]

    def _step_rotation_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[cos, cos] and [-sin, sin], [T, 1, D] each, for `positions` (made once per forward, see
        remember_positions)."""
        memo = self._cos_sin_memo
        if memo is not None and memo[0] is positions and len(memo) > 3 and not torch.compiler.is_compiling():
            return memo[3], memo[4]
        cos, sin = self._step_cos_sin(positions)
        tables = torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)
        memo = self._cos_sin_memo
        if memo is not None and memo[0] is positions:
            self._cos_sin_memo = (*memo[:3], *tables)
        return tables

    def remember_positions(self, positions: torch.Tensor) -> None:
        """Start of a forward: every layer shares this module and is handed this same positions tensor, so the
        range check and the cos/sin lookup can run once for all of them (`forget_positions` ends it). The model
        brackets its layer loop with the two calls; a caller that does not gets the lookup on every call."""
        self._cos_sin_memo = (positions, None, None)

    def forget_positions(self) -> None:
        self._cos_sin_memo = None

    def _step_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memo = self._cos_sin_memo
        if memo is None or memo[0] is not positions or torch.compiler.is_compiling():
            return self.cos_sin(positions)
        if memo[1] is None:
            memo = self._cos_sin_memo = (positions, *self.cos_sin(positions))
        return memo[1], memo[2]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}, base={self.base}, scaling={self.rope_scaling}"
