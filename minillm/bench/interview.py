"""Back-of-the-envelope numbers: the questions an ML-systems interview asks, each answered with a formula
(chapters 1-7, 10 and 11).

"How many tokens per second can one GPU decode?", "how big is the KV cache?", "how much memory traffic does
FlashAttention save?": each has a short formula behind it, and each formula is a graded exercise (the learner's
version gives the number the chapter asks for). Every function here is pure arithmetic on plain numbers: bytes,
FLOP/s, token counts. None of them is called by the engine; the chapters call them to put numbers on the
engine's design, and `minillm estimate` does the model-level bookkeeping (weights + KV) for whole models.

    ch01  batch1_decode_tokens_per_s, critical_batch_size   why decode is memory-bound, and when it stops being
    ch02  kv_cache_bytes                                     the KV cache of a model, a context and a batch
    ch03  attention_hbm_bytes                                why FlashAttention is IO-aware: bytes, naive vs tiled
    ch04  decode_step_floor_s                                a decode step reads the weights AND every sequence's KV
    ch05  num_kv_blocks_needed                               paged blocks, with a shared prompt prefix stored once
    ch06  batching_steps                                     static vs continuous batching, in decode steps
    ch07  quantized_weight_bytes                             a model's weights in a format with group scales
    ch10  max_request_rate                                   the load a server carries before its queue grows
    ch11  ring_allreduce_bytes                               what each GPU sends in a ring all-reduce
"""
from __future__ import annotations

import math


# >>> exercise ch01.batch1_decode_tokens_per_s
def batch1_decode_tokens_per_s(num_params: float, bytes_per_param: float, bandwidth: float) -> float:
    """The upper bound on tokens/s of batch-1 decode when it is memory-bound: every step reads every weight once.

    num_params: the model's parameters (8.03e9 for Llama-3-8B); bytes_per_param: 2 for bf16, 1 for int8/fp8,
    0.5 for int4; bandwidth: bytes/s the memory delivers (4.24e12 for an H200's measured copy bandwidth).
    One step moves num_params * bytes_per_param bytes, so at most bandwidth / that many steps (= tokens, at
    batch 1) per second. (The KV cache and activations add a little more: this is a ceiling, not a forecast.)
    Raise ValueError if any argument is <= 0.
    """
    # >>> solution
    if min(num_params, bytes_per_param, bandwidth) <= 0:
        raise ValueError(f"num_params, bytes_per_param and bandwidth must be > 0, got {num_params!r}, "
                         f"{bytes_per_param!r}, {bandwidth!r}")
    return bandwidth / (num_params * bytes_per_param)
    # <<< solution
# <<< exercise


# >>> exercise ch01.critical_batch_size
def critical_batch_size(peak_flops: float, bandwidth: float, bytes_per_param: float) -> int:
    """The smallest decode batch at which the weight matmuls stop being memory-bound (they reach the ridge point).

    A batch of B tokens through a weight W[k, n] does 2*B*k*n FLOPs and (for B much smaller than k and n)
    reads about bytes_per_param*k*n bytes: intensity 2*B / bytes_per_param FLOPs per byte. The roofline's
    ridge point is peak_flops / bandwidth. Return the smallest integer B whose intensity reaches the ridge,
    i.e. ceil(peak_flops * bytes_per_param / (2 * bandwidth)), and at least 1.
    Example: 700e12 FLOP/s, 4.24e12 B/s, bf16 (2 bytes) -> 166.
    Raise ValueError if any argument is <= 0.
    """
    # >>> solution
    if min(peak_flops, bandwidth, bytes_per_param) <= 0:
        raise ValueError(f"peak_flops, bandwidth and bytes_per_param must be > 0, got {peak_flops!r}, "
                         f"{bandwidth!r}, {bytes_per_param!r}")
    ridge = peak_flops / bandwidth  # FLOPs per byte where the sloped roof meets the flat one
    return max(1, math.ceil(ridge * bytes_per_param / 2 - 1e-9))  # 2B / bytes >= ridge; 1e-9: float noise
    # <<< solution
