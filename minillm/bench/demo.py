"""`minillm demo` (what `make run` runs): the whole engine in one minute, measured (chapter 1).

1. load the bundled SmolLM2-135M-Instruct (a 98 MB GGUF, dequantized to fp32 on a CPU, bf16 on a GPU);
2. stream one chat answer to the terminal token by token (`LLM.generate_stream`): TTFT is the pause before the
   first word, TPOT the rhythm after it;
3. answer a batch of 8 chat prompts together (`LLM.chat`) and print TTFT / TPOT / latency per request, then the
   throughput: batching makes the batch's tokens/s far higher than the single stream's;
4. save a plot of the batch (timeline and TTFT/TPOT bars) and print its path.

On a 2-core CPU it finishes in about a minute; on a GPU it uses the GPU and longer answers.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from minillm.bench.harness import BenchResult, format_percentiles, format_requests, request_stats, run_workload, warm_up
from minillm.bench.plots import plot_run, save_figure

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for a good night's sleep.",
    "Explain what a GPU is in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Name three primary colors.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
]
STREAMED_QUESTION = "In two sentences, what does a large language model do when it answers a question?"
CPU_MAX_TOKENS, GPU_MAX_TOKENS = 48, 128
PROMPT_BUDGET = 128  # tokens: the longest demo conversation after the chat template is about 60


def _conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def stream_answer(llm: Any, question: str, sampling_params: Any, out: Any = None) -> BenchResult:
    """Print the answer as it is generated (to `out`, default the current sys.stdout); returns the single
    request's metrics."""
    out = sys.stdout if out is None else out
    prompt = llm.tokenizer.apply_chat_template(_conversation(question), add_generation_prompt=True)
    print(f"\nuser> {question}\nassistant> ", end="", file=out, flush=True)
    last = None
    num_tokens = 0
    for delta in llm.generate_stream(prompt, sampling_params):
        print(delta.outputs[0].text, end="", file=out, flush=True)
        num_tokens += len(delta.outputs[0].token_ids)
        last = delta
    print("\n", file=out, flush=True)
    if last is None:
        raise RuntimeError("the stream produced nothing")
    # the last delta carries the request's final metrics, but only its newest tokens: pass the count we kept
    stats = request_stats(last, num_output_tokens=num_tokens)
    return BenchResult([stats], wall_time=stats.latency)


def run_demo(max_tokens: int | None = None, out_dir: str | os.PathLike = "out", model: str | None = None,
             device: str | None = None, out: Any = None) -> BenchResult:
    """The demo; returns the batch's BenchResult. Prints everything to `out` (default: sys.stdout when called, not
    the one at import time, which a test harness may have replaced and closed since)."""
    out = sys.stdout if out is None else out
    from minillm import LLM, SamplingParams
    from minillm.loader import read_model_config
    from minillm.platform import resolve_device

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    dev = resolve_device(device)
    if max_tokens is None:
        max_tokens = GPU_MAX_TOKENS if dev.type == "cuda" else CPU_MAX_TOKENS
    # The demo's conversations are short (under PROMPT_BUDGET tokens with the template's system prompt); a
    # contiguous cache reserves max_model_len slots per sequence, so reserve only what the demo can use. Checked
    # against the model's context (its config alone, before loading): LLM() would blame max_model_len instead.
    context = read_model_config(model).max_position_embeddings
    if max_tokens > context - PROMPT_BUDGET:
        raise ValueError(f"max_tokens must be <= {context - PROMPT_BUDGET} (the model's {context}-token context "
                         f"less {PROMPT_BUDGET} for the demo's prompts), got {max_tokens}")
    max_model_len = min(context, -(-(PROMPT_BUDGET + max_tokens) // 64) * 64)
    start = time.perf_counter()
    print("minillm demo: loading SmolLM2-135M-Instruct (bundled GGUF) ..." if model is None
          else f"minillm demo: loading {model} ...", file=out, flush=True)
    llm = LLM(model=model, device=dev, seed=0, max_model_len=max_model_len)
    dtype = str(llm.dtype).replace("torch.", "")
    print(f"loaded in {time.perf_counter() - start:.1f} s on {llm.device} ({dtype}); warm-up {warm_up(llm):.1f} s "
          f"(the first step of each shape pays one-time costs: kept out of the figures below)", file=out, flush=True)

    # mild sampling, seeded per request: varied but reproducible answers, whatever else is in the batch
    def params(seed: int) -> Any:
        return SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_tokens, seed=seed)

    single = stream_answer(llm, STREAMED_QUESTION, params(1234), out)
    r = single.requests[0]
    print(f"(one request alone: TTFT {1e3 * r.ttft:.0f} ms, TPOT {1e3 * (r.tpot or 0):.0f} ms, "
          f"{single.output_throughput:.1f} tok/s)", file=out, flush=True)

    print(f"\nNow {len(DEMO_QUESTIONS)} questions at once, as one batch (max {max_tokens} tokens each) ...",
          file=out, flush=True)
    convs = [_conversation(q) for q in DEMO_QUESTIONS]
    outputs, result = run_workload(llm, convs, [params(i) for i in range(len(convs))], chat=True)
    for i, (q, o) in enumerate(zip(DEMO_QUESTIONS, outputs)):
        answer = " ".join(o.outputs[0].text.split())
        print(f"[{i}] {q}\n    -> {answer[:110]}{'...' if len(answer) > 110 else ''}", file=out)
    print("\n" + format_requests(result), file=out)
    print("\n" + format_percentiles(result), file=out)
    speedup = result.output_throughput / single.output_throughput
    print(f"\nbatching {len(convs)} requests: {result.output_throughput:.1f} tok/s vs "
          f"{single.output_throughput:.1f} tok/s for one alone ({speedup:.1f}x). Decode re-reads every weight "
          f"for each step, however many sequences share it: batching spreads that cost.", file=out)

    fig = plot_run(outputs, result, title=f"minillm demo: {len(convs)} chat requests on {llm.device} ({dtype})")
    path = save_figure(fig, os.path.join(os.fspath(out_dir), "demo.png"))
    print(f"plot saved to {path}\ndone in {time.perf_counter() - start:.1f} s", file=out, flush=True)
    return result
