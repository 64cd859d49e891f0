"""Chapter 9: speculative decoding. The verification rule, its greedy shortcut, prompt lookup, token trees.

The exercises are the pieces of minillm.speculative that decide which tokens a verify step keeps (accept_reject,
residual_distribution, greedy_verify), which drafts it proposes without a model (ngram_lookup), and how a tree of
candidates is laid out for one forward pass (tree_attention_mask, medusa_candidates). The engine calls each through
`dispatch`, so a learner's version runs inside a real speculative engine. One more is the interview question behind
every speculative speedup: how many tokens a verify step emits on average (expected_tokens_per_step).
"""
from minillm.course.spec import Chapter, Exercise

CHAPTER = Chapter(9, "ch09_speculative", "Speculative decoding: lossless verification, n-gram drafts, token trees")

EXERCISES = [
    Exercise(
        id="ch09.accept_reject", function="accept_reject", source="minillm/speculative/rejection.py", points=10,
        nudge="Accept a draft with probability min(1, p/q) using the uniform you are given; a chain stops at its "
              "first rejection.",
        hint="accepted = (uniforms * q_x < p_x) & (position < num_draft_tokens); answer = length of the all-True "
             "prefix (cumprod, then sum), not the count of Trues.",
        signature="accept_reject(p_x: torch.Tensor, q_x: torch.Tensor, uniforms: torch.Tensor, "
                  "num_draft_tokens: torch.Tensor) -> torch.Tensor",
        called_from="minillm.speculative.rejection.rejection_sample (sampled drafts: a draft model at temperature "
                    "> 0, through verify_draft_tokens)",
    ),
    Exercise(
        id="ch09.residual_distribution", function="residual_distribution",
        source="minillm/speculative/rejection.py", points=10,
        nudge="After a rejection, sample only where the target has more mass than the draft: the rest was already "
              "paid out through acceptance.",
        hint="r = clamp(p - q, min=0), divided by its row sum; a row whose sum is <= 1e-6 returns p (no division "
             "by ~0). Not p itself, and not (p - q) without the clamp.",
        signature="residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor",
        called_from="minillm.speculative.rejection.rejection_sample (the token after the first rejection; at the "
                    "bonus position q = 0 and the residual is p)",
    ),
    Exercise(
        id="ch09.greedy_verify", function="greedy_accept", source="minillm/speculative/rejection.py", points=10,
        nudge="Keep drafts while they match the target's own token at their position; then one token of the "
              "target's always follows, even when every draft matched.",
        hint="n = length of the matching prefix (padding never matches); row = drafts[:n], target[n], then -1; "
             "with n == k_b, target[k_b] is the bonus token.",
        signature="greedy_accept(target_token_ids: torch.Tensor, draft_token_ids: torch.Tensor, "
                  "num_draft_tokens: torch.Tensor) -> torch.Tensor",
        called_from="minillm.speculative.rejection.greedy_verify (every verify step of deterministic drafts, "
                    "from SpeculativeDecoder.verify, and every all-greedy batch)",
    ),
    Exercise(
        id="ch09.ngram_lookup", function="propose_prompt_lookup", source="minillm/speculative/ngram.py",
        points=10,
        nudge="Find the last n tokens earlier in the sequence (the latest such place, longest n first) and "
              "propose what came after it.",
        hint="for n from min(max_n, len - 1) down to min_n: windows tokens[j:j+n] for j < len - n only (not the "
             "suffix itself); take the LAST hit j; propose tokens[j + n : j + n + k].",
        signature="propose_prompt_lookup(token_ids: list[int] | torch.Tensor, num_speculative_tokens: int, "
                  "max_n: int = 3, min_n: int = 1) -> list[int]",
        called_from="minillm.speculative.proposer.NGramProposer.propose (an override replaces its n-gram index)",
    ),
    Exercise(
        id="ch09.tree_attention_mask", function="tree_attention_mask", source="minillm/speculative/tree.py",
        points=10,
        nudge="Each tree node may see itself and the nodes on its path to the root, nothing else.",
        hint="mask = eye(N); for each node walk parents up to the root (-1), setting mask[i, ancestor]; siblings "
             "and cousins stay False even though they come earlier in the flattened order.",
        signature="tree_attention_mask(parents: torch.Tensor) -> torch.Tensor",
        called_from="minillm.speculative.tree.TokenTree.from_parents (every token tree the engine verifies)",
    ),
    Exercise(
        id="ch09.medusa_candidates", function="medusa_candidates", source="minillm/speculative/tree.py",
        points=10,
        nudge="Node i of the tree takes one guess from one head: which head is set by its depth, which guess by "
              "its rank.",
        hint="token[b, 0] = root[b]; token[b, i] = head_topk_ids[b, depths[i] - 1, ranks[i]] (head 0 is depth 1); "
             "int64 [B, N].",
        signature="medusa_candidates(root_token_ids: torch.Tensor, head_topk_ids: torch.Tensor, "
                  "depths: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor",
        called_from="minillm.speculative.tree.TokenTree.candidates (Medusa / EAGLE tree drafts)",
    ),
    Exercise(
        id="ch09.expected_tokens_per_step", function="expected_tokens_per_step",
        source="minillm/speculative/rejection.py", points=5,
        nudge="Which drafts count in a step, with what probability, and what does the target add every time?",
        hint="draft i counts with probability a^i (all before it accepted); plus the target's token: "
             "sum_{i=0..k} a^i = (1 - a^(k+1)) / (1 - a), and k + 1 at a = 1.",
        signature="expected_tokens_per_step(acceptance_rate: float, num_speculative_tokens: int) -> float",
        called_from="chapter 9 (interview question: the speedup ceiling of section 1); not called by the engine",
    ),
]
