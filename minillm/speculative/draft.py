"""Draft-model proposers: a small model drafts k tokens autoregressively, the target verifies them (chapter 9).

Two methods share this worker:
    draft_model       a separate model with the same tokenizer (Leviathan et al. 2023; Chen et al. 2023): a GGUF file
                      or HF directory, or, for a model without a smaller sibling on disk (the bundled SmolLM2), the
                      target's first L layers + final norm + LM head *distilled* on the target's outputs
                      (`minillm train-heads --kind draft`, stored as draft_weights.py says); with draft_num_layers
                      and no distilled draft, those layers undistilled (a copy; a quantized target's own
                      modules), with a KV pool of the draft's own.
    self_speculative  the target's own first L layers + final norm + LM head, weights *shared* (no extra weight
                      memory; "early exit" self-speculation as in LayerSkip, Elhoushi et al. 2024, without its
                      training recipe).

The draft runs in the engine process as its own worker: its own ModelRunner (so CUDA graphs for its one-token
steps on a GPU), its own paged KV pool and BlockManager. Per request it keeps a *shadow* Sequence: the tokens whose
K/V are in the draft's cache. Before drafting, the shadow is rolled back to the longest prefix it shares with the
real sequence (rejected drafts are cut there, BlockManager.truncate frees their blocks), the missing tokens are
computed in one batched forward (a prefill the first time, usually 1-2 tokens after), and then k-1 more one-token
steps produce the rest. Because the shadow is checked against the real tokens every time, nothing can go stale:
a preempted request simply loses its shadow (`free`) and rebuilds it when it runs again.

Sampling. Greedy requests draft the argmax: deterministic drafts, verified by exact match. Requests with
temperature > 0 *sample* the drafts from q = the draft's logits under the request's temperature/top-k/top-p
(logits_to_probs, the same transform the target's probabilities get), and return q so that verification can use
the rejection rule min(1, p/q) with the residual resample, which keeps the target's distribution exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.block_manager import BlockManager
from minillm.engine.model_runner import ModelRunner
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.engine.step_input import build_step_input
from minillm.speculative.config import DEFAULT_DRAFT_LAYERS, SpeculativeConfig
from minillm.speculative.draft_vocab import DraftVocab, dense_head_weight
from minillm.speculative.proposer import SampledDraftProposer, check_num_tokens, sample_drafts


class EarlyExitModel(nn.Module):
    """The target's first `num_layers` decoder layers, its final norm and its LM head, as a model of its own. The
    modules are the target's (weights shared); give the result to `independent_copy` for separate weights."""

    def __init__(self, target: nn.Module, num_layers: int) -> None:
        super().__init__()
        layers = target.model.layers
        if not 1 <= num_layers <= len(layers):
            raise ValueError(f"draft_num_layers must be in [1, {len(layers)}] (the target's layers), got {num_layers}")
        self.embed_tokens, self.norm, self.lm_head = target.model.embed_tokens, target.model.norm, target.lm_head
        self.layers = nn.ModuleList(layers[:num_layers])
        self.attention_backend = getattr(target, "attention_backend", "auto")
        self.config = target.config.layers(0, num_layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)


def independent_copy(target: nn.Module, num_layers: int) -> nn.Module:
    """A new model of the target's architecture (a Mixtral's layers keep their experts) with `num_layers` layers,
    initialised from the target's first layers (own weights: the starting point for distilling a draft model)."""
    from minillm.models import new_model
    first = next(target.parameters())
    draft = new_model(target.config.layers(0, num_layers), first.device, first.dtype,
                      getattr(target, "attention_backend", "auto"))
    source = target.state_dict()
    with torch.no_grad():
        for name, tensor in draft.state_dict().items():
            tensor.copy_(source[name])
    return draft.eval()


