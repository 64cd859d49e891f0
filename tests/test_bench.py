"""The bench harness's arithmetic (TTFT, TPOT, latency, throughput, percentiles) on synthetic outputs, the
roofline math, and one small real run through the engine."""
from __future__ import annotations

import math
import random

import pytest
import torch

from minillm.bench import harness, roofline
from minillm.outputs import CompletionOutput, RequestMetrics, RequestOutput


def make_output(rid: str, n_prompt: int, n_out: int, arrival: float, first: float | None, finish: float | None,
                finish_reason: str = "length") -> RequestOutput:
    return RequestOutput(
        request_id=rid, prompt="p", prompt_token_ids=list(range(n_prompt)),
        outputs=[CompletionOutput(0, "t", list(range(n_out)), finish_reason)], finished=True,
        metrics=RequestMetrics(arrival, first_scheduled_time=arrival + 0.001, first_token_time=first,
                               finish_time=finish, num_output_tokens=n_out))


def test_request_stats_ttft_tpot_latency():
    o = make_output("a", 7, 5, arrival=10.0, first=10.25, finish=11.25)
    r = harness.request_stats(o)
    assert r.ttft == pytest.approx(0.25)
    assert r.tpot == pytest.approx(1.0 / 4)  # 4 gaps after the first token
    assert r.latency == pytest.approx(1.25)
    assert r.queue_time == pytest.approx(0.001)
    assert (r.num_prompt_tokens, r.num_output_tokens) == (7, 5)
    # the same numbers the engine's own RequestMetrics properties give
    assert (r.ttft, r.tpot, r.latency) == pytest.approx((o.metrics.ttft, o.metrics.tpot, o.metrics.latency))


def test_single_token_has_no_tpot_and_is_left_out_of_tpot_stats():
    outs = [make_output("one", 3, 1, 0.0, 0.5, 0.5), make_output("two", 3, 3, 0.0, 0.2, 0.6)]
    res = harness.summarize(outs)
    assert res.requests[0].tpot is None
    assert res.percentiles["tpot"]["mean"] == pytest.approx(0.2)  # only request "two": 0.4 / 2
    assert res.percentiles["ttft"]["mean"] == pytest.approx(0.35)


def test_throughput_over_the_run_span():
    outs = [make_output(str(i), 11, 13, arrival=1.0 + 0.1 * i, first=2.0 + 0.1 * i, finish=3.0 + 0.5 * i)
            for i in range(3)]
    res = harness.summarize(outs)
    assert res.wall_time == pytest.approx(4.0 - 1.0)  # first arrival 1.0, last finish 4.0
    assert res.total_output_tokens == 39 and res.total_prompt_tokens == 33
    assert res.output_throughput == pytest.approx(39 / 3.0)
    assert res.total_throughput == pytest.approx(72 / 3.0)
    assert res.request_throughput == pytest.approx(1.0)
    assert harness.summarize(outs, wall_time=6.5).output_throughput == pytest.approx(6.0)


@pytest.mark.parametrize("n", [1, 2, 5, 17, 100])
def test_percentile_matches_numpy_linear(n):
    np = pytest.importorskip("numpy")
    rng = random.Random(n)
    xs = [rng.uniform(-3, 9) for _ in range(n)]
    for q in (0, 1, 37.5, 50, 90, 99, 100):
        assert harness.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_known_values_and_errors():
    assert harness.percentile([4, 1, 3, 2], 50) == 2.5
    assert harness.percentile([10, 20], 90) == pytest.approx(19.0)
    with pytest.raises(ValueError, match="q must be in \\[0, 100\\], got 101"):
        harness.percentile([1.0], 101)
    with pytest.raises(ValueError, match="empty"):
        harness.percentile([], 50)


def test_failed_and_malformed_requests():
    ok = make_output("ok", 4, 4, 0.0, 0.1, 0.4)
    err = make_output("bad", 4, 0, 0.0, None, 0.05, finish_reason="error")
    res = harness.summarize([ok, err])
    assert res.failed == ["bad"] and res.num_requests == 1
    with pytest.raises(ValueError, match="no.*finished request|at least one"):
        harness.summarize([err])
    with pytest.raises(ValueError, match="out of order"):
        harness.request_stats(make_output("x", 1, 2, 5.0, 4.0, 6.0))
    with pytest.raises(ValueError, match="incomplete metrics"):
        harness.request_stats(make_output("y", 1, 2, 5.0, 5.5, None))
    with pytest.raises(ValueError, match="wall_time must be > 0"):
        harness.summarize([ok], wall_time=0.0)


