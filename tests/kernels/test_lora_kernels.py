"""The segmented-gather LoRA kernels (kernels/lora.py: lora_shrink, lora_expand, lora_fused) and their torch
references against a naive per-token loop written here, under the Triton interpreter on CPU (fp32, fp16), the
fused kernel's dispatch rule, plus bf16 checks on a GPU."""
import pytest
import torch

import minillm.platform  # noqa: F401  (sets TRITON_INTERPRET on CPU before triton is imported)
from minillm.kernels import lora as lora_module
from minillm.kernels.lora import (check_segments, lora_expand, lora_expand_reference, lora_fused, lora_fused_pays,
                                  lora_fused_reference, lora_shrink, lora_shrink_reference)

DECODE = ([1] * 8, [0, -1, 1, 1, 2, -1, 0, 2])  # (lengths, slots): 8 decode sequences, two without an adapter
MIXED = ([1, 37, 5, 64], [2, -1, 0, 1])  # a decode token, two prefills and a chunk; one sequence without adapter


def segments(lens, slots, gap=0, device="cpu"):
    """(seg_starts, seg_lens, seg_slots, max_seg_len, T) for segments packed one after another, `gap` unused rows
    before each (rows in no segment: zero in shrink, untouched by expand)."""
    starts, t = [], 0
    for length in lens:
        t += gap
        starts.append(t)
        t += length
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_i32(starts), as_i32(lens), as_i32(slots), max(lens, default=0), t


