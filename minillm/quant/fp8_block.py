"""Block-wise FP8 W8A8 ("fp8_block"): one e4m3 scale per weight tile and per token group (chapters 7-8).

Plain FP8 (fp8.py) gives a weight one scale per output channel (over all K inputs) and an activation one scale
per token (over its whole hidden row). DeepSeek-V3 (2024, section 3.3 "fine-grained quantization") trains and
serves in FP8 with finer scales, and vLLM serves such checkpoints (`"quant_method": "fp8"` with
`"weight_block_size": [128, 128]`):

    weights      W [N, K] cut into (block_n x block_k) tiles; s_w[nb, kb] = max|tile| / 448   (once, offline)
    activations  x [M, K] cut into groups of block_k along K; s_x[m, kb] = max|group| / 448 (every forward)
    y[m, n]      = sum_kb s_x[m, kb] * s_w[n // block_n, kb] * (x8[m, kb-group] . W8[n, kb-group])

The scales change along K, so they cannot wait for the epilogue as in a per-channel GEMM (scaled_mm.py): the
kernel (minillm.kernels.fp8_block_gemm) multiplies the e4m3 tiles of one K-block on the tensor cores and
scales that partial product before adding it to the fp32 accumulator. The cost is one scale per block_k
activations and one per block_n x block_k weights (about 0.2% more bytes at 64 x 64).

What finer scales buy on a *float* grid is less than on an integer one. e4m3 rounds every value to 3 mantissa
bits (about 2.4% RMS) whatever the scale, as long as it lies within e4m3's normal range, 2^15 below the 448
the scale maps the maximum to; only below that (subnormals, then zero) does a coarse scale cost precision.
LLM.int8()'s 10-100x outlier channels stay far inside that range; "massive activations" (Sun et al. 2024,
single channels 1e4-1e5x the median) reach it, and there a token group keeps the damage inside the outlier's
group (tests/test_fp8_block.py). Otherwise a finer scale only makes more values exact (each group's maximum
lands on 448) and moves where the others fall on the grid, which on SmolLM2 shifts perplexity by a few tenths
of a percent either way. GPTQ's rounding onto the tile grid (gptq_fp8_block, `fp8_gptq=True`) matters more.

Measured (benchmarks/quant_quality.py, CPU, SmolLM2-135M, 32 x 512 held-out tokens, 16 x 256 calibration):
fp32 18.184; fp8 per-channel 18.754 (+3.14%); fp8 + GPTQ 18.483 (+1.65%); fp8_block 32 x 32 18.571 (+2.13%);
fp8_block + GPTQ 64 x 64 18.503 (+1.76%), 32 x 32 18.446 (+1.44%); + GPTQ act-order 64 x 64 18.390 (+1.13%),
32 x 32 18.400 (+1.19%). Taken apart on 16 x 256 tokens (fake quantization of one side only): activations
per token +0.99%, per group of 64 +0.28%, of 32 +0.75%; weights per channel +2.41%, per 64 x 64 tile +2.85%.

SmolLM2's hidden size 576 = 9 x 64 is not a multiple of DeepSeek's 128: block_k must divide every linear's K
(576 and 1536: 64 or 32) and block_n every checkpoint tensor's rows (q 576, k and v 192, gate/up 1536), so
that q/k/v and gate/up shards load into whole tile rows; a block that does not divide is refused, naming the
divisors that would. Both must be multiples of 16, the kernel's smallest tile (the fp8 tensor cores take K
in steps of 32; a block_k of 16 or 48 is multiplied in tf32 instead).

Checkpoints (`"quant_method": "fp8_block"`, `"weight_block_size": [block_n, block_k]`, `"activation_scheme":
"dynamic"`): `weight` float8_e4m3fn [N, K] and `weight_scale_inv` fp32 [N / block_n, K / block_k], named as in
DeepSeek-V3's files, where (despite the name) the value multiplies: W ~= W8 * s. `LLM(model,
quantization="fp8_block")` quantizes a dense checkpoint at load time (block 64 unless given).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.hooks import dispatch
from minillm.quant.base import (LinearMethod, SkipListQuantizationConfig, add_bias, add_parameter,
                                parse_modules_to_not_convert)
from minillm.quant.fp8 import FP8_DTYPE, Fp8LinearMethod, scaled_fp8_quant

DEFAULT_BLOCK = (64, 64)  # (block_n, block_k): DeepSeek's 128 does not divide SmolLM2's 576


def _divisors(n: int) -> list[int]:
    """The block sizes that fit n: multiples of 16 that divide it."""
    return [d for d in range(16, n + 1, 16) if n % d == 0]


def check_block_size(block: Any) -> tuple[int, int]:
    """(block_n, block_k) from an int (square tiles) or a pair; ValueError unless both are positive multiples
    of 16."""
    pair = (block, block) if isinstance(block, int) and not isinstance(block, bool) else block
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 16 or b % 16 for b in pair)):
        raise ValueError(f"fp8_block: weight_block_size must be an int or [block_n, block_k], each a positive "
                         f"multiple of 16 (e.g. 64 or [128, 128]), got {block!r}")
    return int(pair[0]), int(pair[1])


def check_block_divides(block: tuple[int, int], input_size: int, row_sizes: list[int], name: str = "linear") -> None:
    """ValueError unless block_k divides input_size (K) and block_n each checkpoint tensor's rows (row_sizes)."""
    block_n, block_k = block
    if input_size % block_k:
        raise ValueError(f"fp8_block: block_k={block_k} does not divide {name}'s in_features={input_size}; "
                         f"allowed block_k (multiples of 16 dividing {input_size}): {_divisors(input_size)}")
    for rows in row_sizes:
        if rows % block_n:
            raise ValueError(f"fp8_block: block_n={block_n} does not divide {name}'s {rows} output rows (one "
                             f"checkpoint tensor); allowed block_n (multiples of 16 dividing {rows}): "
                             f"{_divisors(rows)}")


