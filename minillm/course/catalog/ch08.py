"""Chapter 8: GPTQ's error feedback, AWQ's activation-aware scales and the INT4 GEMM's in-register unpack."""
from __future__ import annotations

from minillm.course.spec import Chapter, Exercise

CHAPTER = Chapter(8, "ch08_gptq_awq_pruning", "GPTQ, AWQ, the INT4 kernel and 2:4 pruning")

EXERCISES = [
    Exercise(
        id="ch08.gptq_column_update", function="gptq_column_update", source="minillm/quant/gptq.py", points=10,
        writes=("W1",),  # written in place: its output
        nudge="Column i has been rounded; the columns after it can still move. Push its error onto them, "
              "weighted by the inverse Hessian's row.",
        hint="err = (W1[:, i] - q) / U1[i, i]; W1[:, i:] -= err[:, None] * U1[i, i:][None, :] in place "
             "(all later columns, not just i + 1); return err.",
        signature="gptq_column_update(W1: torch.Tensor, U1: torch.Tensor, i: int, q: torch.Tensor) -> torch.Tensor",
        called_from="minillm.quant.gptq.gptq_quantize (every column of every layer, minillm quantize --method gptq)",
    ),
    Exercise(
        id="ch08.awq_scale_step", function="awq_scale_step", source="minillm/quant/awq.py", points=10,
        nudge="Scale the salient input channels up in the weights and down in the activations: the product "
              "must not change.",
        hint="s = s_x ** alpha; s /= sqrt(s.max() * s.min()); return s, x / s, [w * s for w in weights] "
             "(W's columns times s, x divided).",
        signature="awq_scale_step(x: torch.Tensor, weights: list[torch.Tensor], s_x: torch.Tensor, alpha: float) "
                  "-> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]",
        called_from="minillm.quant.awq.search_scales (each alpha of the grid, minillm quantize --method awq)",
    ),
    Exercise(
        id="ch08.int4_unpack_kernel", function="int4_unpack", source="kernels/int4_gemm.py", points=15,
        nudge="Pull nibble I out of every packed word of the tile and turn it into a float without losing a bit.",
        hint="code I is nibble I % 4 of w_lo (I < 4) or w_hi, counted from the LOW bits: "
             "((w >> 4 * (I % 4)) & 0xF).to(tl.float32) - z works; the fast way ANDs with 0x4B000000 | mask.",
        signature="int4_unpack(w_lo, w_hi, z, I)",
        called_from="minillm.kernels.int4_gemm._int4_gemm_kernel calls it directly (a @triton.jit helper is "
                    "resolved at compile time, not through dispatch); graded through launch_int4_gemm in the "
                    "chapter module, which runs the GEMM kernel with the learner's helper",
    ),
    Exercise(
        id="ch08.two_four_mask", function="nm_mask", source="minillm/quant/prune.py", points=10,
        nudge="Cut the last dim into groups of m consecutive scores and keep the n best of each group.",
        hint="groups = scores.reshape(..., last // m, m); topk(n, dim=-1).indices; scatter True into a zeros "
             "bool mask of the groups' shape; reshape back.",
        signature="nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor",
        called_from="minillm.quant.prune.prune_linear (minillm quantize --method prune-2:4)",
    ),
]
