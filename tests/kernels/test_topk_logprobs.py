"""The two-stage top-k of log-probabilities (kernels/topk_logprobs.py) against torch, under the Triton interpreter."""
import pytest
import torch

import minillm.platform  # noqa: F401  (sets TRITON_INTERPRET on CPU before triton is imported)
from minillm.kernels.topk_logprobs import CHUNK, MAX_K, topk_log_softmax


@pytest.mark.parametrize("rows,vocab,k", [(3, 3 * CHUNK + 17, 8), (2, CHUNK, 16), (4, 100, 5), (1, 2 * CHUNK, 1)])
def test_equals_log_softmax_topk(rows, vocab, k):
    g = torch.Generator().manual_seed(rows * vocab + k)
    logits = 4 * torch.randn(rows, vocab, generator=g)
    values, indices = topk_log_softmax(logits, k)
    want_values, want_indices = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    assert torch.equal(indices, want_indices)  # random logits: no ties
    torch.testing.assert_close(values, want_values, rtol=0, atol=1e-5)


def test_winners_of_one_chunk_ties_and_bf16():
    """All top-k in one chunk (stage 2 must take several candidates of one chunk), ties to the first position,
    bf16 logits compared without an fp32 copy."""
    vocab = 3 * CHUNK
    logits = torch.zeros(2, vocab, dtype=torch.bfloat16)
    logits[0, CHUNK + torch.arange(6)] = torch.tensor([3.0, 9.0, 5.0, 7.0, 1.0, 8.0], dtype=torch.bfloat16)
    logits[1, [2 * CHUNK + 4, 11, CHUNK + 2]] = 6.0  # a three-way tie across chunks
    values, indices = topk_log_softmax(logits, 4)
    assert indices[0].tolist() == [CHUNK + 1, CHUNK + 5, CHUNK + 3, CHUNK + 2]
    assert indices[1, :3].tolist() == [11, CHUNK + 2, 2 * CHUNK + 4]
    want = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(values, want.gather(1, indices), rtol=0, atol=1e-5)


def test_masked_logits_and_a_chunk_masked_whole():
    logits = torch.randn(2, 3 * CHUNK)
    logits[0, CHUNK:2 * CHUNK] = float("-inf")  # a whole chunk masked: its share of the normaliser is 0
    logits[1, ::2] = float("-inf")
    values, indices = topk_log_softmax(logits, 6)
    want_values, want_indices = torch.log_softmax(logits, dim=-1).topk(6, dim=-1)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, rtol=0, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        topk_log_softmax(torch.randn(5), 2)
    with pytest.raises(ValueError, match="contiguous"):
        topk_log_softmax(torch.randn(8, 3).t(), 2)
    with pytest.raises(ValueError, match=f"k must be an integer in \\[1, min\\({MAX_K}, vocab = 10\\)\\], got 11"):
        topk_log_softmax(torch.randn(2, 10), 11)
    with pytest.raises(ValueError, match="floating point"):
        topk_log_softmax(torch.ones(2, 10, dtype=torch.int64), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_bf16_search_shapes():
    logits = torch.randn(16, 49152, device="cuda", dtype=torch.bfloat16)
    values, indices = topk_log_softmax(logits, 16)
    full = torch.log_softmax(logits.float(), dim=-1)
    # bf16 logits tie often, so torch may name other positions of equal value: compare the values, and check that
    # ours are the log-probabilities at our positions
    torch.testing.assert_close(values, full.topk(16, dim=-1).values, rtol=0, atol=1e-4)
    torch.testing.assert_close(full.gather(1, indices), values, rtol=0, atol=1e-4)
    assert all(len(set(row)) == 16 for row in indices.tolist())