def test_tables_and_json_mention_every_request():
    outs = [make_output(f"req-{i}", 5 + i, 8, 0.0, 0.1 * (i + 1), 1.0 + i) for i in range(4)]
    res = harness.summarize(outs)
    table = harness.format_requests(res)
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["0", "1", "2", "3"] and "output tok/s" in table
    assert "TTFT" in harness.format_percentiles(res) and "p99 ms" in harness.format_percentiles(res)
    d = harness.to_dict(res)
    assert d["total_output_tokens"] == 32 and len(d["requests"]) == 4
    assert d["percentiles_s"]["ttft"]["p50"] == pytest.approx(0.25)


# -- roofline ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k,b", [(1, 1, 1, 4), (1, 4096, 4096, 2), (3, 577, 129, 0.5), (512, 1536, 576, 4)])
def test_arithmetic_intensity_formula(m, n, k, b):
    expected = 2 * m * n * k / (b * (m * k + k * n + m * n))
    assert roofline.arithmetic_intensity(m, n, k, b) == pytest.approx(expected)
    assert roofline.intensity(m, n, k, b) == pytest.approx(expected)


def test_decode_is_memory_bound_and_prefill_compute_bound_on_h100():
    # decode: one token through a 4096x4096 bf16 weight -> about 1 FLOP per byte
    dec = roofline.intensity(1, 4096, 4096, 2)
    assert dec == pytest.approx(1.0, rel=1e-3)
    assert dec < roofline.H100_BF16.ridge_point < roofline.intensity(4096, 4096, 4096, 2)
    assert roofline.H100_BF16.ridge_point == pytest.approx(722e12 / 3.0e12)
    assert roofline.H100_BF16.attainable(dec) == pytest.approx(dec * 3.0e12)
    assert roofline.H100_BF16.attainable(1e4) == 722e12
    # intensity grows with the number of tokens m, towards the ceiling 2nk / (b (n + k)) as m -> infinity
    vals = list(roofline.linear_intensities([1, 2, 8, 64, 1024], 576, 1536, 4).values())
    assert vals == sorted(vals) and vals[-1] < 2 * 576 * 1536 / (4 * (576 + 1536))


@pytest.mark.parametrize("bad", [dict(m=0), dict(n=-1), dict(k=2.0), dict(bytes_per_element=0)])
def test_intensity_validates(bad):
    args = dict(m=1, n=2, k=3, bytes_per_element=2) | bad
    with pytest.raises(ValueError, match="must be"):
        roofline.intensity(**args)


def test_measurements_are_positive_and_plot_builds(tmp_path):
    peak = roofline.measure_machine(size=128, num_bytes=1 << 20)
    assert peak.flops > 1e6 and peak.bandwidth > 1e6 and math.isfinite(peak.ridge_point)
    t = roofline.time_matmul(3, 5, 7, repeats=3)
    assert 0 < t < 1
    fig = roofline.plot_roofline([peak, roofline.H100_BF16], [("decode", 1.0)], [("x", 2.0, 1e8)])
    fig.savefig(tmp_path / "roof.png")
    assert (tmp_path / "roof.png").stat().st_size > 1000