def adapters(num_slots, rank, k, n, dtype=torch.float32, pad_to=None, seed=0):
    """lora_a [L, R, K], lora_b [L, N, R]; with pad_to, rank-`rank` adapters zero-padded to rank pad_to."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(num_slots, rank, k, generator=g) / k ** 0.5
    b = torch.randn(num_slots, n, rank, generator=g)
    if pad_to is not None:
        a = torch.cat([a, torch.zeros(num_slots, pad_to - rank, k)], 1)
        b = torch.cat([b, torch.zeros(num_slots, n, pad_to - rank)], 2)
    return a.to(dtype), b.to(dtype)


def naive_shrink(x, a, starts, lens, slots):
    """s[t] = A_slot x[t] token by token, in float64; zero for rows of no adapter."""
    out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    for start, length, slot in zip(starts.tolist(), lens.tolist(), slots.tolist()):
        for t in range(start, start + length):
            if slot >= 0:
                out[t] = a[slot].double() @ x[t].double()
    return out


def naive_expand(s, b, starts, lens, slots, y):
    """y + B_slot s[t] for every token t of an adapter, in float64 (other rows: y's values)."""
    out = y.double().clone()
    for start, length, slot in zip(starts.tolist(), lens.tolist(), slots.tolist()):
        for t in range(start, start + length):
            if slot >= 0:
                out[t] += b[slot].double() @ s[t].double()
    return out


def adapter_rows(starts, lens, slots, num_tokens):
    """Boolean [T]: the rows that belong to a segment with an adapter."""
    rows = torch.zeros(num_tokens, dtype=torch.bool)
    for start, length, slot in zip(starts.tolist(), lens.tolist(), slots.tolist()):
        if slot >= 0:
            rows[start:start + length] = True
    return rows


CASES = [  # (lengths, slots, rank, padded rank, K, N, gap)
    pytest.param(*DECODE, 8, None, 96, 80, 0, id="decode-r8"),
    pytest.param(*DECODE, 16, None, 64, 48, 0, id="decode-r16"),
    pytest.param(*MIXED, 16, None, 96, 80, 0, id="mixed-r16"),
    pytest.param(*MIXED, 12, 12, 40, 24, 2, id="mixed-r12-gaps"),  # R = 12: not a power of two
    pytest.param([3, 2, 4], [0, 1, -1], 5, 8, 33, 17, 1, id="padded-r5-of-8"),  # rank-5 adapters padded to 8
]


@pytest.mark.parametrize("lens,slots,rank,pad_to,k,n,gap", CASES)
def test_kernels_and_references_match_the_per_token_loop(lens, slots, rank, pad_to, k, n, gap):
    starts, lens_t, slots_t, max_len, t = segments(lens, slots, gap)
    a, b = adapters(3, rank, k, n, pad_to=pad_to, seed=len(lens) * k + n)
    g = torch.Generator().manual_seed(k * n)
    x = torch.randn(t, k, generator=g)
    y0 = torch.randn(t, n, generator=g)
    args = (starts, lens_t, slots_t, max_len)
    want_s = naive_shrink(x, a, *args[:3])
    for shrink in (lora_shrink, lora_shrink_reference):
        s = shrink(x, a, *args)
        assert s.dtype == torch.float32 and s.shape == (t, a.shape[1])
        torch.testing.assert_close(s.double(), want_s, rtol=1e-5, atol=1e-5)
    keep = ~adapter_rows(starts, lens_t, slots_t, t)
    assert torch.equal(s[keep], torch.zeros_like(s[keep]))  # no adapter: exactly zero

    s = want_s.float()
    want_y = naive_expand(s, b, *args[:3], y0)
    for expand in (lora_expand, lora_expand_reference):
        y = y0.clone()
        assert expand(s, b, *args, y) is None
        torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
        assert torch.equal(y[keep], y0[keep])  # rows of no adapter keep their values bit for bit


def test_strided_views_and_split_k():
    """x and y as column slices of wider tensors (row strides > width), lora_a stored transposed ([L, K, R] memory
    viewed as [L, R, K]), and shrink's split-K path (partial sums added with atomics)."""
    lens, slots = [3, 9, 1, 20], [1, 0, -1, 1]
    starts, lens_t, slots_t, max_len, t = segments(lens, slots)
    k, n, rank = 256, 80, 8
    a, b = adapters(2, rank, k, n, seed=7)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, K-stride R
    g = torch.Generator().manual_seed(3)
    big_x = torch.randn(t, k + 24, generator=g)
    x = big_x[:, 8:8 + k]
    big_y = torch.randn(t, n + 32, generator=g)
    args = (starts, lens_t, slots_t, max_len)
    want_s = naive_shrink(x, a, *args[:3])
    for split_k in (1, 2):
        s = lora_shrink(x, a_t, *args, split_k=split_k)
        torch.testing.assert_close(s.double(), want_s, rtol=1e-5, atol=1e-5)
    before = big_y.clone()
    y = big_y[:, 16:16 + n]
    want_y = naive_expand(s, b, *args[:3], y)
    lora_expand(s, b, *args, y)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    assert torch.equal(big_y[:, :16], before[:, :16]) and torch.equal(big_y[:, 16 + n:], before[:, 16 + n:])
    keep = ~adapter_rows(starts, lens_t, slots_t, t)
    assert torch.equal(big_y[keep], before[keep])


def test_fp16_shrink_accumulates_in_fp32():
    """fp16 x and A (the interpreter's fp16 dot is sound; bf16's is not, so bf16 is left to the GPU test): the
    kernel's fp32 sum is close to the float64 one of the same fp16 values, and expand into an fp16 y."""
    starts, lens_t, slots_t, max_len, t = segments(*MIXED)
    k, n = 96, 80
    a, b = adapters(3, 16, k, n, dtype=torch.float16, seed=11)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(5)).half()
    args = (starts, lens_t, slots_t, max_len)
    s = lora_shrink(x, a, *args)
    torch.testing.assert_close(s.double(), naive_shrink(x, a, *args[:3]), rtol=1e-4, atol=1e-4)  # fp32 sums
    y0 = torch.randn(t, n, generator=torch.Generator().manual_seed(6)).half()
    y = y0.clone()
    lora_expand(s, b, *args, y)
    want = naive_expand(s, b, *args[:3], y0)
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-3)
    keep = ~adapter_rows(starts, lens_t, slots_t, t)
    assert torch.equal(y[keep], y0[keep])


FUSED_CASES = [  # (lengths, slots, rank, K, N, gap)
    pytest.param(*DECODE, 8, 96, 80, 0, id="decode-r8"),
    pytest.param(*DECODE, 48, 96, 200, 0, id="decode-r48-n200"),  # BLOCK_R 64; two N tiles, the second partial
    pytest.param(*MIXED, 12, 96, 200, 2, id="mixed-r12-n200-gaps"),  # rows in no segment between the segments
    pytest.param(*MIXED, 48, 96, 80, 0, id="mixed-r48"),  # 37 and 64 rows: row tiles of 64, partial ones
]


