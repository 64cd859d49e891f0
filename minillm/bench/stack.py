"""`minillm bench stack`: the optimizations of this course stacked one on another, each measured live (chapter 1).

One workload, one process, the same weights: every row keeps everything the rows above it switched on and adds
one technique, so the table reads as the story of the course:

  no KV cache            one request at a time; every new token is a prefill of everything so far      (chapter 2)
  + KV cache             one request at a time; prefill once, then one token per step                   (chapter 2)
  + static batching      batches of `batch` requests; a batch runs until its longest request ends       (chapter 2)
  + paged KV, continuous batching   a finished request's place is refilled at the next step           (5, 6)
  + prefix caching       the shared system prompt's KV blocks computed once and reused                  (5, 6)
  + Triton kernels       FlashAttention prefill, split-KV paged decode, fused norms (GPU)               (3, 4)
  + CUDA graphs          decode (and piecewise mixed) steps replayed, not launched kernel by kernel    (4)
  + async scheduling     the host prepares step N+1 while the GPU runs step N (GPU)                     (6)
  + FP8 weights          e4m3 weights quantized while loading: half the weight bytes of bf16; W8A8   (7)
                         GEMMs, the weight-only GEMV on the codes for decode steps of few rows
  + speculative decoding prompt lookup drafts k tokens, one verify step checks them (lossless)         (9)

The workload (seeded, all requests arriving at t = 0 as in an offline batch): `num_prompts` prompts, each a shared
system prompt of `prefix_len` tokens followed by `suffix_len` tokens of its own (windows of real text), greedy,
EOS ignored, output lengths drawn from [output_len // 4, output_len] so that a static batch waits for its longest
member. Every row is warmed up first (kernel builds, graph captures and the CPU's layout timings are not billed to
it). TTFT counts from t = 0, so it includes the wait for earlier requests: what a user at the back of the queue
sees. The table gives output tokens/s, its ratio to the row above and to the first row, mean TTFT and TPOT, and
whether the greedy tokens equal the row above's (they must wherever the weights did not change; a handful of
near-ties may flip in low precision).

A row that cannot run on this device is printed with the reason and skipped: on a CPU the Triton kernels run in
Triton's interpreter (a correctness tool, not a speed-up), there are no CUDA graphs and the engine steps
synchronously, and FP8 is emulated. With FP8 activations (prefill), results of a different batch shape can differ in the
last bit before an activation is rounded to FP8 and land on the other side of a rounding boundary: the rows after
FP8 may then show a few requests whose greedy tokens part from the row above's at a near-tie.

Expect the last two rows to lose on the bundled 135M model at the GPU's batch of 16 (H100, 2026-12-06: FP8 0.74x,
speculation 0.81x of the row above): its matrices take microseconds, so halving their bytes saves little while FP8
adds activation-quantization kernels, and a speculative step runs synchronously, its host work for 16 sequences
added to a verify step that costs the GPU almost nothing more than a decode step. Both pay where a step reads
gigabytes of weights (chapters 7 and 9 measure the 8B shape); the engine's `disable_by_batch_size` turns
speculation off above the batch where it stops paying, which this row leaves on to show the cost.
"""
from __future__ import annotations

import dataclasses
import gc
import random
import time
from typing import Any

from minillm.bench.harness import warm_up
from minillm.bench.workload import synthetic_prompts


@dataclasses.dataclass(frozen=True)
class Layer:
    """One row: the engine options it adds on top of the rows above it."""

    name: str
    chapters: str
    options: dict[str, Any]
    needs_cuda: str | None = None  # why the row is skipped without CUDA; None: it runs anywhere


# Row 0's engine: one sequence in a contiguous cache, eager torch attention, synchronous steps.
BASE_OPTIONS: dict[str, Any] = dict(scheduling="static", kv_layout="contiguous", max_num_seqs=1,
                                    attention_backend="torch", enforce_eager=True, async_scheduling=False)
BATCH = "batch"  # placeholder in an option: the run's batch size

LAYERS: tuple[Layer, ...] = (
    Layer("no KV cache", "2", {}),
    Layer("+ KV cache", "2", {}),
    Layer("+ static batching", "2", dict(max_num_seqs=BATCH)),
    Layer("+ paged KV, continuous batching", "5, 6", dict(scheduling="continuous", kv_layout="paged")),
    Layer("+ prefix caching", "5, 6", dict(enable_prefix_caching=True)),
    Layer("+ Triton kernels", "3, 4", dict(attention_backend="triton"),
          needs_cuda="on a CPU Triton runs in its interpreter, a correctness tool"),
    Layer("+ CUDA graphs", "4", dict(enforce_eager=False), needs_cuda="needs CUDA"),
    Layer("+ async scheduling", "6", dict(async_scheduling=True), needs_cuda="a CPU engine steps synchronously"),
    Layer("+ FP8 weights", "7", dict(quantization="fp8"),
          needs_cuda="a CPU has no FP8 arithmetic: its exact emulation is a correctness tool"),
    Layer("+ speculative decoding", "9", dict(speculative_config={"method": "ngram", "num_speculative_tokens": 4})),
)
LOAD_TIME_OPTIONS = ("quantization",)  # options that change the weights: a new LLM is loaded for them


