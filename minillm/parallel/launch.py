"""The torchrun entry: tensor/pipeline parallelism over processes that torchrun starts, on one or several
machines (chapter 11).

    torchrun --nproc-per-node 2 -m minillm.parallel.launch --model PATH --tensor-parallel-size 2 \\
        --prompt "The capital of France is" --max-tokens 16
    # two machines, 4 GPUs each, TP 4 x PP 2:
    torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 4 --master-addr HOST0 --master-port 29500 \\
        -m minillm.parallel.launch --model PATH --tensor-parallel-size 4 --pipeline-parallel-size 2
    # a Mixtral checkpoint, its experts over 2 processes:
    torchrun --nproc-per-node 2 -m minillm.parallel.launch --model MIXTRAL_DIR --expert-parallel-size 2

Topology. `LLM(..., tensor_parallel_size=N)` (the mp executor) starts N worker processes itself and keeps the
engine in a process of its own: N + 1 processes, the engine is rank 0 and holds no weights, the workers are ranks
1..N. Under torchrun there are exactly N processes (the world size must be tp * pp) and rank 0 is both the
engine (scheduler, tokenizer, detokenizer) and worker 0 (stage 0, TP rank 0): the workers are ranks 0..N-1, and
rank 0 runs its own shard of every step between broadcasting the StepInput and gathering the answers. Every
other rank runs the same worker loop as an mp child (minillm.engine.executor.serve_worker). Each process reads
the checkpoint itself and keeps only its shard.

Collectives go over NCCL when CUDA is there (each process on cuda:LOCAL_RANK), gloo on CPUs.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from minillm.engine.executor import MultiProcExecutor, serve_worker, tp_group_ranks, worker_error
from minillm.engine.worker import CheckpointSource, Worker
from minillm.parallel.state import build_groups, init_parallel_state


class TorchrunExecutor(MultiProcExecutor):
    """Rank 0 of a torchrun job: the engine's executor, with worker 0 in this very process. The engine-facing
    calls are MultiProcExecutor's; what differs is that this rank runs its own shard of every call too."""

    def __init__(self, worker: Worker, group: Any = None) -> None:  # the process group is torchrun's, already up
        self.worker = worker
        self.group = group  # the control messages' group (gloo), see control_group
        self.alone = dist.get_world_size() == 1  # nobody to tell: no collectives at all
        self.processes = []  # torchrun owns the other processes
        self._closed, self._broken = False, None
        tp, pp = worker.engine_config.tensor_parallel_size, worker.engine_config.pipeline_parallel_size
        self._tp_groups = tp_group_ranks(tp, pp, first_rank=0)
        self._gather_checked(self._local(worker.load_model))  # every rank has loaded its shard, or raise

    def _local(self, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as err:  # the same report a remote worker sends
            return worker_error(0, err)

    def _gather_checked(self, own: Any) -> list[Any]:
        if self._broken is not None:
            raise RuntimeError(f"{self._broken}; the engine cannot continue (start a new one)")
        results: list[Any] = [own]
        if not self.alone:
            results = [None] * dist.get_world_size()
            dist.gather_object(own, results, dst=0, group=self.group)
        self._raise_worker_errors(results)
        return results

    def _call(self, method: str | Callable[..., Any], *args: Any) -> list[Any]:
        if self._closed:
            raise RuntimeError("this executor has been shut down")
        if not self.alone:
            dist.broadcast_object_list([(method, args)], src=0, group=self.group)
        if callable(method):
            return self._gather_checked(self._local(method, self.worker, *args))
        return self._gather_checked(self._local(getattr(self.worker, method), *args))

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            if not self.alone:
                dist.broadcast_object_list([("shutdown", ())], src=0, group=self.group)


def control_group(cuda: bool) -> Any:
    """The group the engine's per-step messages (StepInput out, StepOutput back) travel in. Under torchrun on
    GPUs the default group is NCCL, whose object collectives copy every pickle to the GPU and synchronise: a new
    gloo group over the same ranks keeps them on the host, as the mp executor's default group does. Collective:
    every rank calls it."""
    return dist.new_group(backend="gloo") if cuda else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minillm.parallel.launch",
                                     description="minillm tensor/pipeline parallel generation under torchrun")
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: the bundled SmolLM2)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--expert-parallel-size", type=int, default=1, help="MoE models, with tp = pp = 1")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[list[int]] | None:
    """Every rank runs this; rank 0 returns (and prints) the generated token ids, the others None."""
    args = parse_args(argv)
    tp, pp, ep = args.tensor_parallel_size, args.pipeline_parallel_size, args.expert_parallel_size
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun's environment: rank, world size, master
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != tp * pp * ep:
        raise ValueError(f"torchrun started {world_size} processes; tensor_parallel_size * pipeline_parallel_size "
                         f"* expert_parallel_size = {tp} * {pp} * {ep} = {tp * pp * ep} must equal it")
    init_parallel_state(build_groups(tp, pp, first_rank=0, ep_size=ep))
    group = control_group(cuda)
    try:
        return _run(args, rank, cuda, group)
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, cuda: bool, group: Any = None) -> list[list[int]] | None:
    from minillm.config import EngineConfig
    from minillm.engine.cache_config import resolve_engine_config
    from minillm.loader import load_model
    from minillm.loader.model_files import default_model_path
    from minillm.platform import resolve_dtype

    path = args.model or default_model_path()
    model_config, _, tokenizer = load_model(path)  # config and tokenizer; the weights iterator stays unread
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    engine_config = resolve_engine_config(
        EngineConfig(max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
                     pipeline_parallel_size=args.pipeline_parallel_size,
                     expert_parallel_size=args.expert_parallel_size), model_config, device)
    worker_kwargs = dict(model_config=model_config, engine_config=engine_config, device=device, dtype=dtype,
                         model_source=CheckpointSource(path), seed=args.seed)
    if rank != 0:
        serve_worker(rank, worker_kwargs, group)
        return None
    from minillm.engine.llm_engine import LLMEngine
    from minillm.sampling_params import SamplingParams
    executor = TorchrunExecutor(Worker(**worker_kwargs), group)
    try:
        engine = LLMEngine(None, tokenizer, model_config, engine_config, device=device, dtype=dtype,
                           seed=args.seed, executor=executor)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        prompts = args.prompt or ["The capital of France is"]
        ids = [engine.add_request(None, p, params) for p in prompts]
        done: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        for i, prompt in zip(ids, prompts):
            print(f"{prompt!r} -> {done[i].outputs[0].text!r} {done[i].outputs[0].token_ids}", flush=True)
        return [done[i].outputs[0].token_ids for i in ids]
    finally:
        executor.shutdown()


if __name__ == "__main__":
    main()