@pytest.mark.parametrize("lens,slots,rank,k,n,gap", FUSED_CASES)
def test_fused_matches_the_per_token_loop(lens, slots, rank, k, n, gap):
    """lora_fused (and its reference) into y, a column slice of a wider tensor: y + B_slot (A_slot x) per token;
    rows of slot -1 or of no segment, and the columns beside the slice, keep their values bit for bit."""
    starts, lens_t, slots_t, max_len, t = segments(lens, slots, gap)
    a, b = adapters(3, rank, k, n, seed=rank * n + len(lens))
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(t, k, generator=g)
    wide0 = torch.randn(t, n + 40, generator=g)
    args = (starts, lens_t, slots_t, max_len)
    want = naive_expand(naive_shrink(x, a, *args[:3]), b, *args[:3], wide0[:, 24:24 + n])
    keep = ~adapter_rows(starts, lens_t, slots_t, t)
    for fused in (lora_fused, lora_fused_reference):
        wide = wide0.clone()
        y = wide[:, 24:24 + n]
        assert fused(x, a, b, *args, y) is None
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(wide[keep], wide0[keep])
        assert torch.equal(wide[:, :24], wide0[:, :24]) and torch.equal(wide[:, 24 + n:], wide0[:, 24 + n:])


def test_fused_fp16_and_mixed_dtypes():
    """fp16 x, A, B and y (the shrink summed in fp32, not rounded to fp16 between the two products); then fp16 x
    and A into an fp32 y (B fp32: exact fp32 expand)."""
    starts, lens_t, slots_t, max_len, t = segments(*MIXED)
    k, n = 96, 200
    a, b = adapters(3, 16, k, n, dtype=torch.float16, seed=13)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(t, k, generator=g).half()
    y0 = torch.randn(t, n, generator=g).half()
    args = (starts, lens_t, slots_t, max_len)
    s = naive_shrink(x, a, *args[:3])
    keep = ~adapter_rows(starts, lens_t, slots_t, t)
    y = y0.clone()
    lora_fused(x, a, b, *args, y)
    torch.testing.assert_close(y.double(), naive_expand(s, b, *args[:3], y0), rtol=2e-3, atol=2e-3)
    assert torch.equal(y[keep], y0[keep])
    y32 = y0.float()
    lora_fused(x, a, b.float(), *args, y32)
    torch.testing.assert_close(y32.double(), naive_expand(s, b, *args[:3], y0), rtol=1e-5, atol=1e-5)


def test_fused_dispatch_rule(monkeypatch):
    """lora_fused_pays: decode batches of small layers fuse, wide or deep layers and prefills do not; a layer of one
    N tile fuses (nothing is recomputed) unless its K is past FUSED_MAX_K; the bound is FUSED_REREAD_BUDGET's."""
    qkv, gate_up = (576, 960, 48), (576, 3072, 32)  # SmolLM2-135M at rank 16 (R_total 3 * 16, 2 * 16)
    assert lora_fused_pays(1, 1, *qkv) and lora_fused_pays(16, 1, *qkv)
    assert not lora_fused_pays(64, 1, *qkv)
    assert lora_fused_pays(8, 1, *gate_up) and not lora_fused_pays(16, 1, *gate_up)
    assert not lora_fused_pays(1, 2048, *qkv)  # a prefill: 32 row tiles, each N tile redoing its shrink
    assert not lora_fused_pays(1, 1, 4096, 6144, 48)  # Llama-3-8B's qkv: 48 N tiles re-reading 384 KB of A
    assert lora_fused_pays(10_000, 1, 1024, 128, 64)  # one N tile
    assert not lora_fused_pays(1, 1, 4096, 4096, 16)  # K past FUSED_MAX_K: one program would walk all of it
    assert lora_fused_pays(0, 0, *qkv)
    # the bound itself: SmolLM's qkv re-reads 7 N tiles * (48 + 1) * 576 * 2 bytes per decode sequence
    per_seq = 7 * 49 * 576 * 2
    monkeypatch.setattr(lora_module, "FUSED_REREAD_BUDGET", 3 * per_seq)
    assert lora_fused_pays(3, 1, *qkv) and not lora_fused_pays(4, 1, *qkv)
    assert lora_fused_pays(4, 1, *qkv, element_size=1)


