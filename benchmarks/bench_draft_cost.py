"""What one proposal of a head proposer (EAGLE, MTP, Medusa) costs: milliseconds, kernel launches, host syncs.

A speculative step is worth taking only when drafting is cheap next to a target step (1.42 ms for SmolLM2-135M at
batch 1 on the H200, with CUDA graphs). This script times `propose_with_probs` alone, with nothing else in the loop:

    target   SmolLM2-135M's shapes (hidden 576, 9/3 heads of 64, FFN 1536, vocab 49152, tied embeddings) with
             random bf16 weights. A proposer reads only the target's embedding, final norm and LM head, so only those
             are built (the 30 decoder layers would not change the figure).
    heads    random heads of each kind: EAGLE (one layer, run k times), MTP (k modules), Medusa (k residual blocks)
    windows  every request has a full window of recorded features (a 200-token context, window 64)
    k        5 drafts per request, greedy; batch 1 and 8

Correctness first: where CUDA graphs are on, the drafts they replay must equal the eager drafts of the same
proposal. Then, per (kind, batch, mode): the median wall time of a proposal after warm-up, and from a
torch.profiler trace of a few proposals, per proposal: kernels run on the GPU, kernel launches by the host
(cudaLaunchKernel and friends; a graph replay is one cudaGraphLaunch), cudaStreamSynchronize / device syncs, and
memcpys; plus the top kernels by GPU time. `--quick` runs it all on the CPU with a tiny target (the profiler then
counts the torch ops called instead of kernels): a smoke test, not a figure.

    python benchmarks/bench_draft_cost.py --out results/draft_cost_h200.json           (H200, well under 2 minutes)
    python benchmarks/bench_draft_cost.py --quick --out /tmp/draft_cost_cpu.json       (CPU smoke test)
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from collections import Counter

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.sampling_params import SamplingParams
from minillm.speculative.head_kinds import KINDS, new_heads
from minillm.speculative.heads import HeadConfig, TargetParts

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
VIEW_OPS = {"aten::view", "aten::slice", "aten::select", "aten::transpose", "aten::permute", "aten::unsqueeze",
            "aten::expand", "aten::reshape", "aten::t", "aten::as_strided", "aten::empty", "aten::alias",
            "aten::detach", "aten::lift_fresh", "aten::unbind", "aten::chunk", "aten::split", "aten::narrow"}
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


class TargetShell(nn.Module):
    """Only what a head proposer reads of a Llama target: model.embed_tokens, model.norm, lm_head (tied)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.model.norm.eps = config.rms_norm_eps
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


def build_proposer(kind: str, config: ModelConfig, k: int, device: torch.device, dtype: torch.dtype,
                   cuda_graphs: bool):
    torch.manual_seed(0)
    head_config = HeadConfig.for_target(kind, config, k)
    heads = new_heads(head_config)
    with torch.no_grad():  # random, not the identity start: drafts must not be all the same token
        for p in heads.parameters():
            if p.dim() == 2:  # matrices; norms stay at one, biases at zero
                p.normal_(0.0, p.shape[1] ** -0.5)
    target = TargetShell(config)
    with torch.no_grad():
        target.model.embed_tokens.weight.normal_(0.0, 0.5)
    heads, target = heads.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)
    proposer_cls = KINDS[kind][1]
    options = {"cuda_graphs": cuda_graphs} if "cuda_graphs" in inspect.signature(proposer_cls).parameters else {}
    if cuda_graphs and not options:
        raise SystemExit(f"{proposer_cls.__name__} takes no cuda_graphs option: this checkout cannot replay graphs")
    return proposer_cls(heads, head_config, TargetParts(target), **options)


def requests_with_features(proposer, config: ModelConfig, batch: int, context: int, device, dtype):
    """`batch` greedy sequences of `context` tokens whose features (positions 0 .. context - 2) are recorded, as
    a prefill of context - 1 tokens would have left them."""
    g = torch.Generator().manual_seed(batch)
    seqs = []
    for i in range(batch):
        tokens = torch.randint(0, config.vocab_size, (context,), generator=g).tolist()
        seq = Sequence(f"r{i}", tokens, SamplingParams(temperature=0, max_tokens=64))
        seqs.append(seq)
    rows = [torch.randn(context - 1, config.hidden_size, generator=g).to(device, dtype) for _ in seqs]
    proposer.record_hidden_states(ScheduledBatch(seqs, [context - 1] * batch), rows, [[] for _ in seqs])
    return seqs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_proposals(proposer, seqs, k: int, device, repeats: int) -> tuple[float, list[list[int]]]:
    drafts = proposer.propose(seqs, [k] * len(seqs))  # warm-up (captures a graph where graphs are on)
    for _ in range(3):
        proposer.propose(seqs, [k] * len(seqs))
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        proposer.propose_with_probs(seqs, [k] * len(seqs))  # returns host lists: the proposal's final sync is in
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, drafts


