"""Speculative decoding (chapter 9): a rejection sampler that keeps the target's distribution exactly, and every way
of proposing draft tokens (a small draft model, the target's own early layers, Medusa heads, EAGLE, MTP, lookahead
and prompt-lookup n-grams), verified in one multi-token engine step (Scheduler.postprocess rolls back rejections).

The engine-independent core, read in this order:
    rejection.py  why decode has idle compute; the lossless accept/resample rule (chain of k drafts, greedy and
                  sampled, batched with per-sequence k); logits -> probabilities as the sampler makes them
    ngram.py      drafts without a draft model: prompt lookup and lookahead decoding's n-gram pool
    tree.py       token trees (Medusa, EAGLE): flattening, tree attention mask, greedy and sampling verification

In the engine (LLM(speculative_config={"method": ..., "num_speculative_tokens": k, ...})):
    config.py        SpeculativeConfig: vLLM's dict, validated; the method registry
    proposer.py      the proposer interface; prompt lookup ("ngram")
    lookahead.py     "lookahead": a Jacobi window refreshed by the target's outputs + an n-gram pool
    draft.py         "draft_model" and "self_speculative": a draft model with its own paged KV cache
    engine_hooks.py  propose before scheduling, verify after the forward, free per-request state
    tree_verify.py   token trees in the engine step: node positions, ancestor masks, tree verification, KV moves
    tree_proposers.py  "ngram_tree" (prompt-lookup continuations as branches); a static tree over Medusa's top-k
    metrics.py       acceptance rate, mean acceptance length, acceptance by position

Heads that draft from the target's hidden states ("medusa", "eagle", "mtp"; StepOutput.hidden_states):
    heads.py         their config, the target's embedding/norm/LM head, one windowed decoder block, files
    head_proposer.py the target's features per request, windows, draft sampling
    draft_ahead.py   step N+1's greedy proposal started at the end of step N, collected without waiting (on a GPU)
    medusa.py, eagle.py, mtp.py   the three heads and their proposers (head_kinds.py: by name)
    tree_graphs.py   the EAGLE-2 tree search in CUDA graphs
    train_prompts.py  thousands of offline distillation requests, split train / held out by prompt
    train_data.py    the target's own answers (greedy and sampled) and its features over whole documents
    train_losses.py, train_eval.py   the losses (EAGLE's training-time test); held-out top-1 and stepped acceptance
    train_heads.py, train_heads_cli.py   `minillm train-heads`: self-distillation, a loss curve, the held-out report
"""