def test_shrink_rows_covered_skips_the_memset(monkeypatch):
    """rows_covered=True with one K split: s starts uninitialised (poisoned with NaN here) and the kernel stores
    every row, zeros for slot -1 (several row tiles of them); with a K split it falls back to zeros. A promise the
    CPU arrays break is refused."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)
    k, rank = 96, 12
    a, _ = adapters(3, rank, k, 8, seed=5)
    for lens, slots in (DECODE, ([3, 37, 5, 20], [0, -1, 2, 1])):
        starts, lens_t, slots_t, max_len, t = segments(lens, slots)
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
        args = (starts, lens_t, slots_t, max_len)
        want = naive_shrink(x, a, *args[:3])
        for split_k in (1, 2):
            s = lora_shrink(x, a, *args, split_k=split_k, rows_covered=True)
            torch.testing.assert_close(s.double(), want, rtol=1e-5, atol=1e-5)
            keep = ~adapter_rows(starts, lens_t, slots_t, t)
            assert torch.equal(s[keep], torch.zeros_like(s[keep]))
    starts, lens_t, slots_t, max_len, t = segments([2, 3], [0, -1], gap=1)
    with pytest.raises(ValueError, match="rows_covered=True, but the segments cover 5 of the T = 7 rows"):
        lora_shrink(torch.randn(t, k), a, starts, lens_t, slots_t, max_len, rows_covered=True)


def test_empty_batches():
    a, b = adapters(2, 8, 32, 24)
    empty = torch.zeros(0, dtype=torch.int32)
    s = lora_shrink(torch.randn(0, 32), a, empty, empty, empty, 0)
    assert s.shape == (0, 8) and s.dtype == torch.float32
    x = torch.randn(5, 32)
    assert torch.equal(lora_shrink(x, a, empty, empty, empty, 0), torch.zeros(5, 8))
    y = torch.randn(5, 24)
    y0 = y.clone()
    lora_expand(torch.zeros(5, 8), b, empty, empty, empty, 0, y)
    assert torch.equal(y, y0)
    starts, lens_t, slots_t, _, _ = segments([0, 0], [0, 1])  # zero-length segments
    assert torch.equal(lora_shrink(x, a, starts, lens_t, slots_t, 0), torch.zeros(5, 8))
    for args in ((empty, empty, empty, 0), (starts, lens_t, slots_t, 0)):
        lora_fused(x, a, b, *args, y)
        assert torch.equal(y, y0)


def test_bad_inputs_name_the_value():
    a, b = adapters(3, 8, 32, 24)
    starts, lens_t, slots_t, max_len, t = segments([2, 3], [0, 3])  # slot 3 of L = 3
    x = torch.randn(t, 32)
    for fn in (lora_shrink, lora_shrink_reference):
        with pytest.raises(ValueError, match=r"seg_slots\[1\] = 3 .*\[-1, 3\)"):
            fn(x, a, starts, lens_t, slots_t, max_len)
    ok_slots = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"K.*x \(5, 33\).*lora_a \(3, 8, 32\)"):
        lora_shrink(torch.randn(t, 33), a, starts, lens_t, ok_slots, max_len)
    with pytest.raises(ValueError, match="dtype torch.float16 must equal x's torch.float32"):
        lora_shrink(x, a.half(), starts, lens_t, ok_slots, max_len)
    with pytest.raises(ValueError, match=r"seg_lens\[1\] = 3 is out of range \[0, max_seg_len = 2\]"):
        lora_shrink(x, a, starts, lens_t, ok_slots, 2)
    with pytest.raises(ValueError, match="same length S"):
        lora_shrink(x, a, starts, lens_t, ok_slots[:1], max_len)
    with pytest.raises(ValueError, match=r"y must be \[T, N\] with N = lora_b.shape\[1\] = 24"):
        lora_expand(torch.zeros(t, 8), b, starts, lens_t, ok_slots, max_len, torch.zeros(t, 25))
    with pytest.raises(ValueError, match=r"s must be the float32 \[T, R\] = \[5, 8\]"):
        lora_expand(torch.zeros(t, 16), b, starts, lens_t, ok_slots, max_len, torch.zeros(t, 24))
    with pytest.raises(ValueError, match="overlap"):
        check_segments(torch.tensor([0, 1]), torch.tensor([2, 2]), ok_slots, 2, t, 3)
    y = torch.zeros(t, 24)
    with pytest.raises(ValueError, match=r"seg_slots\[1\] = 3 .*\[-1, 3\)"):
        lora_fused(x, a, b, starts, lens_t, slots_t, max_len, y)
    with pytest.raises(ValueError, match=r"agree on L and R, got lora_a \(3, 8, 32\) and lora_b \(3, 24, 16\)"):
        lora_fused(x, a, torch.zeros(3, 24, 16), starts, lens_t, ok_slots, max_len, y)
    with pytest.raises(ValueError, match=r"same T, got x \(5, 32\) and y \(4, 24\)"):
        lora_fused(x, a, b, starts, lens_t, ok_slots, max_len, y[:4])
    with pytest.raises(ValueError, match="lora_b's dtype torch.float16 must equal y's torch.float32"):
        lora_fused(x, a, b.half(), starts, lens_t, ok_slots, max_len, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_kernels_match_reference_on_gpu():
    """A real-size bf16 batch: 32 decode sequences over L = 4 slots (some without adapter) and one 300-token
    prefill, K = N = 4096, R = 16; the default (split-K) shrink and split_k=1 against the reference."""
    k = n = 4096
    rank, num_slots = 16, 4
    slots = [(i % (num_slots + 1)) - 1 for i in range(32)] + [2]  # -1, 0, 1, 2, 3, -1, ...
    lens = [1] * 32 + [300]
    starts, lens_t, slots_t, max_len, t = segments(lens, slots, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, k, device="cuda", generator=g).bfloat16()
    a = (torch.randn(num_slots, rank, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    b = (torch.randn(num_slots, n, rank, device="cuda", generator=g) * 0.05).bfloat16()
    args = (starts, lens_t, slots_t, max_len)
    want_s = lora_shrink_reference(x, a, *args)
    for split_k in (None, 1):
        torch.testing.assert_close(lora_shrink(x, a, *args, split_k=split_k), want_s, rtol=1e-3, atol=1e-3)
    y0 = torch.randn(t, n, device="cuda", generator=g).bfloat16()
    y, want_y = y0.clone(), y0.clone()
    lora_expand(want_s, b, *args, y)
    lora_expand_reference(want_s, b, *args, want_y)
    torch.testing.assert_close(y.float(), want_y.float(), rtol=1.6e-2, atol=1.6e-2)
    keep = ~adapter_rows(starts.cpu(), lens_t.cpu(), slots_t.cpu(), t).cuda()
    assert torch.equal(y[keep], y0[keep])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_fused_matches_reference_on_gpu():
    """lora_fused at a real size in bf16: K = 4096 -> N = 6144 (Llama-3-8B's qkv) at R = 48, 32 decode segments
    over L = 4 slots (every fifth without adapter), into a column slice of a wider y; against the reference and
    against shrink + expand."""
    k, n, rank, num_slots = 4096, 6144, 48, 4
    slots = [(i % (num_slots + 1)) - 1 for i in range(32)]
    starts, lens_t, slots_t, max_len, t = segments([1] * 32, slots, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, k, device="cuda", generator=g).bfloat16()
    a = (torch.randn(num_slots, rank, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    b = (torch.randn(num_slots, n, rank, device="cuda", generator=g) * 0.05).bfloat16()
    wide0 = torch.randn(t, n + 64, device="cuda", generator=g).bfloat16()
    args = (starts, lens_t, slots_t, max_len)
    wide, want, split = wide0.clone(), wide0.clone(), wide0.clone()
    lora_fused(x, a, b, *args, wide[:, 32:32 + n])
    lora_fused_reference(x, a, b, *args, want[:, 32:32 + n])
    lora_expand(lora_shrink(x, a, *args), b, *args, split[:, 32:32 + n])
    torch.testing.assert_close(wide.float(), want.float(), rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(wide.float(), split.float(), rtol=1.6e-2, atol=1.6e-2)
    keep = ~adapter_rows(starts.cpu(), lens_t.cpu(), slots_t.cpu(), t).cuda()
    assert torch.equal(wide[keep], wide0[keep])
    assert torch.equal(wide[:, :32], wide0[:, :32]) and torch.equal(wide[:, 32 + n:], wide0[:, 32 + n:])
    s = lora_shrink(x, a, *args, split_k=1, rows_covered=True)  # uninitialised s, every row stored
    torch.testing.assert_close(s, lora_shrink_reference(x, a, *args), rtol=1e-3, atol=1e-3)


def test_kernels_compile_for_hopper_without_spills():
    """benchmarks/sass_lora.py: the decode launches of lora_fused, lora_shrink and lora_expand compiled for sm_90
    in bf16 by this CPU's Triton and ptxas (a separate process: the compiler, not the interpreter) keep within 128
    registers a thread (4 programs of 4 warps an SM), nothing spilled to local memory."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    import minillm.kernels

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this Triton wheel has no NVIDIA tools")
    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    script = (f"import sys, runpy; import minillm.kernels as k; k.__path__[:0] = {list(minillm.kernels.__path__)!r}; "
              f"sys.path.insert(0, {str(bench)!r}); sys.argv = ['sass_lora.py', '--json']; "
              f"runpy.run_path({str(bench / 'sass_lora.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert {row["kernel"] for row in rows} == {"fused", "shrink", "expand"} and len(rows) == 9
    for row in rows:
        assert not row["spills"] and row["registers"] <= 128, row
