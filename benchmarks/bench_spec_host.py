"""Where a speculative step's time goes at batch 1 (or --batch B): host work, GPU work, host waits (issue 11, ch. 9).

    python benchmarks/bench_spec_host.py --out spec_host.json                     (H200: random SmolLM2-shaped weights)
    python benchmarks/bench_spec_host.py --model PATH.gguf --out spec_host.json   (the real model and shipped heads)
    python benchmarks/bench_spec_host.py --quick --out /tmp/spec_host_cpu.json    (CPU smoke test, tiny model)

At batch 1 a step of SmolLM2-135M is about a millisecond of GPU work, so a speculative method wins only if the host
keeps the GPU busy: every time the host waits for the device and then prepares the next launch, the GPU idles.
For plain decoding, n-gram prompt lookup, EAGLE and EAGLE-2 trees (eagle_tree) this script generates 128 tokens
greedily from one prompt and reports, per engine step:

    ms/step     wall time of LLMEngine.step (timed run, after a warm-up that captures the CUDA graphs)
    gpu ms      GPU busy time per step: the union of the kernels' and copies' intervals in a torch.profiler trace
    idle ms     ms/step - gpu ms: the time the GPU waits for the host
    syncs       blocking syncs per step (cudaStreamSynchronize, cudaDeviceSynchronize, synchronous cudaMemcpy: a
                .cpu() / .tolist() of a device tensor): the budget is one, the verify step's download
    sync ms     host time spent blocked in them per step
    ev / ev ms  cudaEventSynchronize calls per step and the time blocked in them: collecting a proposal drafted
                ahead (free when the draft finished while the host worked; the time says how often it did not)
    d2h         device-to-host copies per step (a non-blocking copy into pinned memory counts here, not in syncs)
    tok/step    tokens emitted per step (1 for plain decoding); speedup: plain's wall time / the method's

The head methods run twice: as shipped, drafting when the engine asks (the proposal's read-back blocks before the
verify step is built), and "ahead" (SpeculativeConfig.draft_ahead, minillm/speculative/draft_ahead.py: step N+1's
proposal starts when step N's features are recorded and comes back by a non-blocking copy): the difference is what
overlapping the draft with the host's bookkeeping buys. Correctness first: the greedy tokens of every method are
compared with plain decoding's (equal in fp32; in bf16 a verify step's rows may round differently from a one-token
step's, so a near-tie can flip: that is numerics, not the method).

Timing: the timed generation runs --repeats times (after gc.collect(): a full collection of a process that imported
torch costs tens of milliseconds, as much as a whole run's difference between two variants) and the median run
counts. A second table splits the host time of a step into phases (wall ms per step inside each call, waits
included): propose (drafting; with "no ahead" it includes waiting for the draft), schedule, execute (the target's
forward: building inputs, launching, waiting for the verify step's download), verify (acceptance, KV moves of
trees), record (features; with "ahead" the next draft's launch), postprocess (the scheduler's rollback and
appends), and the rest of LLMEngine.step (outputs, stop checks, release, building the step input). "attn" is the
part of execute spent in the attention layers' Python calls: zero where a whole-forward CUDA graph replays the step
(plain decode, chain verify, and token-tree verify steps that fit the tree graphs of minillm/engine/cuda_graph.py),
about 30 calls per step where a step runs the piecewise graphs around eager attention
(minillm/engine/piecewise_graph.py): a tree larger than the captured one, or a step mixed with a prefill. The rows
with "ahead" set SpeculativeConfig.draft_ahead=True, the others False (its default, None, is on for a GPU).

Without --model the target has SmolLM2-135M's shapes with random bf16 weights and the EAGLE head is random too: the
acceptance figures are then meaningless, the per-step times are not. With --model the EAGLE head is the shipped one.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

from minillm import LLM, SamplingParams
from minillm.bench.step_transfers import tiny_llama
from minillm.loader.no_tokenizer import NoTokenizer

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
               max_position_embeddings=8192, tie_word_embeddings=True)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")
K = 5


def base_llm(args: argparse.Namespace, device: torch.device) -> tuple[LLM, str | None]:
    """(an LLM whose weights every variant shares, the EAGLE heads directory: None = the shipped heads)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        return LLM(args.model, device=str(device), dtype=dtype, max_model_len=1024, max_num_seqs=2,
                   enforce_eager=True), None  # the variants capture their own graphs
    from minillm.config import EngineConfig, ModelConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.engine.worker import RandomWeights
    from minillm.speculative.head_kinds import new_heads
    from minillm.speculative.heads import HeadConfig, save_heads
    if device.type == "cuda":
        config = ModelConfig(**SMOLLM2)
        model = RandomWeights(0)(config, device, dtype)
    else:
        model, config = tiny_llama()
    engine = LLMEngine(model, NoTokenizer(), config,
                       EngineConfig(max_model_len=1024, max_num_seqs=2, num_kv_blocks=8, enforce_eager=True),
                       device=device, dtype=dtype)  # never stepped: the variants share its weights
    heads_dir = tempfile.mkdtemp(prefix="spec_host_eagle_")
    torch.manual_seed(0)
    head_config = HeadConfig.for_target("eagle", config, K)
    save_heads(heads_dir, new_heads(head_config), head_config)
    return LLM.from_engine(engine), heads_dir


