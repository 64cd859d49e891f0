"""The disaggregated engine: a router in front of a prefill worker and a decode worker (chapter 11).

    llm = LLM(model, disaggregation={"prefill": 1, "decode": 1})       # the same generate / chat / stream
    engine = DisaggregatedEngine(RandomWeights(0), tokenizer, model_config, EngineConfig(...),
                                 disaggregation={"decode_num_kv_blocks": 64})

Design: the router is an LLMEngine (requests, validation, detokenization, stop checks, log-probs, abort: all
inherited), so `LLM(..., disaggregation=...)` serves it through the same front as any engine, and a server or a
benchmark drives it one `step()` at a time; a separate DisaggregatedLLM class would have repeated LLM's whole
surface (generate, chat, streams) for one different constructor. What changes is the step. One engine step is one scheduler decision
and one forward; a router step dispatches work to whichever worker is idle and returns when some worker
finishes a step, so the two workers never wait for each other (a lock-step design would hand every decode step
the length of the longest prefill beside it: exactly the interference disaggregation exists to remove):

    dispatch   prefill worker idle: the KV sends of handed-off requests the decode side has room for, and a
               batch of prompts from the prefill side's scheduler
               decode worker idle: the posted transfers the decode side has blocks for (their receives), and a
               decode batch that already includes them
    wait       for any worker's answer: "posted" (the prefill worker's sends are up: the decode side may admit
               them) or "done" (a step's tokens: postprocess, stop checks, outputs; the prefill side's sequences
               whose first token was sampled and that go on are handed off to the transfer queue)
    dispatch   again, so both workers are busy while the caller consumes the outputs

Each side is chapter 6's scheduler over its own pool (minillm.engine.disagg_scheduler): prefix caching and
chunked prefill apply on the prefill side; the decode side admits transfers only while it has blocks (a request
waits in the transfer queue, holding its prefill blocks, which in turn holds back new prompts: back-pressure
end to end, never a drop), and a decode sequence it has to preempt is recomputed on the decode worker itself.
A seeded request's sampler state travels with its KV, so seeded sampling gives one engine's tokens too. A worker
step that raises is rerun one request at a time on that worker, as one engine's is (minillm.engine.step_isolation),
unless its message moved KV: only the request that breaks it fails.

Timing: a request's first token is stamped when the prefill worker's step reaches the router (TTFT), every
later one when a decode step does (TPOT): RequestOutput.metrics as in one engine. `kv_bytes_sent` keeps the
bytes each request's transfer carried. Where the workers run: `prefill_device` / `decode_device`, by default
cuda:0 and cuda:1 with two GPUs, both on the one GPU otherwise (the KV then goes through CPU memory: a
correctness check, not a measurement), and the CPU on a CPU.

Not supported here: more than one worker per side (xPyD), speculative decoding, static batching, tensor or
pipeline parallel workers, learner overrides (the workers run in other processes).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.block_manager import BlockManager
from minillm.engine.cache_config import CacheConfig, resolve_engine_config
from minillm.engine.disagg_scheduler import DecodeScheduler, DisaggScheduler, KVTransfer, PrefillScheduler
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import SequenceStatus
from minillm.engine.constraints import constrain_step
from minillm.engine.step_input import StepInput, StepOutput, build_step_input
from minillm.engine.step_isolation import can_isolate, rerun_one_by_one
from minillm.outputs import RequestOutput
from minillm.parallel.disagg import ROLES, DisaggWorkers, KVRecv, KVSend, WorkerDied

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DisaggregationConfig:
    """How many workers per side (1 and 1), where they run, and optional per-side KV pool sizes."""

    prefill: int = 1
    decode: int = 1
    prefill_device: str | None = None
    decode_device: str | None = None
    prefill_num_kv_blocks: int | None = None  # default: EngineConfig.num_kv_blocks, or sized by the worker
    decode_num_kv_blocks: int | None = None

    def __post_init__(self) -> None:
        if (self.prefill, self.decode) != (1, 1):
            raise ValueError(f"disaggregation supports 1 prefill and 1 decode worker, got prefill={self.prefill!r}, "
                             f"decode={self.decode!r} (several workers per side are not implemented)")
        for role in ROLES:
            blocks = getattr(self, f"{role}_num_kv_blocks")
            if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
                raise ValueError(f"disaggregation {role}_num_kv_blocks must be None or an integer >= 1, got {blocks!r}")
            if getattr(self, f"{role}_device") is not None:
                self._parsed_device(role)  # a bad one fails here, not in a worker process that dies

    def _parsed_device(self, role: str) -> torch.device:
        """`{role}_device` as a torch.device on this machine (a CUDA one with its index), or ValueError."""
        chosen = getattr(self, f"{role}_device")
        allowed = "allowed: None, 'cpu', 'cuda' or 'cuda:N'"
        try:
            device = torch.device(chosen) if isinstance(chosen, (str, torch.device)) else None
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"disaggregation {role}_device={chosen!r} is not a device; {allowed}")
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if device.index is None and count:
                device = _role_gpu(role)
            if not count or device.index >= count:
                raise ValueError(f"disaggregation {role}_device={chosen!r}, but this machine has {count} CUDA "
                                 f"device(s)")
        return device

    @classmethod
    def from_value(cls, value: "DisaggregationConfig | Mapping[str, Any] | None") -> "DisaggregationConfig":
        if value is None or isinstance(value, DisaggregationConfig):
            return value or cls()
        if not isinstance(value, Mapping):
            raise TypeError(f"disaggregation must be a dict or a DisaggregationConfig, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown disaggregation option(s) {unknown}; allowed: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**value)

    def device(self, role: str, engine_device: torch.device) -> torch.device:
        if getattr(self, f"{role}_device") is not None:
            return self._parsed_device(role)
        return engine_device if engine_device.type != "cuda" else _role_gpu(role)


def _role_gpu(role: str) -> torch.device:
    """The GPU a worker of `role` takes when none is named: each side its own when there are two."""
    return torch.device("cuda", ROLES.index(role) if torch.cuda.device_count() >= 2 else 0)


def check_disaggregation(config: EngineConfig) -> None:
    """Raise ValueError for engine options the disaggregated engine does not run (before any process starts)."""
    from minillm.speculative.config import SpeculativeConfig
    if config.scheduling != "continuous" or config.kv_layout == "contiguous":
        raise ValueError("disaggregation needs continuous batching over paged KV blocks (the transfer moves "
                         f"blocks), got scheduling={config.scheduling!r}, kv_layout={config.kv_layout!r}")
    parallel = config.tensor_parallel_size * config.pipeline_parallel_size * config.expert_parallel_size
    if parallel != 1:
        raise ValueError("disaggregation runs one whole model per worker: tensor_parallel_size, "
                         "pipeline_parallel_size and expert_parallel_size must be 1")
    if SpeculativeConfig.from_engine_config(config) is not None:
        raise ValueError("speculative decoding is not supported with disaggregation")
    if config.kv_offloading_size:
        raise ValueError(f"kv_offloading_size={config.kv_offloading_size} (the prefix cache's CPU tier) is not "
                         f"supported with disaggregation: give None")
    if config.async_scheduling:
        raise ValueError("async_scheduling is not supported with disaggregation (its worker processes answer "
                         "each step in turn): give async_scheduling=False")
    if config.enable_prompt_embeds:
        raise ValueError("enable_prompt_embeds is not supported with disaggregation: give False")


class _SizingExecutor:
    """What LLMEngine's constructor asks of an executor (pool size, cache setup), answered by both workers:
    each side gets the pool its own worker sized, remembered in `cache_configs`."""

    def __init__(self, workers: DisaggWorkers) -> None:
        self.workers = workers
        self.num_blocks: dict[str, int] = {}
        self.cache_configs: dict[str, CacheConfig] = {}

    def determine_num_gpu_blocks(self) -> int:
        self.num_blocks = {role: self.workers.call(role, "determine_num_gpu_blocks") for role in ROLES}
        return min(self.num_blocks.values())

    def initialize_cache(self, cache_config: CacheConfig) -> None:
        for role in ROLES:
            blocks = self.num_blocks.get(role, cache_config.num_gpu_blocks)
            self.cache_configs[role] = dataclasses.replace(cache_config, num_gpu_blocks=blocks)
            self.workers.call(role, "initialize_cache", self.cache_configs[role])

    def execute_model(self, step: StepInput) -> Any:
        raise RuntimeError("a disaggregated engine steps its workers through DisaggregatedEngine.step()")

    def shutdown(self) -> None:
        self.workers.shutdown()


def _without_finished(batch: ScheduledBatch, result: StepOutput) -> tuple[ScheduledBatch, StepOutput]:
    """The part of a returned step whose sequences are still live: a request aborted while its step was under
    way (the router does not wait for the worker) has no tokens to take any more."""
    keep = [i for i, seq in enumerate(batch.seqs) if not seq.is_finished]
    if len(keep) == len(batch.seqs):
        return batch, result
    n = len(batch.seqs)
    per_seq = {f.name: [value[i] for i in keep] for f in dataclasses.fields(result)
               if isinstance(value := getattr(result, f.name), list) and len(value) == n}
    return (ScheduledBatch(seqs=[batch.seqs[i] for i in keep], num_new_tokens=[batch.num_new_tokens[i] for i in keep]),
            dataclasses.replace(result, **per_seq))


class DisaggregatedEngine(LLMEngine):
    """`model_source`: a picklable ModelSource (CheckpointSource(path), RandomWeights(seed)) each worker loads."""

    def __init__(self, model_source: Any, tokenizer: Any, model_config: ModelConfig, engine_config: EngineConfig,
                 *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 disaggregation: DisaggregationConfig | Mapping[str, Any] | None = None) -> None:
        plan = DisaggregationConfig.from_value(disaggregation)
        device = torch.device(device)
        if engine_config.async_scheduling is None:  # the default: off here (check_disaggregation refuses True)
            engine_config = dataclasses.replace(engine_config, async_scheduling=False)
        config = resolve_engine_config(engine_config, model_config, device)
        check_disaggregation(config)
        kwargs = {}
        for role in ROLES:
            blocks = getattr(plan, f"{role}_num_kv_blocks")
            role_config = config if blocks is None else dataclasses.replace(config, num_kv_blocks=blocks)
            if role == "prefill":  # it never runs a decode-only step: no CUDA graphs to capture
                role_config = dataclasses.replace(role_config, enforce_eager=True)
            kwargs[role] = dict(model_config=model_config, engine_config=role_config, device=plan.device(role, device),
                                dtype=dtype, model_source=model_source, seed=seed)
        self.workers = DisaggWorkers(kwargs)
        sizing = _SizingExecutor(self.workers)
        try:
            super().__init__(None, tokenizer, model_config, config, device=device, dtype=dtype, seed=seed,
                             executor=sizing)
        except BaseException:
            self.workers.shutdown()
            raise
        self.disaggregation = plan
        scales = self.workers.call("prefill", "kv_scales")  # fp8 KV: one set of scales on both sides
        if scales is not None:
            self.workers.call("decode", "kv_scales", scales)
        caches = sizing.cache_configs
        self.scheduler = DisaggScheduler(
            PrefillScheduler(config, BlockManager(caches["prefill"].num_gpu_blocks, caches["prefill"].block_size,
                                                  caches["prefill"].num_cpu_blocks,
                                                  enable_prefix_caching=config.enable_prefix_caching)),
            DecodeScheduler(dataclasses.replace(config, enable_prefix_caching=False),
                            BlockManager(caches["decode"].num_gpu_blocks, caches["decode"].block_size,
                                         caches["decode"].num_cpu_blocks)))
        self.kv_bytes_sent: dict[str, int] = {}  # request id -> bytes of its KV transfer
        self._in_flight: dict[str, tuple[ScheduledBatch, list[KVTransfer]]] = {}  # role -> its message's work
        self._finished_ids: dict[str, list[str]] = {role: [] for role in ROLES}
        self._broken: str | None = None

    # -- the front ------------------------------------------------------------------------------------------
    def add_request(self, *args: Any, **kwargs: Any) -> str:
        self._check_usable()
        return super().add_request(*args, **kwargs)

    def pooling_problem(self) -> str | None:
        return "prefill and decode run in separate workers (disaggregation): use one engine for embeddings"

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefixes of both workers' pools (LLMEngine.reset_prefix_cache)."""
        sides = (self.scheduler.prefill.block_manager, self.scheduler.decode.block_manager)
        return any([bm.reset_prefix_cache() for bm in sides])

    _workers_elsewhere = True  # the prefill and the decode worker, each in its own process

    def _on_workers(self, method: Any, *args) -> list:
        """method(worker, *args) on the prefill worker, then the decode worker (between steps)."""
        self._check_usable()
        return [self.workers.call(role, method, *args) for role in ROLES]

    def get_comm_stats(self, reset: bool = False) -> dict[str, dict[str, int]]:
        """Bytes each worker handed to torch.distributed ("kv_send" / "kv_recv"), between steps."""
        self._check_usable()
        return {role: self.workers.call(role, "get_comm_stats", reset) for role in ROLES}

    def num_used_blocks(self) -> dict[str, int]:
        """KV blocks in use on each side (0 and 0 once every request has finished)."""
        return {"prefill": self.scheduler.prefill.block_manager.num_used_blocks,
                "decode": self.scheduler.decode.block_manager.num_used_blocks}

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(self._broken)

    # -- the router step ------------------------------------------------------------------------------------
    def _step(self) -> list[RequestOutput]:
        self._check_usable()
        outputs = self._drain_both_rejected()
        try:
            self._dispatch()
            done = False
            while not done and self._in_flight:
                for worker, kind, payload in self.workers.wait():
                    if kind == "posted":
                        posted = self.scheduler.mark_posted(payload)
                        self.kv_bytes_sent.update((t.request_id, t.nbytes) for t in posted)
                    else:
                        outputs += self._complete(worker.role, payload)
                        done = True
                self._dispatch()  # newly posted transfers may go to an idle decode worker at once
        except WorkerDied as err:
            return outputs + self._fail_all(str(err))
        return outputs + self._drain_both_rejected()

    def _dispatch(self) -> None:
        fresh, self._finished_since_last_step = self._finished_since_last_step, []
        for role in ROLES:
            self._finished_ids[role] += fresh
        sched = self.scheduler
        if "prefill" not in self._in_flight:
            transfers = sched.sends_to_post()
            sends = [KVSend(t.tag, list(t.prefill_seq.block_table), t.request_id) for t in transfers]
            self._submit("prefill", sched.prefill, transfers, sends=sends)
        if "decode" not in self._in_flight:
            transfers = sched.admit_transfers()
            recvs = [KVRecv(t.tag, t.num_blocks, None if t.aborted else t.decode_seq.block_table[:t.num_blocks],
                            t.request_id, t.generator_state) for t in transfers]
            self._submit("decode", sched.decode, transfers, recvs=recvs)

    def _submit(self, role: str, side: Any, transfers: list[KVTransfer], sends: list[KVSend] = (),
                recvs: list[KVRecv] = ()) -> None:
        batch = side.schedule() if side.has_unfinished() else ScheduledBatch()
        if batch.is_empty and not transfers and not batch.moves_blocks:
            return
        finished, self._finished_ids[role] = self._finished_ids[role], []
        if batch.is_empty and not batch.moves_blocks:
            step = StepInput(block_size=self.cache_config.block_size, finished_request_ids=finished)
        else:  # a batch with nothing to run may still swap a sequence out: its K/V is copied by this step
            step = build_step_input(batch, self.cache_config.block_size, finished)
            constrain_step(step, batch.seqs)  # the decode side's sequences share the prefill side's constraint
            self.num_steps += not batch.is_empty
        self._in_flight[role] = (batch, transfers)
        self.workers.workers[role].submit("step", step, list(sends), list(recvs))

    def _complete(self, role: str, result: Any) -> list[RequestOutput]:
        """A worker's step came back: postprocess its batch; the prefill side hands off its finished prompts."""
        batch, transfers = self._in_flight.pop(role)
        sched = self.scheduler
        side = sched.prefill if role == "prefill" else sched.decode
        outputs: list[RequestOutput] = []
        if isinstance(result, Exception):
            live = [i for i, seq in enumerate(batch.seqs) if not seq.is_finished]  # not those aborted meanwhile
            live_batch = ScheduledBatch(seqs=[batch.seqs[i] for i in live],
                                        num_new_tokens=[batch.num_new_tokens[i] for i in live])
            if self._can_rerun(role, live_batch, transfers, result):  # as one engine: find the request that broke it
                logger.error("%s step failed; rerunning its %d requests one by one: %s", role, len(live), result)
                batch, result, failed = rerun_one_by_one(live_batch, self.cache_config.block_size,
                                                         lambda step: self._run_alone(role, step))
                outputs = [self._finish(seq, "error", error=message) for seq, message in failed]
        if isinstance(result, Exception):
            logger.error("%s step failed; finishing its requests with 'error': %s", role, result)
            message = f"{type(result).__name__}: {result}"
            failed = list(batch.seqs)
            if role == "prefill":
                failed += [t.decode_seq for t in sched.fail_unposted(transfers) if not t.aborted]
            else:
                sched.complete(transfers)  # the receives ran or failed: either way nothing more will come
                failed += [t.decode_seq for t in transfers if not t.aborted and t.decode_seq not in batch.seqs]
            # not the ones aborted while the step was under way: their requests ended already (one output only)
            return [self._finish(seq, "error", error=message) for seq in failed if not seq.is_finished]
        if role == "decode":
            sched.complete(transfers)
        batch, result = _without_finished(batch, result)
        if batch.is_empty:
            return outputs
        tokens = result.sampled_token_ids
        try:
            scored = self._scored_tokens(batch, result, tokens)
            side.postprocess(batch, tokens)
        except Exception as err:
            logger.exception("%s step postprocessing failed", role)
            return outputs + [self._finish(seq, "error", error=f"{type(err).__name__}: {err}") for seq in batch.seqs]
        # one engine's output loop (log-probs, text, stop checks): a request whose text cannot be made fails alone
        self._emit_outputs(batch.seqs, tokens, scored, outputs)
        if role == "prefill":  # a prompt done whose request goes on: to the decode side
            for seq, new_tokens in zip(batch.seqs, tokens):
                if new_tokens and not seq.is_finished:
                    self._requests[seq.request_id].seq = sched.hand_off(seq).decode_seq
        return outputs

    def _can_rerun(self, role: str, batch: ScheduledBatch, transfers: list[KVTransfer], error: Exception) -> bool:
        """Whether a failed worker step may be rerun one sequence at a time: one engine's rule
        (step_isolation.can_isolate: several sequences, no block operations, the worker answered), and no KV
        transfer in the message that a rerun could not redo: a receive (it may have failed, leaving its blocks
        unfilled) or a send that was not posted (its request fails)."""
        moved_kv = transfers if role == "decode" else [t for t in transfers if not t.posted]
        return not moved_kv and can_isolate(batch, None, None, error)

    def _run_alone(self, role: str, step: StepInput) -> StepOutput:
        """One step on the `role` worker, waited for (the other worker's answers wait in its pipe meanwhile); its
        failure raised, as an executor's execute_model would."""
        self.workers.workers[role].submit("step", step, [], [])
        result = self.workers.result_of(role)
        if isinstance(result, Exception):
            raise result
        return result

    def _drain_both_rejected(self) -> list[RequestOutput]:
        drained = []
        for side in (self.scheduler.prefill, self.scheduler.decode):
            drained += [self._drop_rejected(seq) for seq in side.rejected]
            side.rejected.clear()
        return drained

    def _fail_all(self, message: str) -> list[RequestOutput]:
        """A worker died: every unfinished request ends with "error" and the reason; later calls raise it."""
        logger.error("%s", message)
        self._broken = message
        self._in_flight.clear()
        outputs = []
        for state in list(self._requests.values()):
            seq = state.seq
            seq.finish_reason, seq.error, seq.finish_time = "error", message, time.perf_counter()
            seq.status = SequenceStatus.FINISHED
            self._requests.pop(seq.request_id, None)
            outputs.append(RequestOutput.from_sequence(seq))
        self.workers.shutdown()
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests in either side or between them, or a step still under way (it may be returning blocks)."""
        return self._broken is None and (self.scheduler.has_unfinished() or bool(self._in_flight))
