"""The machinery of the randomized differential stress tests (tests/test_engine_stress.py drives LLMEngine,
tests/test_disagg_stress.py the prefill/decode disaggregated engine, tests/test_parallel_stress.py tensor and
pipeline parallel workers; tests/test_async_stress.py and tests/test_openai_stress.py the front end, with
tests/async_stress_helpers.py): one way to draw requests, run them alone, drive an engine and judge its outputs.

    Request, Scenario      what a test draws: requests with their SamplingParams, engine options, timed events
    draw_requests          a stream of requests that exercises the output loop: shared prefixes (prefix-cache
                           hits), long and repetitive prompts, stop tokens and stop strings that really fire
                           (draw_stop), min_tokens, seeded sampling, log-probs, special tokens kept as text
                           (skip_special_tokens=False) or not, poisoned requests, LoRA adapters (where the
                           caller passes some: stress_adapters); some aborted later
    Reference              each distinct request run alone on a plain in-process LLMEngine (the oracle)
    drive                  the engine stepped through a scenario's events, an engine's Checks after every
                           abort, finish and step, every output extending the request's last one
                           (extension_problem), then every request compared with the Reference (compare: tokens,
                           text, finish reason, log-probs and their token texts)
    EngineChecks           the checks of an LLMEngine's one scheduler and block manager (other engines subclass),
                           its LoRA slots too (lora_problem)

Why differential: the engine's features (prefix caching, chunked prefill, preemption, speculation, other
processes) must never change what a request produces, only how fast; the same request run alone in the plainest
engine is the answer, exactly (fp32 on the CPU), except at a greedy tie (Reference.parts_at_a_tie).
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.lora import LoRARequest
from minillm.outputs import RequestOutput
from minillm.sampling_params import SamplingParams, StructuredOutputsParams
from tiny import ByteTokenizer

MAX_LEN = 64  # max_model_len of every engine (the reference's too: "length" at the same place)
WINDOW = 10  # keys a token sees in the sliding-window model: contexts reach MAX_LEN, six windows
# model shapes a hunt may pick with MINILLM_STRESS_ARCH (the default: Llama's); every stress test honours it
ARCHS = {"llama": {}, "qwen3": dict(architecture="qwen3", qk_norm=True, head_dim=16),
         "window": dict(sliding_window=WINDOW),
         "mixed_window": dict(sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention"]),
         "mixtral": dict(architecture="mixtral", num_local_experts=4, num_experts_per_tok=2),
         "qwen2": dict(architecture="qwen2", attention_bias=True, tie_word_embeddings=True),
         "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})}
ARCH_NAME = os.environ.get("MINILLM_STRESS_ARCH", "llama")
ARCH = ARCHS[ARCH_NAME]


def stress_config(**arch):
    """The stress tests' tiny model config: ARCH's fields, or `arch`'s where given; with MINILLM_STRESS_QUANT
    QUANT_SHAPE's widths (they win) and still dense: quantized_config asks for the method."""
    from test_engine import tiny_config
    return tiny_config(max_position_embeddings=128, **{**(arch or ARCH), **(QUANT_SHAPE if QUANT else {})})


def quantized_config(config):
    """`config` asking for MINILLM_STRESS_QUANT's method at load (`config` itself without one): what a model built
    from random weights (RandomWeights: dense staging weights, quantized once drawn) or a checkpoint quantizes to."""
    from minillm.quant.base import apply_quantization_override
    return apply_quantization_override(config, QUANT) if QUANT else config


# MINILLM_STRESS_QUANT=<method>: the model's linears quantized at load by a method that needs no calibration, in the
# engine, disaggregated and TP/PP stress tests (tests/test_engine_stress.py says which methods)
QUANT = os.environ.get("MINILLM_STRESS_QUANT")
QUANT_SHAPE = dict(hidden_size=64, intermediate_size=128, head_dim=32)  # wide enough for groups of 64 (rtn, nf4)
# fp8 and fp8_block quantize the activations too, with a scale per token (per 128-wide group) taken from the row
# alone, so no neighbour moves a row's scale; but a batch of another shape (a chunk, a verify step) moves a value by
# fp32 rounding, and a value on an fp8 rounding boundary then lands a whole fp8 step (1/16-1/8 of itself) away. A
# few such steps per layer move log-probs by up to 0.06 nats from the run alone (seeds 35, 50, 76 of fp8_block;
# 8e-3 with fp8's per-channel weights): judged within 0.1 (clean over 200 seeds of each, 2026-12-07); a wrong
# block, position or adapter moves them by whole nats
ROUNDED_ACTIVATIONS = QUANT in ("fp8", "fp8_block")
ROUNDING = 0.1 if ROUNDED_ACTIVATIONS else 1e-4
TIE = ROUNDING  # logits this close are a tie: which one greedy takes depends on the batch's shape (rounding)
LP_TOL = ROUNDING  # log-probs of the same token in two batches of other shapes (fp32 rounding)
LP_WIDTH = 5  # the widest top-k a request asks for; the reference scores that many
# fp8 KV: a prefill attends to its fresh, exact K/V, while chunked prefill, a prefix-cache hit, recompute and a
# verify step read the fp8-rounded K/V of earlier tokens from the cache: their logits differ by up to about 0.1
# nats from the run alone (tests/test_fp8_kv_cache.py's LOGPROB_TOL), so greedy may part far from a tie. The log-prob
# of an unlikely token moves more: 0.26 nats seen for a prompt token of rank 124 under chunks of 2 tokens, and
# chunks of 7 alone made greedy take a token 0.28 below the exact argmax (seed 2331: fp8 rounding, not a bug).
# How far fp8's rounding reaches depends on the model: with Qwen2's q/k/v biases the keys sit on a per-channel
# offset that the one per-tensor scale must also cover, so the rest of each key keeps fewer bits. A request alone,
# chunks of 1-7 over its fp8 cache against one fp8 prefill (25 random prompts, 2026-12-07): the worst prompt
# log-prob moved 0.08-0.19 nats with the Llama shape and 0.18-0.76 with Qwen2's (seeds 5193, 5202 and 5209 of
# MINILLM_STRESS_ARCH=qwen2 parted by 0.53-0.69, with no feature but fp8 to blame): three times the tolerance there.
# Beside experts (MINILLM_STRESS_ARCH=mixtral) fp8's rounding flips the router's top-2 now and then: 0.07-1.34
# nats there, too wide to tell a fault from rounding, so draw_engine_options draws no fp8 KV cache for that shape.
FP8_SCALE = {"qwen2": 3.0}.get(ARCH_NAME, 1.0)
FP8_TOL = 0.5 * FP8_SCALE
FP8_LP_TOL = 0.5 * FP8_SCALE
POISON_TEXT = 298  # a token the tokenizer cannot decode: the request whose prompt ends in it fails alone
POISON_FORWARD = 297  # a token that makes the model's forward raise (the step reruns one request at a time)
# ByteTokenizer's special tokens that a prompt may hold (not the poisons): "" or "<|260|>" as a request asks
SPECIAL_IDS = range(256, POISON_FORWARD)
TOKENIZER = ByteTokenizer()
LORA_RANK = 8  # max_lora_rank of every LoRA engine (the reference's too); stress_adapters' ranks are 2 to 8