# -- workload ------------------------------------------------------------------------------------------------
class WordTokenizer:
    """One id per character: enough to check the windowing."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_synthetic_prompts_exact_lengths_and_deterministic():
    from minillm.bench.workload import corpus_text, synthetic_prompts

    assert len(corpus_text()) > 10_000
    a = synthetic_prompts(WordTokenizer(), 5, 37, seed=3)
    assert [len(p) for p in a] == [37] * 5 and a == synthetic_prompts(WordTokenizer(), 5, 37, seed=3)
    assert a != synthetic_prompts(WordTokenizer(), 5, 37, seed=4)
    assert len(synthetic_prompts(WordTokenizer(), 2, 100_000)[1]) == 100_000  # longer than the corpus: repeats
    with pytest.raises(ValueError, match="got 0 and 5"):
        synthetic_prompts(WordTokenizer(), 0, 5)


def test_bench_cli_rejects_bad_sizes_before_loading(capsys):
    from minillm.bench.cli import main

    assert main(["bench", "--output-len", "0"]) == 2
    assert "output_len must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--input-len", "30", "--output-len", "4", "--max-model-len", "20"]) == 2
    assert "max_model_len=20 cannot hold" in capsys.readouterr().err


def test_bench_refuses_a_prompt_past_the_models_context_before_loading(monkeypatch, capsys):
    """Without --max-model-len, `--input-len 100000` loaded and warmed up the model (14 s) before the engine
    refused the prompt. The model's context is read from its config (GGUF metadata, no weights) and resolved as
    the engine will (capped on a CPU) before anything loads."""
    import minillm
    from minillm.bench.cli import main
    from minillm.engine.cache_config import CPU_MAX_MODEL_LEN

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(minillm, "LLM", no_loading)
    assert main(["bench", "--input-len", "100000", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == (f"minillm bench: error: input_len + output_len = 100032 tokens exceed max_model_len="
                   f"{CPU_MAX_MODEL_LEN} (the default: the model's context of 8192 tokens, capped at "
                   f"{CPU_MAX_MODEL_LEN} on cpu); give shorter lengths\n"), err
    assert main(["bench", "--input-len", "9000", "--max-model-len", "9100", "--device", "cpu"]) == 2
    assert "max_model_len=9100 exceeds the model's context of 8192 tokens" in capsys.readouterr().err


# -- a real run ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_run_two_prompts_four_tokens():
    llm_mod = pytest.importorskip("minillm.llm")
    from minillm import SamplingParams

    llm = llm_mod.LLM(seed=0)
    outs, res = harness.run_workload(llm, ["The capital of France is", "1, 2, 3,"],
                                     SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(outs) == 2 and res.total_output_tokens == 8
    assert all(r.ttft > 0 and r.tpot > 0 and r.latency >= r.ttft for r in res.requests)
    assert res.output_throughput == pytest.approx(8 / res.wall_time)
    torch.testing.assert_close(torch.tensor(res.percentiles["ttft"]["p50"]),
                               torch.tensor(harness.percentile([r.ttft for r in res.requests], 50)))


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    pytest.importorskip("minillm.llm")
    import io

    from minillm.bench.demo import DEMO_QUESTIONS, run_demo

    buf = io.StringIO()
    res = run_demo(max_tokens=3, out_dir=tmp_path, out=buf)
    text = buf.getvalue()
    assert res.num_requests == len(DEMO_QUESTIONS) == 8
    assert all(1 <= r.num_output_tokens <= 3 for r in res.requests)
    assert "assistant> " in text and "output tok/s" in text and "TTFT" in text
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        run_demo(max_tokens=0, out_dir=tmp_path, out=buf)


def test_p6_bound_counts_the_runs_bytes_and_flops():
    """benchmarks/p6_bound.py: KV positions read, steps and FLOPs of a hand-checked workload; the lower bound is
    below the prefill-first schedule's estimate (it holds for every schedule)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from p6_bound import bound, model_sizes
    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=32)
    layer_params, head_params, kv_per_pos = model_sizes(cfg)
    assert (layer_params, head_params, kv_per_pos) == (2 * (64 + 2 * 8 * 4 + 64 + 3 * 8 * 16), 256, 2 * 2 * 4 * 2)
    # input 10, output 4: decode steps at positions 10, 11, 12 read 10 + 11 + 12 = 33 positions
    result = bound([10], [4], bandwidth=1e3, peak=1e4, cfg=cfg)
    assert result["kv_bytes"] == 33 * kv_per_pos and result["steps_at_least"] == 4
    assert math.isclose(result["gemm_tflop"] * 1e12, 2 * layer_params * (10 + 3) + 2 * head_params * 4)
    s = result["seconds"]
    assert math.isclose(s["lower_bound"], s["kv_reads"] + max(s["weight_reads"], s["gemm"]))
    assert s["lower_bound"] <= s["prefill_first"]


