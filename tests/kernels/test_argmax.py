"""The two-stage argmax kernel (kernels/argmax.py) against torch.argmax, under the Triton interpreter on CPU."""
import pytest
import torch

import minillm.platform  # noqa: F401  (sets TRITON_INTERPRET on CPU before triton is imported)
from minillm.kernels.argmax import CHUNK, argmax_last_dim


@pytest.mark.parametrize("rows,vocab", [(1, 3 * CHUNK + 17), (3, CHUNK), (2, 100)])
def test_argmax_equals_torch(rows, vocab):
    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g)
    assert torch.equal(argmax_last_dim(logits), logits.argmax(dim=-1))


def test_ties_and_special_values_pick_torchs_index():
    vocab = 2 * CHUNK + 5
    logits = torch.zeros(4, vocab)
    logits[0, [CHUNK + 3, 7, 2 * CHUNK + 1]] = 5.0          # a tie across chunks: the first position wins
    logits[1] = float("-inf")                                # all -inf: index 0, as torch
    logits[2, CHUNK + 9] = float("nan")                      # NaN is the maximum, as torch
    logits[3, -1] = 1.0                                      # the maximum in the ragged last chunk
    assert argmax_last_dim(logits).tolist() == [7, 0, CHUNK + 9, vocab - 1]
    assert argmax_last_dim(logits).tolist() == logits.argmax(dim=-1).tolist()


def test_strided_rows_and_bad_input():
    base = torch.randn(3, 2 * CHUNK)
    view = base[:, :CHUNK + 1]                               # rows strided by 2 * CHUNK
    assert torch.equal(argmax_last_dim(view), view.argmax(dim=-1))
    with pytest.raises(ValueError, match="2-D"):
        argmax_last_dim(torch.randn(5))
    with pytest.raises(ValueError, match="contiguous"):
        argmax_last_dim(base.t())
    with pytest.raises(ValueError, match="vocab = 0"):
        argmax_last_dim(torch.empty(2, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 8, 256])
def test_argmax_on_gpu_equals_torch(rows):
    logits = torch.randn(rows, 128256, device="cuda").to(torch.bfloat16)  # bf16 ties are common: a real test
    assert torch.equal(argmax_last_dim(logits), logits.float().argmax(dim=-1))