@dataclass
class Request:
    prompt: tuple[int, ...]
    max_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    seed: int | None = None  # a seeded sampled request (temperature 0.8): its own stream, whatever the batch
    priority: int = 0
    logprobs: int | None = None  # top-k log-probs of each sampled token (and of each prompt token)
    prompt_logprobs: int | None = None
    include_stop: bool = False  # include_stop_str_in_output: the text ends after the stop string, not before
    skip_special: bool = True  # skip_special_tokens: False keeps special tokens' text ("<|260|>") in every text
    spaces_between: bool = True  # spaces_between_special_tokens: changes nothing with these tokenizers (key())
    # a constraint (draw_constraint): () or ("regex", pattern) / ("choice", strings) / ("json", schema as JSON
    # text) / ("allowed", token ids) / ("bad_words", words)
    constraint: tuple = ()
    lora: LoRARequest | None = None  # the adapter it runs with (stress_adapters), None: the base model
    pooling: str | None = None  # an embedding request's pooling_type (LAST / MEAN / CLS), None: it generates
    # logits processors and sampling filters (draw_processors): SamplingParams fields as (name, value) pairs,
    # logit_bias's value as (token id, bias) pairs
    processors: tuple = ()

    def add_to(self, engine, rid: str, params: SamplingParams | None = None) -> str:
        """engine.add_request for this request: generating with `params` (default: its own), or embedding."""
        lora = {} if self.lora is None else {"lora_request": self.lora}  # (engines without LoRA)
        if self.pooling is not None:
            from minillm.pooling import PoolingParams
            return engine.add_request(rid, list(self.prompt), pooling_params=PoolingParams(self.pooling), **lora)
        return engine.add_request(rid, list(self.prompt), params or self.params(), **lora)

    def params(self, logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        """Its SamplingParams; the reference passes its own (wider) log-prob widths."""
        return SamplingParams(temperature=0.0 if self.seed is None else 0.8, seed=self.seed,
                              max_tokens=self.max_tokens, stop_token_ids=list(self.stop_token_ids),
                              stop=list(self.stop), min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                              priority=self.priority, logprobs=self.logprobs if logprobs is None else logprobs,
                              prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
                              include_stop_str_in_output=self.include_stop, skip_special_tokens=self.skip_special,
                              spaces_between_special_tokens=self.spaces_between, **constraint_params(self.constraint),
                              **processor_params(self.processors))

    def key(self) -> tuple:
        """What the output depends on (not the priority, nor the log-prob widths: the reference scores them all).
        Nor spaces_between_special_tokens: Tokenizer.decode says it changes no text, so the run alone with either
        value is the answer (the first request drawn decides which, and the comparison holds the claim to it)."""
        return (self.prompt, self.max_tokens, self.stop_token_ids, self.stop, self.min_tokens, self.ignore_eos,
                self.seed, self.include_stop, self.skip_special, self.constraint, self.lora, self.pooling,
                self.processors)


@dataclass
class Scenario:
    """An engine configuration and events: (step, "add", request id, Request) or (step, "abort", request id, None),
    applied before the engine's step number `step` (0-based)."""

    options: dict
    spec: str | None  # None or a speculative method: SPEC_METHODS
    events: list[tuple[int, str, str, Request | None]] = field(default_factory=list)
    # None; "text": the tokenizer fails on POISON_TEXT; "forward": that and the model fails on POISON_FORWARD
    # (only without speculation, whose proposers reach into the model); the reference's too
    poison: str | None = None


class BatchByteTokenizer(ByteTokenizer):
    """ByteTokenizer with decode_batch, as minillm's Tokenizer has it: an engine then decodes the detokenizer
    windows of a step's sequences in one call (detokenizer.decode_windows: one call per skip_special_tokens
    setting present). Without it every window is decoded alone, as in the runs alone."""

    def decode_batch(self, batch, skip_special_tokens: bool = True):
        return [self.decode(ids, skip_special_tokens) for ids in batch]


class FussyTokenizer(BatchByteTokenizer):
    """Cannot decode POISON_TEXT: making the text of a request that holds it raises (a per-request failure).
    POISON_TEXT alone decodes: that is a log-prob entry's text (special tokens' where a request keeps them), and
    the run alone scores LP_WIDTH alternatives, more than most requests ask for: were POISON_TEXT among them
    poison, the run alone would fail where the request does not. The engine's text windows hold two tokens or more
    (the prompt's last ones for context)."""

    def decode(self, token_ids, *args, **kwargs):
        token_ids = list(token_ids)
        if POISON_TEXT in token_ids and len(token_ids) > 1:
            raise ValueError(f"cannot decode token {POISON_TEXT} (test)")
        return super().decode(token_ids, *args, **kwargs)


def engine_tokenizer(poison: str | None) -> ByteTokenizer:
    """The tokenizer of an engine under test: FussyTokenizer where the scenario is poisoned, else
    BatchByteTokenizer (both batch a step's decodes; the runs alone decode one sequence's windows at a time)."""
    return FussyTokenizer() if poison else BatchByteTokenizer()


class PoisonedModel(torch.nn.Module):
    """The model, except that a forward whose input holds POISON_FORWARD raises. Its modules are the model's under
    the model's own names ("model.layers.0.self_attn.qkv_proj", not "inner.model..."): whatever walks the modules
    by name finds them, as LoRA's slots do (minillm.lora.layers.LoRAWeights)."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.__dict__["inner"] = inner  # not a submodule: its children are registered as this module's own
        for name, child in inner.named_children():
            self.add_module(name, child)
        for name, param in inner.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in inner.named_buffers(recurse=False):
            self.register_buffer(name, buf)

    def forward(self, input_ids, positions, *rest):  # rest: a pipeline stage's (hidden, residual) from the last
        if bool((input_ids == POISON_FORWARD).any()):
            raise RuntimeError(f"poisoned token {POISON_FORWARD}")
        return self.inner(input_ids, positions, *rest)

    def compute_logits(self, hidden):
        return self.inner.compute_logits(hidden)


class Reference:
    """Outputs of requests each run alone in a plain in-process engine (no prefix cache, chunking, preemption,
    async or speculation; the scenario's KV cache dtype and poison; a request's LoRA adapter in an engine with
    enable_lora and one slot) over `model_and_config` (the engine under test's weights), computed once per
    distinct request, with the log-probs of every sampled and prompt token (top LP_WIDTH)."""

    def __init__(self, model_and_config) -> None:
        self.model, self.config = model_and_config
        self.cache: dict[tuple, tuple[list[int], str, str]] = {}
        self.outputs: dict[tuple, object] = {}  # the same key -> the finished RequestOutput
        self.merged: dict[LoRARequest, torch.nn.Module] = {}  # an adapter -> the model with it merged (the tie judge)

    def __call__(self, req: Request) -> tuple[list[int], str]:
        return self.run(req)[:2]

    def run(self, req: Request, kv_cache_dtype: str = "auto", poison: str | None = None
            ) -> tuple[list[int], str, str]:
        """(token ids, finish reason, text)."""
        key = (req.key(), kv_cache_dtype, poison)
        if key not in self.cache:
            lora = dict(enable_lora=True, max_loras=1, max_lora_rank=LORA_RANK) if req.lora is not None else {}
            engine = LLMEngine(PoisonedModel(self.model) if poison == "forward" else self.model,
                               FussyTokenizer() if poison else ByteTokenizer(), self.config,
                               EngineConfig(max_model_len=MAX_LEN, max_num_seqs=1, block_size=16, num_kv_blocks=8,
                                            async_scheduling=False, kv_cache_dtype=kv_cache_dtype, **lora))
            # alone, a request's priority orders nothing, and this fcfs engine refuses any but 0
            req.add_to(engine, "ref", req.params(LP_WIDTH, LP_WIDTH).checked_copy(priority=0))
            done = None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        c = out.outputs[0]
                        done = (list(c.token_ids), c.finish_reason, c.text)
                        self.outputs[key] = out
            assert engine.scheduler.block_manager.num_used_blocks == 0
            self.cache[key] = done
        return self.cache[key]

    def parts_into_poison(self, req: Request, got: tuple, expected: tuple, tie: float = TIE) -> bool:
        """Whether one of the two outcomes failed only for generating POISON_TEXT on a path that left the other's
        at a tie (parts_at_a_tie): the other path, as right, never came to that token."""
        for failed, other in ((got, expected), (expected, got)):
            if failed[1] == "error" and other[1] != "error" and POISON_TEXT in failed[0] \
                    and self.parts_at_a_tie(req, failed[0], other[0], tie):
                return True
        return False

    def parts_at_a_tie(self, req: Request, got: list[int], expected: list[int], tie: float = TIE) -> bool:
        """Whether `got` is a greedy run that left `expected` where two tokens tie: at the first difference both
        tokens' logits are within TIE of the best one (a batch of another shape rounds them the other way round),
        and every token of `got` from there is such a greedy choice too (min_tokens' ban respected). fp32 on
        the CPU; a cache-less forward of the whole sequence is the judge (a request's adapter merged into the
        weights: merged_model). An fp8 KV cache passes tie=FP8_TOL."""
        if req.seed is not None:
            return False
        i = next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if i is None:  # one is a prefix of the other: a stop or a length that is not a tie
            return False
        from minillm.speculative.train_data import record_features
        tokens = list(req.prompt) + got
        model = self.model
        if req.lora is not None:
            if req.lora not in self.merged:
                self.merged[req.lora] = merged_model(self.model, req.lora.lora_path)
            model = self.merged[req.lora]
        with torch.no_grad():
            hidden = record_features(model, torch.tensor([tokens]), torch.device("cpu"))[0]
            logits = model.compute_logits(model.model.norm(hidden)).float()
        start = len(req.prompt) - 1
        banned = list(req.stop_token_ids) + ([] if req.ignore_eos else [self.config.eos_token_id])
        constraint = None  # a constrained request's greedy choice is among the tokens its constraint allows
        if req.constraint:
            from minillm.engine.constraints import ConstraintCompiler
            constraint = ConstraintCompiler(TOKENIZER, self.config.vocab_size,
                                            {self.config.eos_token_id}).for_request(req.params())
        for j in range(i, len(got)):
            row = logits[start + j].clone()
            if j < req.min_tokens:
                row[banned] = -float("inf")
            if constraint is not None:
                state = None if constraint.index is None else constraint.walk(constraint.index.start, got[:j])
                mask = constraint.row_mask(state)
                if mask is not None:
                    row[~mask[:len(row)]] = -float("inf")
                row[list(constraint.bans(got[:j]))] = -float("inf")
            row = processed_row(row, req, tokens[:start + 1 + j])
            if float(row.max() - row[got[j]]) > tie or (j == i and float(row.max() - row[expected[j]]) > tie):
                return False
        return True


def processed_row(row: torch.Tensor, req: Request, history: list[int]) -> torch.Tensor:
    """float32 logits [V] of one position after `req`'s logit bias and penalties (history: the prompt and the
    tokens before this one), as the engine applies them (the library's apply_penalties: checked on its own in
    test_logits_processors). min_p, top-k and top-p never remove the argmax: a greedy choice is unchanged."""
    from minillm.layers.logits_processors import apply_penalties
    fields = processor_params(req.processors)
    for tok, bias in fields.get("logit_bias", {}).items():
        row[tok] += bias
    penalties = [fields.get(name, default) for name, default in
                 (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0))]
    if penalties == [0.0, 0.0, 1.0]:
        return row
    hist = torch.tensor([history], dtype=torch.int64)
    is_output = torch.arange(len(history)).unsqueeze(0) >= len(req.prompt)
    presence, frequency, repetition = (torch.tensor([v], dtype=torch.float32) for v in penalties)
    return apply_penalties(row.unsqueeze(0), hist, is_output, presence, frequency, repetition)[0]


def merged_model(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """A copy of `model` with the LoRA adapter in directory `path` folded into its weights (W + scaling B A, in
    each packed layer's rows): what a request with that adapter computes, cache-less (Reference.parts_at_a_tie).
    A quantized layer (MINILLM_STRESS_QUANT) keeps its codes, which cannot take the sum: its output rows get
    x (scaling B A)^T added by a forward hook instead (add_delta_rows)."""
    from minillm.lora.adapter import TARGETS, load_adapter
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for module in modules.values():
            if getattr(module, "lora", None) is not None:
                module.lora = None  # (slots some engine attached: the copy needs none)
        for (layer, name), lora in load_adapter(path).modules.items():
            packed, shard = TARGETS[name]
            linear = modules[f"model.layers.{layer}.{packed}"]
            offset, size = linear.shard_slice(shard) if shard is not None else (0, linear.output_size)
            if getattr(linear, "is_dense", True):
                linear.weight[offset:offset + size] += lora.delta_weight()
            else:
                add_delta_rows(linear, offset, lora.delta_weight())
    return merged.eval()


def add_delta_rows(linear: torch.nn.Module, offset: int, delta: torch.Tensor) -> None:
    """After `linear`'s forward, its output features offset.. get x delta^T added (delta [size, in]): an adapter's
    contribution beside weights that cannot be summed into (a quantized layer's codes)."""
    def hook(module, inputs, output):
        output[..., offset:offset + delta.shape[0]] += torch.nn.functional.linear(inputs[0], delta)
        return output
    linear.register_forward_hook(hook)


# the adapters of stress_adapters: name, rank, targets, layers (None: all), whether each module gets its own alpha
# (written as alpha_pattern). Names say what each adapts, for a failing seed's description.
LORA_SPECS = [("all-r8", 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), None, False),
              ("qvo-r4", 4, ("q_proj", "v_proj", "o_proj"), None, False),
              ("mlp-r6-alpha", 6, ("gate_proj", "up_proj", "down_proj"), None, True),
              ("k+down-layer1-r2", 2, ("k_proj", "down_proj"), range(1, 2), False)]
_ADAPTERS: dict[str, list[LoRARequest]] = {}  # repr(model config) -> its adapters, written once per process


def stress_adapters(config) -> list[LoRARequest]:
    """Four random LoRA adapters for a model of shape `config` (LORA_SPECS: ranks 2 to 8, all projections, some
    of attention, the MLP's with an alpha of their own, two projections of one layer; std 0.3: greedy picks other
    tokens nearly everywhere), written in PEFT's format once per test session to a temporary directory removed at exit;
    lora_int_ids 1 to 4. A mixture-of-experts model's keep only their attention projections (o_proj for the MLP
    one): the engine serves LoRA on an MoE model's attention only."""
    key = repr(config)
    if key not in _ADAPTERS:
        from minillm.lora.adapter import random_adapter, save_adapter
        root = tempfile.mkdtemp(prefix="minillm-stress-lora-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        requests = []
        for i, (name, rank, targets, layers, own_alpha) in enumerate(LORA_SPECS):
            if config.num_local_experts:
                targets = tuple(t for t in targets if t in ("q_proj", "k_proj", "v_proj", "o_proj")) or ("o_proj",)
            adapter = random_adapter(config, rank, targets=targets, seed=100 + i, std=0.3, layers=layers)
            if own_alpha:
                for j, module in enumerate(adapter.modules.values()):
                    module.scaling = (0.5, 1.0, 3.0)[j % 3]
            save_adapter(adapter, f"{root}/{name}")
            requests.append(LoRARequest(name, i + 1, f"{root}/{name}"))
        _ADAPTERS[key] = requests
    return _ADAPTERS[key]


@dataclass(frozen=True)
class PoisonedSource:
    """A picklable model source (minillm.engine.worker.ModelSource) for workers in other processes: `inner`'s
    model wrapped in PoisonedModel, so a forward over POISON_FORWARD raises in the worker."""

    inner: object

    def __call__(self, model_config, device, dtype):
        return PoisonedModel(self.inner(model_config, device, dtype))


def draw_engine_options(rng: random.Random, extra: random.Random | None = None) -> dict:
    """EngineConfig options of a random engine over the tiny model (2 layers, 2 KV heads of 8): block size 4/8/16,
    1-6 sequences, a KV pool of one to two longest sequences (running several long requests preempts), prefix
    caching, chunked prefill with a small token budget, preemption by recompute or swap (swap space from a few
    blocks, where swap falls back to recompute, to plenty), async scheduling, the priority policy, fp8 KV. Never
    LoRA (the disaggregated and parallel engines refuse it): test_engine_stress.draw_scenario adds it.
    `extra` (a generator of its own, so that a seed without it draws what it drew before): 1 engine in 5 with
    blocks of 1, 2, 3, 12 or 32 tokens (a block per token, sizes no power of two, a block longer than most
    prompts), and 1 chunked engine in 3 with a long_prefill_token_threshold."""
    block_size = rng.choice([4, 8, 16])
    if extra is not None and extra.random() < 0.2:
        block_size = extra.choice([1, 2, 3, 12, 32])
    chunked = rng.random() < 0.5
    per_seq = -(-MAX_LEN // block_size)  # blocks one sequence of max_model_len needs
    options = dict(
        max_model_len=MAX_LEN, block_size=block_size, max_num_seqs=rng.randint(1, 6),
        num_kv_blocks=rng.randint(per_seq, 2 * per_seq),  # small: running several long requests preempts
        enable_prefix_caching=rng.random() < 0.5, enable_chunked_prefill=chunked,
        max_num_batched_tokens=rng.choice([2, 4, 7, 16, 33]) if chunked else rng.choice([MAX_LEN, 2 * MAX_LEN]),
        preemption_mode=rng.choice(["recompute", "swap"]), async_scheduling=rng.random() < 0.5)
    if extra is not None and chunked and extra.random() < 1 / 3:  # long prefills take at most this many a step
        options["long_prefill_token_threshold"] = extra.randint(1, options["max_num_batched_tokens"])
    if rng.random() < 0.2:  # lower priority value runs first; victims are taken from the other end
        options["scheduling_policy"] = "priority"
    fp8 = rng.random() < 0.15 and not ARCH.get("num_local_experts")  # (not beside experts: FP8_SCALE says why)
    if fp8:
        options["kv_cache_dtype"] = "fp8"
    if options["preemption_mode"] == "swap":  # from a few blocks (then swap falls back to recompute) to plenty
        # layers x (K, V) x kv heads x head dim x bytes (fp32 or fp8) x slots
        bytes_per_block = 2 * 2 * 2 * 8 * (1 if fp8 else 4) * block_size
        options["swap_space"] = bytes_per_block * rng.choice([per_seq // 2 + 1, per_seq, 4 * per_seq])
    return options


def draw_prompt_token(rng: random.Random) -> int:
    """A random prompt token: a byte, or 1 time in 20 a special token (what a chat template writes between turns:
    its text shows in the context window of a request that keeps special tokens, and in an echoed prompt)."""
    return rng.choice(SPECIAL_IDS) if rng.random() < 0.05 else rng.randrange(256)


def draw_special_switches(rng: random.Random, req: Request) -> None:
    """vLLM's detokenization switches: skip_special_tokens mostly True (the default), False 1 time in 4. The
    tiny models sample a special token (256 and up) for about one token in six, so with False their text
    ("<|260|>") is output text: streamed, held back behind an unfinished UTF-8 character, in the log-prob token
    texts, and searched for stop strings (draw_stop, called after this, cuts them out of that text, so some end
    inside "<|260|>"). spaces_between_special_tokens False 1 time in 5 (it changes no text: Request.key)."""
    req.skip_special = rng.random() >= 0.25
    req.spaces_between = rng.random() >= 0.2


# what draw_constraint picks from: patterns and schemas short enough to finish within a few tokens of MAX_LEN
NESTED = 'root ::= "(" root ")" | "<" root ">" | [a-c]{1,3}'  # brackets nested to any depth: a pushdown automaton


def nested_ok(text: str) -> bool:
    """Whether `text` is in NESTED's language."""
    while text[:1] + text[-1:] in ("()", "<>"):
        text = text[1:-1]
    return re.fullmatch("[a-c]{1,3}", text) is not None

CONSTRAINTS = [("regex", r"[a-f]{2,5}-\d{1,3}"), ("grammar", NESTED), ("regex", r"[^\n]{0,12}\n"),
               ("choice", ("alpha", "beta", "gamma", "δέλτα")),
               ("json", '{"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22]}}, '
                        '"required": ["ok"]}'),
               ("allowed", tuple(range(97, 123)) + (257,)), ("bad_words", ("ab", "e", "zz q"))]


def draw_processors(rng: random.Random, req: Request) -> None:
    """1 request in 5 gets one to three logits processors: the three penalties (their history is the prompt and
    the tokens so far, drafts on a verify row's path included), a logit bias on a few tokens (now and then +-100,
    which forces or bans one) and min_p; a seeded request also top-k and top-p. They change what greedy decoding
    returns, so the run alone must see them applied the same way whatever the batch, chunk, preemption or cache."""
    if rng.random() >= 0.2:
        return
    names = ["repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "min_p"]
    if req.seed is not None:
        names += ["top_k", "top_p"]
    picked = []
    for name in sorted(rng.sample(names, rng.randint(1, 3))):
        if name == "repetition_penalty":
            value = round(rng.uniform(0.5, 2.0), 2)
        elif name in ("presence_penalty", "frequency_penalty"):
            value = round(rng.uniform(-1.0, 1.5), 2)
        elif name == "logit_bias":
            value = tuple((draw_prompt_token(rng), rng.choice([-100.0, -3.0, 2.5, 6.0, 100.0]))
                          for _ in range(rng.randint(1, 3)))
        elif name == "min_p":
            value = round(rng.uniform(0.0, 0.3), 2)
        elif name == "top_k":
            value = rng.randint(1, 40)
        else:
            value = round(rng.uniform(0.3, 0.95), 2)
        picked.append((name, value))
    req.processors = tuple(picked)


def processor_params(processors: tuple) -> dict:
    """SamplingParams' fields for a Request's processors."""
    return {name: dict(value) if name == "logit_bias" else value for name, value in processors}


def constraint_params(constraint: tuple) -> dict:
    """SamplingParams' fields for a Request's constraint."""
    if not constraint:
        return {}
    kind, value = constraint
    if kind == "allowed":
        return {"allowed_token_ids": list(value)}
    if kind == "bad_words":
        return {"bad_words": list(value)}
    value = json.loads(value) if kind == "json" else list(value) if kind == "choice" else value
    return {"structured_outputs": StructuredOutputsParams(**{kind: value}, disable_any_whitespace=kind == "json")}


def constraint_problem(req: Request, token_ids: list[int], finish_reason: str, text: str) -> str | None:
    """What is wrong with a finished request's output under its constraint, or None: a complete structured output
    must match its format (a cut one, by length, must still be a prefix the format allows), allowed tokens only,
    no bad word's tokens in a row."""
    if not req.constraint:
        return None
    kind, value = req.constraint
    outputs = [t for t in token_ids if t != 257 or req.ignore_eos]  # EOS ends the text, it is not in it
    if kind == "allowed":
        bad = [t for t in token_ids if t not in value]
        return f"tokens {bad} are not allowed" if bad else None
    if kind == "bad_words":
        for word in value:
            for ids in (list(word.encode()), list((" " + word).encode())):
                if any(outputs[i:i + len(ids)] == ids for i in range(len(outputs))):
                    return f"bad word {word!r} generated"
        return None
    if finish_reason != "stop" or req.stop or req.stop_token_ids:  # cut by length or a stop: a prefix only
        return None
    complete = {"regex": lambda t: re.fullmatch(value, t), "choice": lambda t: t in value, "grammar": nested_ok,
                "json": lambda t: isinstance(json.loads(t).get("ok"), bool)}[kind]
    return None if complete(text) else f"{kind} output {text!r} does not match {value!r}"


def draw_constraint(rng: random.Random, req: Request) -> None:
    """1 request in 8 gets a constraint (structured outputs, allowed_token_ids or bad_words): the engine runs
    synchronous steps while it lives, masks its rows along their paths (verify steps too) and stops it where its
    format is complete."""
    if rng.random() < 0.125:
        req.constraint = rng.choice(CONSTRAINTS)


def draw_requests(rng: random.Random, scenario: Scenario, reference: Reference, seeded: bool = True,
                  priorities: bool = False, prefix: str = "", loras: list[LoRARequest] | tuple = (),
                  lora_rng: random.Random | None = None, embed_rng: random.Random | None = None,
                  proc_rng: random.Random | None = None) -> None:
    """Append 8 to 16 random requests (ids prefix + "0", prefix + "1", ...) to `scenario.events`, arriving at
    random steps, and aborts of some of them; sorted by step. Prompts hold a special token now and then, and a
    quarter of the requests keep special tokens' text (draw_special_switches). `seeded`: some requests sample
    with a seed (not where the engine's batches legitimately move the probabilities: speculation's verify steps,
    fp8 KV);
    `priorities`: random priorities 0-2 (the priority policy); `loras`: half the requests run with one of these
    adapters (the engine must have enable_lora), drawn from `lora_rng` (its own generator: a scenario without
    adapters draws what it drew before adapters existed); `proc_rng`: logits processors (draw_processors, from a
    generator of its own likewise). Stops are cut out of the reference's own run (with the request's adapter and
    processors), so they really fire."""
    kv_dtype = scenario.options.get("kv_cache_dtype", "auto")
    prefixes = [[draw_prompt_token(rng) for _ in range(rng.randint(8, 40))] for _ in range(2)]
    num_requests = rng.randint(8, 16)
    step = 0
    for i in range(num_requests):
        step += rng.choice([0, 0, 0, 1, 1, 3])
        kind = rng.random()
        if kind < 0.4:  # a shared prefix, sometimes the whole prompt (a full cache hit)
            prefix_tokens = rng.choice(prefixes)
            suffix = [draw_prompt_token(rng) for _ in range(rng.choice([0, 1, 3, 9]))]
            prompt = prefix_tokens + suffix
        elif kind < 0.45:  # a long prompt: few tokens left to max_model_len
            prompt = [draw_prompt_token(rng) for _ in range(rng.randint(MAX_LEN - 20, MAX_LEN - 1))]
        elif kind < 0.55:  # a repetitive prompt: prompt lookup drafts from it
            unit = [draw_prompt_token(rng) for _ in range(rng.randint(1, 4))]
            prompt = (unit * 20)[:rng.randint(4, 30)]
        else:
            prompt = [draw_prompt_token(rng) for _ in range(rng.randint(1, 30))]
        prompt = prompt[:MAX_LEN - 1]
        req = Request(tuple(prompt), rng.choice([1, 2, 5, 12, 30, MAX_LEN]), ignore_eos=rng.random() < 0.2,
                      priority=rng.randint(0, 2) if priorities else 0)
        if seeded and rng.random() < 0.15:  # seeded sampling: its own random stream, whatever the batch
            req.seed = rng.randrange(1000)
        if rng.random() < 0.3:
            req.logprobs = rng.randint(0, LP_WIDTH)
        if rng.random() < 0.15:  # (such a request never reads the prefix cache)
            req.prompt_logprobs = rng.randint(0, LP_WIDTH)
        if scenario.poison and rng.random() < 0.2:  # a request that fails: its text, or the forward of its prompt
            poisons = [POISON_TEXT, POISON_FORWARD] if scenario.poison == "forward" else [POISON_TEXT]
            req.prompt = req.prompt[:MAX_LEN - 2] + (rng.choice(poisons),)
        draw_special_switches(rng, req)
        draw_constraint(rng, req)
        if proc_rng is not None:
            draw_processors(proc_rng, req)
        if loras and lora_rng.random() < 0.5:
            req.lora = lora_rng.choice(loras)
        draw_stop(rng, req, reference, kv_dtype, scenario.poison)
        if embed_rng is not None and embed_rng.random() < 0.125:  # its prefill's pooled hidden states, no text
            req = Request(req.prompt, 1, lora=req.lora, pooling=embed_rng.choice(["LAST", "MEAN", "CLS"]))
        scenario.events.append((step, "add", prefix + str(i), req))
        if rng.random() < 0.25:  # abort it later: while waiting, running, swapped, or after it finished
            scenario.events.append((step + rng.randint(0, 12), "abort", prefix + str(i), None))
    scenario.events.sort(key=lambda e: e[0])


def draw_stop(rng: random.Random, req: Request, reference: Reference, kv_dtype: str = "auto",
              poison: str | None = None, odds: tuple[float, float] = (0.3, 0.1), longest: int = 2) -> None:
    """Maybe give `req` a stop token (odds[0]; with min_tokens 3 times in 10) or a stop string of 1 to `longest`
    characters (odds[1]), cut out of the plain run of `req` itself, so that it really fires (rarely a stop token
    the run never makes)."""
    r = rng.random()
    if r < odds[0]:  # a stop token the plain run really produces (or, rarely, one it never does)
        tokens, _, _ = reference.run(req, kv_dtype, poison)
        req.stop_token_ids = (rng.choice(tokens) if tokens and rng.random() < 0.9 else 299,)
        # (not under a structured output: banning a stop token the format needs leaves nothing to sample, which the
        # engine refuses or ends with "error": test_constraints tests that)
        if rng.random() < 0.3 and not (req.constraint and req.constraint[0] != "allowed"):
            req.min_tokens = rng.randint(1, req.max_tokens)
    elif r < odds[0] + odds[1]:  # a stop string cut out of the plain run's text
        _, _, text = reference.run(req, kv_dtype, poison)
        if len(text) >= 3:
            start = rng.randrange(len(text) - 2)
            req.stop = (text[start:start + rng.randint(1, longest)],)


def lora_problem(engine, lora_ids: set[int] | None = None) -> str | None:
    """What is wrong with an engine's LoRA bookkeeping after a step, or None (also None where LoRA is off): more
    than max_loras distinct adapters among the running sequences; a slot id that is not an adapter of the
    requests added (`lora_ids`, where known), or one adapter in two slots; a slot the engine thinks holds an
    adapter while the in-process worker's slot holds another (every step's copies are made by the time step()
    returns, async steps' too: the CPU runs a launch at once)."""
    slots = getattr(engine, "lora_slots", None)
    if slots is None:
        return None
    running = {s.lora_request.lora_int_id for s in engine.scheduler.running if s.lora_request is not None}
    if len(running) > slots.max_loras:
        return f"{len(running)} adapters {sorted(running)} among the running sequences, max_loras={slots.max_loras}"
    held = [i for i in slots.slot_ids if i is not None]
    if len(held) != len(set(held)):
        return f"an adapter in two slots: {slots.slot_ids}"
    if lora_ids is not None and not set(held) <= lora_ids:
        return f"slots {slots.slot_ids} hold an adapter no request named (adapters {sorted(lora_ids)})"
    worker = getattr(getattr(engine, "executor", None), "driver_worker", None)
    resident = getattr(getattr(worker, "lora", None), "resident", None)
    if resident is not None and any(i is not None and resident[s] != i for s, i in enumerate(slots.slot_ids)):
        return f"the engine's slots {slots.slot_ids}, the worker's {resident}"
    return None


class EngineChecks:
    """The bookkeeping checks of an LLMEngine (one scheduler, one block manager), whatever its executor; the
    disaggregated engine's checks subclass it (two sides and a transfer queue). `lora_ids`: the adapters of the
    requests added so far (drive notes them), for the LoRA checks."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lora_ids: set[int] = set()

    def holds_nothing(self, rid: str, seq) -> None:
        """Request `rid` (its sequence `seq`) has ended: it holds no device or CPU block any more."""
        bm = self.engine.scheduler.block_manager
        assert not seq.block_table and seq.seq_id not in bm._on_device and seq.seq_id not in bm._cpu_tables, \
            f"request {rid} still holds blocks after it ended"

    def after_abort(self, rid: str, seq) -> None:
        self.holds_nothing(rid, seq)

    def after_step(self) -> None:
        self.engine.scheduler.check_invariants()
        problem = lora_problem(self.engine, self.lora_ids)
        assert problem is None, f"LoRA: {problem}"

    def at_end(self) -> None:
        """Every request has ended: every block is free again; the LoRA slots hold nothing but adapters of the
        requests (or nothing)."""
        bm = self.engine.scheduler.block_manager
        assert bm.num_used_blocks == 0 and all(r == 0 for r in bm.ref_counts), "device blocks leaked"
        assert bm.num_used_cpu_blocks == 0 and not bm._cpu_tables, "swap space leaked"
        assert not bm._on_device
        problem = lora_problem(self.engine, self.lora_ids)
        assert problem is None, f"LoRA at the end: {problem}"

    @contextlib.contextmanager
    def recording_collateral(self, collateral: set[str]):
        """Where a failed step may not be rerun one request at a time (step_isolation.can_isolate: block operations
        in it, speculation, a worker that did not answer), every request in it ends in "error": note their ids."""
        from minillm.engine import async_step, llm_engine
        from minillm.engine.step_isolation import can_isolate

        def recording(batch, *args, **kwargs):
            ok = can_isolate(batch, *args, **kwargs)
            if not ok:
                collateral.update(seq.request_id for seq in batch.seqs)
            return ok

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llm_engine, "can_isolate", recording)
            mp.setattr(async_step, "can_isolate", recording)
            yield


def drive(engine: LLMEngine, scenario: Scenario, reference: Reference, checks: EngineChecks | None = None,
          max_steps: int = 3000) -> None:
    """Drive the engine through the scenario's events (add_request / abort before step number `step`, then
    step), checking after every abort, finish and step, then compare every request with the reference. The
    engine may have served earlier scenarios (its request ids must then be new)."""
    checks = checks or EngineChecks(engine)
    collateral: set[str] = set()  # requests of a failed step that could not be rerun one at a time (may "error")
    events = list(scenario.events)
    requests: dict[str, Request] = {}
    seqs = {}
    finished: dict[str, tuple[list[int], str, str]] = {}
    outputs_of = {}  # request id -> its finished RequestOutput
    last_output = {}  # request id -> the last RequestOutput it reported (each must extend the one before)
    aborted: set[str] = set()
    step = 0
    with checks.recording_collateral(collateral):
        while events or engine.has_unfinished_requests():
            while events and events[0][0] <= step:
                _, kind, rid, req = events.pop(0)
                if kind == "add":
                    if req.pooling is not None and engine.pooling_problem():  # refused by name, alone
                        with pytest.raises(ValueError, match="embedding requests are not supported"):
                            req.add_to(engine, rid)
                        assert rid not in engine._requests
                        continue
                    req.add_to(engine, rid)
                    if req.lora is not None:
                        checks.lora_ids.add(req.lora.lora_int_id)
                    requests[rid] = req
                    seqs[rid] = engine._requests[rid].seq
                    continue
                seq = engine._requests[rid].seq if rid in engine._requests else None  # (disagg: the decode side's)
                out = engine.abort(rid)
                if out is None:  # finished already (or never added): nothing to abort
                    assert rid in finished or rid not in requests
                    continue
                assert rid not in finished, f"request {rid} aborted after it finished"
                assert out.finished and out.outputs[0].finish_reason == "abort"
                aborted.add(rid)
                checks.after_abort(rid, seq)
                checks.after_step()
            outputs = engine.step()
            step += 1
            assert step < max_steps, "the engine makes no progress"
            for out in outputs:
                rid = out.request_id
                assert rid in requests, f"output for unknown request {rid}"
                assert rid not in aborted, f"output for request {rid} after its abort"
                assert rid not in finished, f"request {rid} reported after it finished"
                problem = stream_problem(requests[rid], last_output.get(rid), out)
                assert problem is None, f"request {rid} {requests[rid]}: {problem}"
                last_output[rid] = out
                if out.finished:
                    c = out.outputs[0]
                    assert c.finish_reason in ("stop", "length", "error"), (rid, c.finish_reason, c.error)
                    finished[rid] = (list(c.token_ids), c.finish_reason, c.text)
                    outputs_of[rid] = out
                    checks.holds_nothing(rid, seqs[rid])
            checks.after_step()
    assert not engine._requests and not engine.scheduler.has_unfinished()
    assert set(finished) | aborted == set(requests) and not set(finished) & aborted
    checks.at_end()
    compare(scenario, reference, requests, finished, outputs_of, collateral)


def extension_problem(before: RequestOutput | None, after: RequestOutput) -> str | None:
    """What is wrong with `after` as the next cumulative output of a request whose last one was `before`: its
    tokens and text must extend the earlier ones (a client never sees text taken back: a possible stop string is
    held back, not sent and cut; so the deltas of a stream add up to the final text), one log-prob entry per
    token, nothing after the finished output."""
    a = after.outputs[0]
    if a.logprobs is not None and len(a.logprobs) != len(a.token_ids):
        return f"{len(a.logprobs)} log-prob entries for {len(a.token_ids)} tokens"
    if before is None:
        return None
    b = before.outputs[0]
    if before.finished:
        return f"an output ({a.finish_reason}) after the finished one ({b.finish_reason})"
    if a.token_ids[:len(b.token_ids)] != b.token_ids:
        return f"tokens {a.token_ids} do not extend the earlier {b.token_ids}"
    if not a.text.startswith(b.text):
        return f"text {a.text!r} does not extend the earlier {b.text!r}"
    return None


def stream_problem(req: Request, before: RequestOutput | None, after: RequestOutput) -> str | None:
    """extension_problem, and a running output shows no stop string (with min_tokens 0 it would have stopped
    there; min_tokens holds stop strings back, so they may stand in its text)."""
    problem = extension_problem(before, after)
    if problem is None and not after.finished and req.min_tokens == 0:
        shown = [s for s in req.stop if s in after.outputs[0].text]
        problem = f"stop string {shown[0]!r} in a running output {after.outputs[0].text!r}" if shown else None
    return problem


def compare(scenario: Scenario, reference: Reference, requests: dict[str, Request],
            finished: dict[str, tuple[list[int], str, str]], outputs_of: dict, collateral: set[str]) -> None:
    """Each finished request against the same request run alone: tokens, finish reason, text and log-probs
    (past a greedy tie, only the tie), "error" only where it fails alone or was collateral; its text against its
    tokens (check_text)."""
    kv_dtype = scenario.options.get("kv_cache_dtype", "auto")
    tie, lp_tol = (FP8_TOL, FP8_LP_TOL) if kv_dtype != "auto" else (TIE, LP_TOL)
    for rid, got in finished.items():
        req = requests[rid]
        expected = reference.run(req, kv_dtype, scenario.poison)
        if "error" in (got[1], expected[1]):  # the poisoned request fails alone, and wherever it fails alone
            reason = outputs_of[rid].outputs[0].error
            assert got[1] == expected[1] or rid in collateral or reference.parts_into_poison(req, got, expected, tie), \
                f"request {rid} {req}: {got[1]} ({reason}), alone {expected[1]}"
            continue
        if got != expected and not reference.parts_at_a_tie(req, got[0], expected[0], tie):
            assert got == expected, f"request {rid} {req}"
        if req.pooling is not None:
            check_embedding(rid, req, outputs_of[rid], reference.outputs[(req.key(), kv_dtype, scenario.poison)],
                            kv_dtype)
        problem = constraint_problem(req, *got)
        assert problem is None, f"request {rid} {req}: {problem}"
        check_text(rid, req, outputs_of[rid].outputs[0])
        check_logprobs(rid, req, outputs_of[rid], reference.outputs[(req.key(), kv_dtype, scenario.poison)], lp_tol)


def check_embedding(rid: str, req: Request, out, ref, kv_dtype: str) -> None:
    """An embedding request's vector is the run alone's: within fp32 rounding, or (fp8 KV cache: a chunk reads
    fp8-rounded K/V where the run alone's one prefill read exact ones; activations rounded to fp8:
    ROUNDED_ACTIVATIONS) pointing the same way."""
    assert out.embedding is not None and ref.embedding is not None, f"request {rid}: no embedding"
    got, want = torch.tensor(out.embedding), torch.tensor(ref.embedding)
    if kv_dtype == "auto" and not ROUNDED_ACTIVATIONS:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=lambda m: f"request {rid} {req}: {m}")
    else:
        assert float(got @ want) > 0.98, f"request {rid} {req}: cosine {float(got @ want):.4f} to the run alone's"


def check_logprobs(rid: str, req: Request, out, ref, tol: float) -> None:
    """`out`'s sampled and prompt log-probs (top req.logprobs / req.prompt_logprobs) are the reference's within
    `tol`, over the tokens both runs share (past a greedy tie they score other sequences). Speculative or not,
    they are the raw target model's log-softmax."""
    got, want = out.outputs[0], ref.outputs[0]
    if req.logprobs is None:
        assert got.logprobs is None, f"request {rid}: log-probs nobody asked for"
    else:
        assert got.logprobs is not None and len(got.logprobs) == len(got.token_ids), \
            f"request {rid}: {None if got.logprobs is None else len(got.logprobs)} log-prob entries for " \
            f"{len(got.token_ids)} tokens"
        shared = next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b),
                      min(len(got.token_ids), len(want.token_ids)))
        for i in range(shared):
            check_entry(f"request {rid} token {i}", got.token_ids[i], got.logprobs[i], want.logprobs[i],
                        req.logprobs, tol, req.skip_special)
    if req.prompt_logprobs is None:
        assert out.prompt_logprobs is None, f"request {rid}: prompt log-probs nobody asked for"
    else:
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(req.prompt), \
            f"request {rid}: {None if out.prompt_logprobs is None else len(out.prompt_logprobs)} prompt log-prob " \
            f"entries for {len(req.prompt)} prompt tokens"
        assert out.prompt_logprobs[0] is None
        for i in range(1, len(req.prompt)):
            check_entry(f"request {rid} prompt token {i}", req.prompt[i], out.prompt_logprobs[i],
                        ref.prompt_logprobs[i], req.prompt_logprobs, tol, req.skip_special)


def token_text(token: int, skip_special: bool) -> str:
    """A log-prob entry's decoded_token for `token` (StepOutputs._token_text): its own byte (U+FFFD for a piece
    of a character), and for a special token nothing, or its text where the request keeps special tokens."""
    if token < 256:
        return bytes([token]).decode("utf-8", errors="replace")
    return "" if skip_special else TOKENIZER.decode([token], skip_special_tokens=False)


def check_text(rid: str, req: Request, done) -> None:
    """What needs no run alone (the runs alone share the detokenizer): where the prompt ends in an ASCII byte (no
    character left for the output to finish) and no stop string cut the text, the incremental text is the output
    tokens decoded at once, special tokens' text kept or not as the request asks (a stop token's never); and, as
    StepOutputs._token_text promises, the sampled tokens' log-prob texts add up to it where every token is a whole
    character (ASCII or special: a piece of one is U+FFFD alone)."""
    ids = list(done.token_ids)
    stop_tokens = set(req.stop_token_ids) | (set() if req.ignore_eos else {257})
    if done.finish_reason == "stop" and not isinstance(done.stop_reason, str) and ids[-1:] and ids[-1] in stop_tokens:
        ids = ids[:-1]  # the stop token (EOS, or one of stop_token_ids)
    elif done.finish_reason == "stop" and not isinstance(done.stop_reason, str):
        pass  # a structured output complete at its last token (engine/constraints.py): that token is text
    elif done.finish_reason != "length":
        return
    if req.prompt[-1] < 128:
        expected = TOKENIZER.decode(ids, skip_special_tokens=req.skip_special)
        assert done.text == expected, f"request {rid}: text {done.text!r}, its tokens decode to {expected!r}"
    if done.logprobs is not None and all(t < 128 or t >= 256 for t in ids):
        texts = "".join(entry[t].decoded_token for t, entry in zip(ids, done.logprobs))
        assert texts == done.text, f"request {rid}: log-prob token texts {texts!r}, text {done.text!r}"


def check_entry(where: str, token: int, got: dict, want: dict, k: int, tol: float, skip_special: bool) -> None:
    """One token's {token id: Logprob}: the token itself plus the k most likely (the reference's LP_WIDTH), each
    with its text as the request decodes it (token_text)."""
    assert token in got, f"{where}: the token {token} is not in its entry {got}"
    wrong = {t: v.decoded_token for t, v in got.items() if v.decoded_token != token_text(t, skip_special)}
    assert not wrong, f"{where}: token texts {wrong} (skip_special_tokens={skip_special})"
    assert abs(got[token].logprob - want[token].logprob) <= tol, f"{where}: {got[token]} alone {want[token]}"
    top = sorted((v.logprob for t, v in got.items() if v.rank <= k), reverse=True)
    expected_top = sorted((v.logprob for v in want.values()), reverse=True)[:k]
    assert len(top) >= min(k, len(expected_top)) and all(abs(a - b) <= tol for a, b in zip(top, expected_top)), \
        f"{where}: top {k} {got} alone {want}"
    for t, v in got.items():
        assert t not in want or abs(v.logprob - want[t].logprob) <= tol, f"{where}: token {t}: {v} alone {want[t]}"


def describe(scenario: Scenario) -> str:
    lines = [f"options={scenario.options!r}, spec={scenario.spec!r}, poison={scenario.poison!r}"]
    lines += describe_loras([e[3] for e in scenario.events if e[1] == "add"], scenario.options)
    lines += [f"  {e!r}" for e in scenario.events]
    return "\n".join(lines)


def describe_loras(requests: list[Request], options: dict) -> list[str]:
    """The LoRA part of a scenario's description: max_loras and how many requests run with each adapter."""
    if not options.get("enable_lora"):
        return []
    used: dict[LoRARequest, int] = {}
    for req in requests:
        if req.lora is not None:
            used[req.lora] = used.get(req.lora, 0) + 1
    each = ", ".join(f"{r.lora_name} (id {r.lora_int_id}, {r.lora_path}): {n}" for r, n in
                     sorted(used.items(), key=lambda item: item[0].lora_int_id))
    return [f"LoRA: max_loras={options.get('max_loras')}, max_lora_rank={options.get('max_lora_rank')}; "
            f"{len(requests) - sum(used.values())} of {len(requests)} requests without an adapter; "
            f"{each or 'none with one'}"]


