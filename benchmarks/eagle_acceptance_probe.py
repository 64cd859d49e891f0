"""Why EAGLE accepts more offline than in the engine: the engine's drafts against the simulator's, on the same text.

    python benchmarks/eagle_acceptance_probe.py [MODEL] [--max-tokens 64] [--k 5] [--heads-dir DIR]
           [--per-kind N] [--kinds chat code summary] [--graphs] [--out probe.json]

Three numbers on the P7 prompt set (benchmarks/bench_speculative.py's prompt_set: chat, code, summaries):

  1. engine: the greedy engine with EAGLE, k drafts per step: mean accepted length (tokens per verify step) and
     acceptance by position. Every proposal the engine makes is logged with the sequence length it was made at.
  2. simulator: the plain greedy continuation of each prompt (prompt + output = one row), its features from one
     cache-less prefill (train_data.record_features), and train_eval's chain over every start position of the
     generated part. "all starts" averages over every position (what simulated_acceptance reports);
     "engine walk" replays the engine's walk (start, accept, jump past the accepted run), which weighs
     positions as the engine does (train_eval.walk_steps).
  3. agreement: for every engine proposal at sequence length n, the simulator's drafts at start p = n - 2 (the
     same context, the same window): on identical text (greedy, so the engine's tokens are the plain run's)
     these must be the same drafts up to numerics. A low agreement points at the engine path; a high one at
     the data / the averaging.

Runs on a CPU (fp32; about 2 minutes per prompt of 48 tokens through the Triton interpreter) or on a GPU (bf16,
seconds): there, run it with and without --graphs (the EAGLE engine eager, or with CUDA graphs as
bench_speculative runs it) to see whether the GPU path drafts what the simulator drafts.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--per-kind", type=int, default=3, help="first N prompts of each kind (chat, code, summary)")
    p.add_argument("--kinds", nargs="+", default=["chat", "code", "summary"], choices=["chat", "code", "summary"])
    p.add_argument("--graphs", action="store_true",
                   help="let the EAGLE engine use CUDA graphs (as bench_speculative does on a GPU); default eager")
    p.add_argument("--heads-dir", default=None, help="a folder with eagle/ (default: the shipped head)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.max_tokens < 2 or not 1 <= args.k <= 16 or args.per_kind < 1:
        p.error("--max-tokens must be >= 2, --k in [1, 16], --per-kind >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from bench_speculative import prompt_set
    from minillm import LLM, SamplingParams
    from minillm.speculative.head_proposer import DEFAULT_WINDOW
    from minillm.speculative.heads import TargetParts
    from minillm.speculative.metrics import SpecDecodeMetrics
    from minillm.speculative.train_data import record_features
    from minillm.speculative.train_eval import mixed_precision, unrolled_chain, walk_steps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(2)
    llm = LLM(args.model, device=device, max_model_len=1024, max_num_seqs=1, num_kv_blocks=16, enforce_eager=True)
    count: dict[str, int] = {}
    prompts = []
    for kind, ids in prompt_set(llm):
        count[kind] = count.get(kind, 0) + 1
        if kind in args.kinds and count[kind] <= args.per_kind:
            prompts.append((kind, ids))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    plain = llm.share_model(max_num_seqs=1, num_kv_blocks=128)
    outputs = [plain.generate([ids], params)[0].outputs[0].token_ids for _, ids in prompts]
    plain.llm_engine.shutdown()

    spec = {"method": "eagle", "num_speculative_tokens": args.k}
    if args.heads_dir:
        spec["model"] = os.path.join(args.heads_dir, "eagle")
    eagle = llm.share_model(max_num_seqs=1, num_kv_blocks=128, speculative_config=spec,
                            enforce_eager=not args.graphs)
    decoder = eagle.llm_engine.speculative
    proposer = decoder.proposer
    log: list[tuple[int, list[int]]] = []
    original = proposer.propose_with_probs

    def logged(seqs, num_tokens):
        drafts, probs = original(seqs, num_tokens)
        for seq, d in zip(seqs, drafts):
            if d:
                log.append((seq.num_tokens, [int(t) for t in d]))
        return drafts, probs

    proposer.propose_with_probs = logged
    model = eagle.llm_engine.runner.model
    head = copy.deepcopy(proposer.heads).float()  # fp32 master weights, as in training; the proposer's untouched
    target = TargetParts(model)
    rows = []
    for (kind, ids), out in zip(prompts, outputs):
        decoder.metrics = SpecDecodeMetrics()
        log.clear()
        spec_out = eagle.generate([ids], params)[0].outputs[0].token_ids
        m = decoder.metrics
        # the simulator on the same text: one row, features from a cache-less prefill
        text = torch.tensor([list(ids) + list(out)], dtype=torch.int64, device=device)
        with torch.inference_mode():
            features = record_features(model, text, torch.device(device)).float()
            with mixed_precision(features.device):  # as train_eval.simulated_acceptance runs it (bf16 on CUDA)
                passes = unrolled_chain(head, features[:, :-1], target.embed(text[:, 1:]).float(), args.k,
                                        DEFAULT_WINDOW)
                drafted = torch.stack([target.logits(target.final_norm(g)).argmax(-1)[0] for g in passes])  # [k, T]
                greedy = target.logits(target.final_norm(features[:, 1:])).argmax(-1)[0]  # token t + 2
        # start p (context f_{<=p}, token x_{p+1}): draft j (0-based) is drafted[j, p + j] vs greedy[p + j]
        n_prompt, total = len(ids), text.shape[1]
        sim_len, sim_drafts = {}, {}
        for p in range(n_prompt - 1, total - args.k - 1):
            d = [int(drafted[j, p + j]) for j in range(args.k)]
            g = [int(greedy[p + j]) for j in range(args.k)]
            n = 0
            while n < args.k and d[n] == g[n]:
                n += 1
            sim_len[p], sim_drafts[p] = 1 + n, d
        starts = sorted(sim_len)
        walk = walk_steps(torch.tensor([[sim_len[p] for p in starts]]))  # the starts are consecutive
        same_first = same_all = compared = 0
        for n_tokens, d in log:
            p = n_tokens - 2
            if p in sim_drafts:
                compared += 1
                # up to the first draft the target rejects: after it the engine feeds its own (wrong) draft
                # back, the simulator the real token, and the two chains part ways by design
                useful = min(sim_len[p], len(d))
                same_first += d[0] == sim_drafts[p][0]
                same_all += d[:useful] == sim_drafts[p][:useful]
        row = {"kind": kind, "same_text": list(spec_out) == list(out),
               "engine_accept_len": m.mean_acceptance_length, "engine_by_position": m.acceptance_by_position,
               "sim_all_starts": sum(sim_len.values()) / len(sim_len),
               "sim_engine_walk": sum(walk) / len(walk),
               "proposals_compared": compared, "first_draft_same": same_first / max(compared, 1),
               "drafts_same_to_first_miss": same_all / max(compared, 1)}
        rows.append(row)
        print(f"{kind:8s} same text {row['same_text']!s:5s} engine {row['engine_accept_len']:.2f}  "
              f"sim(all starts) {row['sim_all_starts']:.2f}  sim(engine walk) {row['sim_engine_walk']:.2f}  "
              f"proposals {compared:3d}: first draft same {row['first_draft_same']:.2f}, same to first miss "
              f"{row['drafts_same_to_first_miss']:.2f}", flush=True)
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in
            ("engine_accept_len", "sim_all_starts", "sim_engine_walk", "first_draft_same", "drafts_same_to_first_miss")}
    print("mean    " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "k": args.k, "max_tokens": args.max_tokens, "rows": rows, "mean": mean},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