# <<< exercise


# >>> exercise ch02.kv_cache_bytes
def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_element: float,
                   num_tokens: int) -> float:
    """Bytes of KV cache for num_tokens tokens (summed over every sequence of a batch) of one model.

    Each token keeps one key AND one value vector of head_dim numbers per KV head (not per query head:
    grouped-query attention shares them) in every layer. Example: Llama-3-8B (32 layers, 8 KV heads,
    head_dim 128) in bf16 keeps 131072 bytes (128 KiB) per token.
    Raise ValueError if num_layers, num_kv_heads or head_dim is < 1, bytes_per_element <= 0 or num_tokens < 0
    (num_tokens = 0 is valid: no tokens, no cache, 0 bytes).
    """
    # >>> solution
    if min(num_layers, num_kv_heads, head_dim) < 1 or num_tokens < 0 or bytes_per_element <= 0:
        raise ValueError(f"need num_layers, num_kv_heads, head_dim >= 1, num_tokens >= 0, bytes_per_element > 0; "
                         f"got {num_layers}, {num_kv_heads}, {head_dim}, {num_tokens}, {bytes_per_element}")
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_element * num_tokens  # 2: a key and a value
    # <<< solution
# <<< exercise


# >>> exercise ch03.attention_hbm_bytes
def attention_hbm_bytes(seq_len: int, head_dim: int, bytes_per_element: float, block_m: int, flash: bool) -> float:
    """Bytes that one head of NON-causal attention over seq_len queries and keys moves to and from memory (HBM).

    Naive (flash=False), three kernels: S = Q K^T reads Q and K and writes S (seq_len x seq_len); the softmax
    reads S and writes P (same size); O = P V reads P and V and writes O. Count each of these once.
    FlashAttention (flash=True): Q is read once and O written once; each of the ceil(seq_len / block_m) query
    tiles streams the whole of K and V through on-chip memory, so K and V are read once per query tile; S and
    P never reach memory. Element counts times bytes_per_element; head_dim, block_m >= 1, seq_len >= 1.
    Raise ValueError for a size < 1 or bytes_per_element <= 0.
    """
    # >>> solution
    if min(seq_len, head_dim, block_m) < 1 or bytes_per_element <= 0:
        raise ValueError(f"seq_len, head_dim, block_m must be >= 1 and bytes_per_element > 0, got {seq_len}, "
                         f"{head_dim}, {block_m}, {bytes_per_element}")
    n, d = seq_len, head_dim
    if not flash:  # QK^T: Q, K in, S out; softmax: S in, P out; PV: P, V in, O out
        return bytes_per_element * ((2 * n * d + n * n) + (2 * n * n) + (n * n + 2 * n * d))
    query_tiles = math.ceil(n / block_m)
    return bytes_per_element * (2 * n * d + query_tiles * 2 * n * d)  # Q in, O out; K and V once per query tile
    # <<< solution
# <<< exercise


# >>> exercise ch04.decode_step_floor_s
def decode_step_floor_s(weight_bytes: float, kv_bytes_per_token: float, context_lens: list[int],
                        bandwidth: float) -> float:
    """The memory floor of one decode step, in seconds: its bytes read divided by the bandwidth.

    A decode step reads every weight once (shared by the whole batch) and, for each sequence, the K and V of
    every token in its context (context_lens[i] tokens for sequence i: never shared). Return
    (weight_bytes + kv_bytes_per_token * sum(context_lens)) / bandwidth. At long contexts and large batches the
    KV term overtakes the weights: batching no longer makes a decoded token cheaper.
    Raise ValueError for an empty batch, a negative context, weight_bytes or kv_bytes_per_token < 0, or
    bandwidth <= 0.
    """
    # >>> solution
    if not context_lens or min(context_lens) < 0:
        raise ValueError(f"context_lens must be a non-empty list of counts >= 0, got {context_lens!r}")
    if weight_bytes < 0 or kv_bytes_per_token < 0 or bandwidth <= 0:
        raise ValueError(f"need weight_bytes, kv_bytes_per_token >= 0 and bandwidth > 0, got {weight_bytes!r}, "
                         f"{kv_bytes_per_token!r}, {bandwidth!r}")
    return (weight_bytes + kv_bytes_per_token * sum(context_lens)) / bandwidth
    # <<< solution
