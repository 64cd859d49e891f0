"""LLM.get_metrics (vLLM's): the /metrics collectors read back as objects after offline generation, and only with
LLM(disable_log_stats=False)."""
from __future__ import annotations

import pytest

from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from minillm.serve.metrics_reader import Counter, Gauge, Histogram
from tiny import one_thread, tiny_qwen2_checkpoint  # noqa: F401 (one_thread: autouse fixture)

OPTIONS = dict(device="cpu", max_model_len=64, num_kv_blocks=32, block_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_qwen2_checkpoint(path)
    return path


def by_name(metrics) -> dict[str, list]:
    found: dict[str, list] = {}
    for m in metrics:
        found.setdefault(m.name.removeprefix("minillm:"), []).append(m)
    return found


def test_metrics_count_what_generate_did(checkpoint):
    llm = LLM(checkpoint, disable_log_stats=False, enable_prefix_caching=True, **OPTIONS)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6, 7, 8, 9, 10, 11, 12, 14], [20, 21]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 5, 4)]
    outs = llm.generate(prompts[:1], params[:1]) + llm.generate(prompts[1:], params[1:])  # the first one cached
    metrics = by_name(llm.get_metrics())
    assert [m.value for m in metrics["generation_tokens"]] == [sum(len(o.outputs[0].token_ids) for o in outs)]
    assert [m.value for m in metrics["prompt_tokens"]] == [20]
    assert {m.labels["finished_reason"]: m.value for m in metrics["request_success"]} == {"length": 3}
    assert isinstance(metrics["num_requests_running"][0], Gauge) and metrics["num_requests_running"][0].value == 0
    hits = metrics["prefix_cache_hits"][0]
    assert isinstance(hits, Counter) and hits.value == 8  # the second prompt's first two 4-token blocks
    ttft = metrics["time_to_first_token_seconds"][0]
    assert isinstance(ttft, Histogram) and ttft.count == 3 and ttft.buckets["+Inf"] == 3 and ttft.sum > 0
    counts = list(ttft.buckets.values())
    assert counts == sorted(counts)  # cumulative
    assert {m.labels["sleep_state"]: m.value for m in metrics["engine_sleep_state"]}["awake"] == 1.0


def test_metrics_need_log_stats_on(checkpoint):
    with pytest.raises(ValueError, match="disable_log_stats=False"):
        LLM(checkpoint, **OPTIONS).get_metrics()
    with pytest.raises(TypeError, match="disable_log_stats must be a bool"):
        LLM(checkpoint, disable_log_stats="no", **OPTIONS)
