"""Host overhead of one engine step: plain decode, prefill and the speculative verify step (issue 14, chapter 4).

    python benchmarks/bench_step_overhead.py [--steps 100] [--out results.json]

A decode step of a small model is bound by the host, not the GPU: the model's GPU time (a CUDA-graph replay) is
a fraction of the step's wall time; the rest is Python, building the step's metadata, copying it to the device
and waiting for the sampled tokens. This script measures that gap, per kind of step:

    step ms       time of LLMEngine.step() (median over --steps steps), everything included: wall time on a
                  GPU, the thread's CPU time on a CPU (robust to other processes sharing the cores)
    runner ms     of which ModelRunner.execute_model (metadata upload, forward, sampling, the tokens' copy back)
    not-forward   (CPU) step ms minus the eager forward's time: the step path's own host work
    gpu ms        (CUDA) GPU time of the forward alone: the decode graph's replay, timed with CUDA events
    host ms       step ms - gpu ms: what a faster host path can win
    h2d/d2h/sync  transfers and syncs of the step path, counted on the CPU (minillm.bench.step_transfers)
    cuda calls    (CUDA) per step, from torch.profiler: cudaMemcpyAsync calls, synchronising calls
                  (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize), and HtoD / DtoH memcpys

On CUDA the model is SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, FFN 1536, vocab 49152) with
random bf16 weights and CUDA graphs on (the default). On a CPU it is a 2-layer toy (a step's time is then all host
work): the figures compare host paths, not devices. The verify step is n-gram speculation with k = 3 drafts for
every sequence (the proposer's drafts topped up with the last token, so every step verifies 3 drafts).
Correctness first: the verify run's greedy output must equal plain decoding's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

from minillm.bench.step_transfers import build_engine, count_scenario, force_drafts, tiny_llama
from minillm.sampling_params import SamplingParams

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
               max_position_embeddings=8192, tie_word_embeddings=True)
# name -> (batch, prompt length, speculative k, sampling, the counted scenario of step_transfers)
CASES = {
    "decode b1": (1, 32, 0, "greedy", "decode"),
    "decode b32": (32, 32, 0, "greedy", "decode"),
    "decode b8 sampled": (8, 32, 0, "sampled", "decode_sampled"),
    "verify b1 k3": (1, 32, 3, "greedy", "verify"),
    "verify b8 k3": (8, 32, 3, "greedy", "verify"),
    "prefill b4 x 96": (4, 96, 0, "greedy", "prefill"),
}


def build_model(device: torch.device):
    if device.type != "cuda":
        return tiny_llama()
    from minillm.config import ModelConfig
    from minillm.engine.worker import RandomWeights
    config = ModelConfig(**SMOLLM2)
    return RandomWeights(0)(config, device, torch.bfloat16), config


def params_for(kind: str, max_tokens: int) -> SamplingParams:
    if kind == "sampled":
        return SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=max_tokens, ignore_eos=True, seed=None)
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(model, config, device, batch: int, prompt_len: int, k: int, kind: str, steps: int,
              prefill: bool) -> dict:
    """Median times of `steps` decode (or verify) steps, or (prefill) of `steps` prefill steps of fresh requests."""
    # on a GPU wall time (the host waits for the device within the step); on a (shared) CPU the thread's own CPU
    # time, which other processes' load does not inflate
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    engine = build_engine(model, config, device, max_num_seqs=max(batch, 4), num_speculative_tokens=k,
                          max_model_len=(prompt_len + steps * (k + 1) + 64 + 15) // 16 * 16)
    if k:
        force_drafts(engine)
    runner_times: list[float] = []
    execute = engine.executor.execute_model

    def timed_execute(step_input):
        start = clock()
        out = execute(step_input)
        runner_times.append(clock() - start)
        return out
    engine.executor.execute_model = timed_execute
    forward_times: list[float] = []
    forward = engine.runner.forward

    def timed_forward(prepared):
        start = clock()
        out = forward(prepared)
        forward_times.append(clock() - start)  # on a CPU the forward's compute; on a GPU its launch
        return out
    engine.runner.forward = timed_forward
    gen = torch.Generator().manual_seed(0)
    step_times: list[float] = []
    outputs: list[list[int]] = []
    for round_ in range(steps if prefill else 1):
        prompts = [torch.randint(0, config.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{round_}-{i}", prompt, params_for(kind, 1 if prefill else steps * (k + 1) + 8))
        if not prefill:
            engine.step()  # the prefill (not timed)
            engine.step()
            runner_times.clear()
            forward_times.clear()
        _sync(device)
        for _ in range(1 if prefill else steps):
            start = clock()
            finished = engine.step()
            _sync(device)
            step_times.append(clock() - start)
            outputs.extend(o.outputs[0].token_ids for o in finished if o.finished)
    del runner_times[len(step_times):], forward_times[len(step_times):]  # one of each per timed step
    while engine.has_unfinished_requests():
        engine.step()
    result = {"step_ms": 1e3 * statistics.median(step_times), "runner_ms": 1e3 * statistics.median(runner_times),
              "steps": len(step_times)}
    if device.type == "cpu":  # the toy's forward is CPU compute: what is left is the step path's host work
        result["outside_forward_ms"] = 1e3 * statistics.median(s - f for s, f in zip(step_times, forward_times))
    graphs = engine.runner.cuda_graphs
    if graphs is not None and not prefill:
        result["gpu_ms"] = replay_ms(graphs, batch, 1 + k)
        result["host_ms"] = result["step_ms"] - result["gpu_ms"]
        result["cuda_calls_per_step"] = profile_calls(engine, batch, kind, k, prompt_len)
    return result


def replay_ms(graphs, batch: int, q_len: int) -> float:
    """GPU time of one replay of the graph this batch runs (median of 50, CUDA events)."""
    size = graphs.bucket_for(batch)
    graph = graphs.graphs[size][q_len]
    # every graph's static inputs are views of one upload buffer, so another shape's step has overwritten them:
    # make every row a padding row (valid addresses) before replaying (on the H200 a replay of stale rows
    # indexed out of bounds)
    graphs._pad(graphs.inputs[size, q_len], 0, q_len, 0)
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_calls(engine, batch: int, kind: str, k: int, prompt_len: int, steps: int = 10) -> dict:
    """Per step, from torch.profiler: cudaMemcpyAsync calls, synchronising CUDA calls, HtoD and DtoH memcpys."""
    from torch.profiler import ProfilerActivity, profile
    for i in range(batch):
        engine.add_request(f"profiled-{i}", list(range(1, prompt_len + 1)), params_for(kind, 4 * steps * (k + 1)))
    engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    count = lambda pred: sum(1 for n in names if pred(n)) / steps  # noqa: E731
    return {"cudaMemcpyAsync": count(lambda n: n.startswith("cudaMemcpyAsync")),
            "synchronize": count(lambda n: n.startswith(("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                         "cudaEventSynchronize"))),
            "memcpy_htod": count(lambda n: n.startswith("Memcpy HtoD")),
            "memcpy_dtoh": count(lambda n: n.startswith("Memcpy DtoH"))}


def check_verify_equals_plain(model, config, device) -> float:
    """Greedy n-gram speculation (drafts topped up) must give plain decoding's tokens: exactly in fp32 on a CPU
    (an AssertionError otherwise); in bf16 on a GPU a 4-row verify and a 1-row decode may round a near-tie of a
    random model apart, so there the fraction of identical tokens is returned and reported."""
    outs = []
    for k in (0, 3):
        engine = build_engine(model, config, device, num_speculative_tokens=k)
        if k:
            force_drafts(engine)
        for i in range(3):
            engine.add_request(str(i), [(5 * i + j) % 200 + 1 for j in range(11 + i)], params_for("greedy", 24))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        outs.append(done)
    if device.type == "cpu" and outs[0] != outs[1]:
        raise AssertionError(f"verify steps changed the greedy output: {outs[0]} vs {outs[1]}")
    pairs = [(a, b) for r in outs[0] for a, b in zip(outs[0][r], outs[1][r])]
    return sum(a == b for a, b in pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per case (default 100)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--no-counts", action="store_true", help="skip the CPU transfer counts")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error(f"--steps must be >= 3, got {args.steps}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a toy model: one thread is fastest and least noisy on a shared CPU
    model, config = build_model(device)
    same = check_verify_equals_plain(model, config, device)
    print(f"greedy tokens of the verify run equal to plain decoding's: {100 * same:.1f}%", file=sys.stderr)
    results = {}
    for name, (batch, prompt_len, k, kind, scenario) in CASES.items():
        row = time_case(model, config, device, batch, prompt_len, k, kind, args.steps, scenario == "prefill")
        if not args.no_counts:
            row["counts"] = count_scenario(scenario).counts()
        results[name] = row
        print(f"  {name}: {row}", file=sys.stderr)
    print(f"\nstep overhead on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"(torch {torch.__version__})")
    cpu = device.type == "cpu"
    print(f"{'case':20s} {'step ms':>8s} {'runner ms':>9s} "
          + ("not-forward ms" if cpu else f"{'gpu ms':>7s} {'host ms':>8s}") + "  h2d/d2h/sync  cuda calls")
    for name, r in results.items():
        c = r.get("counts", {})
        calls = r.get("cuda_calls_per_step")
        calls_text = "" if calls is None else " ".join(f"{k}={v:g}" for k, v in calls.items())
        split = f"{r['outside_forward_ms']:14.3f}" if cpu else \
            f"{r.get('gpu_ms', float('nan')):7.3f} {r.get('host_ms', float('nan')):8.3f}"
        print(f"{name:20s} {r['step_ms']:8.3f} {r['runner_ms']:9.3f} {split}  "
              f"{c.get('h2d', '-')}/{c.get('d2h', '-')}/{c.get('sync', '-')}  {calls_text}")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "date": datetime.date.today().isoformat(), "torch": torch.__version__, "steps": args.steps,
                "command": "python " + " ".join(sys.argv)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "verify_equals_plain": same, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