@dataclasses.dataclass
class RowResult:
    name: str
    chapters: str
    skipped: str | None = None  # the reason, for a row that did not run
    seconds: float = 0.0
    output_tokens: int = 0
    ttft: float | None = None  # mean, seconds from t = 0
    tpot: float | None = None  # mean over requests with two or more tokens
    tokens: list[list[int]] | None = None  # each request's greedy tokens
    same_as_above: str = ""  # "8/8", or why it was not compared

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


def stack_workload(tokenizer: Any, num_prompts: int, prefix_len: int, suffix_len: int, output_len: int,
                   seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths): a shared prefix + one text window per prompt; lengths in [output_len // 4,
    output_len], seeded."""
    windows = synthetic_prompts(tokenizer, num_prompts + 1, max(prefix_len, suffix_len), seed)
    prefix = windows[0][:prefix_len]
    prompts = [prefix + w[:suffix_len] for w in windows[1:]]
    rng = random.Random(seed)
    lengths = [rng.randint(max(1, output_len // 4), output_len) for _ in prompts]
    return prompts, lengths


def _recompute(llm: Any, prompts: list[list[int]], lengths: list[int]) -> tuple[list[list[int]], list[tuple]]:
    """Row 0: each token is a one-token generate over everything so far (no cache survives between calls)."""
    from minillm import SamplingParams
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start, tokens, times = time.perf_counter(), [], []
    for prompt, n in zip(prompts, lengths):
        seq, first = list(prompt), None
        for _ in range(n):
            seq.append(llm.generate([seq], one, use_tqdm=False)[0].outputs[0].token_ids[0])
            first = first if first is not None else time.perf_counter()
        tokens.append(seq[len(prompt):])
        times.append((first - start, time.perf_counter() - start, n))
    return tokens, times


def _engine_run(llm: Any, prompts: list[list[int]], lengths: list[int], serial: bool
                ) -> tuple[list[list[int]], list[tuple]]:
    """All prompts to the engine at once (or, `serial`, one generate call each); (first-token, finish) times
    from t = 0 out of the engine's own request timestamps."""
    from minillm import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    if serial:
        outs = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    failed = [o.outputs[0].error for o in outs if o.outputs[0].finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outs)} requests failed; the first: {failed[0]}")
    times = [(o.metrics.first_token_time - start, o.metrics.finish_time - start, len(o.outputs[0].token_ids))
             for o in outs]
    return [list(o.outputs[0].token_ids) for o in outs], times


def _summarise(row: RowResult, tokens: list[list[int]], times: list[tuple]) -> None:
    row.tokens = tokens
    row.seconds = max(finish for _, finish, _ in times)
    row.output_tokens = sum(n for _, _, n in times)
    row.ttft = sum(first for first, _, _ in times) / len(times)
    gaps = [(finish - first) / (n - 1) for first, finish, n in times if n > 1]
    row.tpot = sum(gaps) / len(gaps) if gaps else None


# The workload's default sizes per device: a CPU run takes about a minute, a GPU one gives batching room to work.
DEFAULT_SIZES = {"cpu": dict(num_prompts=8, batch=4, prefix_len=96, suffix_len=32, output_len=32),
                 "cuda": dict(num_prompts=32, batch=16, prefix_len=256, suffix_len=64, output_len=128)}


