"""The proposer side shared by Medusa, EAGLE and MTP: the target's features per request, windows, draft sampling
(chapter 9).

Every step the engine hands the proposer the target's hidden states of the rows it keeps
(`record_hidden_states`, called by SpeculativeDecoder.record_step before the scheduler's postprocess): a prefill
chunk's rows, a plain decode's one row, a verify step's rows up to the last accepted draft (the rows of rejected
drafts belong to tokens that never happened and are dropped here, as their KV is rolled back there). Row p holds
f_p, the feature that predicted token p + 1. A request's features are kept for its last `window` positions only.

To propose for a sequence of n tokens (token n - 1 just sampled, not yet computed) the proposer needs f_{n-2}: the
feature that chose token n - 1. A request without it (just swapped in, or prefix-cached so its prompt rows were
never computed) gets no drafts this step; its next decode step records what is missing. The window handed to the
heads is, for positions p of the last <= `window` features: f_p and the token x_{p+1} that followed it.

Draft KV ("keep it simple and correct"): the heads keep no cache across steps. EAGLE and MTP recompute their one
layer over the window every step, and keep K/V only within one proposal for the drafts they feed back in (a
DraftKV allocated for the window plus the drafts); a rollback therefore needs no bookkeeping at all. Medusa has no
attention and needs only f_{n-2}.

Cost (what one proposal launches): every window has the same width, `window` (left padded), and each request's
features are kept already padded to it, so the batch's windows are one torch.stack and its tokens and lengths one
host-to-device copy. The drafting loop then has static shapes (EAGLE writes its K/V in place: heads.DraftKV), and
on CUDA a batch of greedy requests replays a CUDA graph captured per (batch bucket, k): the whole proposal, window
pass and k drafts, costs one graph launch. A batch with a sampled request runs the same code eagerly (its q needs
the host every draft).

Drafting ahead (draft_ahead.py; SpeculativeConfig.draft_ahead, on by default on a GPU): greedy proposals start at the end
of the previous step, as soon as its features are recorded (`draft_ahead`, called by SpeculativeDecoder.record_step),
and come back by a non-blocking copy into pinned memory; `propose_with_probs` then collects them without waiting,
and the draft's GPU time may hide behind the host's postprocessing instead of stalling it.

Sampling: a greedy request drafts the argmax; a sampled one draws its drafts from q = the head's distribution under
the request's own temperature/top-k/top-p, and returns q so that verification applies the rejection rule with it
(min(1, p/q) and the residual resample), which keeps the target's distribution exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.kernels.hardware import graph_capture
from minillm.layers.sampler import greedy_tokens
from minillm.speculative.draft_ahead import AheadLanding, AheadProposal
from minillm.speculative.heads import HeadConfig, TargetParts, fused_norm, window_positions
from minillm.speculative.proposer import SampledDraftProposer, check_num_tokens, sample_drafts

DEFAULT_WINDOW = 64  # positions of context the EAGLE / MTP layer attends to when drafting
MAX_GRAPH_BATCH = 256  # larger batches draft eagerly (a graph per bucket up to here)


@dataclass
class Window:
    """A batch of left-padded windows: features [B, W, d] at positions p, the tokens x_{p+1} [B, W] that followed
    them, window-relative positions [B, W] and key_mask [B, W] (False on padding)."""

    features: torch.Tensor
    next_tokens: torch.Tensor
    positions: torch.Tensor
    key_mask: torch.Tensor

    @classmethod
    def from_packed(cls, features: torch.Tensor, packed: torch.Tensor) -> "Window":
        """From features [B, W, d] and packed int64 [B * W + B]: each row's tokens, then every row's length."""
        batch, width = features.shape[:2]
        positions, key_mask = window_positions(packed[batch * width:], width, features.device)
        return cls(features, packed[:batch * width].view(batch, width), positions, key_mask)


# choose(logits [B, V'] over the draft vocabulary) -> the drafted indices into it [B] (on the logits' device):
# argmax or a sample from q; the proposers map them to token ids (TargetParts.vocab.to_ids)
Chooser = Callable[[torch.Tensor], torch.Tensor]
# a request's window as _window_of finds it: (features [W, d] left padded, real rows L, the L tokens after them)
RequestWindow = tuple[torch.Tensor, int, list[int]]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return greedy_tokens(logits)


class HeadProposer(SampledDraftProposer):
    """Base of the head proposers: subclasses set `method`, `hidden_state_kind`, `max_drafts` and `draft`.
    `cuda_graphs`: replay the greedy proposals as CUDA graphs (only where the features live on a GPU)."""

    method = "heads"
    hidden_state_kind = "pre_norm"
    seed_offset = 0x4EAD  # the heads' own stream for seeded requests

    def __init__(self, heads: nn.Module, config: HeadConfig, target: TargetParts, window: int = DEFAULT_WINDOW,
                 seed: int = 0, cuda_graphs: bool = False) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.heads, self.config, self.target, self.window = heads.eval(), config, target, window
        self.generator = torch.Generator().manual_seed(seed + 3)  # draft draws of unseeded requests (CPU)
        self._generators: dict[str, torch.Generator] = {}
        # request_id -> (end, real rows L, f at positions [end - L, end) in the last L rows of a [window, d] tensor)
        self._features: dict[str, tuple[int, int, torch.Tensor]] = {}
        self._zeros: torch.Tensor | None = None  # [window, d]: the padding every stored window starts from
        self._ahead: AheadProposal | None = None  # next step's greedy drafts, started at the end of this one
        self._landing = AheadLanding()  # where they come back: one pinned buffer and event, reused
        self.final_norm = fused_norm(target.norm_weight, target.eps)  # the target's final norm, one kernel
        self.fused = self.fuse()
        self.graphs = DraftGraphs(self) if cuda_graphs else None

    @property
    def max_drafts(self) -> int:
        """The most tokens one proposal can draft (Medusa: its heads; MTP: its modules; EAGLE: no limit)."""
        return self.config.num_heads

    def fuse(self) -> nn.Module | None:
        """The heads' layers packed for drafting (heads.FusedDraftBlock), built once; None: nothing to pack."""
        return None

    def draft(self, window: Window, num_drafts: int, choose: Chooser) -> list[torch.Tensor]:
        """num_drafts steps; step j returns choose(logits of draft j) for every row. Static shapes only (no host
        reads, no shapes that depend on values): greedy proposals are captured in CUDA graphs."""
        raise NotImplementedError

    # -- the target's features ----------------------------------------------------------------------------
    def record_hidden_states(self, batch: ScheduledBatch, hidden_states: list[torch.Tensor],
                             accepted: list[list[int]]) -> None:
        if len(hidden_states) != len(batch.seqs) or len(accepted) != len(batch.seqs):
            raise ValueError(f"{len(hidden_states)} hidden-state blocks and {len(accepted)} token lists for "
                             f"{len(batch.seqs)} sequences")
        width = self.window
        for seq, n, rows, tokens in zip(batch.seqs, batch.num_new_tokens, hidden_states, accepted):
            if rows.shape[0] != n:
                raise ValueError(f"request {seq.request_id!r}: {rows.shape[0]} hidden rows for {n} new tokens")
            drafts = len(seq.spec_token_ids)
            keep = n - drafts + max(len(tokens) - 1, 0) if drafts else n  # rows of rejected drafts never happened
            start = seq.num_computed_tokens  # not yet advanced: postprocess runs after this
            end, length, stored = self._features.get(seq.request_id, (start, 0, None))
            dropped = end - start  # rows from `start` on are recomputed now (after a preemption): drop the old ones
            if stored is None or dropped < 0:  # nothing yet, or a gap (positions never computed here): start afresh
                length, dropped, stored = 0, 0, None
            new = rows[max(0, keep - width):keep]
            old = max(0, min(length - dropped, width - new.shape[0]))  # old rows still wanted, the latest ones
            if self._zeros is None or self._zeros.shape[1] != rows.shape[1] or self._zeros.device != rows.device \
                    or self._zeros.dtype != rows.dtype:
                self._zeros = rows.new_zeros(width, rows.shape[1])
            parts = [self._zeros[:width - old - new.shape[0]], new]
            if old:
                parts.insert(1, stored[width - dropped - old:width - dropped])
            # one cat: a fresh [width, d] tensor (the rows may be views of a CUDA-graph buffer, rewritten next step)
            self._features[seq.request_id] = (start + keep, old + new.shape[0], torch.cat(parts))

    def free(self, request_id: str) -> None:
        self._features.pop(request_id, None)
        if self._ahead is not None:
            self._ahead.rows.pop(request_id, None)

    def active_requests(self) -> set[str]:
        return set(self._features)

    def _window_of(self, seq: Sequence) -> RequestWindow | None:
        """(features [window, d] left padded, real rows L, the L tokens after them) when f_{n-2} is known."""
        end, length, features = self._features.get(seq.request_id, (0, 0, None))
        if features is None or end != seq.num_tokens - 1 or length == 0:
            return None
        return features, length, seq.token_ids[end - length + 1:end + 1]

    def _pack_into(self, host: np.ndarray, windows: list[RequestWindow], rows: int) -> None:
        """Write the host's numbers for `rows` windows (the last rows - len(windows) empty) into host, int64
        [rows * W + rows]: each row's tokens, right aligned, then every row's length."""
        width = self.window
        host[:] = 0
        for row, (_, length, next_tokens) in enumerate(windows):
            if len(next_tokens) != length:
                raise ValueError(f"a window of {length} features needs as many tokens, got {len(next_tokens)}")
            host[(row + 1) * width - length:(row + 1) * width] = next_tokens
            host[rows * width + row] = length

    def _packed(self, windows: list[RequestWindow], rows: int) -> torch.Tensor:
        """_pack_into a fresh int64 tensor on the host, pinned where a GPU will read it."""
        host = np.empty(rows * self.window + rows, dtype=np.int64)
        self._pack_into(host, windows, rows)
        packed = torch.from_numpy(host)
        return packed.pin_memory() if windows[0][0].device.type == "cuda" else packed

    def _batch(self, windows: list[RequestWindow]) -> Window:
        """The batch's windows: the features are already on the device, padded (one stack); the host's numbers go
        in one non-blocking copy."""
        features = torch.stack([f for f, _, _ in windows])
        packed = self._packed(windows, len(windows)).to(features.device, non_blocking=True)
        return Window.from_packed(features, packed)

    # -- drafting -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose_with_probs(self, seqs: list[Sequence], num_tokens: list[int]
                           ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        check_num_tokens(seqs, num_tokens)
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        ready, windows = [], []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            window = self._window_of(seq) if k > 0 else None
            if window is not None:
                ready.append((i, min(k, self.max_drafts)))
                windows.append(window)
        if not ready:
            return drafts, probs
        num_drafts = max(k for _, k in ready)
        params = [seqs[i].sampling_params for i, _ in ready]
        sampled_rows = [r for r, p in enumerate(params) if p.temperature > 0]
        ahead, self._ahead = self._ahead, None  # one use: a later proposal starts from newer windows
        request_ids = [seqs[i].request_id for i, _ in ready]
        if not sampled_rows and ahead is not None and \
                ahead.covers(request_ids, [seqs[i].num_tokens - 1 for i, _ in ready], num_drafts):
            table = ahead.collect(request_ids).tolist()  # drafted during the previous step's postprocessing
        elif not sampled_rows:
            table = self._greedy_drafts(windows, num_drafts).tolist()  # the proposal's one sync
        else:
            gens = [self._generator_of(seqs[ready[r][0]]) for r in sampled_rows]
            table = self._propose_eager(windows, num_drafts, params, sampled_rows, gens)
            for j, r in enumerate(sampled_rows):
                i, k = ready[r]
                probs[i] = torch.stack([q[j] for q in self._q_steps[:k]])
        for row, (i, k) in enumerate(ready):
            drafts[i] = table[row][:k]
        return drafts, probs

    @torch.inference_mode()
    def draft_ahead(self, seqs: list[Sequence], new_tokens: list[list[int]], num_tokens: list[int]) -> None:
        """Start the next step's greedy proposal now (draft_ahead.py): seqs[i] is about to gain new_tokens[i] (the
        step's accepted tokens, whose features record_hidden_states has just stored) and will ask for up to
        num_tokens[i] drafts. Nothing waits here: the drafts come back by a non-blocking copy."""
        self._ahead = None  # an older proposal never outlives a newer step
        rows, windows, num_drafts = self._ahead_windows(seqs, new_tokens, num_tokens)
        if windows:
            num_drafts = min(num_drafts, self.max_drafts)
            self._ahead = AheadProposal.start(rows, self._greedy_drafts(windows, num_drafts), num_drafts,
                                              landing=self._landing)

    def _ahead_windows(self, seqs: list[Sequence], new_tokens: list[list[int]], num_tokens: list[int]
                       ) -> tuple[dict[str, tuple[int, int]], list[RequestWindow], int]:
        """The windows the greedy sequences will have once they gain new_tokens (what _window_of will return
        then), their rows and window ends, and the most drafts asked for."""
        check_num_tokens(seqs, num_tokens)
        rows: dict[str, tuple[int, int]] = {}
        windows: list[RequestWindow] = []
        for seq, tokens, k in zip(seqs, new_tokens, num_tokens):
            if k == 0 or not tokens or seq.sampling_params.temperature > 0:
                continue
            end, length, features = self._features.get(seq.request_id, (0, 0, None))
            if features is None or length == 0 or end != seq.num_tokens - 1 + len(tokens):
                continue  # no feature for the token before the last one: propose will find no window either
            # the tokens after the window's features, as they will read once postprocess appends `tokens`
            rows[seq.request_id] = (len(windows), end)
            windows.append((features, length, (seq.token_ids[-length:] + list(tokens))[-length:]))
        num_drafts = max((k for seq, k in zip(seqs, num_tokens) if seq.request_id in rows), default=0)
        return rows, windows, num_drafts

    def _greedy_drafts(self, windows: list[RequestWindow], num_drafts: int) -> torch.Tensor:
        """Greedy drafts [B, num_drafts] of the windows, left on the device: one graph replay where graphs are on,
        else the eager proposal."""
        if self.graphs is not None and self.graphs.fits(windows):
            drafts = self.graphs.launch(windows, num_drafts)
            if drafts is not None:
                return drafts
        return torch.stack(self.draft(self._batch(windows), num_drafts, greedy), dim=1)

    def _propose_eager(self, windows: list[RequestWindow], num_drafts: int, params: list, sampled_rows: list[int],
                       gens: list[torch.Generator | None]) -> list[list[int]]:
        """Drafts [B][num_drafts] of the windows, op by op; self._q_steps[j]: the sampled rows' q of draft j."""
        self._q_steps = q_steps = []

        def choose(logits: torch.Tensor) -> torch.Tensor:
            tokens = greedy(logits)
            if sampled_rows:  # q under each request's own temperature / top-k / top-p, then x ~ q
                picked, q = sample_drafts(logits[sampled_rows], [params[r] for r in sampled_rows], gens,
                                          self.generator)
                tokens[sampled_rows] = picked.to(tokens.device)
                q_steps.append(self.target.vocab.spread(q))  # over every token, as verification's p
            return tokens

        steps = self.draft(self._batch(windows), num_drafts, choose)
        return torch.stack(steps, dim=1).tolist()  # [B, steps]


