"""The LoRA kernels timed where the engine runs them, inside a CUDA graph: us per call, bf16, 4 adapter slots.

    python benchmarks/probe_lora_graphs.py

triton.testing.do_bench times a Python call, and a LoRA kernel pair at decode is a few microseconds of GPU work
behind tens of microseconds of host launch path; the engine replays them in graphs, where only the GPU side
counts. Here 20 calls are captured in one graph and replayed (best of 5 x 10 replays), for the four adapted layers
of Llama-3-8B and of SmolLM2-135M at their stacked ranks (qkv 3R, o R, gate_up 2R, down R; R = 16), at 1-64
decode rows (one segment per row, as in the decode graphs). Three ways: shrink + expand (the default split of K),
shrink with split_k=1 and rows_covered (no memset, no atomics) + expand, and lora_fused; `(rule: fused)` marks
where lora_fused_pays picks the fused kernel. Needs CUDA; prints a table.
"""
import torch
from minillm.kernels.lora import lora_expand, lora_fused, lora_fused_pays, lora_shrink

REPS = 20
shapes = [("8b qkv", 4096, 6144, 48), ("8b o", 4096, 4096, 16), ("8b gate_up", 4096, 28672, 32),
          ("8b down", 14336, 4096, 16), ("smol qkv", 576, 960, 48), ("smol o", 576, 576, 16),
          ("smol gate_up", 576, 3072, 32), ("smol down", 1536, 576, 16)]


def graph_time(fn):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    g.replay(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 1e9
    for _ in range(5):
        start.record()
        for _ in range(10):
            g.replay()
        end.record(); torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (10 * REPS))
    return best


def empty_graph():
    return graph_time(lambda: None)


for name, k, n, r in shapes:
    a = torch.randn(4, r, k, dtype=torch.bfloat16, device="cuda") * 0.02
    b = torch.randn(4, n, r, dtype=torch.bfloat16, device="cuda") * 0.02
    for m in (1, 4, 16, 64):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        y = torch.zeros(m, n, dtype=torch.bfloat16, device="cuda")
        starts = torch.arange(m, dtype=torch.int32, device="cuda")
        lens = torch.ones(m, dtype=torch.int32, device="cuda")
        slots = torch.arange(m, dtype=torch.int32, device="cuda") % 4
        args = (starts, lens, slots, 1)
        se = graph_time(lambda: lora_expand(lora_shrink(x, a, *args), b, *args, y))
        se1 = graph_time(lambda: lora_expand(lora_shrink(x, a, *args, split_k=1, rows_covered=True), b, *args, y))
        fu = graph_time(lambda: lora_fused(x, a, b, *args, y))
        print(f"{name:13s} M={m:3d}: shrink+expand {se:6.2f} us, split1 {se1:6.2f}, fused {fu:6.2f}"
              f"{'  (rule: fused)' if lora_fused_pays(m, 1, k, n, r) else ''}", flush=True)
