"""Configuration resolved once: the engine's options with every default filled in, and the cache geometry.

A user says as little as they like (`LLM()`, `LLM(max_model_len=4096)`, an EngineConfig with None fields). Before
anything is built, `resolve_engine_config` turns that into a concrete EngineConfig for this model and device:

    max_model_len      the model's context; on a CPU at most CPU_MAX_MODEL_LEN (a contiguous cache reserves it)
    max_num_seqs       64 on a GPU, CPU_MAX_NUM_SEQS on a CPU
    kv_layout          "paged" for continuous batching, "contiguous" for static batching (chapter 2's baseline)
    enforce_eager      False on CUDA (CUDA graphs for decode, as vLLM), True on a CPU or with a backend/compile
                       setting that graphs cannot capture
    piecewise_cuda_graphs  on wherever decode graphs are: steps with prefill tokens (up to 512 of them) replay
                       graphs between eager attention calls. H200, Llama-3-8B shape: continuous batching 1.57-1.64x
                       the tokens/s of decode-only graphs' 1.10x against static; a prefix-cached prompt's TTFT
                       7 ms instead of 37 (benchmarks/RESULTS.md); with them, a step that is one fresh prompt
                       replays a whole-forward graph (minillm/engine/prompt_graph.py)
    async_scheduling   on for CUDA with continuous scheduling and one worker rank: the host schedules and
                       launches step N+1 while the GPU runs step N (a speculative engine only for steps that verify
                       nothing: a verify step's token count is not known in advance). H200: SmolLM2's shapes at
                       batch 1 / 32 1.19x / 1.53x the tokens/s of synchronous steps, Llama-3-8B's batch-1 decode +4-8 points of the weight-read
                       floor, P6's 256 requests 1.24x. Off on a CPU, where host and model share the same cores.
The operator backend stays as given: "auto" is decided per call by the tensors' device (minillm.layers.backend).

Then, once the worker knows how many device blocks fit (minillm.engine.kv_cache.num_device_blocks, which on
CUDA profiles a forward), `make_cache_config` fixes the cache geometry: block size, device blocks, CPU blocks (swap
space; the prefix cache's CPU tier), max_model_len, layout. That one frozen CacheConfig is passed down to the
worker (KV tensors, CUDA graphs) and to the scheduler (block manager): nothing else decides these numbers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.platform import host_memory_bytes
from minillm.quant.base import make_quant_config

CPU_MAX_MODEL_LEN = 2048  # default cap on CPU: a contiguous cache reserves max_model_len tokens per slot
CPU_MAX_NUM_SEQS = 8  # default batch on CPU (a GPU default of 64 would reserve far too much memory here)
GPU_MAX_NUM_SEQS = 64
MAX_SWAP_FRACTION = 0.7  # of the host's memory, at most, for preemption_mode="swap"'s CPU pool
DEFAULT_KV_LAYOUT = {"static": "contiguous", "continuous": "paged"}


def resolve_engine_config(config: EngineConfig, model_config: ModelConfig, device: torch.device) -> EngineConfig:
    """A copy of `config` with every device- and model-dependent default decided (see the module docstring)."""
    on_cuda = torch.device(device).type == "cuda"
    max_model_len = config.max_model_len
    if max_model_len is None:
        max_model_len = model_config.max_position_embeddings
        if not on_cuda:
            max_model_len = min(max_model_len, CPU_MAX_MODEL_LEN)
    elif max_model_len > model_config.max_position_embeddings:
        capped = " (capped at its sliding window by disable_sliding_window)" if config.disable_sliding_window else ""
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context of "
                         f"{model_config.max_position_embeddings} tokens{capped}")
    _check_window_beside_trees(config, model_config)
    max_num_seqs = config.max_num_seqs
    if max_num_seqs is None:
        max_num_seqs = GPU_MAX_NUM_SEQS if on_cuda else CPU_MAX_NUM_SEQS
    kv_layout = config.kv_layout or DEFAULT_KV_LAYOUT[config.scheduling]
    # a block past the context holds more than any sequence (the default size stays allowed for short contexts)
    if kv_layout == "paged" and config.block_size > max(max_model_len, EngineConfig.block_size):
        raise ValueError(f"block_size={config.block_size} exceeds max_model_len={max_model_len}: a paged block "
                         f"holds at most one sequence's tokens (typical sizes: 16 or 32)")
    if config.moe_capacity_factor is not None and model_config.num_local_experts == 0:
        raise ValueError(f"moe_capacity_factor={config.moe_capacity_factor} is only read by mixture-of-experts "
                         f"models; {model_config.architecture!r} has no experts")
    # an MoE layer's expert loop has data-dependent shapes, which a graph cannot capture (minillm.models.moe);
    # its fused path (kernels/fused_moe.py: every row routed, all experts in this process, dense or 8-bit codes
    # with row scales) has none
    quant_config = make_quant_config(model_config) if model_config.num_local_experts else None
    moe_loop = model_config.num_local_experts > 0 and (
        config.expert_parallel_size > 1 or config.moe_capacity_factor is not None
        or (quant_config is not None and not quant_config.fuses_experts(config.tensor_parallel_size)))
    enforce_eager = config.enforce_eager
    if enforce_eager is None:
        # graphs freeze Python-side lengths, which only the triton path keeps on the device ("auto" on CUDA)
        enforce_eager = not on_cuda or config.attention_backend not in ("auto", "triton") or config.compile
        enforce_eager = enforce_eager or moe_loop
    elif not enforce_eager and on_cuda and moe_loop:
        raise ValueError(f"enforce_eager=False with expert_parallel_size={config.expert_parallel_size}, "
                         f"moe_capacity_factor={config.moe_capacity_factor}, quantization="
                         f"{model_config.quantization!r}: the expert loop's shapes follow the routing, which a CUDA "
                         f"graph cannot capture; leave enforce_eager unset or True, or use expert_parallel_size=1, "
                         f"no capacity factor and dense, int8_rtn, fp8 or 4-bit (rtn, gptq, awq) "
                         f"experts (the fused MoE path)")
    piecewise = config.piecewise_cuda_graphs
    if piecewise is None:
        piecewise = not enforce_eager
    overlap = config.async_scheduling
    if overlap is None:
        ranks = config.tensor_parallel_size * config.pipeline_parallel_size * config.expert_parallel_size
        overlap = on_cuda and config.scheduling == "continuous" and ranks == 1
    return dataclasses.replace(config, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_layout=kv_layout,
                               enforce_eager=enforce_eager, piecewise_cuda_graphs=piecewise,
                               async_scheduling=overlap)


def _check_window_beside_trees(config: EngineConfig, model_config: ModelConfig) -> None:
    """Token-tree speculation has no sliding window (a tree node's window would count from its depth, not its
    slot: kernels/sliding_window.py); chains verify exactly, so only the tree methods are refused."""
    from minillm.speculative.config import TREE_METHODS, SpeculativeConfig  # lazy: a leaf module
    spec = SpeculativeConfig.from_engine_config(config)
    if spec is None or spec.method not in TREE_METHODS:
        return
    windows = {model_config.sliding_window_of(i) for i in range(model_config.num_hidden_layers)} - {None}
    if windows:
        raise ValueError(f"speculative method {spec.method!r} verifies token trees, which this model's sliding-window "
                         f"attention (window {min(windows)}) cannot mask; use a chain method (ngram, eagle, medusa, "
                         f"mtp, draft_model, ...)")


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache's geometry, decided once per engine."""

    block_size: int  # token slots per block (max_model_len for the contiguous layout: one block per slot)
    num_gpu_blocks: int  # blocks in the device pool ("gpu" as in vLLM: the device the model runs on)
    num_cpu_blocks: int  # blocks of CPU swap space (preemption_mode="swap"), 0 otherwise
    max_model_len: int
    kv_layout: str  # "paged" | "contiguous"
    num_offload_blocks: int = 0  # blocks of the prefix cache's CPU tier (kv_offloading_size), 0: off
    # every layer's sliding window: the paged pool gives back the blocks that slid out of it (block_window.py)
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "num_gpu_blocks", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"CacheConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_cpu_blocks", "num_offload_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"CacheConfig.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)