def test_replay_ngram_async_counts_steps_by_hand():
    """benchmarks/replay_ngram_async.py on a hand-checked request: the prompt [1, 2, 3, 9] and the output
    [1, 2, 3, 4]. Token 1 comes from the prefill. sync: known [1,2,3,9,1] looks up (1) and drafts [2, 3, 9]; 2 and
    3 are accepted, 9 is not (4 came): one verify step emits 3 tokens. async: the same verify step (nothing is in
    flight at the start). plain: 3 async steps."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from replay_ngram_async import replay
    cost = {"verify": 2.0, "sync_plain": 1.5, "async_plain": 1.0, "drain": 0.5}
    requests = [{"prompt": [1, 2, 3, 9], "output": [1, 2, 3, 4]}]
    sync = replay(requests, "sync", 5, 1, 3, cost)
    assert (sync["verify"], sync["sync_plain"], sync["tokens"], sync["ms"]) == (1, 0, 3, 2.0)
    assert replay(requests, "async", 5, 1, 3, cost)["ms"] == 2.0
    plain = replay(requests, "plain", 5, 1, 3, cost)
    assert (plain["async_plain"], plain["ms"]) == (3, 3.0)
    # nothing repeats: sync pays a synchronous step per token, async runs them async (the guess finds nothing)
    novel = [{"prompt": [5, 6], "output": [7, 8, 10, 11]}]
    assert replay(novel, "sync", 5, 1, 3, cost)["ms"] == 4.5
    assert replay(novel, "async", 5, 1, 3, cost)["ms"] == 3.0


def test_bench_decode_engine_run_on_the_cpu_with_a_context_limit():
    """benchmarks/bench_decode.py's engine run (P5's code path) on a tiny model on the CPU:
    the context limit it is given is the engine's, a limit below one request is refused, and the shapes table
    holds the bundled model's."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_decode as bd
    from test_engine import tiny_config, tiny_model

    config = tiny_config(num_hidden_layers=2, max_position_embeddings=512)
    model = tiny_model(config)
    run = bd.run_engine(model, config, prompt_len=8, output_len=4, batch=2, enforce_eager=True, device="cpu",
                        max_model_len=256)
    assert run["decode_tok_per_s"] > 0 and len(run["first_tokens"]) == 4 and not run["cuda_graphs"]
    with pytest.raises(ValueError, match="max_model_len=16"):
        bd.run_engine(model, config, prompt_len=8, output_len=4, batch=1, enforce_eager=True, device="cpu",
                      max_model_len=16)
    from minillm.loader import load_model
    from minillm.loader.model_files import default_model_path
    bundled = load_model(default_model_path())[0]
    for name, value in bd.SHAPES["smollm2-135m"].items():  # random weights of exactly the bundled model's shapes
        assert getattr(bundled, name) == pytest.approx(value), name


