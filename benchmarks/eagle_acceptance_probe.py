"""Why EAGLE accepts more offline than in the engine: the engine's drafts against the simulator's, on the same text.

    python benchmarks/eagle_acceptance_probe.py [MODEL] [--max-tokens 64] [--k 5] [--heads-dir DIR]
           [--per-kind N] [--kinds chat code summary] [--graphs] [--out probe.json]
           [--methods eagle eagle_tree] [--tree-nodes 16 32 63] [--windows 64] [--no-engine] [--texts FILE]

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

Chain against tree (issue 11's EAGLE trees): `--methods eagle eagle_tree --tree-nodes 16 32 63` adds a walk of the
engine's greedy steps on the same texts for each method, drafting with the proposer's own code (EagleProposer.draft
for the chain, draft_tree + best_candidates_tree for the tree, as the engine runs them) on the features of one
prefill: a step proposes from the window ending at the last token, accepts the deepest path of the tree (or the
leading drafts of the chain) that the greedy text follows, and moves on past it; drafts per step are capped at the
tokens left, as the engine caps them. Greedy output is the plain text whatever is drafted, so on a CPU in fp32 this
walk is the engine's mean accepted length (the chain's walk checks it against row 1). `--windows 64 256` repeats
the walk with the proposer's window widened (the head was trained with 64). `--no-engine` skips rows 1-3 (the
slow part on a CPU); `--texts FILE` keeps the plain greedy texts (read if there, written if not).
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
    p.add_argument("--methods", nargs="*", default=[], choices=["eagle", "eagle_tree"],
                   help="walk the engine's greedy steps on the texts with these drafters (see above)")
    p.add_argument("--tree-nodes", type=int, nargs="+", default=[16, 32, 63], help="eagle_tree node budgets")
    p.add_argument("--topk", type=int, default=8, help="eagle_tree: children per expanded node")
    p.add_argument("--beam", type=int, default=8, help="eagle_tree: nodes expanded per depth")
    p.add_argument("--windows", type=int, nargs="+", default=[64], help="proposer windows for the walk")
    p.add_argument("--no-engine", action="store_true", help="skip the engine run and its comparison (rows 1-3)")
    p.add_argument("--texts", default=None, help="JSON of the plain greedy outputs: read if present, else written")
    args = p.parse_args(argv)
    if args.max_tokens < 2 or not 1 <= args.k <= 16 or args.per_kind < 1:
        p.error("--max-tokens must be >= 2, --k in [1, 16], --per-kind >= 1")
    if min(args.tree_nodes) < 1 or max(args.tree_nodes) > 63 or not 1 <= args.beam <= args.topk or \
            min(args.windows) < 1:
        p.error("--tree-nodes in [1, 63], 1 <= --beam <= --topk, --windows >= 1")
    return args


def walk(proposer, features, text: list[int], prompt_len: int, max_tokens: int, k: int, tree=None,
         searches: dict | None = None) -> tuple[list[int], list[int]]:
    """The greedy engine's verify steps on `text` (prompt + its plain greedy output), drafting with `proposer`
    (a chain) or `tree` (an EagleTreeProposer over it) from the window of `features` [T, d] ending at each step's
    last token: (tokens per step, accepted drafts by depth). `searches`: tree searches by (start, depth), kept
    across node budgets (the search does not depend on the budget, only the rerank does)."""
    import torch
    from minillm.speculative.head_proposer import Window, greedy
    from minillm.speculative.heads import window_positions
    from minillm.speculative.tree_proposers import best_candidates_tree
    width, steps, by_depth = proposer.window, [], [0] * k
    n, emitted = prompt_len + 1, 1  # after the prefill: the first output token is there
    while emitted < max_tokens:
        depth = min(k, max_tokens - emitted - 1)
        p = n - 2  # the feature that chose the last token
        length = min(width, p + 1)
        feats = torch.zeros(1, width, features.shape[1], dtype=features.dtype)
        feats[0, width - length:] = features[p + 1 - length:p + 1]
        tokens = torch.zeros(1, width, dtype=torch.int64)
        tokens[0, width - length:] = torch.tensor(text[p + 2 - length:p + 2])
        positions, key_mask = window_positions([length], width, features.device)
        window = Window(feats, tokens, positions, key_mask)
        accepted = 0
        if depth > 0 and tree is None:
            chain = [int(t) for t in torch.stack(proposer.draft(window, depth, greedy), dim=1)[0]]
            while accepted < depth and chain[accepted] == text[n + accepted]:
                accepted += 1
        elif depth > 0:
            from minillm.speculative.eagle import DraftTreeCandidates
            key = (p, depth)
            if searches is None or key not in searches:
                found = tuple(t[0] for t in proposer.draft_tree(window, depth, tree.topk, tree.beam))
                if searches is not None:
                    searches[key] = found
            ids, parents, scores = found if searches is None else searches[key]
            levels = torch.tensor([1] * tree.topk + [d for d in range(2, depth + 1)
                                                     for _ in range(tree.beam * tree.topk)])
            draft = best_candidates_tree(text[n - 1], DraftTreeCandidates(ids, parents, scores, levels),
                                         tree.num_nodes)
            node, parents_list = 0, draft.tree.parents.tolist()
            while True:  # down the tree while a child holds the greedy text's next token
                child = [c for c, q in enumerate(parents_list) if q == node
                         and draft.token_ids[c] == text[n + accepted]] if accepted < depth else []
                if not child:
                    break
                node, accepted = child[0], accepted + 1
        for d in range(accepted):
            by_depth[d] += 1
        steps.append(1 + accepted)
        n, emitted = n + 1 + accepted, emitted + 1 + accepted
    return steps, by_depth


def walks(args, llm, prompts, outputs) -> list[dict]:
    """Rows of the chain / tree walks: per method, node budget and window, the mean accepted length per kind."""
    import torch
    from minillm.speculative.eagle import EagleProposer
    from minillm.speculative.head_kinds import load_heads
    from minillm.speculative.heads import TargetParts, resolve_heads_dir
    from minillm.speculative.train_data import record_features
    from minillm.speculative.tree_proposers import EagleTreeProposer
    model = llm.llm_engine.runner.model
    device = llm.llm_engine.device
    heads, config = load_heads("eagle", resolve_heads_dir("eagle", os.path.join(args.heads_dir, "eagle")
                                                          if args.heads_dir else None, llm.llm_engine.model_config),
                               llm.llm_engine.model_config, device, llm.llm_engine.dtype)
    texts = [list(ids) + list(out) for (_, ids), out in zip(prompts, outputs)]
    with torch.inference_mode():
        features = [record_features(model, torch.tensor([t]), device, progress=False)[0] for t in texts]
    variants = [("eagle", None)] * ("eagle" in args.methods) + \
        [("eagle_tree", n) for n in args.tree_nodes] * ("eagle_tree" in args.methods)
    rows = []
    for width in args.windows:
        proposer = EagleProposer(heads, config, TargetParts(model), window=width)
        searches: list[dict] = [{} for _ in texts]  # per text: tree searches shared by the node budgets
        for method, nodes in variants:
            tree = None if nodes is None else EagleTreeProposer(proposer, nodes, args.topk, args.beam)
            by_kind: dict[str, list[int]] = {}
            by_depth = [0] * args.k
            with torch.inference_mode():
                for (kind, ids), text, feats, kept in zip(prompts, texts, features, searches):
                    steps, depths = walk(proposer, feats, text, len(ids), args.max_tokens, args.k, tree, kept)
                    by_kind.setdefault(kind, []).extend(steps)
                    by_depth = [a + b for a, b in zip(by_depth, depths)]
            every = [s for steps in by_kind.values() for s in steps]
            row = {"method": method, "tree_nodes": nodes, "window": width,
                   "by_kind": {kind: sum(s) / len(s) for kind, s in by_kind.items()},
                   "mean_accepted_length": sum(every) / len(every), "verify_steps": len(every),
                   "acceptance_by_depth": [a / len(every) for a in by_depth]}
            rows.append(row)
            label = method if nodes is None else f"{method}/{nodes}"
            print(f"walk {label:14s} window {width:4d}: accept len {row['mean_accepted_length']:.2f}  "
                  + "  ".join(f"{kind} {v:.2f}" for kind, v in row["by_kind"].items())
                  + "  by depth " + " ".join(f"{a:.2f}" for a in row["acceptance_by_depth"]), flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from bench_speculative import prompt_set
    from minillm import LLM, SamplingParams

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
    key = [f"{kind}:{len(ids)}:{args.max_tokens}" for kind, ids in prompts]
    saved = json.load(open(args.texts)) if args.texts and os.path.exists(args.texts) else {}
    if saved.get("keys") == key:
        outputs = saved["outputs"]
    else:
        plain = llm.share_model(max_num_seqs=1, num_kv_blocks=128)
        outputs = [plain.generate([ids], params)[0].outputs[0].token_ids for _, ids in prompts]
        plain.llm_engine.shutdown()
        if args.texts:
            with open(args.texts, "w") as f:
                json.dump({"keys": key, "outputs": [list(map(int, o)) for o in outputs]}, f)
    walked = walks(args, llm, prompts, outputs) if args.methods else []
    rows = [] if args.no_engine else engine_against_simulator(args, llm, prompts, outputs, params, device)
    if rows:
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in
                ("engine_accept_len", "sim_all_starts", "sim_engine_walk", "first_draft_same",
                 "drafts_same_to_first_miss")}
        print("mean    " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "k": args.k, "max_tokens": args.max_tokens, "rows": rows,
                       "mean": mean if rows else None, "walks": walked}, f, indent=1)
    return 0


def engine_against_simulator(args, llm, prompts, outputs, params, device) -> list[dict]:
    """Rows 1-3 of the module docstring, per prompt."""
    import torch
    from minillm.speculative.head_proposer import DEFAULT_WINDOW
    from minillm.speculative.heads import TargetParts
    from minillm.speculative.metrics import SpecDecodeMetrics
    from minillm.speculative.train_data import record_features
    from minillm.speculative.train_eval import mixed_precision, unrolled_chain, walk_steps
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
    return rows


if __name__ == "__main__":
    sys.exit(main())