def kv_block_size(config: EngineConfig) -> int:
    """Slots per block: the engine's block_size, or max_model_len for the contiguous layout."""
    return config.max_model_len if config.kv_layout == "contiguous" else config.block_size


def needs_sized_pool(config: EngineConfig) -> bool:
    """Whether the device pool's size comes from memory (paged continuous batching) rather than from the
    batch shape (static batching or a contiguous layout reserve max_model_len per batch slot)."""
    return config.kv_layout == "paged" and config.scheduling == "continuous"


def check_swap_space(swap_space: int, offload_bytes: int = 0) -> None:
    """The CPU pool for swapped-out blocks is allocated at the first preemption, in the middle of serving (the
    prefix cache's CPU tier, `offload_bytes`, at the first eviction): pools that cannot fit in the machine must
    fail now, not then. Over MAX_SWAP_FRACTION of its memory, both together, is refused (vLLM's rule: the host
    needs the rest for the process itself, the weights while loading, the pinned staging)."""
    total = host_memory_bytes()
    if total is not None and swap_space + offload_bytes > MAX_SWAP_FRACTION * total:
        what = f"swap_space={swap_space} bytes" + (f" + kv_offloading_size={offload_bytes / 2**30:g} GiB"
                                                   if offload_bytes else "")
        raise ValueError(f"{what} ({(swap_space + offload_bytes) / 2**30:.1f} GiB) is more than "
                         f"{MAX_SWAP_FRACTION:.0%} of this machine's {total / 2**30:.1f} GiB of memory; give at most "
                         f"{int(MAX_SWAP_FRACTION * total)} bytes in all (or preemption_mode='recompute', a smaller "
                         f"kv_offloading_size)")


