"""`minillm bench serve` against the tiny server on 127.0.0.1: arrivals, the numbers' consistency, goodput, plot."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minillm.bench.cli import main as bench_main
from minillm.bench.serve import MAX_SCHEDULE_S, arrival_times, bench_serve, docstring_prompts, plot_latency_vs_rate, to_json
from minillm.serve.server import ServerThread
from serve_tiny import tiny_app
from tiny import one_thread  # noqa: F401 (autouse fixture)

PROMPTS = [f"prompt number {i} " + "abc " * (i % 5) for i in range(12)]


def test_arrival_times():
    times = arrival_times(4000, 20.0, "poisson", seed=1)
    gaps = np.diff([0.0] + times)
    assert np.all(gaps >= 0) and abs(gaps.mean() - 1 / 20) < 0.005  # exponential with mean 1/rate
    assert abs(gaps.std() - 1 / 20) < 0.005  # an exponential's std equals its mean (Poisson arrivals)
    assert arrival_times(5, math.inf) == [0.0] * 5 == arrival_times(5, 3.0, "burst")
    assert arrival_times(50, 2.0, seed=3) == arrival_times(50, 2.0, seed=3)
    for bad in ((5, 0.0, "poisson"), (5, -1.0, "poisson"), (5, 1.0, "uniform")):
        with pytest.raises(ValueError):
            arrival_times(*bad)
    # 1e-300 put the first request 7e299 s ahead (1e-320: inf): the run slept forever
    for rate in (1e-300, 1e-320, 2 / MAX_SCHEDULE_S * 0.99):
        with pytest.raises(ValueError, match=r"request_rate .* sends 2 requests over about .* s; the schedule may "
                                             r"last at most 86,400 s \(a day\): give a rate >= 2.31e-05 requests/s"):
            arrival_times(2, rate)
    assert len(arrival_times(2, 2 / MAX_SCHEDULE_S)) == 2 and arrival_times(2, 1e-300, "burst") == [0.0, 0.0]


@pytest.mark.parametrize("rates", ["1e-300", "1e-320", "1000,1e-300"])
def test_cli_refuses_a_rate_whose_arrivals_never_end_before_any_request(rates, capsys):
    """Checked for every rate of a sweep before the first run (no server is needed to be refused)."""
    assert bench_main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "2",
                       "--request-rate", rates]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm bench serve: error: --request-rate 1e-3") and "at most 86,400 s" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, words", [(["--model", "nosuch"], "nosuch"), (["--output-len", "1000000000"], "")])
def test_cli_exits_1_when_no_request_succeeded(flags, words, capsys):
    """Every request failed (a model the server does not serve, answers beyond its context): a table of nan and
    exit 0 before; now one line with the first error, and exit 1."""
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        code = bench_main(["bench", "serve", "--base-url", srv.url, "--num-prompts", "2", "--max-prompt-chars", "30",
                           *flags])
    captured = capsys.readouterr()
    assert code == 1 and "nan" not in captured.out, captured
    err = captured.err.strip()
    assert err.startswith("minillm bench serve: error: no request succeeded at --request-rate inf (2 sent); "
                          "the first error: ") and words in err and len(err.splitlines()) == 1, err


def test_docstring_prompts_are_real_text_and_deterministic():
    prompts = docstring_prompts(5, max_chars=120, seed=2)
    assert prompts == docstring_prompts(5, max_chars=120, seed=2) and len(set(prompts)) == 5
    assert all(8 < len(p) <= 120 and " " in p for p in prompts)


def test_bench_serve_against_the_tiny_server(tmp_path):
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        burst = bench_serve(srv.url, PROMPTS, math.inf, output_len=4, slo_ttft_ms=1e9, slo_tpot_ms=1e9)
        paced = bench_serve(srv.url, PROMPTS, 200.0, output_len=4, slo_ttft_ms=0.0)
        code = bench_main(["bench", "serve", "--base-url", srv.url, "--num-prompts", "4", "--max-prompt-chars", "30",
                           "--output-len", "3", "--request-rate", "50,inf", "--json", str(tmp_path / "r.json"),
                           "--plot", str(tmp_path / "r.png")])
    for r in (burst, paced):
        assert r.completed == r.num_requests == 12 and not r.errors
        assert r.output_throughput * r.duration_s == pytest.approx(12 * 4)  # usage: 4 tokens each
        lat = r.latency_ms
        assert lat["ttft"]["mean"] <= lat["e2e"]["mean"] and lat["ttft"]["median"] <= lat["ttft"]["p99"]
        assert lat["tpot"]["mean"] > 0 and lat["itl"]["p90"] <= lat["itl"]["p99"]
    assert burst.arrival == "burst" and burst.goodput == pytest.approx(burst.request_throughput)  # an SLO everyone meets
    assert paced.goodput == 0.0  # nobody gets a first token in 0 ms
    assert code == 0 and [r["request_rate"] for r in json.loads((tmp_path / "r.json").read_text())] == [50.0, "inf"]
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert json.loads(to_json([burst]))[0]["completed"] == 12
    plot_latency_vs_rate([paced, burst])
