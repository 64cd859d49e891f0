"""A model-free engine for the scheduler and block manager: fake tokens, and a shadow KV cache that checks
every read (chapters 5 and 6).

Scheduling decisions do not depend on what the model computes, only on how many tokens it computes, so the
scheduler can be run, tested and drawn without a model. `SimulatedEngine` drives a Scheduler exactly as the
real engine loop does (schedule, apply block operations, compute, advance num_computed_tokens, sample, finish).
Instead of keys and values, `ShadowKVCache` stores in each slot the *identity of the prefix* the token at that
slot ends (a running hash of the token ids up to it): the thing a real K/V vector depends on. After each step
every scheduled sequence reads back every position its attention reads (from its window's first key under a
sliding window) and the identities must match, so a wrong block table, a prefix-cache hit on the wrong block, a
missed copy-on-write or a lost swap shows up as a precise error.
The fake model's next token is a function of the prefix, like greedy decoding, so identical prompts continue
identically (which is what makes prefix caching across requests observable).

Multi-token steps (speculative decoding's verify step) run here too: give `propose(seq) -> draft tokens` and
each decoding sequence carries those drafts into the step; the fake model "samples" at every draft row, the
drafts are accepted while they match (greedy acceptance), and `Scheduler.postprocess` (the same bookkeeping the
real engine uses) appends them and gives back the blocks of the rejected ones.
"""
from __future__ import annotations

from typing import Callable

from minillm.engine.block_manager import slot_mapping
from minillm.engine.scheduler import Scheduler
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.sampling_params import SamplingParams
from minillm.hooks import dispatch


def prefix_identities(token_ids: list[int]) -> list[int]:
    """identity[p] names the prefix token_ids[:p+1] (a running hash; deterministic across processes)."""
    out, h = [], 0
    for token in token_ids:
        h = hash((h, token))
        out.append(h)
    return out


