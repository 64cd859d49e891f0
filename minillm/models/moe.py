"""Mixtral and Qwen3-MoE: the Llama decoder with a sparse mixture-of-experts MLP (chapter 11, expert parallelism).

Everything but the feed-forward sub-block is Llama's (attention with GQA and RoPE, RMSNorm, the residual
stream): the classes here swap in one piece, `MixtralSparseMoeBlock`, through LlamaDecoderLayer.build_mlp.

    x ─► gate (hidden -> E) ─► route_topk: k experts per token, weights renormalised to sum to 1
      ─► each chosen expert: w2(silu(w1 x) * w3 x)  (a SwiGLU MLP of intermediate_size, like Llama's)
      ─► sum of the k outputs times their weights

Checkpoint names are Hugging Face's MixtralForCausalLM ones, `model.layers.{l}.block_sparse_moe.gate.weight` and
`...block_sparse_moe.experts.{e}.w1/w2/w3.weight`; here the block is the layer's `mlp` (as transformers 5 calls
it) and w1/w3 are packed into one `w13` like gate_up_proj. Qwen3-MoE is the same block under Llama's names
(`mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj`) on Qwen3's attention (ModelConfig.qk_norm), its
experts moe_intermediate_size wide, and its router may keep the k probabilities unnormalised (norm_topk_prob).
Where the experts run is decided at construction by the parallel state: all of them in this process, or this
rank's share (minillm.parallel.expert), the others being `ExpertOnAnotherRank` placeholders that hold nothing and
that the loader skips. With tensor parallelism each expert is split like Llama's MLP (w13 by columns, w2 by rows)
and the block all-reduces once, after the combine.

The expert compute is a loop over experts, each a gather of its rows and two matmuls (HF's and vLLM's reference
path, the CPU's). On the Triton backend (a GPU) the block runs kernels/fused_moe.py instead: the rows sorted by
expert and padded into blocks, then one grouped GEMM per projection over all experts (vLLM's fused_moe), three
launches whatever the routing and no host sync; the experts' weights are then views into per-layer stacks.
Quantized experts (each expert's linears take the model's method, as a dense MLP's do: `LLM(moe_model,
quantization=...)`; the router stays dense) take the fused path where their method gives 8-bit codes with row
scales (int8_rtn, fp8) or 4-bit codes in GPTQ's layout (rtn, gptq, awq; act-order on one rank;
LinearMethod.expert_operands), and the loop otherwise (other bit widths, nf4, block scales, LLM.int8's outlier
columns). The loop also stays for expert capacity (it drops rows), and with it the engine runs eagerly: the
loop's shapes depend on the routing. Under expert parallelism the rows each rank receives from the all-to-all run
the grouped GEMM too (top-1, weight 1), but the all-to-all's sizes follow the routing, so that engine runs eagerly
as well. The fused path's shapes do not, so its decode steps are CUDA graphs like a dense model's
(engine/cache_config.py; the counts of ExpertLoad then include the padding rows of a graph's batch bucket).
Mixed prefill steps and token trees stay eager for MoE models.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.layers.activation import SiluAndMul
from minillm.layers.backend import use_triton
from minillm.layers.linear import Linear
from minillm.layers.moe import ExpertLoad, combine_expert_outputs, expert_capacity, route, run_experts
from minillm.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from minillm.parallel.expert import expert_parallel_moe, expert_range
from minillm.parallel.pipeline import PPMissingLayer
from minillm.parallel.state import get_parallel_state, tensor_parallel_all_reduce
from minillm.parallel.tensor import MergedColumnParallelLinear, RowParallelLinear
from minillm.quant.base import QuantizationConfig


class MixtralExpert(nn.Module):
    """One expert: w2(silu(w1 x) * w3 x), with w1 (gate) and w3 (up) packed into w13; each linear quantized like a
    dense model's (`quant_config`'s method for its prefix) or dense."""

    def __init__(self, config: ModelConfig, backend: str, prefix: str,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        size = config.intermediate_size
        self.w13 = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=False, quant_config=quant_config,
                                              prefix=f"{prefix}.w13")
        self.w2 = RowParallelLinear(size, config.hidden_size, bias=False, quant_config=quant_config,
                                    prefix=f"{prefix}.w2")
        # w2 without RowParallelLinear's all-reduce: the block reduces every expert's partial sums at once
        self.w2.reduce_output = False
        self.act_fn = SiluAndMul(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (both linears called as modules, so that forward hooks see their inputs: GPTQ's Hessians per expert)
        return self.w2(self.act_fn(self.w13(x)))


class ExpertOnAnotherRank(PPMissingLayer):
    """Stands where an expert held by another expert-parallel rank would be: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this expert lives on another expert-parallel rank")


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig, backend: str, prefix: str,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        # the router stays dense and replicated under every quantization (as in vLLM): E outputs, a sliver of the
        # weights, whose rounding would move which experts a token reaches
        self.gate = Linear(config.hidden_size, self.num_experts, bias=False, prefix=f"{prefix}.gate")
        state = get_parallel_state()
        self.ep_size, self.tp_size = state.ep_size, state.tp_size
        self.first_expert, self.end_expert = expert_range(self.num_experts, state.ep_size, state.ep_rank)
        self.experts = nn.ModuleList(
            MixtralExpert(config, backend, f"{prefix}.experts.{e}", quant_config)
            if self.first_expert <= e < self.end_expert else ExpertOnAnotherRank() for e in range(self.num_experts))
        self.capacity_factor: float | None = None  # EngineConfig.moe_capacity_factor (set by the worker)
        self.load = ExpertLoad(self.first_expert, self.end_expert - self.first_expert)
        # The fused path reads per-layer stacks of the local experts' operands (LinearMethod.expert_operands): w13
        # [E, 2I, H] and w2 [E, H, I], with [E, 2I] and [E, H] row scales for 8-bit codes, the experts' parameters
        # made views into them. Dense weights are stacked now, so loading or updating an expert writes into the
        # stack (never a copy); quantized codes exist only once loaded (stack_experts, after quantization). Methods
        # without operands (nf4, 3-bit, block scales, outlier columns), and those whose operands this tensor-parallel
        # split breaks (QuantizationConfig.fuses_experts, the engine's rule too), run the loop, each expert its own
        # method's GEMMs.
        local = list(self.experts[self.first_expert:self.end_expert])
        operands = {(type(e.w13.quant_method), type(e.w2.quant_method)) for e in local}
        self.fusable = (quant_config is None or quant_config.fuses_experts(self.tp_size)) and len(operands) == 1 \
            and all(e.w13.quant_method.expert_operands is not None and
                    e.w2.quant_method.expert_operands is not None for e in local[:1])
        self._stacks = _stacked(local) if self.fusable and local[0].w13.is_dense else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        local = list(self.experts[self.first_expert:self.end_expert])
        if self.ep_size > 1:
            stacks = self._fused_stacks(hidden_states)
            grouped = None if stacks is None else functools.partial(self._grouped_rows, stacks)
            out, counts, dropped = expert_parallel_moe(hidden_states, self.gate, self.top_k, self.num_experts, local,
                                                       self.capacity_factor, self.renormalize, grouped)
        else:
            out, counts, dropped = self._local_moe(hidden_states, local)
        self.load.record(counts, dropped)
        return tensor_parallel_all_reduce(out) if self.tp_size > 1 else out

    def _local_moe(self, x: torch.Tensor, local: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every expert in this process: (output, rows per expert, rows dropped). The grouped GEMMs of
        kernels/fused_moe.py on the Triton backend (the experts' SiLU says which) when every row is routed (no
        capacity) through dense half- or full-precision weights, 8-bit codes (int8_rtn, fp8) or GPTQ-packed 4-bit
        words, else the loop (minillm/layers/moe.py), which runs any linear method."""
        weights, expert_ids = route(self.gate(x), self.top_k, self.renormalize)
        stacks = self._fused_stacks(x)
        if stacks is not None:
            return (*self._fused(x, stacks, weights, expert_ids), 0)
        rows = x.repeat_interleave(self.top_k, dim=0)  # token-major rows: row t * k + j is token t's j-th expert
        capacity = expert_capacity(x.shape[0], self.top_k, self.num_experts, self.capacity_factor)
        rows_out, counts, dropped = run_experts(rows, expert_ids.reshape(-1), local, capacity)
        return combine_expert_outputs(rows_out, weights), counts, dropped

    def _fused_stacks(self, x: torch.Tensor) -> tuple | None:
        """The stacks where this step's experts run kernels/fused_moe.py (fusable operands, the Triton backend: the
        experts' SiLU says which, every row routed: no capacity, activations in a float dtype the stacks serve);
        None for the loop."""
        local = self.experts[self.first_expert:self.end_expert]
        if not (self.fusable and use_triton(local[0].act_fn.backend, x) and self.capacity_factor is None and
                x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
            return None
        stacks = self._expert_stacks(list(local))
        return stacks if stacks[0][0].dtype in (x.dtype, torch.int8, torch.float8_e4m3fn, torch.int32) else None

    def _grouped_rows(self, stacks: tuple, rows: torch.Tensor,
                      expert_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert parallelism's received rows, each for one local expert: the grouped GEMM over `stacks`
        (_fused_stacks') with top-1 routing of weight 1 (each row's own expert's output)."""
        if rows.shape[0] == 0:  # no rank routed a row here this step
            return torch.zeros_like(rows), torch.zeros(self.end_expert - self.first_expert, dtype=torch.int64,
                                                       device=rows.device)
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        return self._fused(rows, stacks, ones, expert_of_row[:, None])

    def _fused(self, x: torch.Tensor, stacks: tuple, weights: torch.Tensor,
               expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kernels/fused_moe.py over the stacks ((w13's operands), (w2's)): (output, rows per expert)."""
        from minillm.kernels.fused_moe import fused_moe
        from minillm.quant.fp8 import per_token_fp8
        (w13, *w13_rest), (w2, *w2_rest) = stacks
        method = self.experts[self.first_expert].w13.quant_method
        if w13.dtype == torch.int32:  # GPTQ's 4-bit layout: (qweight, scales, qzeros[, act_perm])
            return fused_moe(x, w13, w2, weights, expert_ids, w13_scale=w13_rest[0], w2_scale=w2_rest[0],
                             w13_zeros=w13_rest[1], w2_zeros=w2_rest[1], group_size=method.group_size,
                             w13_perm=w13_rest[2] if len(w13_rest) > 2 else None,
                             w2_perm=w2_rest[2] if len(w2_rest) > 2 else None)
        return fused_moe(x, w13, w2, weights, expert_ids, w13_scale=w13_rest[0] if w13_rest else None,
                         w2_scale=w2_rest[0] if w2_rest else None,
                         quantize_rows=per_token_fp8 if method.expert_activations_fp8 else None)

    def stack_experts(self) -> None:
        """Build the fused path's stacks now (the model's process_weights_after_loading calls it, once quantized
        experts hold their codes); a no-op for the loop."""
        if self.fusable:
            self._expert_stacks(list(self.experts[self.first_expert:self.end_expert]))

    def _expert_stacks(self, local: list[nn.Module]) -> tuple:
        """The stacks, stacked again if the experts' parameters were given new tensors since (e.g. model.to(), or
        a quantized model used before its weights were processed)."""
        names = local[0].w13.quant_method.expert_operands[0], local[0].w2.quant_method.expert_operands[0]
        if self._stacks is None or getattr(local[0].w13, names[0]).data_ptr() != self._stacks[0][0].data_ptr() or \
                getattr(local[-1].w2, names[1]).data_ptr() != self._stacks[1][0][-1].data_ptr():
            self._stacks = _stacked(local)
        return self._stacks

    def extra_repr(self) -> str:
        held = f", experts {self.first_expert}..{self.end_expert - 1} here" if self.ep_size > 1 else ""
        norm = "" if self.renormalize else ", weights not renormalised"
        return f"experts={self.num_experts}, top_k={self.top_k}{norm}{held}"


def _stacked(experts: list[MixtralExpert]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(w13's operands, w2's), each one tensor per name in their method's expert_operands holding every expert's
    parameter of that name (w13 [E, 2I, H] and w2 [E, H, I] for dense weights; 8-bit codes the same with row scales
    [E, 2I] and [E, H]; GPTQ's qweight [E, in / 8, out], scales and qzeros per group): the experts' parameters
    become views into them (the parameter objects, and their weight loaders, stay the same)."""
    result = []
    for proj in ("w13", "w2"):
        stacks = []
        for name in getattr(experts[0], proj).quant_method.expert_operands:
            params = [getattr(getattr(expert, proj), name) for expert in experts]
            stack = torch.empty((len(params), *params[0].shape), dtype=params[0].dtype, device=params[0].device)
            for i, param in enumerate(params):
                stack[i].copy_(param.detach())
                param.data = stack[i]
            stacks.append(stack)
        result.append(tuple(stacks))
    return result[0], result[1]


class MixtralDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: ModelConfig, backend: str, quant_config: QuantizationConfig | None,
                  prefix: str) -> nn.Module:
        return MixtralSparseMoeBlock(config, backend, prefix, quant_config)


class MixtralModel(LlamaModel):
    layer_class = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    """forward(input_ids [T], positions [T]) -> hidden [T, hidden]; compute_logits as Llama's."""

    model_class = MixtralModel
    packed_modules_mapping = {**LlamaForCausalLM.packed_modules_mapping, "w1": ("w13", 0), "w3": ("w13", 1)}

    def __init__(self, config: ModelConfig, backend: str = "auto") -> None:
        if not config.num_local_experts:
            raise ValueError(f"{type(self).__name__} needs num_local_experts >= 1, got {config.num_local_experts}")
        super().__init__(config, backend)

    def _map_name(self, name: str) -> tuple[str, object]:
        return super()._map_name(name.replace(".block_sparse_moe.", ".mlp."))

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's name of an (unpacked) parameter name: _map_name's renaming undone."""
        return name.replace(".mlp.", ".block_sparse_moe.")

    def process_weights_after_loading(self) -> None:
        """Llama's (each linear quantizes its weights), then each MoE block stacks its experts' codes."""
        super().process_weights_after_loading()
        for module in self.modules():
            if isinstance(module, MixtralSparseMoeBlock):
                module.stack_experts()


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    """Qwen3-MoE (Qwen3MoeForCausalLM): Mixtral's block on Qwen3's attention; the experts' checkpoint names are
    Llama's MLP names, mapped onto the expert's w13 / w2 here (the layer's dense names keep Llama's mapping)."""

    _EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def _map_name(self, name: str) -> tuple[str, object]:
        parts = name.split(".")
        if "experts" in parts:
            parts = [self._EXPERT_NAMES.get(part, part) for part in parts]
        return super()._map_name(".".join(parts))

    def checkpoint_name(self, name: str) -> str:
        parts = name.split(".")
        if "experts" in parts:
            checkpoint = {ours: theirs for theirs, ours in self._EXPERT_NAMES.items()}
            parts = [checkpoint.get(part, part) for part in parts]
        return ".".join(parts)