def run_stack(model: str | None = None, device: str = "auto", dtype: str = "auto", num_prompts: int | None = None,
              batch: int | None = None, prefix_len: int | None = None, suffix_len: int | None = None,
              output_len: int | None = None, seed: int = 0, layers: tuple[Layer, ...] = LAYERS,
              verbose: bool = True) -> list[RowResult]:
    """Measure every row of `layers` in order on one workload; returns the rows (skipped ones included). A size
    left None takes the device's DEFAULT_SIZES."""
    from minillm import LLM
    from minillm.loader import read_model_config
    from minillm.platform import resolve_device
    given = dict(num_prompts=num_prompts, batch=batch, prefix_len=prefix_len, suffix_len=suffix_len,
                 output_len=output_len)
    defaults = DEFAULT_SIZES["cuda" if resolve_device(device).type == "cuda" else "cpu"]
    sizes = {name: defaults[name] if value is None else value for name, value in given.items()}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    num_prompts, batch, prefix_len, suffix_len, output_len = sizes.values()
    max_model_len = prefix_len + suffix_len + output_len + 8  # room for a verify step's draft tokens
    context = read_model_config(model).max_position_embeddings  # before loading; LLM() blamed max_model_len
    if max_model_len > context:
        raise ValueError(f"prefix_len + suffix_len + output_len must be <= {context - 8} (the model's {context}-token "
                         f"context less 8 for a verify step's drafts), got {prefix_len} + {suffix_len} + {output_len}")
    base_options = _resolve(BASE_OPTIONS, batch)

    def load(weights: tuple) -> Any:
        return LLM(model, device=device, dtype=dtype, seed=seed, max_model_len=max_model_len, **dict(weights),
                   **base_options)

    loaded, weights = load(()), ()  # the LLM holding the current weights, and what they are
    cuda = loaded.device.type == "cuda"
    prompts, lengths = stack_workload(loaded.tokenizer, num_prompts, prefix_len, suffix_len, output_len, seed)
    if verbose:
        print(f"{num_prompts} requests: a shared {prefix_len}-token prefix + {suffix_len} tokens each, "
              f"outputs {min(lengths)}..{max(lengths)} tokens (greedy, EOS ignored), batch {batch}; "
              f"{loaded.device}, {str(loaded.dtype).replace('torch.', '')}", flush=True)
    options: dict[str, Any] = {}
    rows: list[RowResult] = []
    above: RowResult | None = None
    for i, layer in enumerate(layers):
        row = RowResult(layer.name, layer.chapters)
        rows.append(row)
        if layer.needs_cuda and not cuda:
            row.skipped = layer.needs_cuda
            continue
        kept = dict(options)  # a row that fails switches nothing on for the rows below it
        options.update(_resolve(layer.options, batch))
        new_weights = tuple((k, options[k]) for k in LOAD_TIME_OPTIONS if k in options)
        engine_options = {k: v for k, v in options.items() if k not in LOAD_TIME_OPTIONS}
        try:
            if new_weights != weights:  # drop the old weights before loading the new ones
                loaded = None
                _free(cuda)
                loaded, weights = load(new_weights), new_weights
                row.same_as_above = "new weights"
            # rows without engine options of their own run on the loaded LLM; the others share its weights
            llm = loaded.share_model(seed=seed, **{**base_options, **engine_options}) if engine_options else loaded
            warm_up(llm)
            run = _recompute(llm, prompts, lengths) if i == 0 else \
                _engine_run(llm, prompts, lengths, serial=options.get("max_num_seqs", 1) == 1)
        except Exception as err:  # one row that cannot run here (memory, a missing kernel) leaves the others' rows
            if i == 0:
                raise
            row.skipped = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            if verbose:
                print(f"  {row.name}: {row.skipped}", flush=True)
            llm, options = None, kept
            _free(cuda)
            if loaded is None:  # new weights failed to load: the rows below run on the previous ones
                loaded = load(weights)
            continue
        _summarise(row, *run)
        if above is None:
            row.same_as_above = "-"
        elif row.same_as_above != "new weights":
            row.same_as_above = f"{sum(a == b for a, b in zip(above.tokens, row.tokens))}/{len(row.tokens)}"
        above = row
        if verbose:
            print(f"  {row.name}: {row.tok_per_s:.1f} output tok/s", flush=True)
        del llm
        _free(cuda)
    return rows


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch
        torch.cuda.empty_cache()


def _resolve(options: dict[str, Any], batch: int) -> dict[str, Any]:
    return {k: (batch if v == BATCH else v) for k, v in options.items()}


def format_stack(rows: list[RowResult]) -> str:
    """The table: one line per row, ratios to the row above (that ran) and to the first row."""
    lines = [f"{'row':34s} {'ch.':5s} {'tok/s':>8s} {'x above':>8s} {'x first':>8s} {'TTFT ms':>8s} "
             f"{'TPOT ms':>8s} {'same tokens':>12s}"]
    first = above = None
    for row in rows:
        if row.skipped:
            lines.append(f"{row.name:34s} {row.chapters:5s} skipped: {row.skipped}")
            continue
        first = first or row
        ratio_above = f"{row.tok_per_s / above.tok_per_s:.2f}x" if above else "-"
        lines.append(f"{row.name:34s} {row.chapters:5s} {row.tok_per_s:8.1f} {ratio_above:>8s} "
                     f"{row.tok_per_s / first.tok_per_s:7.2f}x {_ms(row.ttft):>8s} {_ms(row.tpot):>8s} "
                     f"{row.same_as_above:>12s}")
        above = row
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def to_dict(rows: list[RowResult]) -> list[dict[str, Any]]:
    return [dict(name=r.name, chapters=r.chapters, skipped=r.skipped, seconds=round(r.seconds, 4),
                 output_tokens=r.output_tokens, output_tok_per_s=round(r.tok_per_s, 2),
                 mean_ttft_s=r.ttft, mean_tpot_s=r.tpot, same_tokens_as_above=r.same_as_above) for r in rows]
