"""Draft ahead: start step N+1's proposal at the end of step N, read it back without waiting (chapter 9).

A head proposer (EAGLE, MTP, Medusa) drafts from the target's features, and those of step N are known the moment
step N's verification is done: the accepted tokens and the hidden states of their rows. The engine, however, asks
for drafts only at the start of step N+1 (SpeculativeDecoder.propose, before the scheduler), after it has applied
step N (postprocess, stop checks, detokenizer, outputs). Drafting there serialises three things per step:

    host: verify N, postprocess N, outputs N | launch draft, WAIT | schedule, build, upload, launch verify, WAIT
    GPU:                        ...idle...   | draft (~0.3 ms)    | ...idle...                   | verify N+1

Drafting ahead moves the launch to the end of verification (SpeculativeDecoder.record_step, right after the
features are recorded) and the read-back to a non-blocking copy into page-locked host memory with an event:

    host: verify N, launch draft + async copy, postprocess N, outputs N | collect (no wait) | schedule, build, ...
    GPU:                    draft (runs while the host works)             ...

so the draft's GPU time hides behind the host's bookkeeping, and the host never blocks on the draft: its one wait
per step is the verify step's download. This is the same idea as vLLM's and SGLang's overlap schedulers, applied to
the proposer only (the engine's step order is unchanged).

What is drafted ahead is exactly what propose would draft: the same recorded features, the same tokens (the step's
accepted tokens appended to the sequence's, as postprocess will), greedy choices. A proposal made ahead is used only
if every sequence asking for drafts was drafted ahead from the window it now has (same last position) with at
least as many drafts; otherwise (a request finished, preempted, sampled, newly scheduled) it is dropped and
propose drafts as before. A pending proposal is never wrong, at worst wasted.

The copy lands in one page-locked buffer and one event per proposer (AheadLanding), reused every step: a fresh
pinned tensor and a fresh event per step cost an allocator round trip each, and a pinned allocation that misses
the cache is a cudaHostAlloc, which can stall the host for longer than the whole draft.

It is a switch (SpeculativeConfig.draft_ahead; None, the default, turns it on for the head methods on a GPU and off
on a CPU, where nothing overlaps). On the H200 at batch 1 (benchmarks/bench_spec_host.py, random SmolLM2-shaped
weights, 2026-12-03, the median of three runs per variant after gc.collect(), with the tree graphs) it saves what
the timeline above says it can: EAGLE 2.13 against 2.26 ms per step drafting when asked, eagle_tree 3.06 against
3.24, faster in every run. (A first measurement, one run per variant with "ahead" always first after a new engine
had captured its graphs, had read it slower; a one-off such as a full garbage collection landed in it.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AheadProposal:
    """A proposal started before it was asked for: `rows[request_id] = (row, end)`: the sequence's row of `host`
    and the last feature position its window ended at; `num_drafts`: the drafts per row (a chain's length, a tree
    search's depth); `key`: what else fixed the proposal (a tree search's topk and beam); `ready` is recorded
    after the copy into `host` (None on a CPU, where the copy is done when it returns)."""

    rows: dict[str, tuple[int, int]]
    num_drafts: int
    host: torch.Tensor
    ready: torch.cuda.Event | None
    key: tuple = ()

    @classmethod
    def start(cls, rows: dict[str, tuple[int, int]], result: torch.Tensor, num_drafts: int,
              key: tuple = (), landing: "AheadLanding | None" = None) -> "AheadProposal":
        """Queue the copy of `result` [B, ...] (device) into host memory (the landing's pinned buffer on a GPU, so
        that the copy is asynchronous); the caller keeps working while the proposal and the copy run."""
        host, ready = (landing or AheadLanding()).land(result)
        return cls(rows, num_drafts, host, ready, key)

    def covers(self, request_ids: list[str], ends: list[int], num_drafts: int, key: tuple = ()) -> bool:
        """Whether this proposal holds every request's drafts, from the window it has now, at least num_drafts
        deep, made with the same key."""
        return num_drafts <= self.num_drafts and key == self.key and all(
            self.rows.get(r, (None, None))[1] == e for r, e in zip(request_ids, ends))

    def collect(self, request_ids: list[str]) -> torch.Tensor:
        """The rows of these requests, on the host (waits for the copy only if the proposal is still running:
        normally it finished while the host applied the previous step)."""
        if self.ready is not None:
            self.ready.synchronize()
        rows = [self.rows[r][0] for r in request_ids]
        if rows == list(range(self.host.shape[0])):
            return self.host.clone()  # the landing buffer is rewritten by the next proposal
        return self.host[rows]


class AheadLanding:
    """Where one proposer's proposals made ahead land on the host: a page-locked buffer, grown when a proposal
    needs more, and one event, both reused by every proposal (a proposal is collected, or dropped, before the next
    one starts: a dropped one's copy is queued before the next one's, so the buffer ends up holding the newer)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None

    def land(self, result: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """(host tensor shaped like result, the event recorded after the copy into it; None on a CPU, where the
        copy is done when this returns)."""
        if result.device.type != "cuda":
            return result.to("cpu", copy=True), None
        n = result.numel()
        if self.buffer is None or self.buffer.numel() < n or self.buffer.dtype != result.dtype:
            self.buffer = torch.empty(max(n, 2 * (self.buffer.numel() if self.buffer is not None else 0)),
                                      dtype=result.dtype, pin_memory=True)
        if self.event is None:
            self.event = torch.cuda.Event()
        host = self.buffer[:n].view(tuple(result.shape))
        host.copy_(result, non_blocking=True)
        self.event.record()
        return host, self.event