def check_linears(linears: dict[str, nn.Module], block: tuple[int, int]) -> None:
    """check_block_divides for every {name: Linear} of a model (packed layers by their checkpoint tensors)."""
    for name, lin in linears.items():
        check_block_divides(block, lin.input_size, checkpoint_row_sizes(lin, lin.output_size), name)


def check_recipe(smooth_alpha: Any, gptq: Any, mse_scale: Any, act_order: Any = False) -> bool:
    """quantize_model's fp8 recipe options for fp8_block: only fp8_gptq (with or without act_order) applies;
    True when it needs calibration."""
    if smooth_alpha is not None or mse_scale or not isinstance(gptq, bool):
        raise ValueError(f"fp8_block calibrates with fp8_gptq (a bool) only; got fp8_smooth_alpha={smooth_alpha!r}, "
                         f"fp8_mse_scale={mse_scale!r}, fp8_gptq={gptq!r}")
    if act_order and not gptq:
        raise ValueError("fp8_block: act_order orders GPTQ's columns; it needs fp8_gptq=True")
    return gptq


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 float8_e4m3fn [N, K], scale fp32 [N / block_n, K / block_k]) with W ~= W8 * scale per tile."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating [out, in] tensor, got {getattr(w, 'shape', type(w).__name__)}")
    block_n, block_k = check_block_size(block)
    (n, k) = w.shape
    check_block_divides((block_n, block_k), k, [n], "w")
    tiles = w.float().reshape(n // block_n, block_n, k // block_k, block_k)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)  # [N/bn, 1, K/bk, 1]
    w8, scale = dispatch("ch07.fp8_scale", scaled_fp8_quant)(tiles, amax, FP8_DTYPE)
    return w8.reshape(n, k), scale.reshape(n // block_n, k // block_k).contiguous()


def quantize_fp8_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization, torch reference: x [..., K] -> (x8 float8_e4m3fn [..., K], scale fp32
    [..., K / group]), one scale per token per `group` consecutive channels (vLLM's per_token_group_quant_fp8)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating [..., K] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    k = x.shape[-1]
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or k % group:
        raise ValueError(f"group must be a positive int dividing K={k}, got {group!r}")
    groups = x.float().reshape(*x.shape[:-1], k // group, group)
    x8, scale = dispatch("ch07.fp8_scale", scaled_fp8_quant)(groups, groups.abs().amax(dim=-1, keepdim=True),
                                                            FP8_DTYPE)
    return x8.reshape(x.shape), scale.squeeze(-1)


def dequantize_fp8_block(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8 [N, K] * scale [N / block_n, K / block_k] expanded over each tile: the fp32 weights the GEMM sees."""
    (n, k), (nb, kb) = w8.shape, scale.shape
    return (w8.float().reshape(nb, n // nb, kb, k // kb) * scale.float()[:, None, :, None]).reshape(n, k)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) in block-wise FP8: the call site of the block GEMM.

    CUDA: per-token-group e4m3 activations and minillm.kernels.fp8_block_gemm (fp8 tensor cores, the scales of
    each K-block applied to its partial product). Elsewhere the exact emulation: both operands dequantized
    (e4m3 value times its block's scale, exact in fp32) and one fp32 matmul, the same sum in another order."""
    block_n, block_k = block
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.is_cuda:
        from minillm.kernels.fp8_block_gemm import fp8_block_gemm, per_token_group_quant_fp8
        x8, x_scale = per_token_group_quant_fp8(x2, block_k)
        y = fp8_block_gemm(x8, weight, x_scale, weight_scale, block, bias, out_dtype=x.dtype)
        return y.reshape(*shape[:-1], -1)
    x8, x_scale = quantize_fp8_per_token_group(x2, block_k)
    xd = (x8.float().reshape(x2.shape[0], -1, block_k) * x_scale[..., None]).reshape(x2.shape)
    y = (xd @ dequantize_fp8_block(weight, weight_scale).T).to(x.dtype)
    y = y if bias is None else y + bias
    return y.reshape(*shape[:-1], -1)


class _BlockRowLoader:
    """weight_loader for the scale [N / block_n, K / block_k]: shard rows [offset, offset + size) of a packed
    layer (q/k/v, gate/up) are tile rows [offset / block_n, (offset + size) / block_n)."""

    def __init__(self, layer: nn.Module, block_n: int) -> None:
        self.layer, self.block_n = layer, block_n
        self.shard_ids = tuple(getattr(layer, "shard_ids", ()))  # load_weights reads them through __self__

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        offset, size = (0, param.shape[0] * self.block_n) if shard_id is None else self.layer.shard_slice(shard_id)
        target = param.data.narrow(0, offset // self.block_n, size // self.block_n)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"weight_scale_inv shape mismatch for {type(self.layer).__name__} shard {shard_id!r}: "
                             f"got {tuple(loaded.shape)}, expected {tuple(target.shape)}")
        target.copy_(loaded)


def checkpoint_row_sizes(layer: nn.Module, output_size: int) -> list[int]:
    """Rows of each checkpoint tensor packed into `layer` (one entry for an unpacked layer)."""
    ids = getattr(layer, "shard_ids", ())
    return [layer.shard_slice(s)[1] for s in ids] if ids else [output_size]


class Fp8BlockLinearMethod(Fp8LinearMethod):
    """Fp8LinearMethod's life cycle (dense staging weight -> e4m3 + scales once loaded, or e4m3 read as stored)
    with one scale per (block_n x block_k) tile, stored as DeepSeek's `weight_scale_inv`."""
    SCALE_NAME = "weight_scale_inv"
    expert_operands = None  # tile scales: such experts run the loop, each its own block GEMM
    expert_activations_fp8 = False

    def __init__(self, serialized: bool, block: tuple[int, int]) -> None:
        self.serialized, self.block = serialized, block

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        block_n, block_k = self.block
        check_block_divides(self.block, input_size, checkpoint_row_sizes(layer, output_size), layer.prefix or "linear")
        if self.serialized:
            add_parameter(layer, "weight", torch.zeros(output_size, input_size, dtype=FP8_DTYPE))
            scale = add_parameter(layer, "weight_scale_inv",
                                  torch.ones(output_size // block_n, input_size // block_k, dtype=torch.float32))
            scale.weight_loader = _BlockRowLoader(layer, block_n).load
        else:  # a dense staging weight, quantized tile by tile once loaded
            add_parameter(layer, "weight", torch.empty(output_size, input_size, dtype=dtype))
        add_bias(layer, output_size, bias, dtype)

    def quantize_weight(self, weight: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_block(weight, self.block)  # (each block inside one rank's piece: its own range)

    def decode_codes(self, layer: nn.Module, x: torch.Tensor) -> None:
        return None  # block scales, not per-row ones: its own GEMM at every size

    def linear(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_block_linear(x, layer.weight, layer.weight_scale_inv, self.block, bias)


class Fp8BlockConfig(SkipListQuantizationConfig):
    """fp8_block W8A8: a serialized checkpoint (e4m3 weights, tile scales) or a dense one quantized at load."""

    name = "fp8_block"

    def __init__(self, serialized: bool, block: tuple[int, int] = DEFAULT_BLOCK,
                 modules_to_not_convert: tuple[str, ...] = ()) -> None:
        self.serialized, self.block = serialized, check_block_size(block)
        self.modules_to_not_convert = modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Fp8BlockConfig":
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"fp8_block: activation_scheme must be 'dynamic' (per-token-group scales at run "
                             f"time), got {scheme!r}")
        return cls(config.get("quant_method") == "fp8_block", check_block_size(
            config.get("weight_block_size", list(DEFAULT_BLOCK))), parse_modules_to_not_convert(config, "fp8_block"))

    def make_method(self) -> LinearMethod:
        return Fp8BlockLinearMethod(self.serialized, self.block)

    def stored_shapes(self, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        block_n, block_k = self.block
        return {"weight": (output_size, input_size),
                "weight_scale_inv": (output_size // block_n, input_size // block_k)}


def gptq_fp8_block(w: torch.Tensor, H: torch.Tensor, block: tuple[int, int], percdamp: float = 0.01,
                   act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022) onto the tile grid: (W8 float8_e4m3fn [N, K], scale [N / block_n, K / block_k]).

    Tile scales are fixed first (max|tile| / 448 of the original W), as gptq_fp8 (fp8_calibrated.py) fixes its
    row scales. GPTQ's error feedback depends only on H, never on how a column is rounded, so the column loop
    is gptq_fp8's with one change: column j of row r is rounded on its own tile's grid, q = s[r // block_n,
    j // block_k] * e4m3(w / s). Error pushed onto later columns may carry them past their tile's max: they
    saturate at +-448 * s. act_order: columns by decreasing H[j, j] (GPTQ's desc_act); the tile scales stay
    those of the original columns ("static groups"), so nothing about the checkpoint changes.
    """
    from minillm.quant.fp8_calibrated import E4M3_MAX
    from minillm.quant.gptq import _inverse_hessian_cholesky, gptq_column_update
    block_n, block_k = block
    _, scale = quantize_fp8_block(w, block)
    col_scale = scale.repeat_interleave(block_n, dim=0).repeat_interleave(block_k, dim=1)  # [N, K]
    W = w.detach().float().clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: any weight works, take 0 (as gptq.py)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1], device=W.device)
    W, H, col_scale = W[:, perm], H[perm][:, perm], col_scale[:, perm]
    U = _inverse_hessian_cholesky(H, percdamp)
    codes = torch.empty(W.shape, dtype=FP8_DTYPE, device=W.device)
    column_update = dispatch("ch08.gptq_column_update", gptq_column_update)
    for i1 in range(0, W.shape[1], 128):  # GPTQ's lazy batches of 128 columns
        i2 = min(i1 + 128, W.shape[1])
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            s = col_scale[:, i1 + i]
            c = (W1[:, i] / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
            codes[:, i1 + i] = c
            Err1[:, i] = column_update(W1, U1, i, c.float() * s)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes[:, torch.argsort(perm)], scale


def gptq_layer(layer: nn.Module, runner: Any, opts: dict[str, Any]) -> dict[nn.Module, Any]:
    """quantize_model's layer step for fp8_block with fp8_gptq: each linear in turn (true sequential, as
    calibrated_layers._gptq_layer) gets its input Hessian from the calibration batches, gptq_fp8_block, its
    dequantized weights written back and a forward pre-hook that quantizes its input per token group, so the next linear
    and the next layer calibrate on what the fp8_block model will feed them. Returns QuantizedWeight's with
    the tile scales repeated on every row (so the driver can split q/k/v and gate/up by rows)."""
    from minillm.quant.gptq import HessianAccumulator
    from minillm.quant.rtn import QuantizedWeight
    block_n, block_k = opts["weight_block_size"]

    def fake_quant_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        x8, s = quantize_fp8_per_token_group(x, block_k)
        xd = (x8.float().reshape(*x.shape[:-1], -1, block_k) * s[..., None]).reshape(x.shape)
        return (xd.to(x.dtype),) + tuple(args[1:])

    result = {}
    for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        acc = HessianAccumulator(lin.input_size, device=lin.weight.device)
        runner.run(layer, {lin: acc.add})
        codes, scale = gptq_fp8_block(lin.weight.data, acc.H, (block_n, block_k), opts["percdamp"],
                                      opts["act_order"])
        lin.weight.data.copy_(dequantize_fp8_block(codes, scale).to(lin.weight.dtype))
        lin.register_forward_pre_hook(fake_quant_input)  # the walk's private copy of the model
        result[lin] = QuantizedWeight(codes, scale.repeat_interleave(block_n, 0), None, 8, block_k, True)
    return result


def checkpoint_tensors(w: torch.Tensor, block: tuple[int, int], qw: Any = None) -> dict[str, torch.Tensor]:
    """One checkpoint tensor's fp8_block form (suffix -> tensor), for quantize_model's export; qw: the codes
    and row-repeated tile scales gptq_layer chose (None: round to nearest here)."""
    if qw is not None:
        return {"weight": qw.codes, "weight_scale_inv": qw.scales[::block[0]].contiguous()}
    w8, scale = quantize_fp8_block(w, block)
    return {"weight": w8, "weight_scale_inv": scale}


def quantization_config(block: tuple[int, int], gptq: bool = False, act_order: bool = False) -> dict[str, Any]:
    """config.json's quantization_config of an fp8_block checkpoint (minillm_recipe records a GPTQ pass)."""
    return {"quant_method": "fp8_block", "activation_scheme": "dynamic", "weight_block_size": list(block),
            **({"minillm_recipe": {"gptq": True, "act_order": act_order}} if gptq else {})}