def prompt_ids(llm: LLM, vocab: int) -> list[int]:
    """A summary prompt (text quoted back: n-gram lookup has something to find), or, without a tokenizer, 200
    random ids with a repeated stretch."""
    try:
        import sys
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_speculative import SUMMARY
        return list(llm.llm_engine.tokenizer.encode(SUMMARY[0]))
    except ValueError:  # the random-weight target has no tokenizer
        g = torch.Generator().manual_seed(0)
        head = torch.randint(0, vocab, (120,), generator=g).tolist()
        return head + head[20:100]


def gpu_busy_ms(prof) -> float:
    """Union of the device intervals (kernels, memcpys, memsets) of a trace, in ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    total, current = 0.0, None
    for start, end in spans:
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    if current is not None:
        total += current[1] - current[0]
    return total / 1e3


PHASES = ("propose", "schedule", "execute", "verify", "record", "postprocess", "rest")
SUB_PHASES = ("attn",)  # inside execute


def time_phases(engine, clock, totals: dict[str, float]) -> None:
    """Wrap the engine's per-step calls (instance attributes: nothing in the engine changes) so that each adds its
    wall time to totals[phase]."""
    def timed(obj, name: str, phase: str) -> None:
        call = getattr(obj, name)

        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return call(*args, **kwargs)
            finally:
                totals[phase] += clock() - start
        setattr(obj, name, wrapper)
    decoder = engine.speculative
    if decoder is not None:
        for name, phase in (("propose", "propose"), ("verify", "verify"), ("record_step", "record")):
            timed(decoder, name, phase)
    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.scheduler, "postprocess", "postprocess")
    timed(engine.executor, "execute_model", "execute")
    for layer in engine.runner.attention_layers:  # instance attributes on the shared model: untimed() removes them
        timed(layer, "forward", "attn")


def untimed(engine) -> None:
    for layer in engine.runner.attention_layers:
        layer.__dict__.pop("forward", None)


def batch_prompts(ids: list[int], batch: int) -> list[list[int]]:
    """`batch` prompts from one: the i-th drops its first i tokens (distinct sequences, the same text to find)."""
    return [ids[i % max(len(ids) - 8, 1):] for i in range(batch)]


def run_variant(llm: LLM, label: str, spec: dict | None, ids: list[int], device: torch.device,
                max_tokens: int, repeats: int, batch: int = 1) -> dict:
    prompts = batch_prompts(ids, batch)
    blocks = batch * (-(-(len(ids) + max_tokens + 2 * K) // 16)) + 16  # every sequence's blocks, at 16 tokens each
    variant = llm.share_model(max_num_seqs=max(2, batch), num_kv_blocks=max(80, blocks), speculative_config=spec)
    engine = variant.llm_engine
    decoder = engine.speculative
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    variant.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    variant.generate(prompts, params, use_tqdm=False)  # warm-up: graphs of every bucket this run replays
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    phases = dict.fromkeys(PHASES + SUB_PHASES, 0.0)
    time_phases(engine, clock, phases)
    step = engine.step
    steps = [0, 0.0]

    def timed_step():
        start = clock()
        out = step()
        steps[0] += 1
        steps[1] += clock() - start
        return out
    engine.step = timed_step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = []
    for _ in range(repeats):
        gc.collect()
        sync()
        before = dict(phases)
        steps[:] = [0, 0.0]
        start = clock()
        tokens = [t for out in variant.generate(prompts, params, use_tqdm=False) for t in out.outputs[0].token_ids]
        sync()
        runs.append((clock() - start, steps[0], steps[1], {k: phases[k] - before[k] for k in phases}))
    untimed(engine)
    wall, num_steps, step_seconds, spent = sorted(runs, key=lambda r: r[2] / r[1])[len(runs) // 2]  # the median
    spent["rest"] = step_seconds - sum(spent[k] for k in PHASES)
    row = {"method": label, "wall_ms": round(wall * 1e3, 2), "steps": num_steps,
           "ms_per_step": round(1e3 * step_seconds / num_steps, 3),
           "ms_per_step_runs": [round(1e3 * r[2] / r[1], 3) for r in runs],
           "phase_ms_per_step": {k: round(1e3 * v / num_steps, 3) for k, v in spent.items()},
           "tokens_per_step": round(len(tokens) / batch / max(num_steps - 1, 1), 3), "tokens": list(tokens)}
    engine.step = step
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        steps[0] = 0
        engine.step = timed_step
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            variant.generate(prompts, params, use_tqdm=False)
            sync()
        calls, blocked = {}, {}  # host-side CUDA runtime calls: count, microseconds
        for e in prof.events():
            calls[e.name] = calls.get(e.name, 0) + 1
            blocked[e.name] = blocked.get(e.name, 0.0) + e.time_range.elapsed_us()
        n = max(steps[0], 1)
        row["gpu_ms_per_step"] = round(gpu_busy_ms(prof) / n, 3)
        row["idle_ms_per_step"] = round(row["ms_per_step"] - row["gpu_ms_per_step"], 3)
        row["syncs_per_step"] = round(sum(calls.get(c, 0) for c in SYNC_CALLS) / n, 2)
        row["sync_ms_per_step"] = round(sum(blocked.get(c, 0.0) for c in SYNC_CALLS) / n / 1e3, 3)
        row["event_syncs_per_step"] = round(calls.get("cudaEventSynchronize", 0) / n, 2)
        row["event_sync_ms_per_step"] = round(blocked.get("cudaEventSynchronize", 0.0) / n / 1e3, 3)
        row["d2h_per_step"] = round(sum(c for name, c in calls.items() if "DtoH" in name) / n, 2)
        row["host_alloc_per_step"] = round(sum(c for name, c in calls.items() if "HostAlloc" in name) / n, 2)
    if decoder is not None and decoder.metrics.mean_acceptance_length is not None:
        row["acceptance_length"] = round(decoder.metrics.mean_acceptance_length, 3)  # over every run of the engine
    engine.shutdown()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--model", default=None, help="a GGUF file or HF directory (default: random weights)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test with a tiny random model")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the median counts")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (one prompt, shifted)")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the variants' labels (plain first)")
    args = parser.parse_args()
    if not 1 <= args.batch <= 256:
        raise SystemExit(f"--batch must be in [1, 256], got {args.batch}")
    if not 8 <= args.max_tokens <= 900:
        raise SystemExit(f"--max-tokens must be in [8, 900], got {args.max_tokens}")
    if not 1 <= args.repeats <= 20:
        raise SystemExit(f"--repeats must be in [1, 20], got {args.repeats}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    llm, heads_dir = base_llm(args, device)
    ids = prompt_ids(llm, llm.llm_engine.model_config.vocab_size)
    head = {"num_speculative_tokens": K} if heads_dir is None else {"num_speculative_tokens": K, "model": heads_dir}
    ahead, asked = {"draft_ahead": True}, {"draft_ahead": False}  # both explicit: None is on for a GPU
    variants = [("plain", None), ("ngram", {"method": "ngram", "num_speculative_tokens": K}),
                ("eagle", {"method": "eagle", **head, **asked}), ("eagle ahead", {"method": "eagle", **head, **ahead}),
                ("eagle_tree", {"method": "eagle_tree", **head, **asked}),
                ("eagle_tree ahead", {"method": "eagle_tree", **head, **ahead})]
    if args.methods is not None:
        unknown = sorted(set(args.methods) - {label for label, _ in variants})
        if unknown or args.methods[0] != "plain":
            raise SystemExit(f"--methods must start with plain and name variants of {[v for v, _ in variants]}, "
                             f"got {args.methods}")
        variants = [v for v in variants if v[0] in args.methods]
    rows = []
    for label, spec in variants:
        rows.append(run_variant(llm, label, spec, ids, device, args.max_tokens, args.repeats, args.batch))
        print(f"  {label:20s} {rows[-1]['ms_per_step']:7.3f} ms/step (runs {rows[-1]['ms_per_step_runs']})",
              flush=True)
    plain = rows[0]
    for row in rows:
        row["speedup"] = round(plain["wall_ms"] / row["wall_ms"], 3)
        row["same_tokens_as_plain"] = row.pop("tokens") == plain["tokens"] if row is not plain else True
    plain.pop("tokens", None)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU fp32 tiny (--quick)"
    print(f"\nbatch {args.batch}, {args.max_tokens} tokens, k = {K}, {where}, "
          f"{'model ' + args.model if args.model else 'random weights'}")
    print(f"{'method':20s} {'wall ms':>8s} {'steps':>5s} {'ms/step':>7s} {'gpu ms':>6s} {'idle ms':>7s} "
          f"{'syncs':>5s} {'sync ms':>7s} {'ev':>4s} {'ev ms':>6s} {'d2h':>4s} {'tok/step':>8s} {'speedup':>7s} "
          f"{'same':>5s}")
    for r in rows:
        gpu = [f"{r[key]:{w}}" if key in r else f"{'-':>{w[:-3]}}" for key, w in
               (("gpu_ms_per_step", "6.3f"), ("idle_ms_per_step", "7.3f"), ("syncs_per_step", "5.2f"),
                ("sync_ms_per_step", "7.3f"), ("event_syncs_per_step", "4.1f"), ("event_sync_ms_per_step", "6.3f"),
                ("d2h_per_step", "4.1f"))]
        print(f"{r['method']:20s} {r['wall_ms']:8.1f} {r['steps']:5d} {r['ms_per_step']:7.3f} {' '.join(gpu)} "
              f"{r['tokens_per_step']:8.2f} {r['speedup']:6.2f}x {str(r['same_tokens_as_plain']):>5s}")
    print(f"\nhost ms per step by phase (wall time inside each call, waits included; median run)")
    print(f"{'method':20s} " + " ".join(f"{p:>11s}" for p in PHASES + SUB_PHASES))
    for r in rows:
        print(f"{r['method']:20s} " + " ".join(f"{r['phase_ms_per_step'][p]:11.3f}" for p in PHASES + SUB_PHASES))
    meta = {"device": where, "torch": torch.__version__, "model": args.model or "random SmolLM2-135M shape",
            "max_tokens": args.max_tokens, "batch": args.batch, "k": K, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
