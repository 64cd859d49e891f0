"""Does prompt lookup pay at batch 1, and under which step policy? An offline replay (issue 11, P7; chapter 9).

    python benchmarks/replay_ngram_async.py                       (generates P7's greedy outputs on this CPU, ~1 min)
    python benchmarks/replay_ngram_async.py --tokens benchmarks/results/p7_greedy_tokens_cpu_s23.json --verify-ms 1.3

Greedy decoding is deterministic, so n-gram speculation's tokens are plain decoding's: what a policy changes is only
how many steps of which kind produce them. This script takes the greedy outputs of bench_speculative's nine P7
prompts (128 tokens each), walks them token by token with the prompt-lookup proposer (minillm.speculative.ngram,
the same lookup the engine's NGramProposer answers) and counts steps under three policies:

    sync        today's speculative engine before async steps: every step synchronous; a step verifies when the
                lookup finds a draft, else it is a plain step
    async       steps without drafts run async (SpeculativeDecoder.steps_async with NGramProposer.predicts_drafts):
                while a step is in flight the proposer guesses one token behind; when it expects drafts the engine
                drains (the GPU idles for one host turn) and the next step verifies in sync
    plain       plain decoding, every step async

and prices them with step times measured on the H200 for SmolLM2 (defaults below; each is a flag):
    --verify-ms 1.10     an n-gram verify step, wall time (P7 n-gram at 1,569 tok/s and 1.48 tokens a step,
                         twenty-third session; bench_spec_host put it at ~1.3 in the twenty-second)
    --sync-plain-ms 0.77 a plain step run synchronously (GPU 0.52 + the host's turn)
    --async-plain-ms 0.54 a plain step run async (P7 plain, 1,845-1,857 tok/s)
    --drain-ms 0.30      the GPU idle while the engine drains before a verify step
It is a model, not a measurement: it says which policy and prompt_lookup_min are worth measuring, and the engine
run (bench_speculative.py --methods ngram --prompt-lookup-mins 1 2 3 --sync-too) says what they do.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def greedy_outputs(max_tokens: int) -> list[dict]:
    """P7's prompts and SmolLM2's greedy continuations, generated on this machine's CPU in fp32."""
    from bench_speculative import prompt_set
    from minillm import LLM, SamplingParams
    llm = LLM(device="cpu")
    prompts = prompt_set(llm)
    outs = llm.generate([ids for _, ids in prompts], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                     ignore_eos=True))
    return [{"kind": kind, "prompt": ids, "output": list(o.outputs[0].token_ids)}
            for (kind, ids), o in zip(prompts, outs)]


def accepted(draft: list[int], future: list[int]) -> int:
    """Leading draft tokens equal to what greedy decoding produced next."""
    n = 0
    while n < len(draft) and n < len(future) and draft[n] == future[n]:
        n += 1
    return n


def replay(requests: list[dict], policy: str, k: int, min_n: int, max_n: int, cost: dict) -> dict:
    """Seconds-equivalent (ms) and step counts of one policy over every request; see the module docstring."""
    from minillm.speculative.ngram import propose_prompt_lookup

    def lookup(tokens: list[int], want: int) -> list[int]:
        return propose_prompt_lookup(tokens, want, max_n, min_n) if len(tokens) > 1 else []

    ms, tokens, counts = 0.0, 0, {"verify": 0, "sync_plain": 0, "async_plain": 0, "drain": 0}
    for r in requests:
        prompt, out = r["prompt"], r["output"]
        pos, in_flight = 1, False  # out[0] came from the prefill
        while pos < len(out):
            known = prompt + out[:pos]
            if policy == "plain":
                step = "async_plain"
            elif policy == "async" and in_flight:  # the last token is in flight: guess one token behind
                if len(lookup(known[:-1], 2)) < 2:
                    step = "async_plain"
                else:  # drain: the token in flight is read, then the next step is decided with it known
                    ms += cost["drain"]
                    counts["drain"] += 1
                    in_flight = False
                    continue
            else:
                draft = lookup(known, k)
                step = "verify" if draft else ("sync_plain" if policy == "sync" else "async_plain")
            n = min(accepted(draft, out[pos:]) + 1, len(out) - pos) if step == "verify" else 1
            in_flight = step == "async_plain"
            ms += cost[step]
            counts[step] += 1
            pos, tokens = pos + n, tokens + n
    return {"policy": policy, "prompt_lookup_min": min_n, "prompt_lookup_max": max_n, "tokens": tokens,
            "ms": ms, "tokens_per_ms": tokens / ms, **counts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default=None, help="a JSON of {prompt, output} token lists (default: generate)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    p.add_argument("--max-n", type=int, default=3, help="prompt_lookup_max")
    p.add_argument("--min-ns", type=int, nargs="+", default=[1, 2, 3], help="prompt_lookup_min values to replay")
    p.add_argument("--verify-ms", type=float, default=1.10)
    p.add_argument("--sync-plain-ms", type=float, default=0.77)
    p.add_argument("--async-plain-ms", type=float, default=0.54)
    p.add_argument("--drain-ms", type=float, default=0.30)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    for name in ("verify_ms", "sync_plain_ms", "async_plain_ms", "drain_ms"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.k < 1 or args.max_n < 1 or any(not 1 <= n <= args.max_n for n in args.min_ns):
        p.error(f"need k >= 1 and 1 <= each min-n <= max-n, got k={args.k}, max-n={args.max_n}, min-ns={args.min_ns}")
    if args.tokens:
        with open(args.tokens) as f:
            requests = json.load(f)
    else:
        requests = greedy_outputs(args.max_tokens)
    cost = {"verify": args.verify_ms, "sync_plain": args.sync_plain_ms, "async_plain": args.async_plain_ms,
            "drain": args.drain_ms}
    plain = replay(requests, "plain", args.k, 1, args.max_n, cost)
    rows = [plain]
    print(f"{'policy':8s} {'min_n':>5s} {'x plain':>8s} {'verify':>7s} {'sync':>6s} {'async':>6s} {'drains':>7s}")
    for min_n in args.min_ns:
        for policy in ("sync", "async"):
            r = replay(requests, policy, args.k, min_n, args.max_n, cost)
            r["x_plain"] = r["tokens_per_ms"] / plain["tokens_per_ms"]
            rows.append(r)
            print(f"{policy:8s} {min_n:>5d} {r['x_plain']:>8.2f} {r['verify']:>7d} {r['sync_plain']:>6d} "
                  f"{r['async_plain']:>6d} {r['drain']:>7d}")
    if args.out:
        record = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), "cost_ms": cost, "k": args.k, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