def make_cache_config(config: EngineConfig, num_gpu_blocks: int | None, bytes_per_block: int,
                      sliding_window: int | None = None) -> CacheConfig:
    """The geometry of a resolved config, given the device blocks the worker found room for (None when
    `needs_sized_pool` is False). Static batching and the contiguous layout reserve max_model_len tokens for
    each of max_num_seqs slots, whatever the memory says (that is their waste, measured in chapter 5).
    sliding_window: the model's window when every layer slides (ModelConfig.uniform_sliding_window); the paged
    continuous-batching pool then gives back what slides out of it."""
    if config.max_model_len is None or config.kv_layout is None or config.max_num_seqs is None:
        raise ValueError("make_cache_config needs a resolved EngineConfig (see resolve_engine_config)")
    block_size = kv_block_size(config)
    if not needs_sized_pool(config):
        num_gpu_blocks = config.max_num_seqs * -(-config.max_model_len // block_size)
    elif num_gpu_blocks is None:
        raise ValueError("a paged continuous-batching pool needs num_gpu_blocks from the worker")
    swap = config.swap_space if config.preemption_mode == "swap" and config.kv_layout == "paged" else 0
    # the prefix cache's CPU tier: GiB of host memory, in blocks of this model's K/V across its layers
    offload = int((config.kv_offloading_size or 0) * 2**30) if config.kv_layout == "paged" else 0
    if swap or offload:
        check_swap_space(swap, offload)
    num_offload_blocks = offload // bytes_per_block
    if offload and num_offload_blocks < 1:
        raise ValueError(f"kv_offloading_size={config.kv_offloading_size} GiB holds no block of this model's KV "
                         f"cache ({bytes_per_block} bytes per block of {block_size} tokens); give at least "
                         f"{bytes_per_block / 2**30:.3g} GiB")
    window = sliding_window if needs_sized_pool(config) else None
    return CacheConfig(block_size, num_gpu_blocks, swap // bytes_per_block, config.max_model_len, config.kv_layout,
                       num_offload_blocks, window)
