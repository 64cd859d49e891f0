"""LLM: the offline entry point, `LLM(...).generate(prompts, SamplingParams(...))`, as in vLLM (chapter 2).

    from minillm import LLM, SamplingParams
    llm = LLM()                                    # the bundled SmolLM2-135M-Instruct GGUF
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    print(outs[0].outputs[0].text)

LLM loads the model, builds an LLMEngine, feeds it every prompt and steps it until all are finished.
`generate` validates every prompt first and raises (naming the prompt's index) before any work is done;
`generate_stream` yields text as it is produced; `chat` applies the model's chat template.

The scheduler and KV layout are parameters. The default is chapter 6's continuous batcher over chapter 5's
paged blocks; `LLM(scheduling="static", kv_layout="contiguous")` is chapter 2's static batching over one
contiguous region per sequence, kept for comparison (benchmarks/bench_scheduling.py measures the difference).
`LLM(scheduling_policy="priority")` (vLLM's option; default "fcfs", first come first served) admits the waiting
request of lowest priority value first and preempts from the other end: `generate(prompts, priority=[...])`.
`llm.share_model(**options)` builds another LLM around the same loaded weights (no reload), e.g. to compare
schedulers on one model. `LLM(model, disaggregation={"prefill": 1, "decode": 1})` serves through a prefill worker
and a decode worker process that pass each request's KV cache (minillm.engine.disagg_engine, chapter 11).

KV pool size (paged): `num_kv_blocks=` or `kv_cache_memory=` (bytes) when given; on CUDA, what is left of
`gpu_memory_utilization` x total memory after profiling one max_num_batched_tokens prefill; on CPU, enough for
max_num_seqs sequences of max_model_len, at most 1 GiB (see minillm/engine/kv_cache.py: num_device_blocks).
Every default is decided once, for the model and device, by minillm/engine/cache_config.py.
`kv_cache_dtype="fp8"` (or "fp8_e4m3"; default "auto", the model's dtype) stores keys and values as float8_e4m3fn
with scales calibrated at start-up: the same memory holds 2x the blocks of bf16 (minillm/engine/kv_scales.py).
`quantization="rtn"` rounds a dense checkpoint's linears to 4-bit while loading; `quantization_options=` passes
the method its options, e.g. {"bits": 4, "group_size": 128, "lm_head": True} (the LM head rounded too).
`tokenizer=` (vLLM's) takes the tokenizer from another HF directory (tokenizer.json) or .gguf file than the model,
e.g. a GGUF model with its original HF tokenizer and chat template; it may not have more tokens than the model.
`hf_overrides={"sliding_window": 256}` (vLLM's) changes config fields before the model is built
(minillm/loader/hf_overrides.py: with the checkpoint's weights only fields that keep every tensor's shape, and
num_hidden_layers to read the first layers; with load_format="dummy" any field).
`skip_tokenizer_init=True` (vLLM's) reads no tokenizer at all: prompts are token ids, outputs token ids with empty
text (minillm/loader/no_tokenizer.py).
`load_format="dummy"` (vLLM's) reads the config and tokenizer only and draws random weights of their shapes (a
directory with config.json and the tokenizer's files is enough): a benchmark of a shape, no checkpoint needed.
`LLM(disable_log_stats=False)` keeps the server's /metrics numbers while generating; `llm.get_metrics()` returns
them as objects (requests running and waiting, KV usage, prefix-cache hits, TTFT / TPOT / latency histograms).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence as SequenceT

import torch

from minillm.config import EngineConfig
from minillm.engine.async_llm import take_snapshot
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine.executor import MultiProcExecutor, UniProcExecutor
from minillm.engine.kv_cache import shared_pool_memory
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import CheckpointSource, LoadedWeights, RandomWeights, Worker
from minillm.hooks import overriding
from minillm.engine.prefix_cache import check_cache_salt
from minillm.inputs import Prompt, cache_salts, from_prompt_dict, normalize_prompts
from minillm.llm_requests import merge_choices, normalize_params, template_messages, with_priority
from minillm.outputs import CompletionOutput, RequestOutput
from minillm.platform import resolve_device, resolve_dtype
from minillm.sampling_params import ParamError, SamplingParams, check_seed

if TYPE_CHECKING:
    from minillm.outputs import ClassificationRequestOutput, EmbeddingRequestOutput, ScoringRequestOutput
    from minillm.pooling import PoolingParams
    from minillm.beam_search import BeamSearchOutput, BeamSearchParams

logger = logging.getLogger(__name__)

# LLM(...) options decided when the weights load: a shared model (LLM.share_model) keeps its LLM's
_LOAD_TIME_OPTIONS = ("model", "tokenizer", "hf_overrides", "dtype", "device", "quantization",
                      "quantization_options", "distributed_executor_backend", "disaggregation", "load_format")


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, *, tokenizer: str | os.PathLike | None = None,
                 skip_tokenizer_init: bool = False, hf_overrides: Mapping[str, Any] | None = None,
                 dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "auto", seed: int = 0, max_model_len: int | None = None,
                 max_num_seqs: int | None = None, kv_layout: str | None = None, scheduling: str | None = None,
                 overrides: Mapping[str, Any] | None = None, distributed_executor_backend: str | None = None,
                 quantization: str | None = None, quantization_options: Mapping[str, Any] | None = None,
                 disaggregation: Mapping[str, Any] | None = None, load_format: str = "auto",
                 disable_log_stats: bool = True, generation_config: str = "auto",
                 override_generation_config: Mapping[str, Any] | None = None, **engine_kwargs: Any) -> None:
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a path (a .gguf file or an HF model directory) or None for the bundled "
                            f"model, got {type(model).__name__}: {model!r}")
        check_seed(seed)
        if not isinstance(disable_log_stats, bool):
            raise TypeError(f"disable_log_stats must be a bool, got {type(disable_log_stats).__name__}: "
                            f"{disable_log_stats!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.overrides = _check_overrides(overrides)
        # validate the engine options before spending seconds on loading weights
        engine_config = _engine_config(max_model_len, max_num_seqs, kv_layout, scheduling, engine_kwargs)
        if disaggregation is not None:  # a prefill and a decode worker process behind a router (chapter 11)
            from minillm.engine.disagg_engine import DisaggregationConfig, check_disaggregation
            disaggregation = DisaggregationConfig.from_value(disaggregation)
            check_disaggregation(engine_config)
            if engine_config.enable_lora:
                raise ValueError("enable_lora=True is not supported with disaggregation= (its prefill and decode "
                                 "workers would both need the adapters and the KV transfer their salt): use one or "
                                 "the other")
            if distributed_executor_backend is not None or self.overrides:
                raise ValueError("disaggregation= starts its own prefill and decode worker processes: give neither "
                                 "distributed_executor_backend nor overrides with it")
        if distributed_executor_backend not in (None, "uni", "mp"):
            raise ValueError(f"distributed_executor_backend={distributed_executor_backend!r}; allowed: None or "
                             f"'uni' (the worker in this process), 'mp' (the worker in a child process)")
        if engine_config.tensor_parallel_size * engine_config.pipeline_parallel_size * \
                engine_config.expert_parallel_size > 1:
            if distributed_executor_backend == "uni":
                raise ValueError("tensor/pipeline/expert parallelism needs one worker process per rank: "
                                 "distributed_executor_backend='mp' or None, not 'uni'")
            distributed_executor_backend = "mp"  # one worker process per rank (minillm.parallel, chapter 11)
        if distributed_executor_backend == "mp" and self.overrides:
            raise ValueError("overrides= runs the learner's functions in this process: use the in-process worker "
                             "(distributed_executor_backend=None)")

        from minillm.quant.base import check_quantization_name
        from minillm.quant.checkpoint import load_time_quantization
        if quantization is not None:
            check_quantization_name(quantization)  # a bad name fails before seconds of loading

        tokenizer_path, tokenizer = tokenizer, None  # the name is the loaded tokenizer's below
        if not isinstance(skip_tokenizer_init, bool):
            raise TypeError(f"skip_tokenizer_init must be a bool, got {type(skip_tokenizer_init).__name__}: "
                            f"{skip_tokenizer_init!r}")
        if skip_tokenizer_init and tokenizer_path is not None:
            raise ValueError("give tokenizer= (read the tokenizer from there) or skip_tokenizer_init=True (none at "
                             "all), not both")
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' (the checkpoint's weights) or 'dummy' (random weights of "
                             f"its shapes, for benchmarks), got {load_format!r}")
        from minillm import loader  # the loader pulls in gguf/safetensors: only when needed
        path = os.fspath(model) if model is not None else _default_model_path()
        # the model's own sampling defaults (its generation_config.json), as vLLM reads them
        from minillm.loader.generation_config import default_sampling_fields
        generation_defaults = default_sampling_fields(path, generation_config, override_generation_config)
        if load_format == "dummy":  # vLLM's: the config and tokenizer only, every process drawing the same weights
            model_config, tokenizer = loader.load_config_and_tokenizer(path, not skip_tokenizer_init)
            weights = None
            source = RandomWeights(seed=seed, std_embed=0.02)
        else:
            model_config, weights, tokenizer = loader.load_model(path, with_tokenizer=not skip_tokenizer_init)
            source = CheckpointSource(path)
        from minillm.loader.hf_overrides import apply_hf_overrides  # vLLM's: config fields changed before building
        model_config, num_layers = apply_hf_overrides(model_config, hf_overrides, random_weights=weights is None)
        if num_layers is not None:  # a checkpoint cut to its first layers: the rest are skipped while loading
            source = CheckpointSource(path, num_layers)
        if tokenizer_path is not None:  # vLLM's tokenizer=: the model's tokenizer read from elsewhere
            tokenizer = _checked_tokenizer(loader.load_tokenizer(tokenizer_path), tokenizer_path, model_config)
        # quantize a dense checkpoint while loading (methods without calibration: see minillm.quant), with the
        # method's options (e.g. rtn's {"group_size": 128, "lm_head": True}); misplaced options are refused there
        if engine_config.disable_sliding_window:  # before anything is built from it (vLLM's option)
            model_config = model_config.without_sliding_window()
        model_config = load_time_quantization(model_config, quantization, quantization_options)
        engine_config = resolve_engine_config(engine_config, model_config, self.device)  # raises on bad lengths
        self.model_path = path
        if disaggregation is not None:
            if not disable_log_stats:
                raise ValueError("disable_log_stats=False (LLM.get_metrics) reads one engine's scheduler; "
                                 "disaggregation= runs two in worker processes: use one or the other")
            from minillm.engine.disagg_engine import DisaggregatedEngine
            self.llm_engine = DisaggregatedEngine(source, tokenizer, model_config, engine_config,
                                                  device=self.device, dtype=self.dtype, seed=seed,
                                                  disaggregation=disaggregation)
            self.llm_engine.generation_defaults = generation_defaults
            self._init_driver()
            return
        if distributed_executor_backend == "mp":
            worker_kwargs = dict(model_config=model_config, engine_config=engine_config, device=self.device,
                                 dtype=self.dtype, model_source=source, seed=seed)
            executor = MultiProcExecutor(worker_kwargs)
        else:  # load under the overrides too: some exercises run while weights load (the TP split, dequantizers)
            with overriding(self.overrides):
                executor = UniProcExecutor(Worker(model_config, engine_config, self.device, self.dtype,
                                                  source if weights is None else
                                                  LoadedWeights(weights, path, num_layers), seed))
        try:  # sizing and allocating the KV cache can still fail (too little memory for one block)
            self.llm_engine = LLMEngine(None, tokenizer, model_config, engine_config, device=self.device,
                                        dtype=self.dtype, seed=seed, overrides=self.overrides, executor=executor)
        except BaseException:
            executor.shutdown()  # nobody else holds it: end its worker processes and process group now
            raise
        self.llm_engine.generation_defaults = generation_defaults
        self._init_driver()
        if not disable_log_stats:
            self._start_stats()

    def share_model(self, *, seed: int = 0, max_model_len: int | None = None, max_num_seqs: int | None = None,
                    kv_layout: str | None = None, scheduling: str | None = None,
                    overrides: Mapping[str, Any] | None = None, **engine_kwargs: Any) -> "LLM":
        """A new LLM around this one's loaded weights (nothing is reloaded) with its own engine, scheduler and
        KV pool, built from these options exactly as LLM(...) would build them. Both stay usable: each engine
        re-points the attention layers at its own cache before its forward. max_model_len defaults to this
        LLM's. An explicit attention_backend switches the shared modules, so both LLMs.

        On a GPU this LLM's pool already holds its gpu_memory_utilization share of the device, so without
        num_kv_blocks or kv_cache_memory the new pool is sized for max_num_seqs sequences of max_model_len,
        within what is free now (kv_cache.shared_pool_memory), not profiled as LLM(...) would."""
        base = self.llm_engine
        fixed = [name for name in _LOAD_TIME_OPTIONS if name in engine_kwargs]
        if fixed:  # the weights are this LLM's, loaded once: these were decided then
            raise ValueError(f"share_model reuses this LLM's loaded weights, so {', '.join(fixed)} cannot change "
                             f"(this LLM: device={self.device}, dtype={self.dtype}); build a new LLM(...) instead")
        max_model_len = base.max_model_len if max_model_len is None else max_model_len
        engine_config = _engine_config(max_model_len, max_num_seqs, kv_layout, scheduling, engine_kwargs)
        sizes = (engine_config.tensor_parallel_size, engine_config.pipeline_parallel_size,
                 engine_config.expert_parallel_size)
        if sizes != (1, 1, 1):
            raise ValueError(f"share_model shares the model in this process, so tensor/pipeline/expert_parallel_size "
                             f"must be 1, got {'/'.join(map(str, sizes))}; build a new LLM(...) for parallel workers")
        try:
            model = base.runner.model
        except AttributeError:
            raise ValueError("share_model needs this LLM's model in this process; its workers are other processes "
                             "(distributed_executor_backend='mp', parallelism or disaggregation)") from None
        if self.device.type == "cuda" and engine_config.num_kv_blocks is None and engine_config.kv_cache_memory is None:
            resolved = resolve_engine_config(engine_config, base.model_config, self.device)
            free = torch.cuda.mem_get_info(self.device)[0]
            engine_config = dataclasses.replace(engine_config, kv_cache_memory=shared_pool_memory(
                resolved, base.model_config, self.dtype, free))
        engine = LLMEngine(model, base.tokenizer, base.model_config, engine_config, device=self.device,
                           dtype=self.dtype, seed=seed, overrides=_check_overrides(overrides))
        engine.generation_defaults = base.generation_defaults  # the same model's
        model.shared_by_engines = True  # sleep mode may not take these weights away from the other engine
        llm = LLM.from_engine(engine)
        llm.model_path = self.model_path
        return llm

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """Wrap an already built engine (tests, notebooks that build a model by hand)."""
        llm = cls.__new__(cls)
        llm.device, llm.dtype, llm.overrides = engine.device, engine.dtype, engine.overrides
        llm.model_path = None
        llm.llm_engine = engine
        llm._init_driver()
        return llm

    def _init_driver(self) -> None:
        self._watching: set[str] = set()  # request ids a generate/stream call of this LLM is waiting on
        self._latest: dict[str, RequestOutput] = {}  # newest output of each of them, not yet consumed
        self._idle_steps = 0
        self._stats = None  # the /metrics collectors, fed after every step, with disable_log_stats=False

    def _start_stats(self) -> None:
        from minillm.serve.metrics import ServerMetrics  # prometheus_client: only when asked for
        scheduler = self.llm_engine.scheduler
        offload = getattr(getattr(scheduler, "block_manager", None), "offload", None) is not None
        self._stats = ServerMetrics(self.model_path or "minillm", offload=offload)

    def get_metrics(self) -> list:
        """vLLM's LLM.get_metrics: the server's /metrics collectors (minillm/serve/metrics.py) as objects, a
        Counter, Gauge or Histogram per name and label set (minillm/serve/metrics_reader.py), counted since this
        LLM was built. Needs LLM(..., disable_log_stats=False), as in vLLM (the default skips the per-step
        bookkeeping)."""
        if self._stats is None:
            raise ValueError("LLM.get_metrics needs the engine's statistics: build the LLM with "
                             "disable_log_stats=False")
        return self._stats.read(getattr(self.llm_engine, "sleep_state", "awake"))

    @property
    def tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the SamplingParams a call without sampling_params gets: SamplingParams' defaults, overridden by
        the model's generation_config.json (LLM(generation_config=...); minillm/loader/generation_config.py)."""
        return SamplingParams(**self.llm_engine.generation_defaults)

    def _or_default(self, sampling_params: Any) -> Any:
        return self.get_default_sampling_params() if sampling_params is None else sampling_params

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (vLLM's spelling of `llm.tokenizer`)."""
        return self.tokenizer

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | SequenceT[Prompt], sampling_params: SamplingParams |
                 SequenceT[SamplingParams] | None = None, use_tqdm: bool = False, *,
                 priority: SequenceT[int] | None = None, lora_request: Any = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order. A prompt is a str, a list of token ids or
        vLLM's {"prompt": str} / {"prompt_token_ids": [...]} (minillm.inputs). Every prompt is validated before
        any work starts: a bad one raises ValueError/TypeError naming its index.

        priority (vLLM's argument): one integer per prompt, lower scheduled first, for an LLM built with
        scheduling_policy="priority" (under "fcfs" only zeros are accepted: nothing would honour the others). It
        replaces the prompt's SamplingParams.priority.

        lora_request (vLLM's argument, an LLM built with enable_lora=True): a minillm.lora.LoRARequest for every
        prompt, or one per prompt (None entries: the base model).

        A prompt dict may carry "cache_salt" (vLLM's, a non-empty string): that prompt shares prefix-cache blocks
        only with prompts of the same salt, so tenants cannot learn from each other's cache hits. An LLM built with
        enable_prompt_embeds=True also takes {"prompt_embeds": tensor [n, hidden_size]}, vectors that stand in
        for the token embedding's output (minillm/engine/prompt_embeds.py)."""
        prompt_list = normalize_prompts(prompts, options=SALTED + ("prompt_embeds",))
        # only the finished outputs are returned: the engine need not snapshot every request after every step
        params = normalize_params(self._or_default(sampling_params), len(prompt_list), output_kind="final_only")
        if priority is not None:
            params = with_priority(params, priority, self.llm_engine)
        tokenized = self._validated(prompt_list, [p.truncate_prompt_tokens for p in params])
        return self._submit(tokenized, params, use_tqdm, lora_request, _checked_salts(prompts, len(prompt_list)))

    def _validated(self, prompts: list[Prompt], truncate: list[int | None] | None = None
                   ) -> list[tuple[str | torch.Tensor | None, list[int]]]:
        """(text, token ids) of every prompt, all checked before any work starts; ValueError/TypeError naming the
        index of a bad one. `truncate`: each prompt's SamplingParams.truncate_prompt_tokens. An embeddings prompt
        comes back as (its tensor, placeholder ids)."""
        tokenized = []
        for i, prompt in enumerate(prompts):
            try:
                text, token_ids = self.llm_engine.validate_prompt(prompt, truncate[i] if truncate else None)
                # an embeddings prompt goes on as its tensor (its ids are placeholders)
                tokenized.append((prompt if isinstance(prompt, torch.Tensor) else text, token_ids))
            except (ValueError, TypeError) as err:
                raise type(err)(f"prompt {i}: {err}") from None
        return tokenized

    def _submit(self, tokenized: list[tuple[str | None, list[int]]], params: list[SamplingParams],
                use_tqdm: bool, lora_request: Any = None, salts: list[str | None] | None = None
                ) -> list[RequestOutput]:
        """One engine request per choice (SamplingParams.n: params.choices()); the outputs of a prompt's choices
        come back as one RequestOutput whose outputs[i] is choice i, as vLLM returns them."""
        engine = self.llm_engine
        loras = _per_prompt(lora_request, len(tokenized))
        for i, request in enumerate(loras):
            try:
                engine.check_lora_request(request)
            except (ValueError, TypeError) as err:
                raise type(err)(f"lora_request {i}: {err}") from None
        choices_of = [p.choices() for p in params]
        for i, choices in enumerate(choices_of):  # every request checked before any is queued: a bad one raised
            for choice in choices:  # from add_request left the earlier ones running in the engine, unread
                try:
                    engine.check_sampling_params(choice)
                except ParamError as err:
                    raise ParamError(err.param, f"sampling_params {i}: {err}") from None
        ids: list[list[str]] = []
        try:
            for (text, token_ids), choices, lora, salt in zip(tokenized, choices_of, loras,
                                                              salts or [None] * len(tokenized)):
                ids.append([])
                for choice in choices:
                    ids[-1].append(engine.add_request(None, text if text is not None else token_ids, choice,
                                                      prompt_token_ids=token_ids, lora_request=lora,
                                                      cache_salt=salt))
        except BaseException:
            for request_id in (i for added in ids for i in added):
                engine.abort(request_id)
            raise
        done = iter(self._run_until_done([i for choices in ids for i in choices], use_tqdm))
        return [merge_choices([next(done) for _ in choices]) for choices in ids]

    def embed(self, prompts: Prompt | SequenceT[Prompt], pooling_params: "PoolingParams | None" = None,
              use_tqdm: bool = False, *, lora_request: Any = None) -> list["EmbeddingRequestOutput"]:
        """vLLM's LLM.embed: one vector per prompt, outputs.embedding (minillm/pooling.py: by default the final
        hidden state of the prompt's last token, unit length; PoolingParams(pooling_type="MEAN" or "CLS") pools
        every position or the first, dimensions=d keeps the first d). The prompts run their prefill only, batched
        like any other requests. Every prompt is validated first."""
        from minillm.outputs import EmbeddingRequestOutput
        from minillm.pooling import PoolingParams
        pooling_params = PoolingParams() if pooling_params is None else pooling_params
        engine = self.llm_engine
        tokenized = self._validated(normalize_prompts(prompts, options=SALTED))
        loras = _per_prompt(lora_request, len(tokenized))
        salts = _checked_salts(prompts, len(tokenized))
        ids: list[str] = []
        try:
            for (text, token_ids), lora, salt in zip(tokenized, loras, salts):
                ids.append(engine.add_request(None, text if text is not None else token_ids, None,
                                              prompt_token_ids=token_ids, lora_request=lora,
                                              pooling_params=pooling_params, cache_salt=salt))
        except BaseException:
            for request_id in ids:
                engine.abort(request_id)
            raise
        return [EmbeddingRequestOutput.from_request_output(out) for out in self._run_until_done(ids, use_tqdm)]

    def classify(self, prompts: Prompt | SequenceT[Prompt], use_tqdm: bool = False, *,
                 lora_request: Any = None) -> list["ClassificationRequestOutput"]:
        """vLLM's LLM.classify, for a sequence-classification or reward model (a *ForSequenceClassification
        checkpoint; minillm/classification.py): per prompt outputs.probs over the model's labels (softmax; the
        sigmoid of a reward model's one logit), and minillm's outputs.logits (the raw scores: a reward model's
        reward) and outputs.label (the likeliest label's name). The prompts run their prefill only, batched, as
        embedding requests; every prompt is validated first. ValueError for a generative model."""
        from minillm.classification import CLASSIFY_POOLING, classification_problem, classifier_head, \
            read_classifier_head
        from minillm.outputs import ClassificationRequestOutput
        problem = classification_problem(self.llm_engine)
        if problem:
            raise ValueError(problem)
        outs = self.embed(prompts, CLASSIFY_POOLING, use_tqdm, lora_request=lora_request)
        head = classifier_head(self.collective_rpc(read_classifier_head))  # after the run: the weights it used
        return [ClassificationRequestOutput(o.request_id, o.prompt, o.prompt_token_ids,
                                            head.classify(o.outputs.embedding)) for o in outs]

    def score(self, data_1: Prompt | SequenceT[Prompt], data_2: Prompt | SequenceT[Prompt],
              pooling_params: "PoolingParams | None" = None, use_tqdm: bool = False) -> list["ScoringRequestOutput"]:
        """vLLM's LLM.score with an embedding model: the cosine similarity of each pair's embeddings. One text
        against a list scores it against each; two lists of one length are scored pair by pair."""
        from minillm.outputs import ScoringOutput, ScoringRequestOutput
        from minillm.pooling import cosine_similarity
        first, second = normalize_prompts(data_1), normalize_prompts(data_2)
        if not second or len(first) not in (1, len(second)):
            raise ValueError(f"score needs one text and a list, or two lists of one length; got {len(first)} and "
                             f"{len(second)}")
        outs = self.embed(first + second, pooling_params, use_tqdm)  # one text against many: embedded once
        lefts, rights = outs[:len(first)] * (len(second) // len(first)), outs[len(first):]
        return [ScoringRequestOutput(b.request_id, b.prompt_token_ids,
                                     ScoringOutput(cosine_similarity(a.outputs.embedding, b.outputs.embedding)))
                for a, b in zip(lefts, rights)]

    def beam_search(self, prompts: Prompt | SequenceT[Prompt], params: "BeamSearchParams",
                    lora_request: Any = None) -> list["BeamSearchOutput"]:
        """vLLM's beam search: the beam_width likeliest continuations of each prompt, best first
        (minillm/beam_search.py says how; enable_prefix_caching=True spares re-reading each beam's prefix), under
        one LoRA adapter when `lora_request` names one."""
        from minillm.beam_search import beam_search
        return beam_search(self, normalize_prompts(prompts), params, lora_request)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True,
             lora_request: Any = None, chat_template: str | None = None, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> list[RequestOutput]:
        """Apply a chat template to one conversation (a list of {"role", "content"} dicts; an assistant's
        "tool_calls" and a tool's "tool_call_id" too) or to a list of conversations, then generate (lora_request
        as in generate). vLLM's options: `chat_template` instead of the tokenizer's; `continue_final_message`
        leaves the last message open for the model to go on writing (add_generation_prompt must then be False);
        `tools` (OpenAI's function tools) and `chat_template_kwargs` (e.g. Qwen3's enable_thinking) reach the
        template as variables."""
        from minillm.loader.chat_template import RESERVED_KWARGS, render_conversation
        if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, (list, tuple)) for m in messages):
            conversations = list(messages)
        else:
            conversations = [messages]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message=True continues the last message, add_generation_prompt=True "
                             "opens a new assistant turn: give add_generation_prompt=False with it")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be a Jinja template string, got {type(chat_template).__name__}")
        extra = dict(chat_template_kwargs or {})
        reserved = [k for k in extra if k in (*RESERVED_KWARGS, "tools")]
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved[0]!r}: it is LLM.chat's own argument")
        if tools is not None:
            extra["tools"] = list(tools)
        params = normalize_params(self._or_default(sampling_params), len(conversations), output_kind="final_only")
        tokenized = []
        for i, conversation in enumerate(conversations):
            where = f"conversation {i}: " if len(conversations) > 1 else ""
            try:
                rendered = render_conversation(self.tokenizer, template_messages(conversation, where), chat_template,
                                               add_generation_prompt, continue_final_message, **extra)
                # the template already wrote the special tokens (BOS, role markers) as text: not added again
                token_ids = self.tokenizer.encode(rendered, add_special_tokens=False)
                kept = self.llm_engine.validate_prompt(token_ids, params[i].truncate_prompt_tokens)[1]
                tokenized.append((rendered if len(kept) == len(token_ids) else None, kept))
            except (ValueError, TypeError) as err:
                raise type(err)(f"{where}{err}" if where and not str(err).startswith(where) else str(err)) from None
        return self._submit(tokenized, params, use_tqdm, lora_request)

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                        lora_request: Any = None) -> Iterator[RequestOutput]:
        """Yield deltas for one prompt as tokens arrive: each item's outputs[0].text and .token_ids hold only
        what is new since the previous item. Closing the generator early aborts the request (its KV is freed).
        Several streams (and generate calls) may be interleaved: each step serves all of them."""
        if isinstance(prompt, dict):
            prompt = from_prompt_dict(prompt)
        if isinstance(prompt, (list, tuple)) and any(isinstance(p, (str, list, tuple, dict)) for p in prompt):
            raise TypeError(f"generate_stream streams one prompt (a str or a list of token ids), got a list of "
                            f"{len(prompt)} prompts; use generate() for several")
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        params = normalize_params(self._or_default(sampling_params), 1)[0]
        if params.n > 1:
            raise ParamError("n", f"generate_stream streams one sequence, got n={params.n}; use generate() for n "
                                  f"completions")
        request_id = self.llm_engine.add_request(None, prompt, params, lora_request=lora_request)
        self._watching.add(request_id)
        sent_text, sent_tokens, finished = 0, 0, False
        try:
            while not finished:
                out = self._latest.pop(request_id, None)
                if out is None:
                    self._step_once()
                    continue
                done = out.outputs[0]
                delta = CompletionOutput(index=0, text=done.text[sent_text:], token_ids=done.token_ids[sent_tokens:],
                                         finish_reason=done.finish_reason, error=done.error,
                                         logprobs=None if done.logprobs is None else done.logprobs[sent_tokens:],
                                         cumulative_logprob=done.cumulative_logprob, stop_reason=done.stop_reason)
                sent_text, sent_tokens, finished = len(done.text), len(done.token_ids), out.finished
                if delta.text or delta.token_ids or finished:
                    yield dataclasses.replace(out, outputs=[delta])
        finally:
            self._watching.discard(request_id)
            self._latest.pop(request_id, None)
            if not finished:
                self.llm_engine.abort(request_id)

    def reset_prefix_cache(self) -> bool:
        """vLLM's LLM.reset_prefix_cache: no later request reuses a prefix cached before (LLMEngine's)."""
        return self.llm_engine.reset_prefix_cache()

    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (),
                       kwargs: dict | None = None) -> list:
        """vLLM's LLM.collective_rpc: a Worker method (by name) or a function method(worker, *args, **kwargs) on
        every worker (in worker processes it must pickle: a module-level function); results in rank order."""
        return self.llm_engine.collective_rpc(method, args, kwargs)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[int]:
        """New values for the model's weights, in place, as an RL trainer sends a policy update (what vLLM users
        do through collective_rpc and the model's load_weights): HF-named full tensors, any subset of them (all
        after sleep(level=2)), each rank keeping its shard (Worker.update_weights), then reset_prefix_cache, since
        every cached K/V was computed with the old weights. Between requests only, on dense weights and without
        an fp8 KV cache (its scales were calibrated on the loaded weights). Returns how many tensors each worker
        loaded (a pipeline stage loads only its own layers'), in rank order."""
        return self.llm_engine.update_weights(weights)

    def reload_weights(self) -> list[int]:
        """Read the weights again from the model's checkpoint, in place (vLLM's collective_rpc("reload_weights")):
        after sleep(level=2), or to undo update_weights. Tensors copied per worker, in rank order."""
        return self.llm_engine.reload_weights()

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode: give the device's memory back until wake_up (minillm/engine/sleep_mode.py). Level 1
        keeps the weights in host memory, level 2 drops them (update_weights or reload_weights after wake_up);
        the KV cache and the prefix cache are dropped at both. Between requests only."""
        reports = self.llm_engine.sleep(level)
        logger.info("sleep(level=%d): %.2f GiB of device memory given back, %.2f GiB kept in host memory", level,
                    sum(r.freed_bytes for r in reports) / 2**30, sum(r.host_bytes for r in reports) / 2**30)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the memory back: tags "weights" and/or "kv_cache" (None: both); the CUDA graphs are captured again
        when the last one wakes."""
        self.llm_engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.llm_engine.is_sleeping()

    def start_profile(self, profile_dir: str | None = None) -> None:
        """vLLM's LLM.start_profile: record torch.profiler traces of the engine and its workers until
        stop_profile (minillm/engine/profiler.py: profile_dir, else MINILLM_TORCH_PROFILER_DIR or vLLM's
        VLLM_TORCH_PROFILER_DIR)."""
        self.llm_engine.start_profile(profile_dir)

    def stop_profile(self) -> list[str]:
        """Write the traces; their paths (Chrome trace JSON: https://ui.perfetto.dev opens them)."""
        return self.llm_engine.stop_profile()

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.llm_engine.abort(request_id)

    def _step_once(self) -> None:
        """One engine step; keep the newest output of every request some caller of this LLM is waiting for."""
        steps = self.llm_engine.num_steps
        outputs = self.llm_engine.step()
        # progress = a step ran (final_only requests return nothing until they finish) or something came back
        self._idle_steps = 0 if outputs or self.llm_engine.num_steps != steps else self._idle_steps + 1
        if self._idle_steps > 100:
            self._idle_steps = 0
            raise RuntimeError(f"the scheduler made no progress for 100 steps with "
                               f"{self.llm_engine.get_num_unfinished_requests()} request(s) unfinished")
        if self._stats is not None:
            self._stats.on_step(outputs, take_snapshot(self.llm_engine))
        for out in outputs:
            if out.request_id in self._watching:
                self._latest[out.request_id] = out  # outputs are cumulative: the newest one says it all

    def _run_until_done(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        self._watching.update(request_ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(request_ids), desc="generate", unit="req")
        try:
            while pending:
                self._step_once()
                for request_id in [r for r in pending if r in self._latest and self._latest[r].finished]:
                    pending.discard(request_id)
                    results[request_id] = self._latest.pop(request_id)
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            for request_id in pending:  # e.g. KeyboardInterrupt: do not leave half-run requests behind
                self.llm_engine.abort(request_id)
            raise
        finally:
            self._watching.difference_update(request_ids)
            for request_id in request_ids:
                self._latest.pop(request_id, None)
            if bar is not None:
                bar.close()
        return [results[r] for r in request_ids]


def _engine_config(max_model_len: int | None, max_num_seqs: int | None, kv_layout: str | None,
                   scheduling: str | None, engine_kwargs: Mapping[str, Any]) -> EngineConfig:
    """Validate LLM()'s engine options (before any weights load); the defaults are filled in later, once, by
    minillm.engine.cache_config.resolve_engine_config."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(engine_kwargs) - fields)
    if unknown:
        raise TypeError(f"LLM() got unknown keyword argument(s) {', '.join(unknown)}; engine options are: "
                        f"{', '.join(sorted(fields))}")
    return EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_layout=kv_layout,
                        scheduling=scheduling or "continuous", **engine_kwargs)


SALTED = ("cache_salt",)  # the prompt-dict key LLM.generate and LLM.embed read beside the prompt (minillm.inputs)


def _checked_salts(prompts: Any, num_prompts: int) -> list[str | None]:
    """Each prompt's cache_salt, checked before any work starts (the error names the prompt's index)."""
    salts = cache_salts(prompts, num_prompts)
    for i, salt in enumerate(salts):
        try:
            check_cache_salt(salt)
        except (ValueError, TypeError) as err:
            raise type(err)(f"prompt {i}: {err}") from None
    return salts


def _per_prompt(lora_request: Any, num_prompts: int) -> list:
    """vLLM's lora_request argument as one entry per prompt: one request (or None) for all, or a list of them."""
    if isinstance(lora_request, (list, tuple)):
        if len(lora_request) != num_prompts:
            raise ValueError(f"lora_request has {len(lora_request)} entries for {num_prompts} prompts: give one "
                             f"LoRARequest for all or one per prompt")
        return list(lora_request)
    return [lora_request] * num_prompts


def _checked_tokenizer(tokenizer: Any, path: str | os.PathLike, model_config: Any) -> Any:
    """A tokenizer given with tokenizer= must not produce ids the model has no embedding for (the model's vocabulary
    may be larger: embeddings are often padded to a multiple of 64 or 128)."""
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer={os.fspath(path)!r} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocabulary of {model_config.vocab_size}: it is not this model's tokenizer")
    return tokenizer


def _default_model_path() -> str:
    from minillm.loader.model_files import default_model_path
    return default_model_path()


def _check_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate every override now (unknown exercise id, wrong signature, unloadable file) rather than at the
    first step; returns the mapping with file paths resolved to functions."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping of exercise id -> function, got {type(overrides).__name__}")
    if not overrides:
        return {}
    from minillm.course.overrides import resolve_overrides  # LLM is a face: it may import the course
    return resolve_overrides(overrides)
