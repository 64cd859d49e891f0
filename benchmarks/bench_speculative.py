"""Speculative decoding on SmolLM2: mean acceptance length and wall-clock speedup per proposer (chapter 9).

    python benchmarks/bench_speculative.py [MODEL] [--quick | --cpu] [--k 4] [--max-tokens 128]
           [--batch-sizes 1 8 32 128] [--methods ngram lookahead self_speculative draft_model]
           [--draft-layers 4 16 24] [--heads-dir DIR] [--draft-vocab-sizes 8192 16384]
           [--out benchmarks/results/speculative_h200.json]

MODEL defaults to the bundled SmolLM2-135M-Instruct GGUF. One LLM loads the weights; every variant (plain decoding,
then each proposer) is an engine over the same weights (`LLM.share_model`) with its own KV pool and its own CUDA
graphs (on CUDA: graphs for q_len 1 and, with speculation, 1 + k). Each batch size runs the fixed prompt set below
(chat, code and summarisation prompts: at batch 1 each prompt in turn, at batch B one batch of B with the set
cycled) greedily with ignore_eos, so every variant emits exactly the same number of tokens: speedup = plain time /
variant time, measured in the same run after a warm-up. With --repeats R each timed pass runs R times (garbage
collected before and disabled during each) and the median pass's time counts; acceptance figures are the first
pass's (greedy: every pass emits the same tokens).

Reported per variant and batch size: wall time, output tokens/s, speedup over plain decoding, mean acceptance length
(tokens per verify step, 1 + accepted / steps), tokens per step per sequence ("tok/step": output tokens over the
sequences every step ran, drafting or not: 1.0 for plain decoding; the fair figure for a method that may skip
drafting, as n-gram lookup does when it finds nothing), acceptance rate (on CUDA, n-gram and lookahead drafts are padded to
k so that verify steps replay the q_len = 1 + k graphs; the padding counts as drafts: compare acceptance lengths),
and the fraction of requests whose tokens equal the plain run's (1.0 expected; in bf16 a verify step's logits may
differ in the last bit from a one-token step's, so a near-tie can flip: that is numerics, not the method).

The draft_model variant uses the distilled draft in --heads-dir DIR/draft when there is one (`minillm train-heads
--kind draft --out DIR/draft`), else the one shipped in minillm/speculative/weights/draft, else a *copy* of the
target's first --draft-layers[0] layers (there is no smaller SmolLM2 on disk): an initialisation, not a trained
draft. --draft-vocab-sizes V1 V2 adds, for the head methods and draft_model, one variant per size drafting over the
target's V most frequent answer tokens only (speculative_config draft_vocab_size, FR-Spec). self_speculative shares
the target's first L layers' weights instead, for each L of --draft-layers (untrained early exit: acceptance stays
low until L is close to the full depth, where a draft costs nearly a target step; the sweep shows that trade-off,
which LayerSkip-style training is for). --quick runs a short smoke test on a CPU.

medusa, eagle and mtp (add them to --methods) draft from the target's hidden states with trained heads: those shipped
in minillm/speculative/weights/, or, with --heads-dir DIR, DIR/medusa, DIR/eagle, DIR/mtp as `minillm train-heads
--out` wrote them. Medusa drafts at most its K heads, MTP at most its D modules, per verify step.
Token trees: ngram_tree (several prompt-lookup continuations), medusa_tree (the Medusa heads' top-k under a sparse
tree, 4 nodes per level) and eagle_tree (EAGLE-2: the EAGLE head's dynamic tree, its 32 most probable nodes;
--tree-nodes 32 63 measures each size) score a tree per sequence; their verify steps replay the tree CUDA graphs
(minillm/engine/cuda_graph.py) where the batch fits them.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

CHAT = ["What are three tips for staying focused while studying?",
        "Explain the difference between a list and a tuple in Python.",
        "Write a short, friendly email inviting a colleague to lunch on Friday."]
CODE = ["Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
        "Here is a function:\n\ndef add(a, b):\n    return a + b\n\nRewrite it with type hints and a docstring, "
        "then write three pytest tests for it.",
        "Write a Python class Stack with push, pop, peek and is_empty methods."]
PASSAGE = ("The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
           "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
           "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
           "from outer space and is the world's biggest single structure made by living organisms. This reef "
           "structure is composed of and built by billions of tiny organisms, known as coral polyps. It supports a "
           "wide diversity of life and was selected as a World Heritage Site in 1981.")
SUMMARY = [f"Summarise the following text in three sentences.\n\n{PASSAGE}",
           f"List the key facts of this text as bullet points, quoting the numbers exactly.\n\n{PASSAGE}",
           f"Rewrite this text for a ten-year-old, keeping its facts.\n\n{PASSAGE}"]
PROMPTS = CHAT + CODE + SUMMARY
HEAD_METHODS = ("medusa", "eagle", "mtp", "medusa_tree", "eagle_tree")  # trained heads: --heads-dir, vocab sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: bundled SmolLM2)")
    p.add_argument("--quick", action="store_true", help="a short CPU smoke test")
    p.add_argument("--cpu", action="store_true",
                   help="run the full prompt set without a GPU (slow; acceptance lengths, not speed, mean something)")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed passes per variant and batch size, the median pass's time counting (default: 3 on "
                        "a GPU, where single runs of the speculative rows moved 15-30%%; 1 on the CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--methods", nargs="+", default=["ngram", "lookahead", "self_speculative", "draft_model"])
    p.add_argument("--draft-layers", type=int, nargs="+", default=[4, 16, 24],
                   help="layers of the target an early-exit draft keeps (self_speculative: each; draft_model: "
                        "the first)")
    p.add_argument("--tree-nodes", type=int, nargs="+", default=None,
                   help="tree methods: one variant per node count (num_tree_nodes, at most 63; default: the "
                        "method's own, 32 for eagle_tree; EAGLE-2's paper drafts about 60)")
    p.add_argument("--tree-widths", type=int, nargs="+", default=None,
                   help="eagle_tree: one variant per search width (speculative_config tree_search_width: top-k "
                        "children per expanded node, nodes expanded per depth; default: the method's own)")
    p.add_argument("--draft-vocab-sizes", type=int, nargs="+", default=None,
                   help="head methods and draft_model: also one variant per draft vocabulary size "
                        "(speculative_config draft_vocab_size: drafts over the target's most frequent answer "
                        "tokens, FR-Spec)")
    p.add_argument("--disable-by-batch-size", type=int, default=None,
                   help="speculative_config disable_by_batch_size for every method: plain steps while more "
                        "sequences than this run (the switch's cost and effect, measured)")
    p.add_argument("--prompt-lookup-mins", type=int, nargs="+", default=None,
                   help="ngram: one variant per prompt_lookup_min (shortest suffix matched; default: the config's, 2)")
    p.add_argument("--sync-too", action="store_true",
                   help="also run every speculative variant with async_scheduling=False (label '/sync'): every "
                        "step synchronous, as speculative engines stepped before they went async while switched off")
    p.add_argument("--heads-dir", default=None,
                   help="medusa/eagle/mtp: a folder with trained heads in medusa/, eagle/, mtp/ (default: shipped)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="model dtype (default: the device's, bf16 on a GPU); float32 shows losslessness on a GPU: "
                        "in bf16 a verify step (1 + k rows) and a decode step (1 row) round differently")
    p.add_argument("--out", default=None, help="JSON file for the raw results")
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.batch_sizes, args.k = min(args.max_tokens, 8), [1, 2], min(args.k, 3)
        args.draft_layers = args.draft_layers[:1]
    if args.disable_by_batch_size is not None and args.disable_by_batch_size < 1:
        p.error(f"--disable-by-batch-size must be >= 1, got {args.disable_by_batch_size}")
    if args.k < 1 or args.max_tokens < 1 or min(args.batch_sizes) < 1 or min(args.draft_layers) < 1:
        p.error("--k, --max-tokens, every batch size and every draft layer count must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.tree_nodes and not all(1 <= n <= 63 for n in args.tree_nodes):
        p.error(f"--tree-nodes must be in [1, 63] (one 64-bit ancestor mask per node), got {args.tree_nodes}")
    return args


def prompt_set(llm, quick: bool = False) -> list[tuple[str, list[int]]]:
    """(kind, token ids) of the prompt set (one of each kind when quick), rendered with the chat template."""
    tok = llm.tokenizer
    chosen = [("chat", CHAT), ("code", CODE), ("summary", SUMMARY)]
    out = []
    for kind, texts in chosen:
        for text in texts[:1] if quick else texts:
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            out.append((kind, tok.encode(rendered, add_special_tokens=False)))
    return out


def batches_for(prompts: list[tuple[str, list[int]]], batch: int) -> list[list[tuple[str, list[int]]]]:
    """Batch 1: every prompt of the set, one request at a time. Batch B: one batch of B, the set cycled."""
    if batch == 1:
        return [[p] for p in prompts]
    return [[prompts[i % len(prompts)] for i in range(batch)]]


def variants(args: argparse.Namespace) -> list[tuple[str, dict | None]]:
    """(label, speculative_config) of every engine to measure, plain decoding first."""
    out: list[tuple[str, dict | None]] = [("plain", None)]
    for method in args.methods:
        config = {"method": method, "num_speculative_tokens": args.k}
        if args.disable_by_batch_size is not None:
            config["disable_by_batch_size"] = args.disable_by_batch_size
        if method == "ngram" and args.prompt_lookup_mins:
            out += [(f"{method}/min{n}", dict(config, prompt_lookup_min=n)) for n in args.prompt_lookup_mins]
        elif method == "self_speculative":
            out += [(f"{method}/L{n}", dict(config, draft_num_layers=n)) for n in args.draft_layers]
        elif method == "draft_model":  # distilled: --heads-dir/draft, else the shipped one; else an undistilled copy
            from minillm.speculative.heads import SHIPPED_DIR
            distilled = os.path.join(args.heads_dir, "draft") if args.heads_dir else None
            if distilled and os.path.isdir(distilled):
                drafts = [(f"{method}/distilled", dict(config, model=distilled))]
            elif os.path.isdir(SHIPPED_DIR / "draft"):  # draft_model without model or layers loads it
                drafts = [(f"{method}/shipped", config)]
            else:
                drafts = [(f"{method}/L{args.draft_layers[0]}", dict(config, draft_num_layers=args.draft_layers[0]))]
            if args.draft_vocab_sizes:
                drafts += [(f"{drafts[0][0]}/v{v}", dict(drafts[0][1], draft_vocab_size=v))
                           for v in args.draft_vocab_sizes]
            out += drafts
        else:
            if method in HEAD_METHODS and args.heads_dir is not None:
                heads = method.removesuffix("_tree")  # a tree over the same heads
                config["model"] = os.path.join(args.heads_dir, heads)
            sized = method in ("medusa_tree", "eagle_tree")  # (ngram_tree's size is its proposer's max_nodes)
            trees = [(f"{method}/{n}", dict(config, num_tree_nodes=n)) for n in args.tree_nodes] \
                if sized and args.tree_nodes else [(method, config)]
            if method == "eagle_tree" and args.tree_widths:  # EAGLE-2's search width (top-k and beam)
                trees = [(f"{label}/w{w}", dict(spec, tree_search_width=w)) for label, spec in trees
                         for w in args.tree_widths]
            if method in HEAD_METHODS and args.draft_vocab_sizes:
                trees += [(f"{label}/v{v}", dict(spec, draft_vocab_size=v)) for label, spec in trees
                          for v in args.draft_vocab_sizes]  # the full vocabulary first, then each size
            out += trees
    return out


def run_variant(llm, method: str, spec: dict | None, args, prompts: list[tuple[str, list[int]]], num_kv_blocks: int,
                plain_tokens: dict[int, list[list[int]]] | None, async_scheduling: bool | None = None) -> list[dict]:
    import torch
    from minillm import SamplingParams
    from minillm.speculative.metrics import SpecDecodeMetrics

    variant = llm.share_model(max_num_seqs=max(args.batch_sizes), num_kv_blocks=num_kv_blocks,
                              speculative_config=spec, async_scheduling=async_scheduling)
    engine = variant.llm_engine
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    # sequence-steps: each step adds the sequences it runs. Output tokens over sequence-steps is tokens per step
    # per sequence (1.0 for plain decoding), unlike the accepted length (per *verify* step), it also counts the
    # steps a method did not draft in (n-gram finds nothing, a tree is cut to its root)
    seq_steps, schedule = [0], engine.scheduler.schedule

    def counted_schedule():
        scheduled = schedule()
        seq_steps[0] += len(scheduled.seqs)
        return scheduled
    engine.scheduler.schedule = counted_schedule
    for batch in args.batch_sizes:
        # warm-up at this batch size (Triton JIT of the decode and verify kernels it picks, graph capture of the
        # drafts, allocator, first-touch costs): on the H200 a 0.5-1.5 s compile inside a timed run of a few
        # seconds read as a 2x slowdown. Above batch 1 the warm-up runs as long as the timed run: requests that
        # accept more finish first, so the batch drains through smaller draft-graph buckets (8 -> 4 -> 2 -> 1),
        # each captured on first use, and a 24-token warm-up never reached them (eleventh session: one capture
        # cost 300 ms of a 0.6 s run)
        length = 2 if args.quick else 24 if batch == 1 else args.max_tokens
        variant.generate([ids for _, ids in batches_for(prompts, batch)[0]],
                         SamplingParams(temperature=0, max_tokens=length, ignore_eos=True))
        runs, tokens, by_kind = [], [], {}
        total = SpecDecodeMetrics()
        runner = getattr(engine, "runner", None)
        counts = getattr(runner, "forward_counts", None)
        counts_before = dict(counts) if counts is not None else {}
        seq_steps_before = seq_steps[0]
        for repeat in range(args.repeats):  # the figures of the first pass, the time of the median pass
            seconds = 0.0
            for group in batches_for(prompts, batch):
                if engine.speculative is not None:
                    engine.speculative.metrics = SpecDecodeMetrics()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                gc.collect()  # a full collection costs tens of ms: never inside a timed run
                gc.disable()
                start = time.perf_counter()
                outputs = variant.generate([ids for _, ids in group], params)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
                gc.enable()
                if repeat:
                    continue
                tokens += [o.outputs[0].token_ids for o in outputs]
                if engine.speculative is not None:
                    total.merge(engine.speculative.metrics)
                    if batch == 1:  # acceptance per kind of prompt: n-grams shine on summaries, not on chat
                        by_kind.setdefault(group[0][0], SpecDecodeMetrics()).merge(engine.speculative.metrics)
            if not repeat:
                seq_steps_first = seq_steps[0] - seq_steps_before
                forwards = {k: v - counts_before.get(k, 0) for k, v in (counts or {}).items()}
            runs.append(seconds)
        seconds = sorted(runs)[len(runs) // 2]
        same = None if plain_tokens is None else \
            sum(a == b for a, b in zip(tokens, plain_tokens[batch])) / len(tokens)
        num_tokens = sum(len(t) for t in tokens)
        rows.append({"method": method, "batch": batch, "num_requests": len(tokens), "seconds": seconds,
                     "seconds_runs": runs, "output_tokens": num_tokens, "tokens_per_s": num_tokens / seconds,
                     "tokens_per_sequence_step": num_tokens / max(seq_steps_first, 1),
                     "mean_acceptance_length": total.mean_acceptance_length or 1.0,
                     "acceptance_rate": total.acceptance_rate,
                     "acceptance_by_position": total.acceptance_by_position,
                     "acceptance_length_by_kind": {k: m.mean_acceptance_length for k, m in by_kind.items()},
                     "same_tokens_as_plain": same, "tokens": tokens,
                     # how the first timed pass's forwards ran: a step outside every graph (eager) costs ~10x a replay
                     "forwards": forwards})
    variant.llm_engine.shutdown()
    del variant, engine  # its KV pool and CUDA graphs go before the next variant's are made
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from minillm import LLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats is None:
        args.repeats = 3 if device == "cuda" else 1
    if device == "cpu":
        torch.set_num_threads(1)  # small ops on a shared CPU: threads only fight each other
    if device == "cpu" and not (args.quick or args.cpu):
        print("no CUDA device: run with --quick for a CPU smoke test (or --cpu for the full prompt set)",
              file=sys.stderr)
        return 2
    batch_max = max(args.batch_sizes)
    max_model_len = 1024
    llm = LLM(args.model, device=device, max_model_len=max_model_len, max_num_seqs=batch_max,
              num_kv_blocks=16, enforce_eager=True, **({"dtype": args.dtype} if args.dtype else {}))  # the base engine only lends its weights
    prompts = prompt_set(llm, args.quick)
    longest = max(len(ids) for _, ids in prompts)
    block = llm.llm_engine.cache_config.block_size
    num_kv_blocks = batch_max * -(-(longest + args.max_tokens + args.k + 1) // block) + 8
    results: list[dict] = []
    plain_tokens = None
    runs = [(method, spec, None) for method, spec in variants(args)]
    if args.sync_too:  # each speculative variant again, every step synchronous
        runs += [(f"{method}/sync", spec, False) for method, spec, _ in runs if spec is not None]
    for method, spec, async_scheduling in runs:
        rows = run_variant(llm, method, spec, args, prompts, num_kv_blocks, plain_tokens, async_scheduling)
        if method == "plain":
            plain_tokens = {r["batch"]: r["tokens"] for r in rows}
        results += rows
        for r in rows:
            print(f"  {method:22s} batch {r['batch']:4d}: {r['seconds']:7.2f} s, {r['tokens_per_s']:8.1f} tok/s, "
                  f"accept len {r['mean_acceptance_length']:.2f}, forwards {r['forwards']}", flush=True)
    plain = {r["batch"]: r["seconds"] for r in results if r["method"] == "plain"}
    for r in results:
        r["speedup"] = plain[r["batch"]] / r["seconds"]
    print(f"\nspeculative decoding, {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), "
          f"k={args.k}, {args.max_tokens} tokens per request, greedy")
    print(f"{'method':22s} {'batch':>5s} {'tok/s':>9s} {'speedup':>8s} {'accept len':>10s} {'tok/step':>8s} "
          f"{'accept rate':>11s} {'same as plain':>13s}")
    for r in results:
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        same = "-" if r["same_tokens_as_plain"] is None else f"{r['same_tokens_as_plain']:.2f}"
        print(f"{r['method']:22s} {r['batch']:5d} {r['tokens_per_s']:9.1f} {r['speedup']:8.2f} "
              f"{r['mean_acceptance_length']:10.2f} {r['tokens_per_sequence_step']:8.2f} {rate:>11s} {same:>13s}  "
              + " ".join(f"{k} {v:.2f}" for k, v in r["acceptance_length_by_kind"].items() if v is not None))
    if args.out:
        for r in results:
            r.pop("tokens")
        record = {"command": "python " + " ".join(sys.argv), "device": device,
                  "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "model": llm.model_path, "k": args.k, "max_tokens": args.max_tokens,
                  "draft_layers": args.draft_layers, "heads_dir": args.heads_dir, "results": results}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
