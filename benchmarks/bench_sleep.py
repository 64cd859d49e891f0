"""Sleep mode on the GPU: how much device memory sleep gives back, and what sleeping and waking cost.

    python benchmarks/bench_sleep.py [--shape smollm2-135m llama3-8b] [--levels 1 2] [--out results.json]

For each shape (random bf16 weights, CUDA graphs, the default KV pool: gpu_memory_utilization 0.9), against the
driver's own count of used memory (torch.cuda.mem_get_info, which sees the caching allocator's reserve too):

    held            device memory in use with the engine built and warm
    after sleep     in use after sleep(level): level 1 copies the weights to pinned host memory, level 2 drops them
    freed share     (held - after sleep) / (the weights' and the KV pool's bytes)
    sleep, wake     seconds of sleep(level) and of wake_up() (which captures the CUDA graphs again)
    reload          level 2: seconds of reload_weights (here RandomWeights draws them again on the CPU)
    build           seconds to build the engine from scratch (the alternative to sleeping)

and checks that the engine generates the same greedy tokens after waking (level 1) or reloading (level 2) as
before sleeping, beside a control: whether a second run before sleeping repeats the first (with random weights
the top logits are near-ties, which a different kernel choice on the first run can flip).
Needs CUDA. Prints a line per run and writes the raw numbers to --out as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

from bench_lora import SHAPES


def used_bytes() -> int:
    import torch
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def run(shape: str, level: int, device: str = "cuda") -> dict:
    import torch
    from minillm.config import EngineConfig, ModelConfig
    from minillm.engine.executor import UniProcExecutor
    from minillm.engine.llm_engine import LLMEngine
    from minillm.engine.worker import RandomWeights, Worker
    from minillm.engine.cache_config import resolve_engine_config
    from minillm.sampling_params import SamplingParams

    from minillm.loader.no_tokenizer import NoTokenizer

    config = ModelConfig(**SHAPES[shape])
    device = torch.device(device)
    start = time.perf_counter()
    engine_config = resolve_engine_config(EngineConfig(max_model_len=2048, max_num_seqs=64), config, device)
    worker = Worker(config, engine_config, device, torch.bfloat16, RandomWeights(seed=0, std_embed=0.02))
    engine = LLMEngine(None, NoTokenizer(), config, engine_config, executor=UniProcExecutor(worker), device=device,
                       dtype=torch.bfloat16)
    build = time.perf_counter() - start
    prompts = [torch.randint(0, config.vocab_size, (64,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(4)]

    def greedy() -> list[list[int]]:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        return [done[str(i)] for i in range(len(prompts))]

    want = greedy()
    again = greedy()  # the control: a second run before sleeping (a random model's near-ties may flip anyway)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*worker.model.parameters(), worker.runner.kv_cache.storage)}
    weights_kv = sum(storages.values())
    held = used_bytes()
    start = time.perf_counter()
    engine.sleep(level)
    sleep_s = time.perf_counter() - start
    asleep = used_bytes()
    start = time.perf_counter()
    engine.wake_up()
    wake_s = time.perf_counter() - start
    reload_s = None
    if level == 2:
        start = time.perf_counter()
        engine.reload_weights()
        reload_s = time.perf_counter() - start
    after = greedy()
    same, repeatable = after == want, again == want
    same_as_again = after == again
    row = dict(repeatable=repeatable, same_as_second_run=same_as_again, shape=shape, level=level, held_gib=held / 2**30, asleep_gib=asleep / 2**30,
               weights_kv_gib=weights_kv / 2**30, freed_share=(held - asleep) / weights_kv, sleep_s=sleep_s,
               wake_s=wake_s, reload_s=reload_s, build_s=build, same_tokens=same,
               graphs_back=worker.runner.cuda_graphs is not None)
    print(f"{shape:13s} level {level}: held {row['held_gib']:.2f} GiB, asleep {row['asleep_gib']:.2f} GiB "
          f"(freed {100 * row['freed_share']:.1f}% of the weights + KV pool's {row['weights_kv_gib']:.2f} GiB); "
          f"sleep {sleep_s:.2f} s, wake {wake_s:.2f} s" + (f", reload {reload_s:.1f} s" if reload_s else "") +
          f"; build {build:.1f} s; same tokens {same} (as the second run before sleeping {same_as_again}, which "
          f"repeated the first: {repeatable}), graphs back {row['graphs_back']}", flush=True)
    engine.shutdown()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs="+", default=["smollm2-135m", "llama3-8b"], choices=sorted(SHAPES))
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_sleep needs CUDA", file=sys.stderr)
        return 1
    rows = []
    for shape in args.shape:
        for level in args.levels:
            rows.append(run(shape, level))
            import gc
            gc.collect()
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            date = datetime.datetime.now(datetime.timezone.utc).isoformat()
            json.dump({"device": torch.cuda.get_device_name(), "date": date, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
