"""The KV cache tensors: how many blocks, one allocation, per-layer views, swap and copy (chapters 2 and 5).

Layout (see minillm/forward_context.py, the contract with the attention layers and kernels):

    storage: [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]   (one allocation)
    layer i: k_cache = storage[0, i], v_cache = storage[1, i]                    (views, no copies)

One big tensor instead of 2 * num_layers small ones makes block-level operations one indexing expression for all
layers at once: swapping block b out to CPU memory is `cpu[:, :, c] = gpu[:, :, b]`, and copy-on-write of a shared
block is `storage[:, :, dst] = storage[:, :, src]`.

The *contiguous* cache of chapter 2 is the same thing with block_size = max_model_len and one block per batch slot:
every sequence reserves room for the longest possible sequence, which is exactly the waste chapter 5 measures.

FP8 KV cache (`kv_cache_dtype="fp8"`, minillm.layers.kv_quant): the storage is float8_e4m3fn, so a block costs one
byte per element and the same memory holds 2x the blocks of bf16 (4x of fp32). Next to it lives
`scales` [2, num_layers, num_kv_heads] fp32 (k_scale, v_scale per layer and kv head), set once by
minillm.engine.kv_scales before the first step; each layer's attention gets views of its rows, so CUDA graphs
capture the scales by address. Swapping and copy-on-write move the fp8 bytes as they are: the scales belong to
the layer, not to the block, so nothing else has to move.

The prefix cache's CPU tier (EngineConfig.kv_offloading_size, minillm.engine.offload_tier) is a second host pool of
the same layout, `offload_storage`: `offload` copies evicted cached blocks into it, `onload` copies them back into
fresh device blocks for a prompt that found them there. Swapping and the tier move bytes the same way (_to_host,
_from_host, through minillm.engine.host_transfers: on a GPU the host never waits for those copies); they keep
separate pools because a swapped-out sequence must find all its blocks again, while a tier entry is a cache's,
dropped when the tier is full.
"""
from __future__ import annotations

import logging
import math

import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.host_transfers import HostTransfers
from minillm.layers.kv_quant import kv_cache_torch_dtype

logger = logging.getLogger(__name__)

# The paged pool on a CPU when nothing else is said: room for every batch slot at full length, but at most
# this many bytes (1 GiB: SmolLM2-135M in fp32 needs 45 KiB per token, so 8 slots x 2,048 tokens = 720 MiB fit).
CPU_DEFAULT_KV_MEMORY = 1 << 30


def kv_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one block holds across all layers, `dtype` being the cache's element type (1 byte for
    fp8, 2 for bf16, 4 for fp32: see kv_cache_torch_dtype)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_hidden_layers * block_size * model_config.num_key_value_heads * \
        model_config.head_dim * elem


