"""kernels/fused_moe.py: the routing's alignment into expert blocks, and the grouped-GEMM MoE MLP against the
per-expert loop of minillm/layers/moe.py (Triton's interpreter on a CPU, fp32; bf16 on a GPU)."""
import pytest
import torch

from minillm.kernels.fused_moe import fused_moe, moe_align
from minillm.layers.moe import combine_expert_outputs, route, run_experts


def test_moe_align_groups_pairs_by_expert_in_padded_blocks():
    # pairs (token * k + j): 0 -> e2, 1 -> e0, 2 -> e2, 3 -> e1, 4 -> e0, 5 -> e2; expert 3 gets nothing
    sorted_pairs, block_expert, counts = moe_align(torch.tensor([[2, 0], [2, 1], [0, 2]]), 4, 4)
    assert counts.tolist() == [2, 1, 3, 0]
    assert sorted_pairs.tolist()[:12] == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6]  # 6 = T * k: a padding row
    assert block_expert.tolist()[:3] == [0, 1, 2] and all(b == -1 for b in block_expert.tolist()[3:])
    assert sorted_pairs.numel() == 4 * block_expert.numel() and all(p == 6 for p in sorted_pairs.tolist()[12:])


def _moe_case(tokens, experts, top_k, hidden, inter, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    weights, ids = route(torch.randn(tokens, experts, generator=g) * 2, top_k)
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


def _loop(x, w13, w2, weights, ids):
    """The reference: minillm/layers/moe.py's per-expert loop, the engine's CPU path."""
    inter = w2.shape[2]

    def expert(e):
        def run(rows):
            gate_up = rows @ w13[e].T
            return (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[e].T
        return run
    rows = x.repeat_interleave(ids.shape[1], dim=0)
    out, counts, _ = run_experts(rows, ids.reshape(-1), [expert(e) for e in range(w13.shape[0])])
    return combine_expert_outputs(out, weights), counts


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", [(1, 4, 2, 32, 48), (7, 8, 2, 32, 24),
                                                              (33, 16, 4, 64, 40), (5, 3, 3, 16, 16)])
def test_fused_moe_equals_the_expert_loop(tokens, experts, top_k, hidden, inter):
    case = _moe_case(tokens, experts, top_k, hidden, inter)
    out, counts = fused_moe(*case)
    ref, ref_counts = _loop(*case)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == ref_counts.tolist()
    assert ref.abs().max() > 0.1


def test_fused_moe_names_bad_shapes():
    x, w13, w2, weights, ids = _moe_case(3, 4, 2, 16, 8)
    with pytest.raises(ValueError, match=r"need w13 \[E, 2I, 16\] and w2 \[E, 16, I\]"):
        fused_moe(x, w13, w2[:, :, :4], weights, ids)
    with pytest.raises(ValueError, match=r"topk_ids and topk_weights must both be \[3, k\]"):
        fused_moe(x, w13, w2, weights[:2], ids[:2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 8, 64, 300])
def test_fused_moe_gpu_bf16(tokens):
    """Qwen3-30B-A3B's expert shapes scaled down (128 experts, top-8): bf16 on the GPU against the loop in fp32."""
    case = _moe_case(tokens, 128, 8, 256, 96, device="cuda", dtype=torch.bfloat16, seed=tokens)
    out, counts = fused_moe(*case)
    ref, ref_counts = _loop(*[t.float() if t.is_floating_point() else t for t in case])
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert counts.tolist() == ref_counts.tolist()
