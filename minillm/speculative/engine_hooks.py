"""Speculative decoding inside the engine loop: propose, verify, count (chapter 9).

LLMEngine._step calls three methods of the SpeculativeDecoder it built from `EngineConfig.speculative_config`:

    decoder.propose(scheduler)          before scheduler.schedule(): drafts for every running sequence that will
                                        decode next step (seq.spec_token_ids), from the configured proposer;
                                        the scheduler then grants them as far as budget and blocks allow
    decoder.verify(batch, step_output)  after the forward: per sequence, the tokens it appends (accepted drafts +
                                        one), which scheduler.postprocess applies (and rolls back the rest)
    decoder.record_step(batch, ...)     then, for head proposers: the target's features of the kept rows, and,
                                        with SpeculativeConfig.draft_ahead, the next step's proposal started at
                                        once (draft_ahead.py: the draft runs while the host postprocesses)
    decoder.release(scheduler)          after the step: proposer state of requests no longer running (finished,
                                        aborted, preempted) is freed

Verification, two exact rules.
  Deterministic drafts (n-grams, lookahead, greedy draft-model drafts): q is one-hot, so "accept x with probability
  min(1, p(x)/q(x)) = p(x), else resample from p without x" is the same as "sample y ~ p at every row and accept while
  y == x" (minillm.speculative.rejection explains why). The runner already sampled every row with the request's
  own temperature/top-k/top-p and generator, so these rows need no logits at all: greedy_verify on the samples.
  Sampled drafts (a draft model at temperature > 0): the rejection rule with the draft's q, on the target's logits
  (StepInput.return_logits is set only for such steps): verify_draft_tokens.
Either way the output is distributed exactly as plain sampling from the target; at temperature 0 it is token-identical.

Speculation is switched off for a step when more than `disable_by_batch_size` sequences are running (a big batch is
compute-bound already: verifying drafts would cost real FLOPs), and a head proposer (EAGLE, Medusa, MTP) keeps no
target features meanwhile (its windows restart once the batch shrinks); drafts are never proposed past max_tokens.
With CUDA graphs on, deterministic drafts are padded to exactly k tokens, so that a verify step has the one query
length (1 + k) the graphs were captured for (a padded draft is merely rejected: it costs compute, not correctness).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.engine.step_input import StepOutput
from minillm.hooks import dispatch
from minillm.speculative.config import HIDDEN_STATE_KIND, SpeculativeConfig, verify_query_lens
from minillm.speculative.metrics import SpecDecodeMetrics
from minillm.speculative.proposer import NGramProposer, Proposer
from minillm.speculative.rejection import greedy_accept, greedy_verify, pad_per_sequence, verify_draft_tokens
from minillm.speculative.tree_verify import TreeVerifier

logger = logging.getLogger(__name__)


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, vocab_size: int, max_model_len: int,
                 pad_drafts: bool = False, seed: int = 0, draft_ahead: bool | None = None) -> None:
        self.config, self.proposer = config, proposer
        self.vocab_size, self.max_model_len, self.pad_drafts = vocab_size, max_model_len, pad_drafts
        # SpeculativeConfig.draft_ahead, None resolved by the device (build_speculative_decoder passes it)
        self.draft_ahead = bool(config.draft_ahead) if draft_ahead is None else draft_ahead
        self.metrics = SpecDecodeMetrics()  # engine-wide totals
        self.generator = torch.Generator().manual_seed(seed + 2)  # rejection draws of unseeded requests (CPU)
        self._generators: dict[str, torch.Generator] = {}
        self._draft_probs: dict[int, torch.Tensor] = {}  # seq_id -> q of this step's sampled drafts [k, V]
        self.enabled_last_step = False
        self.num_propose_errors = 0
        self.num_padded_tokens = 0  # filler drafts added for the CUDA graphs (counted in metrics.num_draft_tokens)
        # token trees (tree_verify.py): a proposer with propose_trees drafts one tree per sequence
        self.tree = TreeVerifier() if getattr(proposer, "proposes_trees", False) else None

    # -- 1. propose ---------------------------------------------------------------------------------------
    def propose(self, scheduler: Any) -> None:
        """Set spec_token_ids of the running decodes. Drafts only ever save time, so a proposer that fails
        costs this step its drafts (logged, counted in num_propose_errors), never a request."""
        self._draft_probs.clear()
        try:
            self._propose(scheduler)
        except Exception:
            self.num_propose_errors += 1
            if self.num_propose_errors == 1:  # the traceback once; then a line now and then, not one per step
                logger.exception("proposer %r failed; this step decodes without drafts", self.proposer.method)
            elif self.num_propose_errors % 100 == 0:
                logger.warning("proposer %r has failed %d times", self.proposer.method, self.num_propose_errors)
            self._draft_probs.clear()
            for seq in getattr(scheduler, "running", ()):
                seq.spec_token_ids = []
            self._free_all()  # the proposer's state may be half-updated

    def _switched_off(self, running: list[Sequence]) -> bool:
        """disable_by_batch_size: no drafts while more sequences than the limit are running."""
        limit = self.config.disable_by_batch_size
        return limit is not None and len(running) > limit

    @staticmethod
    def _decoding(running: list[Sequence]) -> list[Sequence]:
        """The sequences that may get drafts: those about to decode (not a prefill or a chunk of one)."""
        return [seq for seq in running if not seq.is_prefill and seq.num_uncomputed_tokens == 1]

    def _free_all(self) -> None:
        """Drop the proposer's state of every request (each rebuilds it, as after a preemption)."""
        for request_id in self.proposer.active_requests():
            self.proposer.free(request_id)

    def _propose(self, scheduler: Any) -> None:
        running = list(getattr(scheduler, "running", ()))
        self.enabled_last_step = not self._switched_off(running)
        if not self.enabled_last_step:
            return
        seqs = self._decoding(running)
        wanted = [self._num_wanted(seq) for seq in seqs]
        if not seqs:
            return
        if self.tree is not None:  # one tree per sequence, at most `wanted` levels below its last token
            self.tree.propose(self.proposer, seqs, wanted, self.vocab_size)
            return
        drafts, probs = self.proposer.propose_with_probs(seqs, wanted)
        if len(drafts) != len(seqs) or len(probs) != len(seqs):
            raise ValueError(f"proposer {self.proposer.method!r} returned {len(drafts)} drafts / {len(probs)} "
                             f"distributions for {len(seqs)} sequences")
        padding = self.pad_drafts and any(drafts)
        for seq, k, draft, q in zip(seqs, wanted, drafts, probs):
            draft = [int(t) for t in draft]
            if len(draft) > k or any(not 0 <= t < self.vocab_size for t in draft):
                raise ValueError(f"proposer {self.proposer.method!r} drafted {draft} for request "
                                 f"{seq.request_id!r}: at most {k} tokens in [0, {self.vocab_size}) allowed")
            if q is not None:
                if q.shape != (len(draft), self.vocab_size):
                    raise ValueError(f"draft probabilities of request {seq.request_id!r} have shape "
                                     f"{tuple(q.shape)}, expected ({len(draft)}, {self.vocab_size})")
                self._draft_probs[seq.seq_id] = q
            elif padding:  # one query length (1 + k) per verify step: what the CUDA graphs were captured for
                self.num_padded_tokens += k - len(draft)  # scored like drafts: they dilute acceptance_rate
                draft += [draft[-1] if draft else seq.last_token_id] * (k - len(draft))
            seq.spec_token_ids = draft

    def steps_async(self, scheduler: Any) -> bool:
        """Whether the engine's next step may run as an async plain step (engine/async_step.py; with async
        scheduling on), never while a token tree's KV moves wait for the next step (prepare_step carries them; an
        async step would drop them). Two cases:
          * speculation is switched off by disable_by_batch_size (the rule propose applies). Head proposers record
            no features meanwhile, so their windows restart, as after record_step's switch-off: every request's
            proposer state is freed here;
          * the proposer expects no drafts for any running decode (`predicts_drafts`: prompt lookup, whose drafts
            come and go with the text; its index is kept). A step with nothing to verify is a plain step, and run
            async it costs what plain decoding's does: on the P7 prompts, an offline replay of the greedy outputs
            with the H200's step times put n-gram at 1.12x of plain decoding this way against 0.90x with every
            step synchronous (prompt_lookup_min 2; benchmarks/RESULTS.md, twenty-third session)."""
        if self.tree is not None and self.tree.has_pending_moves:
            return False
        running = list(getattr(scheduler, "running", ()))
        if self._switched_off(running):
            self.enabled_last_step = False
            self._draft_probs.clear()
            self._free_all()
            return True
        predicts = getattr(self.proposer, "predicts_drafts", None)
        if predicts is None:
            return False
        decodes = [seq for seq in self._decoding(running) if self._num_wanted(seq) > 0]  # what propose asks for
        try:
            return not predicts(decodes)
        except Exception:  # like a failed proposal: counted, and the step runs in sync (propose decides there)
            self.num_propose_errors += 1
            if self.num_propose_errors == 1:
                logger.exception("proposer %r could not predict its drafts", self.proposer.method)
            return False

    def _num_wanted(self, seq: Sequence, num_new_tokens: int = 0) -> int:
        """Drafts to ask for seq once it has num_new_tokens more tokens: the last step of a request needs none,
        and the context bounds them (a position past max_model_len is never computed). max_tokens bounds them
        too, except where drafts are padded to k for the CUDA graphs: a verify step of other than 1 + k rows
        misses the captured graphs and runs piecewise, ~10x slower on the H200, so near its end a request still
        drafts k and verify() keeps only the tokens it may emit."""
        k = self.config.num_speculative_tokens
        tokens_left = seq.sampling_params.max_tokens - seq.num_output_tokens - num_new_tokens
        if self.pad_drafts and tokens_left > 1:
            tokens_left = k + 1
        context_left = self.max_model_len - seq.num_tokens - num_new_tokens
        return max(0, min(k, tokens_left - 1, context_left - 1))

    @property
    def needs_hidden_states(self) -> bool:
        """Set StepInput.return_hidden_states: only head proposers (Medusa, EAGLE, MTP) draft from features."""
        return getattr(self.proposer, "hidden_state_kind", None) is not None

    def keeps_features(self, batch: ScheduledBatch) -> bool:
        """Whether this step's hidden states go to the proposer (StepInput.return_hidden_states): for a head
        proposer, unless the batch is over disable_by_batch_size. Speculation is off there, and keeping the
        features cost a copy per sequence per step (EAGLE switched off ran at 0.59x of plain decoding at batch 32
        on the H200); a request's window restarts from the first step after the batch shrinks."""
        limit = self.config.disable_by_batch_size
        return self.needs_hidden_states and (limit is None or len(batch.seqs) <= limit)

    def record_step(self, batch: ScheduledBatch, output: StepOutput, accepted: list[list[int]]) -> None:
        """Before postprocess: hand a head proposer the target's hidden states of the rows this step keeps (a
        prefill chunk's rows; a verify step's first 1 + accepted-drafts rows), and, with config.draft_ahead, let it
        start the next step's drafts now (draft_ahead.py: they run on the GPU while the host postprocesses this
        step). Like propose, a failure here costs drafts, never a request."""
        if not self.needs_hidden_states:
            return
        if not self.keeps_features(batch):
            for seq in batch.seqs:
                self.proposer.free(seq.request_id)
            return
        try:
            if output.hidden_states is None:
                raise ValueError("the head proposer needs hidden states: the step was run without "
                                 "return_hidden_states")
            self.proposer.record_hidden_states(batch, output.hidden_states, accepted)
            if self.draft_ahead and hasattr(self.proposer, "draft_ahead"):
                self.proposer.draft_ahead(batch.seqs, accepted,
                                          [self._num_wanted(s, len(t)) for s, t in zip(batch.seqs, accepted)])
        except Exception:
            self.num_propose_errors += 1
            if self.num_propose_errors == 1:  # counted with the proposal errors: the traceback once
                logger.exception("proposer %r could not record hidden states", self.proposer.method)
            self._free_all()

    def needs_logits(self, batch: ScheduledBatch) -> bool:
        """Set StepInput.return_logits: only sampled drafts need the target's logits."""
        return (any(seq.spec_token_ids and seq.seq_id in self._draft_probs for seq in batch.seqs)
                or (self.tree is not None and self.tree.needs_logits(batch)))

    def prepare_step(self, batch: ScheduledBatch, step_input: Any) -> None:
        """After build_step_input: token trees set their rows' positions and ancestor masks, and the KV moves
        of the previous tree verification ride along (tree_verify.py)."""
        if self.tree is not None:
            self.tree.prepare_step(batch, step_input)

    # -- 2. verify ----------------------------------------------------------------------------------------
    def verify(self, batch: ScheduledBatch, output: StepOutput) -> list[list[int]]:
        sampled = output.sampled_token_ids
        if len(sampled) != len(batch.seqs):
            raise ValueError(f"{len(sampled)} sample lists for {len(batch.seqs)} sequences")
        accepted: list[list[int] | None] = [None] * len(batch.seqs)
        exact, stochastic = [], []  # rows verified by sample-and-match / by the rejection rule with q
        trees: list[int] = []  # rows of token trees (tree_verify.py)
        for i, seq in enumerate(batch.seqs):
            if not seq.spec_token_ids:
                accepted[i] = list(sampled[i])
                if sampled[i] and not seq.is_prefill:  # a plain decode step of a speculating engine
                    self._record(seq, 0, 0)
            elif self.tree is not None and self.tree.holds(seq):  # a token tree: verified below
                trees.append(i)
            elif seq.seq_id in self._draft_probs:
                stochastic.append(i)
            else:
                exact.append(i)
        if trees:
            seqs = [batch.seqs[i] for i in trees]
            depths = [self.tree.depth(seq) for seq in seqs]  # metrics count a tree's levels, not its nodes
            rows = self.tree.verify(seqs, output, trees, [self._generator_of(s) for s in seqs], self.generator)
            for i, seq, depth, row in zip(trees, seqs, depths, rows):
                accepted[i] = row = _emittable(seq, row)
                self._record(seq, depth, len(row) - 1)
        if exact:
            for i, row in zip(exact, self._verify_exact([batch.seqs[i] for i in exact], [sampled[i] for i in exact])):
                accepted[i] = row
        if stochastic:
            if output.logits is None:
                raise ValueError("sampled drafts need the target's logits: the step was run without return_logits")
            seqs = [batch.seqs[i] for i in stochastic]
            width = max(len(s.spec_token_ids) for s in seqs)
            drafts, counts = self._padded_drafts(seqs, width)
            logits = torch.cat([output.logits[i] for i in stochastic])
            target = pad_per_sequence(logits, counts + 1)  # [B, width + 1, V]
            q = torch.zeros(len(seqs), width, self.vocab_size)
            for row, seq in enumerate(seqs):
                k = len(seq.spec_token_ids)
                q[row, :k] = self._draft_probs[seq.seq_id][:k]  # the scheduler may have trimmed the drafts
            params = [s.sampling_params for s in seqs]
            result = verify_draft_tokens(
                target, drafts, counts, torch.tensor([p.temperature for p in params], dtype=torch.float32),
                torch.tensor([p.top_k for p in params], dtype=torch.int64),
                torch.tensor([p.top_p for p in params], dtype=torch.float32), draft_probs=q,
                generators=[self._generator_of(s) for s in seqs], default_generator=self.generator)
            for i, row in zip(stochastic, result.to_lists()):
                accepted[i] = row
        for i in exact + stochastic:
            seq = batch.seqs[i]
            accepted[i] = _emittable(seq, accepted[i])
            self._record(seq, len(seq.spec_token_ids), len(accepted[i]) - 1)
            self.proposer.observe(seq, list(seq.spec_token_ids), list(sampled[i]))
        return accepted  # type: ignore[return-value]

    def _verify_exact(self, seqs: list[Sequence], sampled: list[list[int]]) -> list[list[int]]:
        """Sample-and-match for deterministic drafts: keep the drafts while each equals the target's token sampled
        at its row, then the target's token at the first mismatch (or the bonus token). With a learner's
        greedy_accept active (ch09.greedy_verify) it runs on tensors through greedy_verify; otherwise the same rule
        on the host lists: a verify step's rows are already on the host, and a dozen tiny CPU tensor ops would cost
        more than the loop."""
        for seq, row in zip(seqs, sampled):
            if len(row) != len(seq.spec_token_ids) + 1:
                raise ValueError(f"request {seq.request_id!r} carried {len(seq.spec_token_ids)} drafts but "
                                 f"{len(row)} rows were sampled (expected {len(seq.spec_token_ids) + 1})")
        if dispatch("ch09.greedy_verify", greedy_accept) is not greedy_accept:
            width = max(len(seq.spec_token_ids) for seq in seqs)
            drafts, counts = self._padded_drafts(seqs, width)
            targets = torch.tensor([row + [0] * (width + 1 - len(row)) for row in sampled])
            return greedy_verify(targets, drafts, counts).to_lists()
        out = []
        for seq, row in zip(seqs, sampled):
            n = 0
            for draft, target in zip(seq.spec_token_ids, row):
                if draft != target:
                    break
                n += 1
            out.append(row[:n + 1])
        return out

    def _padded_drafts(self, seqs: list[Sequence], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.tensor([len(s.spec_token_ids) for s in seqs], dtype=torch.int64)
        drafts = torch.tensor([s.spec_token_ids + [0] * (width - len(s.spec_token_ids)) for s in seqs],
                              dtype=torch.int64).reshape(len(seqs), width)
        return drafts, counts

    def _generator_of(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None:
            return None
        if seq.request_id not in self._generators:
            # an offset: the worker's generator of this request starts from `seed` too, and the accept draws must
            # not replay the numbers that chose its earlier tokens
            self._generators[seq.request_id] = torch.Generator().manual_seed(seed + 0x7E51F1)
        return self._generators[seq.request_id]

    def _record(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        metrics = seq.spec_metrics
        if metrics is None:
            metrics = seq.spec_metrics = SpecDecodeMetrics()  # read by RequestOutput.from_sequence
        metrics.record(num_drafts, num_accepted)
        self.metrics.record(num_drafts, num_accepted)

    # -- 3. release ---------------------------------------------------------------------------------------
    def release(self, scheduler: Any) -> None:
        """Free the proposer's state of requests no longer running (finished, aborted, preempted). The random
        streams of seeded requests (the rejection rule's here, the proposer's draft draws) live until the request
        leaves the scheduler: one preempted and resumed continues its streams instead of replaying numbers it has
        already used."""
        running = {seq.request_id for seq in getattr(scheduler, "running", ())}
        for request_id in self.proposer.active_requests() - running:
            self.proposer.free(request_id)
        alive = running | {seq.request_id for queue in ("waiting", "swapped") for seq in getattr(scheduler, queue, ())}
        for request_id in set(self._generators) - alive:
            del self._generators[request_id]
        self.proposer.keep_streams(alive)


def _emittable(seq: Sequence, tokens: list[int]) -> list[int]:
    """The accepted tokens a request may still emit: drafts padded to the graphs' k near the end of a request
    (SpeculativeDecoder._num_wanted) can be accepted past max_tokens. The stop check would drop them too; cutting
    here keeps the acceptance metrics to tokens that were really emitted."""
    room = seq.sampling_params.max_tokens - seq.num_output_tokens
    return tokens if len(tokens) <= room else tokens[:max(room, 1)]


def build_proposer(spec: SpeculativeConfig, engine: Any, seed: int = 0) -> Proposer:
    """The proposer of `spec.method` for this engine (the registry: a new method adds a branch here)."""
    if spec.method == "ngram":
        return NGramProposer(spec.prompt_lookup_max, spec.prompt_lookup_min)
    if spec.method == "lookahead":
        from minillm.speculative.lookahead import LookaheadProposer
        return LookaheadProposer(spec.lookahead_ngram)
    if spec.method == "ngram_tree":
        from minillm.speculative.tree_proposers import NGramTreeProposer
        return NGramTreeProposer(spec.prompt_lookup_max, spec.prompt_lookup_min)
    if spec.method == "medusa_tree":
        from minillm.speculative.tree_proposers import build_medusa_tree_proposer
        return build_medusa_tree_proposer(spec, engine, seed)
    if spec.method == "eagle_tree":
        from minillm.speculative.tree_proposers import build_eagle_tree_proposer
        return build_eagle_tree_proposer(spec, engine, seed)
    if spec.method in HIDDEN_STATE_KIND:  # Medusa, EAGLE, MTP: trained heads over the target's features
        from minillm.speculative.head_kinds import build_head_proposer
        return build_head_proposer(spec, engine, seed)
    from minillm.speculative.draft import DraftModelProposer, draft_for
    draft, draft_config = draft_for(spec, engine)
    cache = engine.cache_config
    slack = engine.engine_config.max_num_seqs * (spec.num_speculative_tokens // cache.block_size + 2)
    proposer = DraftModelProposer(draft, draft_config, engine.engine_config, cache.num_gpu_blocks + slack,
                                  cache.block_size, engine.device, engine.dtype, seed)
    if spec.draft_vocab_size is not None:  # FR-Spec: counts beside a distilled draft, else the shipped ones
        from minillm.speculative.draft_vocab import draft_vocab_ids
        proposer.restrict_vocab(draft_vocab_ids(spec.draft_vocab_size, spec.model, engine.model_config))
    return proposer


def build_speculative_decoder(engine: Any, seed: int = 0) -> SpeculativeDecoder | None:
    """The engine's SpeculativeDecoder, or None when its EngineConfig asks for no speculation."""
    spec = SpeculativeConfig.from_engine_config(engine.engine_config)
    if spec is None:
        return None
    if engine.engine_config.scheduling != "continuous":
        raise ValueError(f"speculative decoding needs continuous batching over paged blocks (rollback of rejected "
                         f"drafts), got scheduling={engine.engine_config.scheduling!r}")
    config = engine.engine_config
    # pad deterministic drafts to k only where a (bucket, 1 + k) CUDA graph exists to replay
    pad = not config.enforce_eager and engine.device.type == "cuda" and len(verify_query_lens(config)) > 1
    return SpeculativeDecoder(spec, build_proposer(spec, engine, seed), engine.model_config.vocab_size,
                              engine.max_model_len, pad_drafts=pad, seed=seed,
                              draft_ahead=spec.draft_ahead if spec.draft_ahead is not None
                              else spec.method in HIDDEN_STATE_KIND and engine.device.type == "cuda")