def test_profile_async_step_smoke_on_the_cpu(tmp_path):
    """benchmarks/profile_async_step.py on a 2-layer toy: a row per (batch, mode) with the host time of the step
    and of its parts, and every wrapped method put back afterwards."""
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import profile_async_step as pa
    from minillm.engine.cuda_graph import DecodeCUDAGraphs
    from minillm.engine.llm_engine import LLMEngine

    step, init = LLMEngine.step, DecodeCUDAGraphs.__init__
    out = tmp_path / "r.json"
    assert pa.main(["--device", "cpu", "--batch", "1", "2", "--output-len", "3", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["batch"], r["async_scheduling"]) for r in runs] == [(1, False), (1, True), (2, False), (2, True)]
    for r in runs:
        assert r["tok_per_s"] > 0 and r["host"]["LLMEngine.step"]["calls_per_step"] == 1.0
    assert "AsyncSteps._read" in runs[1]["host"] and "AsyncSteps._read" not in runs[0]["host"]
    assert LLMEngine.step is step and DecodeCUDAGraphs.__init__ is init
    with pytest.raises(SystemExit):
        pa.main(["--device", "cpu", "--batch", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            pa.main([])  # the default device is CUDA: a clear error, not a traceback from deep in torch


def test_profile_spec_step_smoke_on_the_cpu(tmp_path):
    """benchmarks/profile_spec_step.py --quick: plain decoding and an n-gram variant each get per-step op times on a
    toy model, the speculative one in fewer steps (its drafts are accepted on the repeated prompt), and bad sizes
    are refused before anything loads."""
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import profile_spec_step as ps

    out = tmp_path / "k.json"
    assert ps.main(["--quick", "--methods", "ngram", "--max-tokens", "12", "--top", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"plain", "ngram"}
    for r in res.values():
        assert r["steps"] > 0 and r["us_per_step"] > 0 and r["per_step"][0][2] >= r["per_step"][-1][2]
    assert res["ngram"]["steps"] <= res["plain"]["steps"]
    with pytest.raises(SystemExit):
        ps.main(["--quick", "--k", "0", "--out", str(out)])


def test_warm_up_meets_every_step_shape_before_a_timed_run():
    """After warm_up, the CPU matmul has timed its layouts for every row class a run meets (one row, 2-16 rows, a
    prefill of 17+), so no timed request pays for that timing."""
    from minillm import LLM
    from minillm.layers.cpu_matmul import clear_cpu_matmul_cache, cpu_matmul_decisions

    llm = LLM(max_model_len=64, seed=0)
    clear_cpu_matmul_cache()
    assert harness.warm_up(llm) > 0
    assert {key[3] for key in cpu_matmul_decisions()} == {"1", "2-16", "17+"}


def test_warm_up_fits_a_short_context():
    """minillm bench --max-model-len 8: the warm-up's prompt and tokens shrink to the context, not fail."""
    from minillm import LLM

    assert harness.warm_up(LLM(max_model_len=8, seed=0)) > 0


def test_save_figure_returns_the_file_it_wrote(tmp_path):
    """A name without a format's extension gets matplotlib's .png, and the path returned (the one the CLI prints)
    says so; a known extension is kept."""
    from matplotlib.figure import Figure

    from minillm.bench.plots import save_figure
    assert save_figure(Figure(), tmp_path / "stack") == str(tmp_path / "stack.png")
    assert (tmp_path / "stack.png").is_file()
    assert save_figure(Figure(), tmp_path / "sub" / "stack.svg") == str(tmp_path / "sub" / "stack.svg")


def test_request_table_numbers_requests_as_the_workload_does():
    """The engine's request ids count warm-up requests too (the demo's 8 prompts came out as requests 4..11): the
    table numbers each request by its place in the workload, the prompts' [0]..[n-1]."""
    outs = [make_output(str(40 + i), 5, 3, arrival=0.0, first=0.1, finish=0.2 + i) for i in range(3)]
    outs.insert(1, make_output("41x", 4, 0, 0.0, None, 0.05, finish_reason="error"))  # a failed one keeps its place
    table = harness.format_requests(harness.summarize(outs))
    rows = [line.split()[0] for line in table.splitlines()[2:5]]
    assert rows == ["0", "2", "3"], table


def test_bench_latency_times_one_batch_per_iteration_with_a_cold_prefix_cache(capsys):
    """`minillm bench latency` on a tiny engine: num_iters timings of one batch, each after reset_prefix_cache (so
    each pays its prefill: the prefix cache gains no hit), the mean and percentiles of them; bad sizes refused
    before anything loads."""
    from minillm.bench.cli import main
    from minillm.bench.latency import format_latency, run_latency, to_dict
    from minillm.llm import LLM
    from test_engine import make_engine, tiny_config, tiny_model

    config = tiny_config()
    llm = LLM.from_engine(make_engine((tiny_model(config), config), scheduling="continuous", kv_layout="paged",
                                      block_size=4, enable_prefix_caching=True))
    block_manager, generate, hits = llm.llm_engine.scheduler.block_manager, llm.generate, []

    def counting(*args, **kwargs):  # the prefix-cache hits of each batch
        before = block_manager.prefix_cache_hits
        out = generate(*args, **kwargs)
        hits.append(block_manager.prefix_cache_hits - before)
        return out
    llm.generate = counting
    result = run_latency(batch_size=3, input_len=12, output_len=5, num_iters=4, num_iters_warmup=1, llm=llm,
                         verbose=False)
    assert len(result.latencies) == 4 and all(t > 0 for t in result.latencies)
    assert min(result.latencies) <= result.percentiles["p50"] <= result.percentiles["p99"] <= max(result.latencies)
    assert result.mean == pytest.approx(sum(result.latencies) / 4)
    assert len(hits) == 2 + 5 and hits[1] > 0 and hits[2:] == [0] * 5  # warm_up's two calls, then cold batches
    assert "avg latency" in format_latency(result) and to_dict(result)["tokens_per_s"] == result.tokens_per_s
    assert main(["bench", "latency", "--num-iters", "0"]) == 2
    assert "num_iters must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "latency", "--batch-size", "0"]) == 2
    assert "batch_size must be an integer >= 1, got 0" in capsys.readouterr().err


def test_bench_window_release_smoke_on_the_cpu(tmp_path):
    """benchmarks/bench_window_release.py --smoke: on a pool that holds few whole prompts, the release runs more
    sequences at once than keeping every block, with the same greedy tokens (the script raises if they differ)
    and every block given back."""
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_window_release as bw

    out = tmp_path / "w.json"
    bw.main(["--smoke", "--out", str(out)])
    release, held = json.loads(out.read_text())["rows"]
    assert (release["mode"], held["mode"]) == ("release", "held")
    assert release["max_running"] > held["max_running"]
    with pytest.raises(ValueError, match="must exceed the window"):
        bw.main(["--smoke", "--prompt-len", "10"])
