"""Worker: one device's share of the engine. It builds and loads the model, sizes and owns the KV cache, and runs
the steps it is sent (vLLM's Worker; chapter 2 introduces it, the parallelism chapter gives each rank one).

The engine process keeps the requests, the scheduler and the detokenizer; a worker holds only tensors: the
weights, the KV cache, CUDA graphs, the sampler's generators. They meet at two narrow places, both picklable so
that a worker can sit in another process (minillm.engine.executor):

    worker.load_model()                              build the model from its ModelSource, on this device
    worker.determine_num_gpu_blocks()                how many KV blocks fit (profiles a forward on CUDA)
    worker.initialize_cache(cache_config)            allocate them, bind them to the layers, capture graphs
    worker.execute_model(step_input) -> StepOutput   one step (minillm.engine.step_input)

A ModelSource is any picklable callable `(model_config, device, dtype) -> nn.Module` that returns the model with
its weights loaded: `CheckpointSource(path)` reads a GGUF file or an HF directory (a worker in another process),
`LoadedWeights` builds from weights LLM already opened, `PrebuiltModel` wraps a model already built in this
process (tests, notebooks, LLM.share_model). The last two cannot cross a process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.cache_config import CacheConfig
from minillm.engine.kv_cache import num_device_blocks
from minillm.engine.model_runner import ModelRunner
from minillm.engine.sleep_mode import (SLEEP_TAGS, SleepingTensors, SleepReport, check_sleep_level, check_wake_tags,
                                       give_back_device_memory)
from minillm.engine.step_input import StepInput, StepOutput
from minillm.layers.cpu_matmul import clear_cpu_matmul_cache
from minillm.parallel.runner import ParallelModelRunner, StageForProfiling
from minillm.parallel.weights import rank_model_config

ModelSource = Callable[[ModelConfig, torch.device, torch.dtype], nn.Module]


def build_model(model_config: ModelConfig, weights, device: torch.device, dtype: torch.dtype,
                attention_backend: str = "auto") -> nn.Module:
    """Instantiate the model for `model_config` directly on `device` in `dtype` and load the weights."""
    # Llama, Mistral, Qwen2, Qwen3 share one implementation; Mixtral and Qwen3-MoE add experts
    from minillm.models import new_model
    start = time.perf_counter()
    model = new_model(model_config, device, dtype, attention_backend)
    model.load_weights(weights)
    model.load_seconds = time.perf_counter() - start
    return model.eval()


@dataclass(frozen=True)
class CheckpointSource:
    """Load the model from a GGUF file or an HF directory on disk (each worker reads it itself)."""

    path: str
    num_layers: int | None = None  # read only the first num_layers decoder layers (hf_overrides cut the model)

    def __call__(self, model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from minillm.loader import load_model  # gguf / safetensors readers: only when a checkpoint is read
        from minillm.loader.hf_overrides import first_layers
        _, weights, _ = load_model(self.path)
        return build_model(model_config, first_layers(weights, self.num_layers), device, dtype)


@dataclass(frozen=True)
class RandomWeights:
    """Random weights of the config's real shapes, the same in every process for one seed (vLLM's "dummy" load
    format): throughput work on an 8B shape needs no checkpoint, and tests get a model a child process can
    rebuild bit for bit. Norm weights near 1, other matrices N(0, 1/fan_in), embeddings N(0, std_embed)."""

    seed: int = 0
    std_embed: float = 0.5

    def __call__(self, model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from minillm.models import new_model
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: identical on every device
        model = new_model(model_config, device, dtype)
        from minillm.parallel.state import get_parallel_state
        state = get_parallel_state()
        if state.tp_size * state.pp_size * state.ep_size > 1:  # the same numbers, each rank keeping its shard
            from minillm.parallel.weights import load_random_weights_sharded
            load_random_weights_sharded(model, model_config, dtype, lambda n, s: self._draw(n, s, generator))
        else:
            for name, param in model.named_parameters():
                param.data.copy_(self._draw(name, tuple(param.shape), generator))
        model.process_weights_after_loading()  # quantized layers pack their weights here (minillm.quant)
        return model.eval()

    def _draw(self, name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        values = torch.empty(shape, dtype=torch.float32)
        if "norm" in name:
            return values.uniform_(0.8, 1.2, generator=generator)
        std = self.std_embed if "embed" in name else shape[-1] ** -0.5
        return values.normal_(0.0, std, generator=generator)


class LoadedWeights:
    """Weights already opened in this process (LLM reads the file once for the config, tokenizer and these). An
    iterator of them is used up by the first build; a later one (Worker.reload_weights) reads `path` again."""

    def __init__(self, weights, path: str | None = None, num_layers: int | None = None) -> None:
        self.weights, self.path, self.num_layers = weights, path, num_layers

    def __call__(self, model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
        weights = self.weights
        if weights is None:
            if self.path is None:
                raise ValueError("these weights were an iterator, read by the first build; give LoadedWeights the "
                                 "checkpoint's path to read them again")
            return CheckpointSource(self.path, self.num_layers)(model_config, device, dtype)
        if iter(weights) is weights:  # an iterator: used up below
            self.weights = None
        from minillm.loader.hf_overrides import first_layers
        return build_model(model_config, first_layers(weights, self.num_layers), device, dtype)

    def __reduce__(self):
        raise TypeError("LoadedWeights live in this process; a worker in another process needs CheckpointSource")


class PrebuiltModel:
    """A model already built and loaded in this process (not picklable on purpose: it cannot cross processes)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
        return self.model

    def __reduce__(self):
        raise TypeError("a PrebuiltModel lives in this process; give a worker in another process a picklable "
                        "ModelSource such as CheckpointSource(path)")


