"""What Medusa, EAGLE and MTP heads share: their config, the target's frozen parts, one small decoder block, and
the files they are saved in (chapter 9).

All three draft from the target's own last hidden state and reuse the target's embedding, final norm and LM head
(tied in SmolLM2: the 28M-parameter vocabulary matrix is never copied, only read). What each adds is small:

    medusa  K residual blocks h + SiLU(W h + b) on the post-norm state            K * d^2 parameters
    eagle   fc: [feature; embedding] 2d -> d, then one decoder layer              ~ 1 target layer
    mtp     per module: two RMSNorms, a 2d -> d projection, one decoder layer   ~ 1 target layer each

The decoder layer here (`DraftBlock`) is a Llama block with plain torch attention (SDPA) over a short *window* of
the sequence: heads run outside the paged KV cache. Training runs it over whole sequences, with autograd. The
proposers recompute the window every step (it is tens of tokens, one layer: cheap next to a target step) and keep
a cache only within one proposal, for the drafts they feed back in (minillm.speculative.head_proposer); they run
the same weights packed into a `FusedDraftBlock` (the engine's fused kernels, a preallocated `DraftKV` written in
place), because at batch 1 a draft layer's cost is the number of kernels it launches, not its arithmetic.

Files: a directory with `heads.safetensors` (the head's own parameters only) and `config.json` (HeadConfig, with
the target's fingerprint: hidden size, layers, vocabulary). `resolve_heads_dir` finds the directory for a
speculative config: its "model", else the weights shipped for the bundled model under
minillm/speculative/weights/<method>/, checked against the target's fingerprint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from minillm.config import ModelConfig
from minillm.layers.norm import rms_norm
from minillm.layers.rotary import apply_rotary
from minillm.speculative.config import MAX_SPECULATIVE_TOKENS
from minillm.speculative.draft_vocab import DraftVocab, dense_head_weight

HEAD_KINDS = ("medusa", "eagle", "mtp")
WEIGHTS_FILE, CONFIG_FILE = "heads.safetensors", "config.json"
SHIPPED_DIR = Path(__file__).parent / "weights"


def target_fingerprint(config: ModelConfig) -> dict[str, int]:
    """What heads trained on one target must match in another before they are loaded onto it."""
    return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size}


@dataclass
class HeadConfig:
    kind: str
    num_heads: int  # medusa: heads K; mtp: modules D; eagle: 1 (one layer, run k times)
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    target: dict[str, int] = field(default_factory=dict)  # target_fingerprint of the model it was trained on
    training: dict = field(default_factory=dict)  # steps, losses, data: a record, not read back

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        top = MAX_SPECULATIVE_TOKENS
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or not 1 <= self.num_heads <= top:
            raise ValueError(f"num_heads must be an integer in [1, {top}], got {self.num_heads!r}")

    @classmethod
    def for_target(cls, kind: str, config: ModelConfig, num_heads: int) -> "HeadConfig":
        return cls(kind, 1 if kind == "eagle" else num_heads, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, config.head_dim, config.intermediate_size, config.rms_norm_eps,
                   config.rope_theta, target_fingerprint(config))


class TargetParts:
    """The target's embedding, final norm and LM head, read-only, as plain tensor functions (no triton kernel,
    no forward context): a head's gradients flow through them in training, and they run on [B, T, d] tensors."""

    def __init__(self, target: nn.Module) -> None:
        try:
            self.embed_weight = target.model.embed_tokens.weight
            self.norm_weight, self.eps = target.model.norm.weight, target.model.norm.eps
            self.lm_head_weight = dense_head_weight(target.lm_head, "a Medusa/EAGLE/MTP head")
        except AttributeError as err:
            raise ValueError(f"heads need the target's embed_tokens, final norm and lm_head; "
                             f"{type(target).__name__} lacks one ({err})") from None
        self.vocab_size, self.hidden_size = self.lm_head_weight.shape
        self.vocab = DraftVocab(self.lm_head_weight)  # what drafting scores (draft_vocab.py): all rows, or a few

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed_weight)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.norm_weight, self.eps)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return F.linear(normed, self.lm_head_weight)