def profile_proposals(proposer, seqs, k: int, device, count: int) -> dict:
    """Per proposal: GPU kernels, host launch calls, syncs, memcpys (CPU: aten ops); the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(count):
            proposer.propose_with_probs(seqs, [k] * len(seqs))
        synchronize(device)
    names, kernel_time, kernels = Counter(), Counter(), 0
    for event in prof.events():
        names[event.name] += 1
        if device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            kernel_time[event.name] += event.time_range.elapsed_us()
    if device.type != "cuda":  # no kernels: count the torch ops each proposal calls (outermost, views left out)
        kernels = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS
                      and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
        kernel_time = Counter()
    return {"kernels": kernels / count,
            "launch_calls": sum(names[n] for n in LAUNCH_CALLS) / count,
            "graph_launches": names["cudaGraphLaunch"] / count,
            "syncs": sum(names[n] for n in SYNC_CALLS) / count,
            "memcpys": sum(n for name, n in names.items() if name.startswith(("cudaMemcpy", "aten::copy_"))
                           and "Memcpy" in name) / count,
            "top_kernels": [(name[:70], round(us / count, 1)) for name, us in kernel_time.most_common(5)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test with a tiny target")
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--kinds", default="eagle,mtp,medusa")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("-k", type=int, default=5, help="drafts per proposal (1-16)")
    args = parser.parse_args()
    if not 1 <= args.k <= 16:
        raise SystemExit(f"-k must be in [1, 16], got {args.k}")
    kinds = args.kinds.split(",")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise SystemExit(f"--kinds must name some of {', '.join(KINDS)}, got {unknown[0]!r}")
    batches = [int(b) for b in args.batches.split(",")]
    on_gpu = torch.cuda.is_available() and not args.quick
    if not on_gpu:
        torch.set_num_threads(1)  # small ops on a shared CPU: one thread times steadier
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = ModelConfig(**(SMOLLM2 if on_gpu else TINY))
    context, repeats, profiled = 200, (50 if on_gpu else 5), (10 if on_gpu else 2)
    modes = [False, True] if on_gpu else [False]
    rows = []
    for kind in kinds:
        for batch in batches:
            eager_drafts = None
            for graphs in modes:
                proposer = build_proposer(kind, config, args.k, device, dtype, graphs)
                seqs = requests_with_features(proposer, config, batch, context, device, dtype)
                ms, drafts = time_proposals(proposer, seqs, args.k, device, repeats)
                if graphs and drafts != eager_drafts:  # correctness before speed
                    raise SystemExit(f"{kind} batch {batch}: graph drafts {drafts} differ from eager {eager_drafts}")
                eager_drafts = drafts
                if any(len(d) != args.k for d in drafts):
                    raise SystemExit(f"{kind} batch {batch}: asked for {args.k} drafts, got {drafts}")
                row = {"kind": kind, "batch": batch, "k": args.k, "mode": "graphs" if graphs else "eager",
                       "ms_per_proposal": round(ms, 3), **profile_proposals(proposer, seqs, args.k, device, profiled)}
                rows.append(row)
                print(f"  {kind:6s} batch {batch:2d} {row['mode']:6s}: {ms:8.3f} ms", flush=True)
    unit = "kernels" if on_gpu else "torch ops"
    print(f"\nhead proposal cost, k = {args.k}, window 64, {'H200 bf16' if on_gpu else 'CPU fp32 tiny (--quick)'}")
    print(f"{'kind':6s} {'batch':>5s} {'mode':6s} {'ms/proposal':>11s} {unit:>9s} {'launches':>8s} {'graphs':>6s} "
          f"{'syncs':>5s} {'memcpys':>7s}")
    for r in rows:
        print(f"{r['kind']:6s} {r['batch']:5d} {r['mode']:6s} {r['ms_per_proposal']:11.3f} {r['kernels']:9.1f} "
              f"{r['launch_calls']:8.1f} {r['graph_launches']:6.1f} {r['syncs']:5.1f} {r['memcpys']:7.1f}")
    if on_gpu:
        print("\ntop kernels per proposal (us), batch 1:")
        for r in rows:
            if r["batch"] == batches[0]:
                print(f"  {r['kind']} {r['mode']}: {r['top_kernels']}")
    meta = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "context": context, "window": 64, "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
