"""The exercise registry: every graded function of the course, in one table.

An exercise is one function of the reference implementation, fenced in its source file by markers:

    # >>> exercise ch01.rms_norm
    def rms_norm(x, weight, eps):
        \"\"\"docstring (kept in the learner's stub)\"\"\"
        # >>> solution
        ...the answer (replaced by `raise NotImplementedError` in the stub)...
        # <<< solution
    # <<< exercise

`minillm course sync` copies each fenced region into `solutions/<chapter module>.py` and, with its
solution blocks replaced, into `exercises/<chapter module>.py`. The engine calls the same function
through `minillm.course.overrides.dispatch(id, fn)`, so a learner's answer can run inside the real engine.

This module is imported by every layer that dispatches, so it must stay light: no torch here.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re
from pathlib import Path

from minillm.course.spec import EXERCISE_ID, Chapter, Exercise  # noqa: F401  (re-exported)

CHAPTERS: dict[int, Chapter] = {c.number: c for c in [
    Chapter(1, "ch01_basics", "Basics: the roofline, RMSNorm, RoPE and the sampling filters"),
    Chapter(2, "ch02_kv_cache", "The KV cache: causal masks for prefill, chunked prefill and decode"),
    Chapter(3, "ch03_flash_attention", "FlashAttention: online softmax, tiles and causal block skipping"),
    Chapter(4, "ch04_decode_and_fusion", "Decode and fusion: split-KV merges and a fused RMSNorm kernel"),
    Chapter(5, "ch05_paged_kv", "Paged KV cache: block tables, slot mappings and prefix caching"),
    Chapter(6, "ch06_scheduling", "Continuous batching: admission, preemption by swap or recompute, async steps"),
]}

_EXERCISES: list[Exercise] = [
    Exercise(
        id="ch01.arithmetic_intensity", function="arithmetic_intensity", source="minillm/bench/roofline.py",
        points=5,
        hint="FLOPs are 2mnk; bytes are A, B read once AND C written once, times bytes_per_element.",
        nudge="Intensity = FLOPs / bytes moved. Count the multiply-adds of an m x n x k matmul, then every byte that crosses memory.",
        signature="arithmetic_intensity(m: int, n: int, k: int, bytes_per_element: float) -> float",
        called_from="minillm.bench.roofline.intensity",
    ),
    Exercise(
        id="ch01.rms_norm", function="rms_norm", source="minillm/layers/norm.py", points=10,
        hint="x * rsqrt(mean(x**2 over the LAST dim, keepdim) + eps) in fp32, cast back, then * weight; no mean subtraction.",
        nudge="RMSNorm divides each vector by its root-mean-square (no mean is subtracted), then scales it by a learned weight.",
        signature="rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor",
        called_from="minillm.layers.norm.RMSNorm.forward",
    ),
    Exercise(
        id="ch01.rope", function="apply_rotary", source="minillm/layers/rotary.py", points=10,
        hint="Pair channel i with i + D/2 (not 2i, 2i+1): [x1*cos - x2*sin, x2*cos + x1*sin]; cos/sin unsqueeze(-2) over heads.",
        nudge="RoPE rotates pairs of channels by a position-dependent angle; which channels form a pair is the convention to get right.",
        signature="apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor",
        called_from="minillm.layers.rotary.RotaryEmbedding.forward",
    ),
    Exercise(
        id="ch01.top_k_filter", function="top_k_filter", source="minillm/layers/sampler.py", points=10,
        hint="Keep ranks 0..k-1 of a descending sort per row (k = -1: whole row); everything else -inf; do not modify the input.",
        nudge="Keep the k largest logits of each row and make every other logit impossible to sample.",
        signature="top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor",
        called_from="minillm.layers.sampler.Sampler.forward",
    ),
    Exercise(
        id="ch01.top_p_filter", function="top_p_filter", source="minillm/layers/sampler.py", points=10,
        hint="Sort probs descending; keep a token while the mass BEFORE it is < top_p (so the crossing token stays).",
        nudge="Keep the smallest set of most likely tokens whose probabilities add up to at least top_p.",
        signature="top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor",
        called_from="minillm.layers.sampler.Sampler.forward",
    ),
    Exercise(
        id="ch01.apply_penalties", function="apply_penalties", source="minillm/layers/logits_processors.py",
        points=10,
        hint="counts = scatter_add of (valid & is_output) over history.clamp(min=0); repetition where the token occurs "
             "in ANY valid entry (prompt too): / r if > 0 else * r; then - f * counts - p * (counts > 0).",
        nudge="Lower the logits of tokens the sequence already holds: by a factor for any occurrence, by a constant "
              "per generated occurrence, and once for being generated at all.",
        signature="apply_penalties(logits: torch.Tensor, history: torch.Tensor, is_output: torch.Tensor, "
                  "presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor",
        called_from="minillm.layers.logits_processors.ProcessingTensors.apply (the sampler, before the temperature)",
    ),
    Exercise(
        id="ch02.causal_mask", function="causal_mask", source="minillm/layers/attention.py", points=10,
        hint="Bottom-right aligned: mask[i, j] = j <= i + (kv_len - q_len); q_len == 1 is one all-True row.",
        nudge="With a KV cache the queries are the LAST q_len of kv_len positions: a query may see every key up to its own position.",
        signature="causal_mask(q_len: int, kv_len: int, device: torch.device | str | None = None) -> torch.Tensor",
        called_from="minillm.layers.attention (the torch and reference attention paths)",
    ),
    Exercise(
        id="ch02.sliding_window_mask", function="sliding_window_mask", source="kernels/sliding_window.py",
        points=10,
        hint="Positions pos = kv_len - q_len + i (a column), keys first_key + j (a row); keep key <= pos and, with a "
             "window, key > pos - window (window keys, the query's own included).",
        nudge="Start from the causal mask, then also hide every key more than window - 1 positions before the query.",
        signature="sliding_window_mask(q_len: int, kv_len: int, window: int | None, first_key: int = 0, "
                  "device: torch.device | str | None = None) -> torch.Tensor",
        called_from="minillm.layers.attention (the torch path of a sliding-window layer: Mistral, Qwen2)",
    ),
    Exercise(
        id="ch03.online_softmax_update", function="online_softmax_update", source="kernels/flash_attention.py",
        points=10,
        hint="m_new = max(m, rowmax(s)); alpha = exp(m - m_new) rescales BOTH l and acc; p = exp(s - m_new); guard all -inf rows.",
        nudge="Process the scores one block at a time: keep a running max and a running sum, and correct both when the max grows.",
        signature="online_softmax_update(m_i: torch.Tensor, l_i: torch.Tensor, acc: torch.Tensor, scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]",
        called_from="minillm.kernels.flash_attention.flash_attention_reference (the torch model of the kernel, "
                    "through dispatch); the Triton kernel does the same update in base 2 inside attend_kv_range",
    ),
    Exercise(
        id="ch03.causal_block_range", function="causal_block_range", source="kernels/flash_attention.py", points=10,
        hint="Row i is at position k_len - q_len + i; hi = min(k_len, last EXISTING row's pos + 1); full_end = "
             "min(k_len, first row's pos + 1) rounded DOWN to block_n; neither below 0 (k_len < q_len).",
        nudge="A tile of query rows needs only the key blocks at or before its last row's position; some of those need no mask at all.",
        signature="causal_block_range(m_start: int, block_m: int, q_len: int, k_len: int, block_n: int, causal: bool = True) -> tuple[int, int]",
        called_from="minillm.kernels.flash_attention.flash_attention_reference (through dispatch); "
                    "_flash_fwd_kernel computes the same bounds inline in Triton",
    ),
    Exercise(
        id="ch03.flash_attention_kernel", function="attend_kv_range", source="kernels/flash_attention.py",
        points=20,
        hint="exp2 with qk_scale in log2 units; rescale acc AND l_i by alpha = exp2(m_i - m_new); masked rows: m_new -inf -> 0 before exp2.",
        nudge="The kernel's inner loop: one block of keys at a time, the same online-softmax update as online_softmax_update, in Triton.",
        signature="attend_kv_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, k_len, lo, hi, qk_scale, MASKED, CAUSAL, BLOCK_N, BLOCK_D, HEAD_DIM, UPCAST)",
        called_from="minillm.kernels.flash_attention._flash_fwd_kernel calls it directly (a @triton.jit helper "
                    "is resolved at compile time, not through dispatch); graded through launch_flash_attention "
                    "in the chapter module, which runs the kernel with the learner's helper",
    ),
    Exercise(
        id="ch04.merge_lse", function="merge_lse", source="kernels/decode_merge.py", points=10,
        hint="lse = logaddexp(lse_a, lse_b); weights exp(lse_x - lse), transposed [H, T] -> [T, H, 1]; both -inf -> 0, not nan.",
        nudge="Two partial attentions over disjoint keys combine exactly if each is weighted by its share of the total softmax mass (its lse).",
        signature="merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]",
        called_from="minillm.kernels.decode_merge.merge_attention_states (through dispatch); "
                    "_merge_splits_kernel does the same merge over N splits in Triton",
    ),
    Exercise(
        id="ch04.rms_norm_kernel", function="rms_norm_kernel", source="kernels/fused.py", points=15,
        writes=("OUT", "RES_OUT"),  # written in place: its outputs
        hint="mask cols >= n_cols, divide the sum of squares by n_cols (not BLOCK), store the residual sum before normalising.",
        nudge="One program per row: load the row (masked past n_cols), optionally add the residual, normalise, scale, store.",
        signature="rms_norm_kernel(X, RES, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, n_cols, eps, HAS_RESIDUAL, BLOCK)",
        called_from="minillm.kernels.fused.rms_norm launches it directly (a Triton kernel, not through dispatch); "
                    "graded through the rms_norm launcher in the chapter module",
    ),
    Exercise(
        id="ch05.slot_mapping", function="slot_mapping", source="minillm/engine/block_table.py", points=10,
        hint="slot = block_table[p // block_size] * block_size + p % block_size for p in range(start, end); check the range.",
        nudge="A token's position tells you its logical block and its offset inside it; the block table turns the logical block into a physical one.",
        signature="slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]",
        called_from=("minillm.engine.step_input.build_step_input (every step) and "
                     "minillm.engine.scheduler_sim.ShadowKVCache"),
    ),
    Exercise(
        id="ch05.hash_block", function="hash_block", source="minillm/engine/prefix_cache.py", points=5,
        hint="hash((parent, tuple(token_ids))) with parent = 0 for the first block: the key chains every earlier token.",
        nudge="A block's cache key must depend on every token before it, not just its own tokens: chain in the previous block's key.",
        signature="hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int",
        called_from="minillm.engine.prefix_cache.chain_hashes",
    ),
    Exercise(
        id="ch05.blocks_to_append", function="blocks_to_append", source="minillm/engine/block_table.py", points=5,
        hint="ceil((num_tokens_now + num_new_tokens) / block_size) - num_blocks_held, never below 0; validate the counts.",
        nudge="How many blocks do num_tokens_now + num_new_tokens tokens need in total, and how many does the sequence already hold?",
        signature="blocks_to_append(num_tokens_now: int, num_new_tokens: int, num_blocks_held: int, "
                  "block_size: int) -> int",
        called_from="minillm.engine.block_manager.BlockManager._write_plan (append_slots, can_append)",
    ),
    Exercise(
        id="ch05.free_blocks", function="free_blocks", source="minillm/engine/block_table.py", points=5,
        writes=("ref_counts",),  # written in place: its output
        hint="Walk the table from its last block; decrement each ref count; return those that hit 0; a count < 1 is a double free.",
        nudge="Blocks can be shared (prefix caching): freeing a table drops one reference per block; only unreferenced blocks are free.",
        signature="free_blocks(block_table: list[int], ref_counts: list[int]) -> list[int]",
        called_from="minillm.engine.block_manager.BlockManager._release (free, swap_out, copy-on-write)",
    ),
    Exercise(
        id="ch06.admit_or_preempt", function="admit_or_preempt", source="minillm/engine/scheduler.py", points=10,
        hint="Running: run iff needed <= free, else preempt. Waiting: admit iff num_running < max_num_seqs and free - needed >= watermark.",
        nudge="A running sequence must get its blocks or be preempted; a waiting one is admitted only if the batch and the pool have room to spare.",
        signature="admit_or_preempt(is_running: bool, num_blocks_needed: int, num_free_blocks: int, "
                  "watermark_blocks: int, num_running: int, max_num_seqs: int) -> str",
        called_from="minillm.engine.scheduler.Scheduler._decide (running, swapped and waiting queues)",
    ),
    Exercise(
        id="ch06.swap_out_mapping", function="swap_out_mapping", source="minillm/engine/block_table.py", points=5,
        hint="zip(block_table, free_cpu_blocks) in order, one distinct CPU block each; too few CPU blocks is a ValueError.",
        nudge="Swapping out copies each GPU block of the sequence to its own free CPU block, in order.",
        signature="swap_out_mapping(block_table: list[int], free_cpu_blocks: list[int]) -> list[tuple[int, int]]",
        called_from="minillm.engine.block_manager.BlockManager.swap_out",
    ),
    Exercise(
        id="ch06.resolve_deferred_ids", function="resolve_deferred_ids", source="minillm/engine/step_buffers.py",
        writes=("input_ids",),  # written in place: its output
        points=5,
        hint="deferred = ids < 0; rows = (-1 - ids).clamp(0, S - 1); ids.copy_(torch.where(deferred, "
             "previous_tokens[rows], ids)): in place, no .tolist().",
        nudge="Which row of the previous step's tokens does -(r + 1) name, and how do you fetch all of them at once "
              "without the host reading a single value?",
        signature="resolve_deferred_ids(input_ids: torch.Tensor, previous_tokens: torch.Tensor | None) -> None",
        called_from="minillm.engine.model_runner.ModelRunner._run (async scheduling's steps that take input ids "
                    "from the step before)",
    ),
    # ---- interview questions with a numeric answer (minillm/bench/interview.py), and chapter 3's Triton puzzles
    Exercise(
        id="ch01.batch1_decode_tokens_per_s", function="batch1_decode_tokens_per_s",
        source="minillm/bench/interview.py", points=5,
        nudge="At batch 1 a decode step is limited by memory: how many bytes must it read, and how fast can they come?",
        hint="One decode step reads every weight once: tokens/s <= bandwidth / (num_params * bytes_per_param).",
        signature="batch1_decode_tokens_per_s(num_params: float, bytes_per_param: float, bandwidth: float) -> float",
        called_from="chapter 1 (interview question); not called by the engine",
    ),
    Exercise(
        id="ch01.critical_batch_size", function="critical_batch_size", source="minillm/bench/interview.py",
        points=5,
        nudge="Write decode's arithmetic intensity as a function of the batch, and find where it meets the ridge point.",
        hint="Decode intensity is 2B / bytes_per_param FLOPs/byte; set it equal to the ridge peak/bandwidth; ceil.",
        signature="critical_batch_size(peak_flops: float, bandwidth: float, bytes_per_param: float) -> int",
        called_from="chapter 1 (interview question); not called by the engine",
    ),
    Exercise(
        id="ch02.kv_cache_bytes", function="kv_cache_bytes", source="minillm/bench/interview.py", points=5,
        nudge="Count what one token leaves behind in every layer: which vectors, how many heads, how many numbers each.",
        hint="2 (K and V) x layers x KV heads (not query heads) x head_dim x bytes x tokens.",
        signature="kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_element: float, "
                  "num_tokens: int) -> float",
        called_from="chapter 2 (interview question); not called by the engine",
    ),
    Exercise(
        id="ch03.attention_hbm_bytes", function="attention_hbm_bytes", source="minillm/bench/interview.py",
        points=5,
        nudge="List what each kernel reads and writes from memory; for the tiled version, ask how often K and V are read.",
        hint="Naive: 4nd + 4n^2 elements (S written, read, P written, read); flash: 2nd + ceil(n/block_m) * 2nd.",
        signature="attention_hbm_bytes(seq_len: int, head_dim: int, bytes_per_element: float, block_m: int, "
                  "flash: bool) -> float",
        called_from="chapter 3 (interview question); not called by the engine",
    ),
    Exercise(
        id="ch03.outer_add_kernel", function="outer_add_kernel", source="kernels/puzzles.py", points=5,
        writes=("OUT",),  # written in place: its output
        nudge="Each program owns one tile: build its row and column offsets from its two program ids, then mask the edges.",
        hint="rows = pid0 * BLOCK_M + arange; cols likewise; load x[rows], y[cols] masked; store x[:, None] + "
             "y[None, :] with a 2-D mask.",
        signature="outer_add_kernel(X, Y, OUT, n_rows, n_cols, stride_om, stride_on, BLOCK_M, BLOCK_N)",
        called_from="chapter 3 (Triton puzzle 1); graded through the outer_add launcher in the chapter module",
    ),
    Exercise(
        id="ch03.softmax_kernel", function="softmax_kernel", source="kernels/puzzles.py", points=5,
        writes=("OUT",),  # written in place: its output
        nudge="One program holds a whole row: think about what value a padded lane must have so it never matters.",
        hint="Load the row with other=-inf (not 0), subtract tl.max, tl.exp, divide by tl.sum, store masked.",
        signature="softmax_kernel(X, OUT, stride_x, stride_o, n_cols, BLOCK)",
        called_from="chapter 3 (Triton puzzle 2); graded through the softmax launcher in the chapter module",
    ),
    Exercise(
        id="ch03.matmul_kernel", function="matmul_kernel", source="kernels/puzzles.py", points=10,
        writes=("C",),  # written in place: its output
        nudge="One program per C tile, looping over K one block at a time; the last block may stick out past K.",
        hint="acc = zeros; for k0 in range(0, K, BLOCK_K): masked loads (rows & k < K, k < K & cols), other=0.0; "
             "acc = tl.dot(a, b, acc).",
        signature="matmul_kernel(A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, "
                  "stride_cn, BLOCK_M, BLOCK_N, BLOCK_K)",
        called_from="chapter 3 (Triton puzzle 3); graded through the matmul launcher in the chapter module",
    ),
    Exercise(
        id="ch04.decode_step_floor_s", function="decode_step_floor_s", source="minillm/bench/interview.py",
        points=5,
        nudge="What does one decode step read from memory: which bytes are shared by the batch, which belong to a sequence?",
        hint="(weight_bytes + kv_bytes_per_token * sum(context_lens)) / bandwidth: weights once, KV per sequence.",
        signature="decode_step_floor_s(weight_bytes: float, kv_bytes_per_token: float, context_lens: list[int], "
                  "bandwidth: float) -> float",
        called_from="chapter 4 (interview question); not called by the engine",
    ),
    Exercise(
        id="ch05.num_kv_blocks_needed", function="num_kv_blocks_needed", source="minillm/bench/interview.py",
        points=5,
        nudge="Count each sequence's blocks, then ask which of them hold exactly the same keys and values for everyone.",
        hint="sum(ceil(n / bs)) over sequences, minus (len - 1) x the prefix's FULL blocks (shared_prefix_len // bs).",
        signature="num_kv_blocks_needed(seq_lens: list[int], block_size: int, shared_prefix_len: int = 0) -> int",
        called_from="chapter 5 (interview question); not called by the engine",
    ),
    Exercise(
        id="ch06.batching_steps", function="batching_steps", source="minillm/bench/interview.py", points=5,
        nudge="Simulate it: when does a slot free up, and when may a waiting request take it, in each policy?",
        hint="Static: sum of each batch's max; continuous: each newcomer takes the earliest-freed slot; answer: "
             "the last finish.",
        signature="batching_steps(output_lens: list[int], max_batch: int, continuous: bool) -> int",
        called_from="chapter 6 (interview question); not called by the engine",
    ),
]



def _collect_catalog() -> None:
    """Add the chapters listed one per file in minillm/course/catalog/ (chapter 7 on).

    Each module there defines CHAPTER (a Chapter) and EXERCISES (a list of Exercise), so chapters can be
    written side by side without editing one shared table.
    """
    from minillm.course import catalog
    for info in sorted(pkgutil.iter_modules(catalog.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{catalog.__name__}.{info.name}")
        chapter, exercises = module.CHAPTER, module.EXERCISES
        if chapter.number in CHAPTERS:
            raise ValueError(f"catalog/{info.name}.py: chapter {chapter.number} is already registered")
        CHAPTERS[chapter.number] = chapter
        for e in exercises:
            if e.chapter != chapter.number:
                raise ValueError(f"catalog/{info.name}.py lists {e.id}, which is not in chapter {chapter.number}")
        _EXERCISES.extend(exercises)


_collect_catalog()
EXERCISES: dict[str, Exercise] = {e.id: e for e in _EXERCISES}


def get(exercise_id: str) -> Exercise:
    """The registered exercise `exercise_id`, or a KeyError listing the valid ids."""
    try:
        return EXERCISES[exercise_id]
    except KeyError:
        raise KeyError(f"unknown exercise {exercise_id!r}; registered: {', '.join(EXERCISES)}") from None


def select(target: str | None = None) -> list[Exercise]:
    """Exercises matching `target`: None (all), 'ch01' / '1' (a chapter) or 'ch01.rms_norm' (one)."""
    if target is None or target == "all":
        return list(EXERCISES.values())
    if target in EXERCISES:
        return [EXERCISES[target]]
    m = re.fullmatch(r"(?:ch)?(\d{1,2})", target)
    if m and int(m.group(1)) in CHAPTERS:
        return [e for e in EXERCISES.values() if e.chapter == int(m.group(1))]
    raise ValueError(f"unknown grading target {target!r}; use a chapter ({', '.join(f'ch{c:02d}' for c in CHAPTERS)}) "
                     f"or an exercise id ({', '.join(EXERCISES)})")


def repo_root() -> Path:
    """The course's root (holding exercises/, solutions/, tests/): $MINILLM_ROOT or the package's parent."""
    env = os.environ.get("MINILLM_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2]
