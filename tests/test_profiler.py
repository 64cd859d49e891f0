"""start_profile / stop_profile, vLLM's (minillm/engine/profiler.py): Chrome traces of the engine process and of
every worker process, written where asked, holding the model's operators; the server's endpoints exist only with
a profiler directory; misuse is a clear error."""
from __future__ import annotations

import json
import os

import httpx
import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine.executor import MultiProcExecutor
from minillm.engine.llm_engine import LLMEngine
from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from minillm.serve.server import ServerThread
from serve_tiny import tiny_app
from test_engine import make_engine, model_and_config  # noqa: F401  (fixture)
from tiny import ByteTokenizer, one_thread  # noqa: F401  (autouse fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def operators(path: str) -> set[str]:
    with open(path) as f:
        return {e.get("name", "") for e in json.load(f)["traceEvents"]}


def test_llm_traces_its_steps(model_and_config, tmp_path, monkeypatch):
    llm = LLM.from_engine(make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4))
    monkeypatch.delenv("MINILLM_TORCH_PROFILER_DIR", raising=False)
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path / "vllm"))
    llm.start_profile()
    with pytest.raises(RuntimeError, match="already being recorded"):
        llm.start_profile()
    llm.generate([[1, 2, 3]], GREEDY)
    (path,) = llm.stop_profile()
    assert os.path.dirname(path) == str(tmp_path / "vllm") and os.path.basename(path).startswith("engine-")
    names = operators(path)
    assert "aten::mm" in names or "aten::addmm" in names or "aten::linear" in names
    with pytest.raises(RuntimeError, match="start_profile"):
        llm.stop_profile()
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR")
    with pytest.raises(RuntimeError, match="MINILLM_TORCH_PROFILER_DIR or VLLM_TORCH_PROFILER_DIR"):
        llm.start_profile()
    llm.start_profile(str(tmp_path / "given"))  # an explicit directory needs no variable
    assert llm.stop_profile()[0].startswith(str(tmp_path / "given"))


def test_tensor_parallel_workers_write_their_own_traces(tmp_path):
    from test_parallel import CONFIG, ENGINE, _kwargs
    config = resolve_engine_config(EngineConfig(**ENGINE, tensor_parallel_size=2), CONFIG, torch.device("cpu"))
    engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE, tensor_parallel_size=2),
                       executor=MultiProcExecutor(dict(_kwargs(), engine_config=config)))
    try:
        engine.start_profile(str(tmp_path))
        engine.add_request(None, [5, 6, 7], GREEDY)
        while engine.has_unfinished_requests():
            engine.step()
        paths = engine.stop_profile()
    finally:
        engine.shutdown()
    assert [os.path.basename(p).split("-")[0] for p in paths] == ["engine", "rank1", "rank2"]
    for rank_trace in paths[1:]:  # each rank's row-parallel layers all-reduce; the engine holds no model
        assert "c10d::allreduce_" in operators(rank_trace)
    assert "c10d::allreduce_" not in operators(paths[0])


def test_the_servers_endpoints_only_with_a_directory(tmp_path):
    app, _ = tiny_app(profile_dir=str(tmp_path))
    with ServerThread(app) as srv:
        assert httpx.post(srv.url + "/start_profile").status_code == 200
        assert httpx.post(srv.url + "/start_profile").status_code == 400
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        traces = httpx.post(srv.url + "/stop_profile").json()["traces"]
        assert len(traces) == 1 and os.path.exists(traces[0])
        assert httpx.post(srv.url + "/stop_profile").status_code == 400
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        assert httpx.post(srv.url + "/start_profile").status_code == 404


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_trace_holds_the_kernels(model_and_config, tmp_path):
    import copy

    from minillm.config import EngineConfig
    model, config = model_and_config
    engine = LLMEngine(copy.deepcopy(model).cuda(), ByteTokenizer(), config, EngineConfig(
        max_model_len=64, max_num_seqs=4, num_kv_blocks=64, block_size=16), device="cuda", dtype=torch.float32)
    engine.start_profile(str(tmp_path))
    engine.add_request(None, [1, 2, 3], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    (path,) = engine.stop_profile()
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)  # the GPU's own activity, not only the host's
