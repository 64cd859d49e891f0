"""The split-KV merge fused into the paged decode kernel (fused_merge=True; minillm.kernels.decode_merge).

The last split program of each (sequence, kv head, row tile) merges the partials; the two-kernel path
(fused_merge=False) and a torch reference must agree with it. CPU (interpreter, fp32): 2, 3 and 5 splits, one and
several queries per sequence, GQA, many merge chunks, an FP8 cache, varlen token trees over two row tiles, calls
in a row (the arrival counters return to zero), buffer growth. GPU: bf16 at Llama-3-8B's attention shape, and a
CUDA graph captured once and replayed with new inputs.
"""
from __future__ import annotations

import pytest
import torch

import minillm.kernels.decode_merge as merge
import minillm.kernels.paged_attention as paged
from kernel_reference import attention_reference, gather_from_cache
from minillm.kernels.paged_attention import paged_decode_attention


def _pool(seq_lens, heads, kv_heads, head_dim, q_rows, block_size=16, seed=0, device="cpu", dtype=torch.float32):
    """q [q_rows, H, D] and random caches, each sequence's blocks scattered over the pool."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(q_rows, heads, head_dim, generator=g)
    tables = torch.full((len(seq_lens), max(blocks) + 1), -1, dtype=torch.int32)
    perm, used = torch.randperm(num_blocks, generator=g), 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[used:used + n]
        used += n
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return to(q), to(k_cache), to(v_cache), tables.to(device), lens


def _reference(q, k_cache, v_cache, tables, seq_lens, q_len, k_scale=None, v_scale=None):
    """fp32 on the CPU: the last q_len tokens of each sequence, causal among themselves."""
    outs = []
    for b in range(tables.shape[0]):
        n = int(seq_lens[b])
        k = gather_from_cache(k_cache.cpu(), tables[b].cpu(), n).float()
        v = gather_from_cache(v_cache.cpu(), tables[b].cpu(), n).float()
        if k_scale is not None:
            k, v = k * k_scale.view(-1, 1), v * v_scale.view(-1, 1)
        outs.append(attention_reference(q[b * q_len:(b + 1) * q_len].float().cpu(), k, v, causal=True)[0])
    return torch.cat(outs)


def _counters_clean(device="cpu"):
    device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    buf = merge._ARRIVALS.get(device)
    return buf is not None and not buf.any()


class _NoMergeLaunch:
    """Stands in for the second kernel where the merge must happen inside the split kernel."""
    def __getitem__(self, grid):
        raise AssertionError("the two-kernel merge was launched on the fused path")


@pytest.mark.parametrize("num_splits, q_len", [(2, 1), (3, 3), (5, 1)])
def test_fused_equals_two_kernels_and_reference(num_splits, q_len, monkeypatch):
    # 4 q heads over 1 kv head (G = 4); a sequence as long as its queries leaves most splits empty
    seq_lens = [q_len, 20, 50]
    q, kc, vc, bt, sl = _pool(seq_lens, 4, 1, 16, 3 * q_len, seed=num_splits + 10 * q_len)
    with monkeypatch.context() as patch:
        patch.setattr(paged, "_merge_splits_kernel", _NoMergeLaunch())
        fused = paged_decode_attention(q, kc, vc, bt, sl, num_splits=num_splits, q_len=q_len, fused_merge=True)
    assert _counters_clean()
    two = paged_decode_attention(q, kc, vc, bt, sl, num_splits=num_splits, q_len=q_len, fused_merge=False)
    torch.testing.assert_close(fused, two, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused, _reference(q, kc, vc, bt, sl, q_len), atol=2e-5, rtol=1e-4)


def test_many_chunks_and_calls_in_a_row(monkeypatch):
    # one fp32 value a thread: 4 splits of head_dim 32 a merge step, so 5 splits take two (online rescaling)
    monkeypatch.setattr(merge, "MERGE_ELEMENTS_PER_THREAD", 1)
    assert merge._merge_chunk(32, 4) == 4
    q, kc, vc, bt, sl = _pool([2, 50, 33], 4, 1, 32, 6, seed=3)
    first = paged_decode_attention(q, kc, vc, bt, sl, num_splits=5, q_len=2, fused_merge=True)
    assert _counters_clean()
    second = paged_decode_attention(q, kc, vc, bt, sl, num_splits=5, q_len=2, fused_merge=True)
    assert _counters_clean()
    assert torch.equal(first, second)  # the counters were back at 0: the same program merged both times
    torch.testing.assert_close(first, _reference(q, kc, vc, bt, sl, 2), atol=2e-5, rtol=1e-4)


def test_fp8_cache():
    q, kc, vc, bt, sl = _pool([17, 45], 6, 3, 32, 2, seed=4)
    k_scale = kc.abs().amax(dim=(0, 1, 3)) / 448.0
    v_scale = vc.abs().amax(dim=(0, 1, 3)) / 448.0
    kq = (kc / k_scale.view(1, 1, -1, 1)).to(torch.float8_e4m3fn)
    vq = (vc / v_scale.view(1, 1, -1, 1)).to(torch.float8_e4m3fn)
    args = (q, kq, vq, bt, sl)
    fused = paged_decode_attention(*args, k_scale=k_scale, v_scale=v_scale, num_splits=3, fused_merge=True)
    two = paged_decode_attention(*args, k_scale=k_scale, v_scale=v_scale, num_splits=3, fused_merge=False)
    torch.testing.assert_close(fused, two, atol=1e-6, rtol=1e-6)
    ref = _reference(q, kq.float(), vq.float(), bt, sl, 1, k_scale, v_scale)
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-4)


def _tree_masks(q_lens, seed):
    """Random token trees: node i's parent is a random earlier node (or none); its mask is its ancestors + itself."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in q_lens:
        masks = []
        for i in range(n):
            parent = int(torch.randint(-1, i, (1,), generator=g)) if i else -1
            masks.append((masks[parent] if parent >= 0 else 0) | (1 << i))
        rows += masks
    return torch.tensor(rows, dtype=torch.int64)


