"""Where a decode step's host time goes, synchronous and under async scheduling (issue 14, chapter 4).

    python benchmarks/profile_async_step.py [--batch 1 8 32] [--output-len 128] [--ab-sample] [--out r.json]

Under async scheduling (minillm/engine/async_step.py) the host prepares and launches step N+1 while the GPU runs
step N, so a step takes max(host time, GPU time): once the GPU is hidden, every microsecond of host work is a
microsecond of the step. This script runs bench_decode's engine timing (16-token prompts, CUDA graphs, random
weights of SmolLM2-135M's shapes in bf16) and wraps the engine's, the runner's and the step buffers' methods with a
perf_counter accumulator, so each line is that method's host time per `LLMEngine.step()` call (nested: a method's
time includes the methods it calls; warm-up steps included). "event waits" is time spent in
torch.cuda.Event.synchronize: the host waiting for the GPU (for a step's tokens, or for a buffer's last copy).

`--ab-sample` runs async engines only, with decode graphs that do and do not take the LM head, the greedy argmax
and the deferred-id gather into the replay (DecodeCUDAGraphs(sample=...)), alternating twice, in one process:
a same-run A/B. On a CPU (`--device cpu`) it runs a 2-layer toy for a smoke test: figures are GPU figures.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd  # noqa: E402

from minillm.engine import async_step, cuda_graph, step_buffers  # noqa: E402
from minillm.engine.executor import UniProcExecutor  # noqa: E402
from minillm.engine.llm_engine import LLMEngine  # noqa: E402
from minillm.engine.model_runner import ModelRunner  # noqa: E402
from minillm.engine.scheduler import Scheduler  # noqa: E402

TIMED = ((LLMEngine, ("step", "_schedule", "_emit_outputs")), (Scheduler, ("schedule", "postprocess")),
         (UniProcExecutor, ("launch_model", "collect_model", "execute_model")),
         (ModelRunner, ("prepare", "forward", "_sample_on_device", "apply_block_ops")),
         (async_step.AsyncSteps, ("_read", "_expect")), (async_step, ("build_step_input",)),
         (step_buffers.UploadBuffer, ("reserve", "upload")), (step_buffers.DownloadRing, ("start",)),
         (step_buffers.PendingDownload, ("wait",)))


class HostClock:
    """perf_counter totals and call counts of the methods in TIMED, and of the host's waits on CUDA events, while
    open (a context manager: the methods are put back on exit)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self._originals: list[tuple[object, str, object]] = []

    def __enter__(self) -> "HostClock":
        for owner, names in TIMED:
            for name in names:
                self._wrap(owner, name, f"{getattr(owner, '__qualname__', owner.__name__.rsplit('.', 1)[-1])}.{name}")
        if torch.cuda.is_available():
            self._wrap(torch.cuda.Event, "synchronize", "event waits")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, method in reversed(self._originals):
            setattr(owner, name, method)
        self._originals.clear()

    def _wrap(self, owner, name: str, label: str) -> None:
        method = getattr(owner, name)
        self._originals.append((owner, name, method))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
        setattr(owner, name, timed)

    def per_step(self) -> dict[str, dict[str, float]]:
        steps = self.calls.get("LLMEngine.step", 0) or 1
        return {label: {"us_per_step": round(self.seconds[label] / steps * 1e6, 1),
                        "calls_per_step": round(self.calls[label] / steps, 2)}
                for label in sorted(self.seconds, key=lambda k: -self.seconds[k])}


@contextlib.contextmanager
def sampling_graphs(enabled: bool):
    """DecodeCUDAGraphs built inside take (or do not take) sampling into the replay, whatever the runner asks."""
    init = cuda_graph.DecodeCUDAGraphs.__init__

    def patched(self, *args, sample: bool = False, **kwargs):
        init(self, *args, sample=sample and enabled, **kwargs)
    cuda_graph.DecodeCUDAGraphs.__init__ = patched
    try:
        yield
    finally:
        cuda_graph.DecodeCUDAGraphs.__init__ = init


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--ab-sample", action="store_true",
                        help="async engines only, decode graphs with and without sampling inside, alternating")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch) or args.output_len < 2:
        parser.error(f"--batch must be >= 1 and --output-len >= 2, got {args.batch} and {args.output_len}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: the figures are GPU figures (--device cpu runs a smoke test)")
    if args.device == "cpu":  # a smoke test: a 2-layer toy
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from test_engine import tiny_config, tiny_model
        config = tiny_config(num_hidden_layers=2, max_position_embeddings=512)
        model = tiny_model(config)
    else:
        shape = bd.SHAPES["smollm2-135m"]
        model, config = bd.build_model(shape["num_hidden_layers"], shape=shape)
    runs = []
    modes = [(True, s) for s in (False, True, False, True)] if args.ab_sample else [(False, True), (True, True)]
    for batch in args.batch:
        for asynchronous, sample in modes:
            with HostClock() as clock, sampling_graphs(sample):
                run = bd.run_engine(model, config, 16, args.output_len, batch, None, device=args.device,
                                    async_scheduling=asynchronous)
            row = dict(batch=batch, async_scheduling=asynchronous, sampling_graphs=sample,
                       tok_per_s=run["decode_tok_per_s"], ms_per_step=run["ms_per_step"], host=clock.per_step())
            runs.append(row)
            print(f"batch {batch}, async {asynchronous}, sampling graphs {sample}: {row['tok_per_s']} tok/s "
                  f"({row['ms_per_step']} ms/step); host us per step:")
            for label, figures in row["host"].items():
                print(f"    {label:32s} {figures['us_per_step']:8.1f}  ({figures['calls_per_step']} calls)")
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join(["benchmarks/profile_async_step.py"] + (argv or sys.argv[1:])),
                           device=device, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), runs=runs), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
