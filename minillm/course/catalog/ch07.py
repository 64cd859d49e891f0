"""Chapter 7: quantization formats. Round-to-nearest per group, FP8 with saturation, SmoothQuant's smoothing
scale, and the GGUF blocks (Q4_1, Q4_K) that SmolLM2 ships in; and the interview question every format answers
first: how many bytes the weights take (quantized_weight_bytes)."""
from __future__ import annotations

from minillm.course.spec import Chapter, Exercise

CHAPTER = Chapter(7, "ch07_quantization", "Quantization: integer and float grids, groups, FP8, SmoothQuant, GGUF blocks")

EXERCISES = [
    Exercise(
        id="ch07.quantize_per_group", function="quantize_per_group", source="minillm/quant/rtn.py", points=15,
        nudge="Give every run of group_size input columns of each row its own grid: a scale (and a zero point) "
              "from that run's range only.",
        hint="reshape to [out, in // g, g]; amax/amin over the LAST dim; asymmetric: lo = min(min, 0), "
             "hi = max(max, 0), s = (hi - lo) / (2^b - 1), z = round(-lo / s); clamp s >= tiny.",
        signature="quantize_per_group(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) "
                  "-> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]",
        called_from="minillm.quant.rtn.quantize and compute_qparams (RTN, GPTQ's group grids, AWQ's search, "
                    "LLM(quantization='rtn'))",
    ),
    Exercise(
        id="ch07.dequantize_per_group", function="dequantize_per_group", source="minillm/quant/rtn.py", points=5,
        nudge="Each column needs its group's scale and zero: expand the [out, n_groups] tables to [out, in].",
        hint="column j uses group j // g: repeat_interleave(g, dim=1), not repeat; w = (codes - zero) * scale in fp32.",
        signature="dequantize_per_group(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, "
                  "group_size: int) -> torch.Tensor",
        called_from="minillm.quant.rtn.dequantize (QuantizedWeight.dequantize, every weight-only method)",
    ),
    Exercise(
        id="ch07.fp8_scale", function="scaled_fp8_quant", source="minillm/quant/fp8.py", points=10,
        nudge="Map amax onto the format's largest finite value, and decide what happens to a value beyond it.",
        hint="fp8_max = torch.finfo(fp8_dtype).max; scale = (amax / fp8_max).clamp(min=tiny); "
             "(x / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype): e5m2 turns overflow into inf.",
        signature="scaled_fp8_quant(x: torch.Tensor, amax: torch.Tensor, fp8_dtype: torch.dtype = "
                  "torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]",
        called_from="minillm.quant.fp8.quantize_fp8 (weights at load) and quantize_fp8_per_token (fp8_linear's "
                    "activations, every forward)",
    ),
    Exercise(
        id="ch07.smoothquant_scale", function="smoothquant_scale", source="minillm/quant/smoothquant.py",
        points=5,
        nudge="Split each channel's difficulty between X and W: alpha of it stays with the activations' range, "
              "the rest with the weights'.",
        hint="w_max = cat(|W|).amax(dim=0) over ALL weights' rows; s = x_max^alpha / w_max^(1 - alpha); clamp "
             "both maxima and s to >= 1e-5.",
        signature="smoothquant_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) "
                  "-> torch.Tensor",
        called_from="minillm.quant.smoothquant.smoothing_factors (minillm quantize --method smoothquant)",
    ),
    Exercise(
        id="ch07.dequant_q4_1", function="dequantize_q4_1", source="minillm/loader/dequant.py", points=10,
        nudge="A block is 20 bytes: two fp16 numbers, then 16 bytes holding 32 four-bit codes. Which nibble is which?",
        hint="view(-1, 20); d, m = bytes 0-1, 2-3 as fp16; cat([qs & 15, qs >> 4], dim=1) (low nibbles are "
             "elements 0-15); w = q * d + m.",
        signature="dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor",
        called_from="minillm.loader.dequant.GGML_TYPES (loading SmolLM2's 210 Q4_1 tensors)",
    ),
    Exercise(
        id="ch07.dequant_q4_k", function="dequantize_q4_k", source="minillm/loader/dequant.py", points=15,
        nudge="Two levels of scales: fp16 d and dmin per 256 weights, and a 6-bit scale and min per 32, packed "
              "into 12 bytes.",
        hint="scales 4-7 = (b[8..11] & 15) | (b[0..3] >> 6) << 4, mins 4-7 = (b[8..11] >> 4) | (b[4..7] >> 6) << 4; "
             "chunk c of 32 bytes: low nibbles = sub-block 2c, high = 2c + 1.",
        signature="dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor",
        called_from="minillm.loader.dequant.GGML_TYPES (any Q4_K / Q4_K_M GGUF)",
    ),
    Exercise(
        id="ch07.quantized_weight_bytes", function="quantized_weight_bytes", source="minillm/bench/interview.py",
        points=5,
        nudge="A group's scale and zero point are paid once and shared by all of its weights: what does one weight "
              "cost, everything included?",
        hint="bits per weight = bits + (scale_bits + zero_bits) / group_size; bytes = num_params * that / 8.",
        signature="quantized_weight_bytes(num_params: float, bits: int, group_size: int, scale_bits: int = 16, "
                  "zero_bits: int = 0) -> float",
        called_from="chapter 7 (interview question: the memory table); not called by the engine",
    ),
]