def test_varlen_tree_over_two_row_tiles():
    # q_len bound 20 -> 32 rows per sequence x G 4 = 128 rows: two row tiles of 64, each with its own counter
    q_lens = [20, 1, 0, 7]
    seq_lens = [n + p for n, p in zip(q_lens, (3, 5, 9, 12))]
    q, kc, vc, bt, sl = _pool(seq_lens, 8, 2, 16, sum(q_lens), seed=5)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    common = dict(q_len=20, cu_seqlens_q=cu, tree_mask=_tree_masks(q_lens, 6))
    # one split is tests/test_tree_attention.py's oracle (checked there against a per-row reference); the
    # two-kernel merge of these 28 x 8 rows takes seconds in the interpreter, and the tests above compare it
    one = paged_decode_attention(q, kc, vc, bt, sl, num_splits=1, **common)
    fused = paged_decode_attention(q, kc, vc, bt, sl, num_splits=3, fused_merge=True, **common)
    assert _counters_clean()
    torch.testing.assert_close(fused, one, atol=2e-5, rtol=1e-4)


def test_counter_buffer_grows_and_keeps_the_old_one(monkeypatch):
    monkeypatch.setattr(merge, "_ARRIVALS", {})
    monkeypatch.setattr(merge, "_RETIRED_ARRIVALS", [])
    small = merge._arrival_counters(torch.device("cpu"), 10)
    assert small.numel() == merge.MIN_ARRIVALS and not small.any()
    assert merge._arrival_counters(torch.device("cpu"), 10) is small
    big = merge._arrival_counters(torch.device("cpu"), merge.MIN_ARRIVALS + 1)
    assert big.numel() == 2 * merge.MIN_ARRIVALS and not big.any()
    assert merge._RETIRED_ARRIVALS == [small]  # a captured graph may still count into it


def test_rejects_bad_fused_merge():
    q, kc, vc, bt, sl = _pool([3], 2, 2, 16, 1)
    with pytest.raises(ValueError, match="fused_merge"):
        paged_decode_attention(q, kc, vc, bt, sl, num_splits=2, fused_merge=1)


# -- GPU ------------------------------------------------------------------------------------------------------
LLAMA = dict(heads=32, kv_heads=8, head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [1, 4])
def test_gpu_bf16_fused_equals_two_kernels(q_len):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seq_lens = [q_len, 100, 1000, 4096, 777]
    q, kc, vc, bt, sl = _pool(seq_lens, LLAMA["heads"], LLAMA["kv_heads"], LLAMA["head_dim"], 5 * q_len, seed=q_len,
                              device="cuda", dtype=torch.bfloat16)
    ref = _reference(q, kc, vc, bt, sl, q_len)
    for splits in (2, 3, 5, 32):
        fused = paged_decode_attention(q, kc, vc, bt, sl, num_splits=splits, q_len=q_len, fused_merge=True)
        two = paged_decode_attention(q, kc, vc, bt, sl, num_splits=splits, q_len=q_len, fused_merge=False)
        torch.testing.assert_close(fused, two, atol=1e-3, rtol=8e-3)  # the same fp32 math: a bf16 ulp apart at most
        torch.testing.assert_close(fused.float().cpu(), ref, atol=1e-2, rtol=2e-2)
    assert _counters_clean("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_gpu_cuda_graph_replays(fused):
    """Captured once, replayed 3 times with new queries and lengths: each replay equals an eager call, with the
    merge fused (the counters allocated by the warm-up, reset by every replay) and as the second kernel."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, kc, vc, bt, sl = _pool([512] * 4, **LLAMA, q_rows=4, seed=9, device="cuda", dtype=torch.bfloat16)
    static_q, static_sl = q.clone(), sl.clone()
    # the warm-up the engine does: Triton compiles here (and the counters are allocated), not in the capture
    paged_decode_attention(static_q, kc, vc, bt, static_sl, num_splits=8, fused_merge=fused)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = paged_decode_attention(static_q, kc, vc, bt, static_sl, num_splits=8, fused_merge=fused)
    g = torch.Generator(device="cuda").manual_seed(10)
    for step in range(3):
        static_q.copy_(torch.randn(q.shape, generator=g, device="cuda", dtype=q.dtype))
        static_sl.copy_(torch.tensor([300 + 50 * step, 512, 1, 17 * step + 2], dtype=torch.int32))
        graph.replay()
        eager = paged_decode_attention(static_q, kc, vc, bt, static_sl, num_splits=8, fused_merge=fused)
        torch.testing.assert_close(static_out, eager, atol=0.0, rtol=0.0, msg=f"replay {step}")
    torch.cuda.synchronize()
    if fused:
        assert _counters_clean("cuda")