@torch.inference_mode()
def profile_peak_memory(model: torch.nn.Module, engine_config: EngineConfig, max_model_len: int,
                        device: torch.device) -> int:
    """Peak bytes torch allocates on `device` for the weights plus the largest step the engine will run.

    The largest step is a prefill of max_num_batched_tokens tokens (cut into sequences of at most
    max_model_len, as the scheduler would), followed by logits for max_num_seqs rows. It runs without a KV
    cache (no slot_mapping): the cache does not exist yet, its size is what this measurement decides.
    Activation memory is freed after the forward, but the *peak* is what the allocator must be able to give.
    """
    from minillm.forward_context import forward_context, prefill_metadata

    total = engine_config.max_num_batched_tokens
    num_seqs = max(1, -(-total // max_model_len))
    seq_lens = [total // num_seqs + (i < total % num_seqs) for i in range(num_seqs)]
    input_ids = torch.zeros(total, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with forward_context(prefill_metadata(seq_lens, device=device)):
        hidden = model(input_ids, positions)
    rows = torch.arange(min(engine_config.max_num_seqs, total), device=device)
    logits = model.compute_logits(hidden[rows]).float()
    torch.softmax(logits, dim=-1)  # the sampler's fp32 probabilities
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del hidden, logits
    torch.cuda.empty_cache()
    return int(peak)


def shared_pool_memory(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype, free_bytes: int) -> int:
    """KV memory for a second engine around weights an engine of this process already serves (LLM.share_model on
    a GPU, no pool size given). The first engine's pool holds its gpu_memory_utilization share of the device
    already, so profiling would leave the second nothing; instead it is sized for its own work, max_num_seqs
    sequences of max_model_len, within gpu_memory_utilization of the `free_bytes` free now (the rest is headroom
    for its activations). `config` is resolved (resolve_engine_config)."""
    per_block = kv_bytes_per_block(model_config, config.block_size, kv_cache_torch_dtype(config.kv_cache_dtype, dtype))
    full = _every_sequence_bytes(config, per_block)
    return max(1, min(full, int(config.gpu_memory_utilization * free_bytes)))  # 1: num_device_blocks says why


def _every_sequence_bytes(config: EngineConfig, per_block: int) -> int:
    """The pool that holds max_num_seqs sequences of max_model_len at once (whole blocks each)."""
    return config.max_num_seqs * -(-config.max_model_len // config.block_size) * per_block


def num_device_blocks(engine_config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype,
                      device: torch.device, model: torch.nn.Module | None = None) -> int:
    """How many paged KV blocks the device pool gets, for a resolved engine configuration and the model's `dtype`
    (the cache's element type is engine_config.kv_cache_dtype resolved against it: fp8 blocks are 2x smaller
    than bf16 ones, so a memory budget holds 2x as many).

    First rule that applies:
      num_kv_blocks      taken as given (a pool too small for one request then rejects that request alone,
                         with finish_reason "error": see Scheduler._never_fits)
      kv_cache_memory    bytes // bytes per block
      CUDA               profile one max_num_batched_tokens prefill (profile_peak_memory, needs `model`), then
                         budget = gpu_memory_utilization * total - peak torch memory - memory used outside
                         torch (CUDA context, cuBLAS workspaces), as vLLM does
      CPU                enough for max_num_seqs sequences of max_model_len, at most CPU_DEFAULT_KV_MEMORY
    A budget-derived pool that cannot hold one sequence of max_model_len raises ValueError naming the numbers.
    """
    block_size, max_model_len = engine_config.block_size, engine_config.max_model_len
    kv_dtype = kv_cache_torch_dtype(engine_config.kv_cache_dtype, dtype)
    per_block = kv_bytes_per_block(model_config, block_size, kv_dtype)
    if engine_config.num_kv_blocks is not None:
        return engine_config.num_kv_blocks
    if engine_config.kv_cache_memory is not None:
        budget = engine_config.kv_cache_memory
        source = "kv_cache_memory"
    elif device.type == "cuda":
        if model is not None:
            peak = profile_peak_memory(model, engine_config, max_model_len, device)
        else:  # no model to profile: count what is allocated now (the weights) and hope activations fit
            peak = torch.cuda.memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        outside_torch = max(0, total - free - torch.cuda.memory_reserved(device))
        budget = int(engine_config.gpu_memory_utilization * total - peak - outside_torch)
        source = (f"gpu_memory_utilization={engine_config.gpu_memory_utilization} of {total / 2**30:.1f} GiB "
                  f"minus a peak of {peak / 2**30:.2f} GiB and {outside_torch / 2**30:.2f} GiB outside torch")
    else:
        budget = min(_every_sequence_bytes(engine_config, per_block), CPU_DEFAULT_KV_MEMORY)
        source = f"the CPU default min(max_num_seqs x max_model_len, {CPU_DEFAULT_KV_MEMORY >> 20} MiB)"
    num_blocks = max(0, budget) // per_block
    needed = -(-max_model_len // block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV pool holds {num_blocks} blocks of {block_size} tokens ({max(0, budget) / 2**20:.1f} MiB from "
            f"{source}, {per_block} bytes per block) but one sequence of max_model_len={max_model_len} needs "
            f"{needed}; give more memory (kv_cache_memory, num_kv_blocks, gpu_memory_utilization) or lower "
            f"max_model_len")
    logger.info("KV pool: %d blocks of %d tokens in %s, %d bytes per block (%.1f MiB, from %s)", num_blocks,
                block_size, kv_dtype, per_block, num_blocks * per_block / 2**20, source)
    return int(num_blocks)


class KVCache:
    """The device cache (and, on demand, CPU caches of the same layout for swapped-out blocks and for the prefix
    cache's CPU tier).

    `dtype` is the model's; `kv_cache_dtype` ("auto", "fp8", "fp8_e4m3") decides the storage's element type.
    """

    def __init__(self, model_config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, num_cpu_blocks: int = 0, kv_cache_dtype: str = "auto",
                 num_offload_blocks: int = 0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_layers = model_config.num_hidden_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_cpu_blocks = num_cpu_blocks
        self.num_offload_blocks = num_offload_blocks
        self.block_shape = (block_size, model_config.num_key_value_heads, model_config.head_dim)
        self.dtype = kv_cache_torch_dtype(kv_cache_dtype, dtype)  # the storage's element type
        self.device = device
        # zeros, not empty: a kernel that reads a padded position multiplies it by a zero probability,
        # and 0 * NaN from uninitialised memory would still be NaN
        shape = (2, self.num_layers, num_blocks, *self.block_shape)
        try:
            self.storage = torch.zeros(shape, dtype=self.dtype, device=device)
        except RuntimeError as err:  # torch.OutOfMemoryError on CUDA, an allocator RuntimeError on a CPU
            nbytes = math.prod(shape) * torch.empty((), dtype=self.dtype).element_size()
            raise ValueError(f"the KV pool of {num_blocks} blocks of {block_size} tokens needs "
                             f"{nbytes / 2**30:.2f} GiB on {device}, which could not be allocated; ask for fewer "
                             f"(num_kv_blocks, kv_cache_memory, gpu_memory_utilization; max_num_seqs x "
                             f"max_model_len for static batching)") from err
        # fp8: (k_scale, v_scale) per layer and kv head, 1.0 until minillm.engine.kv_scales calibrates them
        self.scales: torch.Tensor | None = None
        if self.dtype != dtype:
            self.scales = torch.ones((2, self.num_layers, model_config.num_key_value_heads), dtype=torch.float32,
                                     device=device)
        self._cpu_storage: torch.Tensor | None = None
        self._offload_storage: torch.Tensor | None = None
        self.transfers = HostTransfers(device)  # device <-> host copies the host does not wait for
        logger.info("KV cache: %d blocks of %d tokens in %s (%.1f MiB)", num_blocks, block_size, self.dtype,
                    self.nbytes / 2**20)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) views of layer `index`, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.storage[0, index], self.storage[1, index]

    def layer_scales(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) views of layer `index`, each fp32 [num_kv_heads]; (None, None) unless fp8."""
        if self.scales is None:
            return None, None
        return self.scales[0, index], self.scales[1, index]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    @property
    def cpu_storage(self) -> torch.Tensor:
        """The swap space, allocated the first time a block is swapped (pinned when a GPU is present), with
        every store made so far landed in it; viewed in the device pool's layout [2, num_layers, num_blocks, ...]
        (it is kept block-major: host_transfers.py)."""
        self.transfers.settle()
        return self._swap_pool().movedim(0, 2)

    @property
    def offload_storage(self) -> torch.Tensor:
        """The prefix cache's CPU tier, allocated the first time a block is offloaded (pinned when a GPU is present),
        with every store made so far landed in it; viewed as cpu_storage is."""
        self.transfers.settle()
        return self._tier_pool().movedim(0, 2)

    def _swap_pool(self) -> torch.Tensor:
        return self._host_pool("_cpu_storage", self.num_cpu_blocks, "a block swap was requested but the CPU swap "
                               "space has 0 blocks (set swap_space > 0 with preemption_mode='swap')")

    def _tier_pool(self) -> torch.Tensor:
        return self._host_pool("_offload_storage", self.num_offload_blocks, "a block offload was requested but the "
                               "CPU tier has 0 blocks (set kv_offloading_size > 0 with enable_prefix_caching=True)")

    def _host_pool(self, attr: str, num_blocks: int, empty: str) -> torch.Tensor:
        """The host pool kept in `attr`, allocated on first use: block-major [num_blocks, 2, num_layers, ...], so
        that each block is one contiguous run of bytes that DMA moves without the CPU (host_transfers.py)."""
        pool = getattr(self, attr)
        if pool is None:
            if num_blocks < 1:
                raise RuntimeError(empty)
            pool = torch.zeros((num_blocks, 2, self.num_layers, *self.block_shape), dtype=self.dtype,
                               pin_memory=torch.device(self.device).type == "cuda")
            setattr(self, attr, pool)
        return pool

    # -- block operations requested by the scheduler ------------------------------------------------------
    def _check(self, blocks: list[int], limit: int, what: str) -> torch.Tensor:
        bad = [b for b in blocks if not 0 <= b < limit]
        if bad:
            raise ValueError(f"{what} block ids {bad} are outside [0, {limit})")
        return torch.tensor(blocks, dtype=torch.long)

    def _device_ids(self, ids: list[int], limit: int, what: str) -> torch.Tensor:
        """Checked ids as a device tensor, copied from pinned memory without waiting: a copy from pageable memory
        would make the host wait for all work queued before it (async scheduling queues a whole step there)."""
        ids = self._check(ids, limit, what)
        if torch.device(self.device).type != "cuda":
            return ids.to(self.device)
        return ids.pin_memory().to(self.device, non_blocking=True)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (device_block, cpu_block) pairs from the device cache to the CPU cache, all layers at once."""
        if pairs:
            self._to_host(pairs, self._swap_pool(), self.num_cpu_blocks, "cpu")

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (cpu_block, device_block) pairs from the CPU cache back to the device cache."""
        if pairs:
            self._from_host(pairs, self._swap_pool(), self.num_cpu_blocks, "cpu")

    def offload(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (device_block, host_block) pairs into the prefix cache's CPU tier (blocks evicted on the device)."""
        if pairs:
            self._to_host(pairs, self._tier_pool(), self.num_offload_blocks, "CPU-tier")

    def onload(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (host_block, device_block) pairs from the CPU tier into fresh device blocks (a prefix found there)."""
        if pairs:
            self._from_host(pairs, self._tier_pool(), self.num_offload_blocks, "CPU-tier")

    def _to_host(self, pairs: list[tuple[int, int]], host: torch.Tensor, limit: int, what: str) -> None:
        """Device -> host, queued behind every earlier forward (so the bytes are the ones they wrote); the host
        does not wait for them (minillm/engine/host_transfers.py)."""
        src = self._device_ids([d for d, _ in pairs], self.num_blocks, "device")
        self.transfers.store(self.storage, src, host, self._check([c for _, c in pairs], limit, what))

    def _from_host(self, pairs: list[tuple[int, int]], host: torch.Tensor, limit: int, what: str) -> None:
        src = self._check([c for c, _ in pairs], limit, what)
        self.transfers.load(host, src, self.storage, self._device_ids([d for _, d in pairs], self.num_blocks,
                                                                      "device"))

    def copy_slots(self, pairs: list[tuple[int, int]]) -> None:
        """Copy single token slots (src, dst), all layers, K and V: a token tree's accepted nodes move to the
        consecutive positions after the prefix (chapter 9). Gathered before the write, like `copy`."""
        if not pairs:
            return
        limit = self.num_blocks * self.block_shape[0]
        src = self._device_ids([s for s, _ in pairs], limit, "source slot")
        dst = self._device_ids([d for _, d in pairs], limit, "destination slot")
        storage = self.storage.view(torch.uint8) if self.storage.element_size() == 1 else self.storage
        flat = storage.view(2, self.num_layers, limit, *self.block_shape[1:])  # fp8: moved as bytes (CPU has no
        flat[:, :, dst] = flat[:, :, src]  # fp8 index_put)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate (src, dst) device blocks. The right-hand side is gathered before the write,
        so a chain like [(0, 1), (1, 2)] copies the *old* contents of block 1 into block 2."""
        if not pairs:
            return
        src = self._device_ids([s for s, _ in pairs], self.num_blocks, "source")
        dst = self._device_ids([d for _, d in pairs], self.num_blocks, "destination")
        self.storage[:, :, dst] = self.storage[:, :, src]
