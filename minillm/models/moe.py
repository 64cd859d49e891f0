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
launches whatever the routing and no host sync; the experts' weights are then views into per-layer stacks. The
loop stays for expert capacity (it drops rows), for expert parallelism (the all-to-all path) and for quantized
experts (each expert's linears take the model's method, as a dense MLP's do: `LLM(moe_model, quantization=...)`;
the router stays dense), and with it the engine runs eagerly: the loop's shapes depend on the routing. The fused
path's do not, so its decode steps are CUDA graphs like a dense model's (engine/cache_config.py; the counts of
ExpertLoad then include the padding rows of a graph's batch bucket). Mixed prefill steps and token trees stay
eager for MoE models.
"""
from __future__ import annotations

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
        self.act_fn = SiluAndMul(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # w2's matmul without RowParallelLinear's all-reduce: the block reduces every expert's partial sums at once
        return self.w2.quant_method.apply(self.w2, self.act_fn(self.w13(x)), None)


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
        # (w13 [E, 2I, H], w2 [E, H, I]) of the local experts, whose parameters are views into them from the start:
        # the fused path reads the stacks, and loading or updating an expert writes into them (never a copy).
        # Quantized experts have no dense weight to stack: they run the loop, each expert its own method's GEMMs
        local = list(self.experts[self.first_expert:self.end_expert])
        self.fusable = all(e.w13.is_dense and e.w2.is_dense for e in local)
        self._stacks = _stacked(local) if self.fusable else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        local = list(self.experts[self.first_expert:self.end_expert])
        if self.ep_size > 1:
            out, counts, dropped = expert_parallel_moe(hidden_states, self.gate, self.top_k, self.num_experts, local,
                                                       self.capacity_factor, self.renormalize)
        else:
            out, counts, dropped = self._local_moe(hidden_states, local)
        self.load.record(counts, dropped)
        return tensor_parallel_all_reduce(out) if self.tp_size > 1 else out

    def _local_moe(self, x: torch.Tensor, local: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every expert in this process: (output, rows per expert, rows dropped). The grouped GEMMs of
        kernels/fused_moe.py on the Triton backend (the experts' SiLU says which) when every row is routed (no
        capacity) through dense half- or full-precision weights, else the loop (minillm/layers/moe.py), which runs
        any linear method (quantized experts)."""
        weights, expert_ids = route(self.gate(x), self.top_k, self.renormalize)
        expert = local[0]
        if self.fusable and use_triton(expert.act_fn.backend, x) and self.capacity_factor is None and \
                x.dtype == expert.w13.weight.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            from minillm.kernels.fused_moe import fused_moe
            out, counts = fused_moe(x, *self._expert_stacks(local), weights, expert_ids)
            return out, counts, 0
        rows = x.repeat_interleave(self.top_k, dim=0)  # token-major rows: row t * k + j is token t's j-th expert
        capacity = expert_capacity(x.shape[0], self.top_k, self.num_experts, self.capacity_factor)
        rows_out, counts, dropped = run_experts(rows, expert_ids.reshape(-1), local, capacity)
        return combine_expert_outputs(rows_out, weights), counts, dropped

    def _expert_stacks(self, local: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacks, stacked again if the experts' parameters were given new tensors since (e.g. model.to())."""
        if local[0].w13.weight.data_ptr() != self._stacks[0].data_ptr() or \
                local[-1].w2.weight.data_ptr() != self._stacks[1][-1].data_ptr():
            self._stacks = _stacked(local)
        return self._stacks

    def extra_repr(self) -> str:
        held = f", experts {self.first_expert}..{self.end_expert - 1} here" if self.ep_size > 1 else ""
        norm = "" if self.renormalize else ", weights not renormalised"
        return f"experts={self.num_experts}, top_k={self.top_k}{norm}{held}"


def _stacked(experts: list[MixtralExpert]) -> tuple[torch.Tensor, torch.Tensor]:
    """One w13 [E, 2I, H] and one w2 [E, H, I] tensor holding the experts' weights, each expert's parameters made
    views into them (the parameter objects, and their weight loaders, stay the same)."""
    stacks = []
    for name in ("w13", "w2"):
        first = getattr(experts[0], name).weight
        stack = torch.empty((len(experts), *first.shape), dtype=first.dtype, device=first.device)
        for i, expert in enumerate(experts):
            param = getattr(expert, name).weight
            stack[i].copy_(param.detach())
            param.data = stack[i]
        stacks.append(stack)
    return stacks[0], stacks[1]


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


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    """Qwen3-MoE (Qwen3MoeForCausalLM): Mixtral's block on Qwen3's attention; the experts' checkpoint names are
    Llama's MLP names, mapped onto the expert's w13 / w2 here (the layer's dense names keep Llama's mapping)."""

    _EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def _map_name(self, name: str) -> tuple[str, object]:
        parts = name.split(".")
        if "experts" in parts:
            parts = [self._EXPERT_NAMES.get(part, part) for part in parts]
        return super()._map_name(".".join(parts))