class RopeTables:
    """cos/sin of position * inv_freq for positions 0 .. n - 1, computed once per device and kept (fp32, the
    precision apply_rotary rotates in): a forward then gathers its rows instead of recomputing inv_freq (a pow)
    and the angles every call. Window-relative positions stay below the window plus the drafts, so the tables
    are short; they grow (to the next power of two) when a longer sequence comes, as in training.

    Tables made under torch.inference_mode are inference tensors, which autograd may not save: they are kept
    apart from those made outside it, so a module used by the proposer can still be trained."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.half, self.theta = head_dim // 2, theta
        self._tables: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [>= length, D/2]."""
        key = (torch.device(device), torch.is_inference_mode_enabled())
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = max(256, 1 << (length - 1).bit_length())
            inv_freq = 1.0 / self.theta ** (torch.arange(self.half, device=device, dtype=torch.float32) / self.half)
            angles = torch.arange(size, device=device, dtype=torch.float32)[:, None] * inv_freq
            cached = self._tables[key] = (angles.cos(), angles.sin())
        return cached

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Rotate-half RoPE (the target's layout) of x [B, T, H, D] at positions [B, T], every one < `length`."""
        cos, sin = self.tables(length, x.device)
        return apply_rotary(x, cos[positions], sin[positions])  # [B, T, D/2], broadcast over heads


class DraftBlock(nn.Module):
    """A pre-norm Llama decoder layer on batched windows [B, T, d], attention by SDPA.

    forward(x, positions, key_mask, past) -> (out, (k, v)): `key_mask` [B, S] marks the real keys (False: left
    padding) over the past keys and these T new ones; `past` the (k, v) this call returned before; positions are
    window-relative, < S. Causal within the window; every query also sees itself, so a padding row attends to
    something (no NaN) and is ignored. This is the training forward (autograd, plain torch ops); the proposers
    draft with the same weights packed into a FusedDraftBlock."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.eps, self.rope = config.rms_norm_eps, RopeTables(hd, config.rope_theta)
        self.input_norm = nn.Parameter(torch.ones(d))
        self.post_attention_norm = nn.Parameter(torch.ones(d))
        self.q_proj, self.k_proj = nn.Linear(d, h * hd, bias=False), nn.Linear(d, kv * hd, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, kv * hd, bias=False), nn.Linear(h * hd, d, bias=False)
        self.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        s = t + (past[0].shape[2] if past is not None else 0)
        if key_mask.shape != (b, s):
            raise ValueError(f"key_mask must be [B, S] = [{b}, {s}], got {tuple(key_mask.shape)}")
        y = rms_norm(x, self.input_norm, self.eps)
        q = self.rope(self.q_proj(y).view(b, t, self.num_heads, self.head_dim), positions, s).transpose(1, 2)
        k = self.rope(self.k_proj(y).view(b, t, self.num_kv_heads, self.head_dim), positions, s).transpose(1, 2)
        v = self.v_proj(y).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        query_at = torch.arange(s - t, s, device=x.device)[:, None]
        keys = torch.arange(s, device=x.device)[None, :]
        allowed = ((keys <= query_at) & key_mask[:, None, :]) | (keys == query_at)  # [B, T, S]
        group = self.num_heads // self.num_kv_heads
        attn = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              attn_mask=allowed[:, None], scale=self.head_dim ** -0.5)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        y = rms_norm(x, self.post_attention_norm, self.eps)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y)), (k, v)

    @torch.no_grad()
    def init_from_target_layer(self, layer: nn.Module) -> bool:
        """Start from a target decoder layer's weights (dense float only; returns False and keeps the random
        init otherwise): a warm start that makes minutes of training go further."""
        try:
            qkv, o = layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight
            gate_up, down = layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight
            norms = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        except AttributeError:
            return False
        q_rows, kv_rows = self.q_proj.out_features, self.k_proj.out_features
        ffn = self.gate_proj.out_features
        if not qkv.is_floating_point() or qkv.shape != (q_rows + 2 * kv_rows, self.q_proj.in_features) \
                or gate_up.shape != (2 * ffn, self.gate_proj.in_features) or down.shape != self.down_proj.weight.shape:
            return False
        for mine, theirs in ((self.q_proj, qkv[:q_rows]), (self.k_proj, qkv[q_rows:q_rows + kv_rows]),
                             (self.v_proj, qkv[q_rows + kv_rows:]), (self.o_proj, o), (self.gate_proj, gate_up[:ffn]),
                             (self.up_proj, gate_up[ffn:]), (self.down_proj, down)):
            mine.weight.copy_(theirs)
        self.input_norm.copy_(norms[0])
        self.post_attention_norm.copy_(norms[1])
        return True


class DraftKV:
    """K/V of one proposal, preallocated: [B, kv_heads, capacity, head_dim], filled left to right in place.

    A drafting loop that grows its K/V with torch.cat allocates and copies the whole past every step, and its
    shapes change, which a CUDA graph cannot hold. Here step j writes its keys at column `length` and attends
    over the first length + 1 columns: a view whose shape depends only on j, so the unrolled loop is one static
    graph (the idea of vLLM's preallocated KV cache, on a window)."""

    def __init__(self, batch: int, num_kv_heads: int, capacity: int, head_dim: int, like: torch.Tensor) -> None:
        self.k = like.new_empty(batch, num_kv_heads, capacity, head_dim)
        self.v = like.new_empty(batch, num_kv_heads, capacity, head_dim)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, D] after what is there; return every key and value so far (views)."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"DraftKV holds {self.k.shape[2]} positions; {self.length} + {k.shape[2]} do not fit")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class FusedDraftBlock(nn.Module):
    """A DraftBlock's weights packed for drafting (no autograd): what the engine's own decoder layer does, on a
    window. forward(x [B, T, d], positions [B, T], attn_bias, cache: DraftKV) -> [B, T, d].

    Per layer call: one fused norm, one q|k|v GEMM, RoPE on q and k in one pass (in place on a GPU: the Triton
    kernel of minillm.layers.rotary, from its cached cos|sin table), the new K/V written into `cache`, one SDPA
    call, o_proj, one fused residual-add + norm, one gate|up GEMM, one SiLU-and-multiply, down_proj: about a dozen
    kernels where DraftBlock's plain ops launch some seventy (each norm alone is six). Grouped-query attention
    needs no repeat_interleave: the G query heads that share a KV head become G * T query rows of that head, and
    `attn_bias` (additive, from draft_attention_bias) is laid out for those rows. The weights are copied once, at
    construction: build it after the heads are loaded, not while they train."""

    def __init__(self, block: DraftBlock, max_position: int) -> None:
        super().__init__()
        from minillm.layers.activation import SiluAndMul
        from minillm.layers.rotary import RotaryEmbedding
        self.num_heads, self.num_kv_heads, self.head_dim = block.num_heads, block.num_kv_heads, block.head_dim
        d, device = block.input_norm.shape[0], block.input_norm.device
        with torch.no_grad():
            self.qkv = torch.cat([block.q_proj.weight, block.k_proj.weight, block.v_proj.weight]).detach()
            self.gate_up = torch.cat([block.gate_proj.weight, block.up_proj.weight]).detach()
        self.o_proj, self.down_proj = block.o_proj.weight.detach(), block.down_proj.weight.detach()
        self.input_norm = fused_norm(block.input_norm, block.eps)
        self.post_attention_norm = fused_norm(block.post_attention_norm, block.eps)
        self.rotary = RotaryEmbedding(block.head_dim, max_position, block.rope.theta).to(device)
        self.act = SiluAndMul()

    def new_cache(self, batch: int, capacity: int, like: torch.Tensor) -> DraftKV:
        """An empty DraftKV for `capacity` positions, in `like`'s dtype and device."""
        return DraftKV(batch, self.num_kv_heads, capacity, self.head_dim, like)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn_bias: torch.Tensor, cache: DraftKV
                ) -> torch.Tensor:
        b, t, d = x.shape
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        group = h // kv
        flat = x.reshape(b * t, d)
        qkv = F.linear(self.input_norm(flat), self.qkv)
        q, k = self.rotary(positions.reshape(-1), qkv[:, :h * hd].view(b * t, h, hd),
                           qkv[:, h * hd:(h + kv) * hd].view(b * t, kv, hd))
        v = qkv[:, (h + kv) * hd:].view(b, t, kv, hd)
        keys, values = cache.append(k.reshape(b, t, kv, hd).transpose(1, 2), v.transpose(1, 2))
        # [B, T, KV, G, D] -> [B, KV, G * T, D]: a view when T = 1 (a draft step), one copy for the window
        q = q.reshape(b, t, kv, group, hd).permute(0, 2, 3, 1, 4).reshape(b, kv, group * t, hd)
        attn = draft_sdpa(q, keys, values, attn_bias, hd ** -0.5)
        attn = attn.view(b, kv, group, t, hd).permute(0, 3, 1, 2, 4).reshape(b * t, h * hd)
        y, residual = self.post_attention_norm(F.linear(attn, self.o_proj), flat)
        return (residual + F.linear(self.act(F.linear(y, self.gate_up)), self.down_proj)).view(b, t, d)


