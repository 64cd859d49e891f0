"""A model's generation_config.json as its sampling defaults (minillm/loader/generation_config.py, vLLM's
generation_config="auto"): read and checked, used by LLM.generate without sampling_params, and by the server
wherever a request leaves a knob out; max_new_tokens caps every completion."""
from __future__ import annotations

import argparse
import json

import httpx
import pytest

from minillm import LLM, SamplingParams
from minillm.loader.generation_config import default_sampling_fields
from minillm.serve.cli import add_model_options
from minillm.serve.server import ServerThread
from serve_tiny import tiny_app, tiny_engine
from tiny import one_thread, tiny_qwen2_checkpoint  # noqa: F401  (one_thread: autouse fixture)

QWEN_LIKE = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
             "eos_token_id": [1, 2], "max_new_tokens": 5}


def _write(directory, config) -> None:
    (directory / "generation_config.json").write_text(json.dumps(config))


def test_the_sampling_fields_are_read_under_sampling_params_names(tmp_path):
    _write(tmp_path, QWEN_LIKE)
    assert default_sampling_fields(str(tmp_path)) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                      "repetition_penalty": 1.05, "max_tokens": 5}
    assert default_sampling_fields(str(tmp_path), "vllm") == {}
    assert default_sampling_fields(str(tmp_path), "vllm", {"temperature": 0.0}) == {"temperature": 0.0}
    assert default_sampling_fields(str(tmp_path / "model.gguf")) == {}  # a GGUF file has no generation config
    other = tmp_path / "other"
    other.mkdir()
    _write(other, {"top_k": 3})
    assert default_sampling_fields(str(tmp_path), str(other), {"min_p": 0.1}) == {"top_k": 3, "min_p": 0.1}
    with pytest.raises(ValueError, match="no generation_config.json there"):
        default_sampling_fields(str(tmp_path), str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown field 'do_sample'; allowed: temperature"):
        default_sampling_fields(str(tmp_path), override={"do_sample": False})
    with pytest.raises(ValueError, match="not valid sampling parameters.*temperature"):
        default_sampling_fields(str(tmp_path), override={"temperature": -1.0})
    (other / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        default_sampling_fields(str(tmp_path), str(other))


def test_llm_generate_without_sampling_params_takes_the_models_defaults(tmp_path):
    tiny_qwen2_checkpoint(tmp_path)
    _write(tmp_path, {"temperature": 0.0, "max_new_tokens": 3})
    llm = LLM(str(tmp_path), num_kv_blocks=32, block_size=4)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0.0, 3)
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    out = llm.generate(["a b w5 w7"])[0].outputs[0]
    assert out.token_ids == llm.generate(["a b w5 w7"], greedy)[0].outputs[0].token_ids and len(out.token_ids) <= 3
    assert len(llm.generate(["a b"], SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids) == 8
    plain = LLM(str(tmp_path), num_kv_blocks=32, block_size=4, generation_config="vllm")
    assert plain.get_default_sampling_params().max_tokens == SamplingParams().max_tokens


def test_the_server_fills_what_a_request_leaves_out_and_caps_its_length():
    engine = tiny_engine()
    engine.generation_defaults = {"temperature": 0.0, "max_tokens": 4}
    app, _ = tiny_app(engine)
    with ServerThread(app) as srv:
        def complete(**fields):
            body = {"prompt": "hello", "ignore_eos": True, **fields}
            response = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()

        left_out, explicit = complete(), complete(temperature=0.0, max_tokens=4)
        assert left_out["choices"][0]["text"] == explicit["choices"][0]["text"]
        assert left_out["usage"]["completion_tokens"] == 4
        assert complete(max_tokens=10)["usage"]["completion_tokens"] == 4  # max_new_tokens: a server-wide cap
        response = httpx.post(srv.url + "/v1/responses", json={"input": "hi"}, timeout=30).json()
        assert response["temperature"] == 0.0 and response["top_p"] == 1.0


def test_serve_and_run_batch_take_vllms_flags(capsys):
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    args = parser.parse_args(["--generation-config", "vllm", "--override-generation-config", '{"temperature": 0.5}'])
    assert (args.generation_config, args.override_generation_config) == ("vllm", {"temperature": 0.5})
    assert parser.parse_args([]).generation_config == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--override-generation-config", "[0.5]"])
    assert "must be a JSON object" in capsys.readouterr().err