class DraftGraphs:
    """The greedy proposals of one HeadProposer as CUDA graphs, one per (batch bucket, number of drafts).

    A graph replays a fixed sequence of kernels on fixed addresses: the proposal reads its inputs from static
    buffers per bucket (features [bucket, W, d]; tokens and lengths packed as int64 [bucket * W + bucket]), which
    the host fills before each replay (a stack on the device, one host-to-device copy), and leaves its drafts in
    a static [bucket, k]. Batches are padded up to a power of two, so a handful of graphs covers every batch
    size; padding rows hold stale windows whose drafts nobody reads. Graphs are captured on first use, after
    one eager run on a side stream (it builds the RoPE tables and lets the allocator settle), and all share one
    memory pool. The numbers are those of the eager path: the same kernels on the same shapes."""

    def __init__(self, proposer: HeadProposer) -> None:
        self.proposer = proposer
        self.pool = None
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # bucket -> (features, packed)
        self.staging: dict[int, tuple] = {}  # bucket -> (pinned host packed, its numpy view, its copy's event)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (bucket, k)

    def release_graphs(self) -> bool:
        """Drop every graph and its static buffers (sleep mode moves the weights they read); the next proposal
        captures them again. True when there were any."""
        had = bool(self.graphs)
        self.graphs.clear()
        self.inputs.clear()
        self.pool = None
        return had

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << (batch - 1).bit_length()

    def fits(self, windows: list[RequestWindow]) -> bool:
        return windows[0][0].device.type == "cuda" and len(windows) <= MAX_GRAPH_BATCH

    def _run(self, bucket: int, num_drafts: int) -> torch.Tensor:
        features, packed = self.inputs[bucket]
        steps = self.proposer.draft(Window.from_packed(features, packed), num_drafts, greedy)
        return torch.stack(steps, dim=1)

    def _capture(self, bucket: int, key, like: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, Any]:
        """Record `_run(bucket, key)` (key: what else fixes the shapes; here the number of drafts) on the
        bucket's static inputs, after one warm-up run on a side stream; (graph, its static outputs)."""
        if bucket not in self.inputs:
            width = self.proposer.window
            self.inputs[bucket] = (like.new_zeros(bucket, width, like.shape[-1]),
                                   torch.zeros(bucket * width + bucket, dtype=torch.int64, device=like.device))
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):  # warm-up: lazily built tables and workspaces exist before capture
            self._run(bucket, key)
        torch.cuda.current_stream(like.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph, pool=self.pool):
            out = self._run(bucket, key)
        return graph, out

    def _fill(self, windows: list[RequestWindow], bucket: int) -> None:
        """The windows into the bucket's static inputs (rows past len(windows) keep stale windows). The tokens and
        lengths are staged in a pinned buffer per bucket, reused: its last copy to the device has finished by now
        (a step's download waited for it), which the event confirms without waiting."""
        features, packed = self.inputs[bucket]
        torch.stack([f for f, _, _ in windows], out=features[:len(windows)])
        staging = self.staging.get(bucket)
        if staging is None:
            pinned = packed.device.type == "cuda"
            host = torch.empty(packed.shape, dtype=torch.int64, pin_memory=pinned)
            staging = self.staging[bucket] = (host, host.numpy(), torch.cuda.Event() if pinned else None)
        host, host_numbers, copied = staging
        if copied is not None and not copied.query():
            copied.synchronize()
        self.proposer._pack_into(host_numbers, windows, bucket)
        packed.copy_(host, non_blocking=True)
        if copied is not None:
            copied.record()

    def launch(self, windows: list[RequestWindow], num_drafts: int) -> torch.Tensor | None:
        """Drafts [B, num_drafts] of the windows by one graph replay, left on the device (a view of the graph's
        static output: read it, or queue a copy of it, before the next replay). None after a capture failure: the
        proposer drafts eagerly from then on."""
        batch = len(windows)
        bucket = self.bucket(batch)
        key = self._key(bucket, num_drafts)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(bucket, key[1], windows[0][0])
            except RuntimeError as err:  # a capture failure costs speed, never a request: draft eagerly from now
                warnings.warn(f"{self.proposer.method}: CUDA graph capture failed ({err}); drafting eagerly")
                self.proposer.graphs = None
                return None
        graph, out = self.graphs[key]
        self._fill(windows, bucket)
        graph.replay()
        return out[:batch, :num_drafts]

    def _key(self, bucket: int, num_drafts: int) -> tuple[int, int]:
        """The graph to replay: the shortest captured one of this bucket that drafts at least num_drafts, else a
        new one as long as the longest captured so far. Greedy drafts are a chain, so the first n of a longer
        proposal are the n-draft proposal; near the end of a request (k trimmed to the tokens left) the steady
        state's graph then serves, instead of a capture per (bucket, n) paid in the middle of serving."""
        longer = [k for b, k in self.graphs if b == bucket and k >= num_drafts]
        if longer:
            return bucket, min(longer)
        return bucket, max([num_drafts] + [k for _, k in self.graphs])