# SDPA's backends for drafting on a GPU, cuDNN left out. cuDNN builds an execution plan the first time it meets a
# shape, 70-1,000 ms on the H200 (torch 2.11, 2026-12-03), and a draft's shapes change with the batch bucket: as a
# batch drains (8 -> 4 -> 2 -> 1 requests) each new bucket's CUDA-graph capture paid it in the middle of serving
# (one 300 ms step in a 0.3 s run at batch 8). The memory-efficient kernel takes the same additive mask, needs no
# plan (first call 0.1 ms); timed from Python, call by call, on these shapes it took 38-80 us against cuDNN's 43-51.
DRAFT_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def draft_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """scaled_dot_product_attention with an additive mask, without cuDNN on a GPU (DRAFT_SDPA_BACKENDS says why)."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    with sdpa_kernel(DRAFT_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def fused_norm(weight: torch.Tensor, eps: float) -> nn.Module:
    """The engine's RMSNorm module (one Triton kernel on a GPU, residual add included) reading `weight` in place."""
    from minillm.layers.norm import RMSNorm
    norm = RMSNorm(weight.shape[0], eps)
    norm.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    return norm


def draft_attention_bias(key_mask: torch.Tensor, num_queries: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """FusedDraftBlock's additive mask for the last `num_queries` of S positions: [B, 1, group * T, S] with 0 where
    DraftBlock's boolean rule allows (causal, real keys, and always the query itself) and -inf elsewhere. One
    query (a draft step) gives [B, 1, 1, S], broadcast over the group; build it once per proposal and slice."""
    s = key_mask.shape[1]
    query_at = torch.arange(s - num_queries, s, device=key_mask.device)[:, None]
    keys = torch.arange(s, device=key_mask.device)[None, :]
    allowed = ((keys <= query_at) & key_mask[:, None, :]) | (keys == query_at)  # [B, T, S]
    return grouped_attention_bias(allowed, group, dtype)


def grouped_attention_bias(allowed: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Any boolean mask allowed [B, T, S] (query t may see key s) as FusedDraftBlock's additive bias
    [B, 1, group * T, S]: 0 where allowed, -inf elsewhere, repeated for the `group` query heads that share a KV
    head (row g * T + t). EAGLE's draft trees pass an ancestor mask here (eagle.EagleProposer.draft_tree)."""
    b, t, s = allowed.shape
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    if t == 1:
        return bias[:, None]
    return bias[:, None, None].expand(b, 1, group, t, s).reshape(b, 1, group * t, s)


def window_positions(lengths: list[int] | torch.Tensor, width: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded windows: (positions [B, width] counting from 0 at each row's first real token, key_mask
    [B, width] True on real tokens). RoPE sees only distances, so window-relative positions are exact.
    `lengths`: a list, or an int64 tensor already on `device` (no copy)."""
    lengths_t = (lengths if isinstance(lengths, torch.Tensor) else torch.tensor(lengths, device=device))[:, None]
    pad = width - lengths_t
    index = torch.arange(width, device=device)[None, :]
    return (index - pad).clamp(min=0), index >= pad


# -- files ----------------------------------------------------------------------------------------------
def save_heads(directory: str | os.PathLike, heads: nn.Module, config: HeadConfig) -> Path:
    """Write heads.safetensors (bf16 unless the heads are fp32 and small) and config.json into `directory`."""
    from minillm.loader.model_files import save_safetensors
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(torch.bfloat16).contiguous().cpu() for name, t in heads.state_dict().items()}
    save_safetensors(tensors, path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    return path


def load_head_files(directory: str | os.PathLike, kind: str, target: ModelConfig
                    ) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of the heads in `directory`; raises if they are another kind or were trained on a
    target of another shape."""
    from safetensors.torch import load_file
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: no trained heads here (need {CONFIG_FILE} and {WEIGHTS_FILE}, as "
                                f"`minillm train-heads --kind {kind} --out {path}` writes them)")
    try:
        config = HeadConfig(**json.loads((path / CONFIG_FILE).read_text()))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_FILE}: not a head config ({err})") from None
    if config.kind != kind:
        raise ValueError(f"{path} holds {config.kind!r} heads, but speculative method {kind!r} was asked for")
    if config.target != target_fingerprint(target):
        raise ValueError(f"{path}: heads trained for a target with {config.target}, this target has "
                         f"{target_fingerprint(target)}; train heads for it with `minillm train-heads`")
    return config, load_file(str(path / WEIGHTS_FILE))


def shipped_weights_dir(kind: str, target: ModelConfig) -> Path | None:
    """SHIPPED_DIR / kind (heads, or train-heads' "draft") when it was trained on this target, else None."""
    shipped = SHIPPED_DIR / kind
    if not (shipped / CONFIG_FILE).is_file():
        return None
    trained_for = json.loads((shipped / CONFIG_FILE).read_text()).get("target")
    return shipped if trained_for == target_fingerprint(target) else None


def resolve_heads_dir(kind: str, model: str | None, target: ModelConfig) -> Path:
    """`model` when given; else the shipped weights for `kind` if they were trained on this target; else a
    ValueError that says how to get some."""
    if model is not None:
        return Path(model)
    shipped = shipped_weights_dir(kind, target)
    if shipped is not None:
        return shipped
    raise ValueError(f"no shipped {kind} heads for this target ({target_fingerprint(target)}): train them with "
                     f"`minillm train-heads --kind {kind} --out DIR` and pass speculative_config="
                     f"{{'method': '{kind}', 'model': DIR, ...}}")


def num_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