def draft_for(spec: SpeculativeConfig, engine: Any) -> tuple[nn.Module, ModelConfig]:
    """(draft model, its ModelConfig) for a draft_model / self_speculative spec on this engine:
      * draft_model with `model`: a distilled draft directory (draft_weights.py: the target's embedding and LM
        head plus its own layers) or any model with the target's tokenizer (a GGUF file or HF directory);
      * draft_model without `model` or draft_num_layers: the distilled draft shipped for the bundled model when
        one was trained on this target;
      * otherwise the target's first draft_num_layers (default DEFAULT_DRAFT_LAYERS) layers: for draft_model an
        undistilled draft with a KV pool of its own, a copy with its own weights (independent_copy) of a dense
        target and the target's own modules of a quantized one (a copy built from the config cannot take the
        processed tensors of its layers; the values are the same, nothing trains them here); the target's own
        modules for self_speculative."""
    from minillm.speculative.draft_weights import is_draft_dir, load_draft
    from minillm.speculative.heads import shipped_weights_dir
    config = engine.model_config
    if spec.method == "draft_model" and spec.model is not None and not is_draft_dir(spec.model):
        from minillm.engine.worker import build_model
        from minillm.loader import load_model
        draft_config, weights, _ = load_model(spec.model)
        if draft_config.vocab_size != config.vocab_size:
            raise ValueError(f"draft model {spec.model!r} has vocab_size {draft_config.vocab_size}, the target "
                             f"{config.vocab_size}: a draft must share the target's tokenizer")
        if draft_config.max_position_embeddings < engine.max_model_len:  # it drafts at every position up to it
            raise ValueError(f"draft model {spec.model!r} reads at most {draft_config.max_position_embeddings} "
                             f"positions (max_position_embeddings), below max_model_len={engine.max_model_len}: "
                             f"set max_model_len <= {draft_config.max_position_embeddings} or use a draft with a "
                             f"longer context")
        return build_model(draft_config, weights, engine.device, engine.dtype), draft_config
    try:
        target = engine.runner.model
    except AttributeError:
        raise ValueError(f"speculative method {spec.method!r} builds its draft on the target's weights, which live "
                         f"in another process here; use the in-process executor or give a draft model file as "
                         f"speculative_config['model']") from None
    distilled = None
    if spec.method == "draft_model":
        distilled = spec.model or (shipped_weights_dir("draft", config) if spec.draft_num_layers is None else None)
    if distilled is not None:
        return load_draft(distilled, target, config, engine.device, engine.dtype)
    layers = spec.draft_num_layers or DEFAULT_DRAFT_LAYERS
    if layers > config.num_hidden_layers:
        raise ValueError(f"draft_num_layers={layers} exceeds the target's {config.num_hidden_layers} layers")
    own = spec.method == "draft_model" and config.quantization is None
    return independent_copy(target, layers) if own else EarlyExitModel(target, layers), config.layers(0, layers)