class Worker:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, device: torch.device | str,
                 dtype: torch.dtype, model_source: ModelSource, seed: int = 0) -> None:
        self.model_config = model_config
        self.engine_config = engine_config  # resolved (minillm.engine.cache_config.resolve_engine_config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.model_source = model_source
        self.model: nn.Module | None = None
        self.runner: ModelRunner | None = None
        self.lora = None  # minillm.lora.layers.LoRAWeights when enable_lora: the adapter slots on every layer
        self._tracer = None  # a worker process's TraceRecorder while start_profile records (engine/profiler.py)
        self._sleeping = SleepingTensors()  # what sleep() freed, by tag (engine/sleep_mode.py)
        self._recapture_graphs = False  # sleep() dropped CUDA graphs: the last wake_up captures them again
        self.weights_discarded = False  # sleep(level=2) dropped the weights: a full load must come before a step

    def load_model(self) -> None:
        model = self.model_source(self.model_config, self.device, self.dtype)
        backend = self.engine_config.attention_backend
        if backend != "auto":  # "auto" leaves the model's own choice (triton on a GPU, torch on a CPU)
            from minillm.layers.backend import set_operator_backend
            set_operator_backend(model, backend)
        if self.model_config.num_local_experts:  # MoE (chapter 11): drop tokens over an expert's capacity, or not
            from minillm.parallel.expert import set_capacity_factor
            set_capacity_factor(model, self.engine_config.moe_capacity_factor)
        config = self.engine_config
        if config.enable_lora:  # the slots exist before the KV pool is sized from the memory left
            from minillm.lora.adapter import process_adapter_cache
            from minillm.lora.layers import LoRAWeights
            self.lora = LoRAWeights(model, config.max_loras, config.max_lora_rank,
                                    process_adapter_cache(config.max_cpu_loras or config.max_loras), self.dtype,
                                    self.device)
        self.model = model

    def determine_num_gpu_blocks(self) -> int:
        if self.model is None:
            raise RuntimeError("load_model() first: the pool is sized by profiling the model")
        # a tensor/pipeline-parallel rank sizes its pool for its own layers and K/V heads, in its own memory
        local_config = rank_model_config(self.model_config)
        model = self.model if local_config is self.model_config else StageForProfiling(self.model)
        return num_device_blocks(self.engine_config, local_config, self.dtype, self.device, model=model)

    def initialize_cache(self, cache_config: CacheConfig) -> None:
        if self.model is None:
            raise RuntimeError("load_model() before initialize_cache()")
        local_config = rank_model_config(self.model_config)
        from minillm.parallel.state import get_parallel_state  # an EP rank's forward runs collectives: eager
        sharded = local_config is not self.model_config or get_parallel_state().ep_size > 1
        runner_class = ParallelModelRunner if sharded else ModelRunner
        lora = {} if self.lora is None else dict(lora=self.lora)  # (LoRA runs unsharded: EngineConfig checks)
        self.runner = runner_class(self.model, local_config, cache_config.num_gpu_blocks, cache_config.block_size,
                                   self.device, self.dtype, self.seed, cache_config.num_cpu_blocks,
                                   engine_config=self.engine_config, num_offload_blocks=cache_config.num_offload_blocks,
                                   **lora)

    def execute_model(self, step: StepInput) -> StepOutput | None:
        """The step's samples; None on a rank of a parallel group that does not sample (see ParallelModelRunner)."""
        if self.runner is None:
            raise RuntimeError("initialize_cache() before execute_model()")
        return self.runner.execute_model(step)

    @property
    def can_launch(self) -> bool:
        """Whether this worker's steps can be launched and collected apart (async scheduling): the plain runner
        can; a tensor/pipeline/expert-parallel rank's runner steps only as a whole (execute_model)."""
        return type(self.runner) is ModelRunner

    def launch_model(self, step: StepInput):
        """Queue one step without waiting for it (ModelRunner.launch); `collect_model` returns its StepOutput."""
        if self.runner is None:
            raise RuntimeError("initialize_cache() before launch_model()")
        return self.runner.launch(step)

    def collect_model(self, launched) -> StepOutput:
        return self.runner.collect(launched)

    def update_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Copy new values into this rank's weights in place (HF names, full tensors: each rank keeps its shard),
        so every buffer, CUDA graph and KV pool that reads them stays valid: how an RL trainer hands a policy
        update to the engine (LLM.update_weights). Only dense weights: a quantized layer's codes came from the
        old values. Any subset of the weights, except after sleep(level=2) dropped them: then all of them.
        Returns how many tensors were loaded."""
        self._check_reloadable("update_weights")
        with torch.no_grad():
            loaded = self.model.load_weights(weights, strict=self.weights_discarded)
        self.weights_discarded = False
        clear_cpu_matmul_cache()  # the CPU's re-laid-out weight copies (layers/cpu_matmul.py) are stale now
        return loaded

    def reload_weights(self) -> int:
        """Load the weights again from this worker's ModelSource, in place (vLLM's reload_weights: after
        sleep(level=2), or to undo update_weights). The source builds a second model in host memory, whose
        tensors are copied over; a PrebuiltModel has no source to read. Returns how many tensors were copied."""
        self._check_reloadable("reload_weights")
        fresh = self.model_source(self.model_config, torch.device("cpu"), self.dtype)
        if fresh is self.model:
            raise ValueError("reload_weights: this model was handed over built (PrebuiltModel), so there is no "
                             "checkpoint to read again; use update_weights")
        ours = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in fresh.named_parameters():
                ours[name].copy_(tensor)
        clear_cpu_matmul_cache()
        self.weights_discarded = False
        return len(ours)

    def _check_reloadable(self, what: str) -> None:
        """New weights can be copied in place: loaded, awake, dense (a quantized layer's codes and an fp8 KV
        cache's scales were computed from the values loaded first)."""
        from minillm.quant.base import UnquantizedLinearMethod
        if self.model is None:
            raise RuntimeError(f"load_model() before {what}()")
        if self._sleeping.is_asleep("weights"):
            raise RuntimeError(f"{what} while the weights sleep: wake_up(tags=['weights']) first")
        quantized = sorted({type(m.quant_method).__name__ for m in self.model.modules()
                            if getattr(m, "quant_method", None) is not None
                            and not isinstance(m.quant_method, UnquantizedLinearMethod)})
        if quantized:
            raise ValueError(f"{what} needs dense weights; this model's layers are quantized ("
                             f"{', '.join(quantized)}): load the new checkpoint into a new LLM")
        if self.engine_config.kv_cache_dtype not in (None, "auto"):
            raise ValueError(f"{what} with kv_cache_dtype={self.engine_config.kv_cache_dtype!r}: its scales were "
                             f"calibrated on the loaded weights; build a new LLM for new ones")

    # -- sleep mode (engine/sleep_mode.py) ---------------------------------------------------------------------
    def sleep(self, level: int = 1) -> SleepReport:
        """Give this worker's device memory back: the KV pool dropped, the weights kept in host memory (level 1)
        or their parameters dropped (level 2: dense weights only, reloaded after wake_up), the CUDA graphs
        dropped. Between requests only (the engine checks)."""
        check_sleep_level(level)
        if self.runner is None:
            raise RuntimeError("initialize_cache() before sleep()")
        if any(self._sleeping.is_asleep(tag) for tag in SLEEP_TAGS):
            raise RuntimeError("this worker sleeps already: wake_up() first")
        if getattr(self.model, "shared_by_engines", False):
            raise ValueError("this model's weights are shared with another LLM (LLM.share_model): sleeping would "
                             "take them from that engine too; build the LLMs with their own weights to sleep them")
        if level == 2:
            self._check_reloadable("sleep(level=2)")
        clear_cpu_matmul_cache()  # derived copies of the weights
        self._recapture_graphs = self.runner.release_graphs() or self._recapture_graphs
        kv = self.runner.kv_cache.storage
        kv_ptr = kv.untyped_storage().data_ptr()  # (the attention layers' k_cache / v_cache views are the pool's)
        params = list(self.model.parameters())
        others = [t for m in self.model.modules() for t in (*m.buffers(recurse=False), *vars(m).values())
                  if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != kv_ptr]
        lora = [] if self.lora is None else [t for s in self.lora.layers.values() for t in (s.a, s.b)]
        weights = self._sleeping.put_to_sleep("weights", [*others, *lora, *(params if level == 1 else ())],
                                              drop=params if level == 2 else ())
        cache = self._sleeping.put_to_sleep("kv_cache", (), drop=[kv])
        self.weights_discarded = self.weights_discarded or level == 2
        give_back_device_memory(self.device)
        return SleepReport(weights.freed_bytes + cache.freed_bytes, weights.host_bytes)

    def wake_up(self, tags: tuple[str, ...] | None = None) -> None:
        """Take the memory of `tags` ("weights", "kv_cache"; None: both) again; once nothing sleeps, capture the
        CUDA graphs sleep dropped."""
        for tag in check_wake_tags(tags):
            self._sleeping.wake(tag)
        if self._recapture_graphs and not any(self._sleeping.is_asleep(tag) for tag in SLEEP_TAGS):
            self._recapture_graphs = False
            self.runner.configure(self.runner.engine_config)

    def start_profile(self, directory: str, name: str | None = None) -> None:
        """Record this worker process's operators and kernels until stop_profile (minillm/engine/profiler.py);
        its trace is named `name`, by default rank<r> (its rank in the process group)."""
        from minillm.engine.profiler import TraceRecorder
        if name is None:
            name = f"rank{dist.get_rank()}" if dist.is_initialized() else "worker"
        self._tracer = TraceRecorder(name)
        self._tracer.start(directory)

    def stop_profile(self) -> str | None:
        """Write this process's trace; its path (None when no profile is being recorded here)."""
        tracer, self._tracer = self._tracer, None
        return tracer.stop() if tracer is not None and tracer.running else None

    def get_comm_stats(self, reset: bool = False) -> dict[str, int]:
        """Bytes this process has handed to torch.distributed collectives, per operation (chapter 11)."""
        from minillm.parallel.state import comm_stats
        stats = dict(comm_stats)
        if reset:
            comm_stats.clear()
        return stats

    def time_all_reduce(self, rows: int, reps: int = 20) -> float:
        """Median milliseconds of one all-reduce of a [rows, hidden] activation in the model's dtype over this
        rank's tensor-parallel group: what each row-parallel linear of a step of `rows` tokens pays (chapter 11;
        benchmarks/bench_tp_decode.py). 0.0 without tensor parallelism. Every rank of the group must call it."""
        from minillm.parallel.state import comm_stats, get_parallel_state, tensor_parallel_all_reduce
        if rows < 1 or reps < 1:
            raise ValueError(f"rows and reps must be >= 1, got {rows} and {reps}")
        if get_parallel_state().tp_size == 1:
            return 0.0
        x = torch.ones(rows, self.model_config.hidden_size, device=self.device, dtype=self.dtype)
        saved = dict(comm_stats)  # a measurement, not traffic of the engine's steps
        tensor_parallel_all_reduce(x)  # warm-up (NCCL builds its channels on the first call)
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                tensor_parallel_all_reduce(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                tensor_parallel_all_reduce(x)
                times.append(1e3 * (time.perf_counter() - t0))
        comm_stats.clear()
        comm_stats.update(saved)
        return sorted(times)[len(times) // 2]

    def get_moe_stats(self, reset: bool = False) -> dict:
        """Tokens routed to this rank's experts per MoE layer (minillm.parallel.expert.collect_load_stats)."""
        from minillm.parallel.expert import model_load_stats
        if self.model is None:
            raise RuntimeError("load_model() before get_moe_stats()")
        return model_load_stats(self.model, reset)