class ShadowKVCache:
    """Stands in for engine.kv_cache.KVCache: same block operations, prefix identities instead of tensors."""

    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int = 0, num_offload_blocks: int = 0) -> None:
        self.block_size = block_size
        self.device: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.cpu: list[list[int | None]] = [[None] * block_size for _ in range(num_cpu_blocks)]
        self.tier: list[list[int | None]] = [[None] * block_size for _ in range(num_offload_blocks)]  # CPU tier

    def apply(self, batch: ScheduledBatch) -> None:
        """The runner's order (ModelRunner.apply_block_ops): swap-outs, the CPU tier's stores, swap-ins, copies
        (all sources read before any copy writes), the tier's loads."""
        for dev, cpu in batch.blocks_to_swap_out:
            self.cpu[cpu] = list(self.device[dev])
        for dev, host in batch.blocks_to_offload:
            self.tier[host] = list(self.device[dev])
        for cpu, dev in batch.blocks_to_swap_in:
            self.device[dev] = list(self.cpu[cpu])
        sources = [list(self.device[src]) for src, _ in batch.blocks_to_copy]
        for (_, dst), content in zip(batch.blocks_to_copy, sources):
            self.device[dst] = content
        for host, dev in batch.blocks_to_onload:
            self.device[dev] = list(self.tier[host])

    def write(self, block_table: list[int], start: int, end: int, identities: list[int]) -> list[int]:
        """Store positions start..end-1; returns their slots."""
        slots = dispatch("ch05.slot_mapping", slot_mapping)(block_table, start, end, self.block_size)
        for p, slot in zip(range(start, end), slots):
            self.device[slot // self.block_size][slot % self.block_size] = identities[p]
        return slots

    def check(self, seq: Sequence, end: int, identities: list[int], start: int = 0) -> None:
        """Every position start..end-1 of seq must read back its own prefix identity (start > 0: a sliding window's
        first key; the blocks before it may have been given back)."""
        slots = dispatch("ch05.slot_mapping", slot_mapping)(seq.block_table, start, end, self.block_size)
        for p, slot in enumerate(slots, start=start):
            got = self.device[slot // self.block_size][slot % self.block_size]
            if got != identities[p]:
                raise AssertionError(f"sequence {seq.seq_id} ({seq.request_id!r}) position {p}: slot {slot} "
                                     f"(block table {seq.block_table}) holds the K/V of another prefix")


class SimulatedEngine:
    """The engine loop around a Scheduler, with a fake model and a checking KV cache."""

    def __init__(self, scheduler: Scheduler, vocab_size: int = 50,
                 propose: Callable[[Sequence], list[int]] | None = None) -> None:
        bm = scheduler.block_manager
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.propose = propose  # drafts for a decoding sequence, asked before every step
        self.kv = ShadowKVCache(bm.num_blocks, bm.block_size, bm.num_cpu_blocks, bm.num_offload_blocks)
        self.finished: list[Sequence] = []
        self.batches: list[ScheduledBatch] = []
        self._count = 0

    def add_request(self, prompt_token_ids: list[int], max_tokens: int = 8, priority: int = 0,
                    request_id: str | None = None, arrival_time: float | None = None) -> Sequence:
        self._count += 1
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, priority=priority, ignore_eos=True)
        seq = Sequence(request_id or f"req-{self._count}", prompt_token_ids, params,
                       arrival_time=float(self._count) if arrival_time is None else arrival_time)
        self.scheduler.add(seq)
        return seq

    def step(self) -> ScheduledBatch:
        sched, bm = self.scheduler, self.scheduler.block_manager
        if self.propose is not None:
            for seq in sched.running:
                if not seq.is_prefill:
                    seq.spec_token_ids = list(self.propose(seq))
        batch = sched.schedule()
        self.batches.append(batch)
        self.kv.apply(batch)
        written: set[int] = set()
        identities = {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if n < 1 or end > seq.num_tokens + len(seq.spec_token_ids):
                raise AssertionError(f"sequence {seq.seq_id}: scheduled tokens {start}..{end - 1} of "
                                     f"{seq.num_tokens} + {len(seq.spec_token_ids)} drafts")
            identities[seq.seq_id] = prefix_identities(seq.token_ids + seq.spec_token_ids)
            slots = self.kv.write(seq.block_table, start, end, identities[seq.seq_id])
            shared = {s // bm.block_size for s in slots if not bm.is_writable(s // bm.block_size)}
            if shared or written & set(slots):
                raise AssertionError(f"sequence {seq.seq_id} writes into shared blocks {sorted(shared)} or into "
                                     f"slots another sequence wrote this step")
            written |= set(slots)
        window = bm.sliding_window
        for seq, n in zip(batch.seqs, batch.num_new_tokens):  # attention reads after every store
            first = 0 if window is None else max(0, seq.num_computed_tokens - window + 1)  # the step's first key
            self.kv.check(seq, seq.num_computed_tokens + n, identities[seq.seq_id], first)
        new_tokens = [self._sample_and_accept(seq, n, identities[seq.seq_id])
                      for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        sched.postprocess(batch, new_tokens)
        for seq, new in zip(batch.seqs, new_tokens):
            max_tokens = seq.sampling_params.max_tokens
            if new and seq.num_output_tokens >= max_tokens:
                seq.truncate_output(seq.num_prompt_tokens + max_tokens)  # a verify step may overshoot
                seq.finish_reason = "length"
                sched.finish(seq)
                self.finished.append(seq)
        self.finished.extend(sched.rejected)
        sched.rejected.clear()
        sched.check_invariants()
        return batch

    def _sample_and_accept(self, seq: Sequence, n: int, identities: list[int]) -> list[int]:
        """The fake model's tokens at the last 1 + k rows when the step reaches the end (else none), cut at
        the first draft that differs from them: greedy acceptance."""
        spec = seq.spec_token_ids
        if seq.num_computed_tokens + n < seq.num_tokens + len(spec):
            return []
        accepted = []
        for j in range(len(spec) + 1):
            token = identities[seq.num_tokens - 1 + j] % self.vocab_size  # prediction after position
            accepted.append(token)
            if j == len(spec) or spec[j] != token:
                break
        return accepted

    def run(self, max_steps: int = 100_000) -> list[Sequence]:
        """Step until every request has finished; raise if that takes more than max_steps (a livelock)."""
        steps = 0
        while self.scheduler.has_unfinished():
            if steps >= max_steps:
                raise RuntimeError(f"no end after {max_steps} steps: {len(self.scheduler.running)} running, "
                                   f"{len(self.scheduler.waiting)} waiting, {len(self.scheduler.swapped)} swapped")
            self.step()
            steps += 1
        return self.finished