# <<< exercise


# >>> exercise ch05.num_kv_blocks_needed
def num_kv_blocks_needed(seq_lens: list[int], block_size: int, shared_prefix_len: int = 0) -> int:
    """Paged KV blocks that hold every sequence of seq_lens, when all of them start with the same prompt prefix
    of shared_prefix_len tokens.

    Each sequence needs ceil(len / block_size) blocks of its own. The prefix's FULL blocks
    (shared_prefix_len // block_size of them) hold identical K/V for every sequence, so they are stored once and
    shared (reference counts, or the prefix cache); a partly filled prefix block is not shared (each sequence
    writes its own tokens after the prefix into it). With shared_prefix_len = 0 it is the plain paged count.
    Raise ValueError if block_size < 1, seq_lens is empty, a length is < 0 or shorter than shared_prefix_len,
    or shared_prefix_len < 0.
    """
    # >>> solution
    if block_size < 1 or shared_prefix_len < 0 or not seq_lens:
        raise ValueError(f"need block_size >= 1, shared_prefix_len >= 0 and a non-empty seq_lens, got {block_size}, "
                         f"{shared_prefix_len}, {seq_lens!r}")
    if min(seq_lens) < shared_prefix_len:
        raise ValueError(f"every sequence must hold the {shared_prefix_len}-token prefix, got lengths {seq_lens!r}")
    shared = shared_prefix_len // block_size
    own = sum(-(-n // block_size) - shared for n in seq_lens)  # ceil division, minus the shared full blocks
    return shared + own
    # <<< solution
# <<< exercise


# >>> exercise ch06.batching_steps
def batching_steps(output_lens: list[int], max_batch: int, continuous: bool) -> int:
    """Decode steps to finish requests that all arrive at once, each producing output_lens[i] tokens, one
    token per step per running request, at most max_batch running together (prefill ignored: one step = one
    token for every running request).

    Static (continuous=False): requests are taken in order, max_batch at a time; a batch runs until its
    longest request ends, then the next batch starts. Continuous (continuous=True): a finished request leaves
    at the end of its last step and the next waiting request (in order) joins at the next step.
    Example: [4, 1, 1, 1, 1], max_batch 2: static 4 + 1 + 1 = 6 steps; continuous 4.
    Raise ValueError if max_batch < 1 or a length is < 1.
    """
    # >>> solution
    if max_batch < 1 or any(n < 1 for n in output_lens):
        raise ValueError(f"need max_batch >= 1 and every output length >= 1, got {max_batch}, {output_lens!r}")
    if not continuous:
        return sum(max(output_lens[i:i + max_batch]) for i in range(0, len(output_lens), max_batch))
    finish_times: list[int] = []  # when each running slot frees up; a newcomer takes the earliest free slot
    for n in output_lens:
        if len(finish_times) < max_batch:
            finish_times.append(n)
        else:
            start = min(finish_times)
            finish_times.remove(start)
            finish_times.append(start + n)
    return max(finish_times, default=0)
    # <<< solution
# <<< exercise


# >>> exercise ch10.max_request_rate
def max_request_rate(max_num_seqs: int, output_tokens: float, step_time_s: float) -> float:
    """The highest request rate (requests/s) a continuous-batching server sustains: beyond it the waiting queue,
    and with it every new request's TTFT, grows without bound.

    The server runs at most max_num_seqs requests at once; each produces output_tokens tokens, one per decode
    step of step_time_s seconds (prefill ignored; a full batch steps as fast as a small one, which is true while
    decode is memory-bound: chapter 1). Little's law: requests inside = arrival rate x time each stays. A request
    stays output_tokens * step_time_s seconds, and at most max_num_seqs fit, so requests leave (and may arrive)
    at no more than max_num_seqs / (output_tokens * step_time_s) per second.
    Example: 64 sequences, 200 tokens each, 20 ms steps -> 64 / (200 * 0.02) = 16 requests/s.
    Raise ValueError if any argument is <= 0 (max_num_seqs must be an integer).
    """
    # >>> solution
    if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
    if not output_tokens > 0 or not step_time_s > 0:
        raise ValueError(f"output_tokens and step_time_s must be > 0, got {output_tokens!r} and {step_time_s!r}")
    return max_num_seqs / (output_tokens * step_time_s)
    # <<< solution
# <<< exercise


# >>> exercise ch07.quantized_weight_bytes
def quantized_weight_bytes(num_params: float, bits: int, group_size: int, scale_bits: int = 16,
                           zero_bits: int = 0) -> float:
    """Bytes of a model's weights stored as `bits`-bit codes with one scale (and, asymmetric, one zero point) per
    group of `group_size` consecutive weights: what "will it fit?" needs (chapter 7's memory table).

    Every weight costs its code, and every group adds scale_bits + zero_bits shared by its group_size weights, so a
    weight costs bits + (scale_bits + zero_bits) / group_size bits in all, and the model num_params times that,
    divided by 8. Example: 70.6e9 parameters, int4 g128 with fp16 scales and 4-bit zeros: 4 + 20 / 128 = 4.156 bits
    per weight -> 36.7 GB; bf16 has no groups to pay for (bits 16, group_size 1, scale_bits 0): 141 GB.
    Per-channel scales are group_size = the layer's input size.
    Raise ValueError if num_params <= 0, or if bits, group_size, scale_bits or zero_bits is not an integer with
    bits >= 1, group_size >= 1, scale_bits >= 0 and zero_bits >= 0.
    """
    # >>> solution
    if not num_params > 0:
        raise ValueError(f"num_params must be > 0, got {num_params!r}")
    for name, value, low in (("bits", bits, 1), ("group_size", group_size, 1), ("scale_bits", scale_bits, 0),
                             ("zero_bits", zero_bits, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return num_params * (bits + (scale_bits + zero_bits) / group_size) / 8
    # <<< solution
# <<< exercise


# >>> exercise ch11.ring_allreduce_bytes
def ring_allreduce_bytes(payload_bytes: float, world_size: int) -> float:
    """Bytes each GPU sends in a ring all-reduce of a `payload_bytes` tensor over `world_size` GPUs (NCCL's
    algorithm for large messages; chapter 11's tensor-parallel traffic).

    The tensor is cut into world_size chunks. Reduce-scatter: world_size - 1 steps, in each every GPU sends one
    chunk to its neighbour and adds the chunk it receives, until each GPU holds one fully summed chunk. All-gather:
    world_size - 1 more steps pass the summed chunks around the ring. So each GPU sends 2 (world_size - 1) chunks of
    payload_bytes / world_size: nearly twice the payload however many GPUs there are (bandwidth-optimal), and 0
    alone. Example: 16 KiB over 8 GPUs -> 2 * 7 / 8 * 16384 = 28,672 bytes per GPU.
    Raise ValueError if payload_bytes < 0 or world_size is not an integer >= 1.
    """
    # >>> solution
    if not payload_bytes >= 0:
        raise ValueError(f"payload_bytes must be >= 0, got {payload_bytes!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return 2 * (world_size - 1) * payload_bytes / world_size
    # <<< solution
# <<< exercise