class DraftModelProposer(SampledDraftProposer):
    """Drafts with `draft_model` (forward(ids, positions) -> hidden, compute_logits(hidden) -> logits) over its own
    paged KV pool of `num_blocks` blocks."""

    method = "draft_model"

    def __init__(self, draft_model: nn.Module, draft_config: ModelConfig, engine_config: EngineConfig,
                 num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        plain = dataclasses.replace(engine_config, speculative_config=None, speculative_model=None,
                                    num_speculative_tokens=None)  # the draft itself decodes one token a step
        self.model = draft_model
        self.runner = ModelRunner(draft_model, draft_config, num_blocks, block_size, device, dtype, seed,
                                  engine_config=plain)
        self.block_manager = BlockManager(num_blocks, block_size, watermark=0.0)
        self.block_size, self.device = block_size, device
        self.vocab_size = draft_config.vocab_size
        # draft sampling happens on the CPU copy of the logits (verification runs there too)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self._shadows: dict[str, Sequence] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._synced: dict[str, int] = {}  # request_id -> leading tokens the shadow shares with the sequence
        self.vocab: DraftVocab | None = None  # restrict_vocab: draft over a few tokens' rows of the LM head

    def restrict_vocab(self, token_ids: torch.Tensor) -> None:
        """Draft over these token ids only (draft_vocab.py): a 1-layer draft's LM head is most of its cost."""
        self.vocab = DraftVocab(dense_head_weight(self.model.lm_head, "a draft vocabulary")).restrict(token_ids)

    # -- per-request state --------------------------------------------------------------------------------
    def free(self, request_id: str) -> None:
        shadow = self._shadows.pop(request_id, None)
        if shadow is not None:
            self.block_manager.free(shadow)
        self._synced.pop(request_id, None)

    def active_requests(self) -> set[str]:
        return set(self._shadows)

    def _prepare_shadow(self, seq: Sequence, k: int) -> Sequence | None:
        """The request's shadow, rolled back to what it shares with seq and with slots for this proposal's
        tokens; None (state dropped) when the draft pool has no room."""
        bm, shadow = self.block_manager, self._shadows.get(seq.request_id)
        if shadow is None:
            if bm.num_free_blocks < 1:
                return None
            shadow = Sequence(seq.request_id, seq.token_ids[:1], seq.sampling_params)
            bm.allocate(shadow)  # one block, nothing computed
            self._shadows[seq.request_id] = shadow
        # Tokens are only ever appended to a running sequence, so the first `synced` tokens (what the shadow copied
        # last time) still agree; only the drafts after them need comparing: O(k), not O(length), per step.
        limit = min(shadow.num_computed_tokens, seq.num_tokens - 1)
        common = min(self._synced.get(seq.request_id, 0), limit)
        while common < limit and shadow.token_ids[common] == seq.token_ids[common]:
            common += 1
        shadow.num_computed_tokens = common
        bm.truncate(shadow, max(common, 1))
        shadow.token_ids = list(seq.token_ids)
        self._synced[seq.request_id] = seq.num_tokens
        needed = seq.num_tokens - common + k - 1  # the missing tokens now, then one per further draft
        if bm.num_blocks_to_append(shadow, needed) > bm.num_free_blocks:
            self.free(seq.request_id)
            return None
        bm.append_slots(shadow, needed)
        return shadow

    # -- drafting -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose_with_probs(self, seqs: list[Sequence], num_tokens: list[int]
                           ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        check_num_tokens(seqs, num_tokens)
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = []  # (index, shadow, drafts wanted)
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            shadow = self._prepare_shadow(seq, k) if k > 0 else None
            if shadow is not None:
                active.append((i, shadow, k))
        first = True
        while active:
            batch = ScheduledBatch([s for _, s, _ in active],
                                   [s.num_tokens - s.num_computed_tokens if first else 1 for _, s, _ in active])
            logits = self._forward(batch)
            params = [seqs[i].sampling_params for i, _, _ in active]
            sampled_rows = [row for row, p in enumerate(params) if p.temperature > 0]
            chosen = logits.argmax(dim=-1)  # greedy rows: deterministic drafts, no distribution needed
            q = None
            if sampled_rows:  # q under the request's own temperature / top-k / top-p, then x ~ q
                gens = [self._generator_of(seqs[active[r][0]]) for r in sampled_rows]
                picked, q = sample_drafts(logits[sampled_rows], [params[r] for r in sampled_rows], gens,
                                          self.generator)
                chosen[sampled_rows] = picked.to(chosen.device)
            if self.vocab is not None:  # indices into the draft vocabulary -> token ids; q over every token
                chosen, q = self.vocab.to_ids(chosen), None if q is None else self.vocab.spread(q)
            tokens = chosen.tolist()
            q_row = {r: j for j, r in enumerate(sampled_rows)}
            for row, (i, shadow, _) in enumerate(active):
                token = int(tokens[row])
                shadow.num_computed_tokens = shadow.num_tokens
                shadow.token_ids.append(token)
                drafts[i].append(token)
                if row in q_row:
                    probs[i].append(q[q_row[row]])
            active = [(i, s, k) for i, s, k in active if len(drafts[i]) < k]
            first = False
        return drafts, [torch.stack(p) if p else None for p in probs]

    def _forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """The draft's logits at the last row of every sequence of `batch`, [B, V] (V': its draft vocabulary)."""
        runner = self.runner
        prepared = runner.prepare(build_step_input(batch, self.block_size))
        if runner.attention_layers[0].k_cache.data_ptr() != runner.kv_cache.storage.data_ptr():
            runner.bind_kv_cache()  # self_speculative: the target's attention modules were bound to its own cache
        hidden = runner.forward(prepared)[prepared.sample_indices]
        return self.model.compute_logits(hidden) if self.vocab is None else self.vocab.logits(hidden)
