"""LLM(load_format="dummy"), vLLM's: the config and tokenizer only (a directory needs no safetensors), random
weights of their shapes drawn the same in every process, so one process and tensor parallelism agree."""
from __future__ import annotations

import os
import shutil

import pytest

from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from tiny import tiny_qwen2_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10]]
OPTIONS = dict(device="cpu", max_model_len=64, num_kv_blocks=32, block_size=4)


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """(a checkpoint, the same without its weights: config.json and the tokenizer only)."""
    full = tmp_path_factory.mktemp("full")
    tiny_qwen2_checkpoint(full)
    bare = tmp_path_factory.mktemp("bare")
    for name in os.listdir(full):
        if not name.endswith(".safetensors") and not name.endswith(".index.json"):
            shutil.copy(full / name, bare / name)
    return full, bare


def tokens(llm: LLM) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]


def test_dummy_weights_need_no_checkpoint_and_agree_across_processes(directories):
    full, bare = directories
    dummy = tokens(LLM(bare, load_format="dummy", **OPTIONS))
    assert dummy == tokens(LLM(full, load_format="dummy", **OPTIONS))  # the checkpoint's weights are not read
    assert dummy != tokens(LLM(full, **OPTIONS))
    assert tokens(LLM(bare, load_format="dummy", seed=1, **OPTIONS)) != dummy  # the seed draws them
    tp = LLM(bare, load_format="dummy", tensor_parallel_size=2, **OPTIONS)
    try:
        assert tokens(tp) == dummy  # each rank draws the full tensors and keeps its shard
    finally:
        tp.llm_engine.shutdown()
    with pytest.raises(ValueError, match="load_format must be 'auto'.*got 'pt'"):
        LLM(full, load_format="pt", **OPTIONS)
    with pytest.raises(FileNotFoundError):
        LLM(bare, **OPTIONS)  # without dummy the weights are needed


def test_a_tokenizer_from_another_path(directories, tmp_path):
    """LLM(model, tokenizer=path), vLLM's: the tokenizer is read from another HF directory (or a .gguf file) than
    the weights; one with more tokens than the model's vocabulary is refused, naming both sizes."""
    full, _ = directories
    only_tokenizer = tmp_path / "tok"
    only_tokenizer.mkdir()
    shutil.copy(full / "tokenizer.json", only_tokenizer / "tokenizer.json")
    own = LLM(full, **OPTIONS)
    other = LLM(full, tokenizer=only_tokenizer, **OPTIONS)
    assert other.get_tokenizer().source == os.fspath(only_tokenizer) != own.get_tokenizer().source
    text = [o.outputs[0].text for o in other.generate(["a b ab w7"], GREEDY)]
    assert text == [o.outputs[0].text for o in own.generate(["a b ab w7"], GREEDY)] and text[0]
    from minillm.loader.model_files import default_model_path
    with pytest.raises(ValueError, match=r"has 49152 tokens, more than the model's vocabulary of 112: it is not"):
        LLM(full, tokenizer=default_model_path(), **OPTIONS)  # SmolLM2's GGUF tokenizer
    with pytest.raises(FileNotFoundError, match="tokenizer='/no/such/dir': no such file or directory"):
        LLM(full, tokenizer="/no/such/dir", **OPTIONS)
    with pytest.raises(TypeError, match="tokenizer must be a path"):
        LLM(full, tokenizer=3, **OPTIONS)
    with pytest.raises(ValueError, match="tokenizer"):
        own.share_model(tokenizer=only_tokenizer)


def test_skip_tokenizer_init_runs_on_token_ids_without_tokenizer_files(directories, tmp_path):
    """LLM(skip_tokenizer_init=True), vLLM's: no tokenizer is read (a directory with config.json alone serves);
    token ids in, the same token ids out as with the tokenizer, empty text; what needs text is refused by name."""
    _, bare = directories
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(bare / "config.json", config_only / "config.json")
    llm = LLM(config_only, load_format="dummy", skip_tokenizer_init=True, **OPTIONS)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == tokens(LLM(bare, load_format="dummy", **OPTIONS))
    assert [o.outputs[0].text for o in outs] == ["", ""]
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["some text"], GREEDY)
    with pytest.raises(ValueError, match="stop strings \\['w3'\\] are matched in the output text, and this engine "
                                         "has no tokenizer"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=4, stop=["w3"]))
    with pytest.raises(ValueError, match="a chat needs a tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="not both"):
        LLM(bare, load_format="dummy", skip_tokenizer_init=True, tokenizer=bare, **OPTIONS)
    with pytest.raises(TypeError, match="skip_tokenizer_init must be a bool"):
        LLM(bare, load_format="dummy", skip_tokenizer_init="yes", **OPTIONS)


def test_no_tokenizer_refuses_constraints_and_gives_logprobs_without_text(directories):
    _, bare = directories
    llm = LLM(bare, load_format="dummy", skip_tokenizer_init=True, **OPTIONS)
    from minillm.sampling_params import StructuredOutputsParams
    with pytest.raises(ValueError, match="structured_outputs needs a tokenizer that gives each token's bytes"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="a+")))
    with pytest.raises(ValueError, match="bad_words needs a tokenizer that gives each token's bytes"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=4, bad_words=["a"]))
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=2, logprobs=2))[0].outputs[0]
    assert len(out.logprobs) == 2 and {lp.decoded_token for entry in out.logprobs for lp in entry.values()} == {""}


def test_serve_skip_tokenizer_init_answers_token_ids_and_refuses_text(directories, tmp_path):
    """`minillm serve --skip-tokenizer-init` (vLLM's) on a directory with config.json alone: /v1/completions takes
    token-id prompts and gives return_token_ids' ids (those LLM.generate gives with the tokenizer), empty text;
    a text prompt, a chat and /tokenize are 400s naming the flag; flags that need text are refused at startup."""
    import httpx
    from minillm.serve.cli import build_served_app, check_server_options
    from minillm.serve.server import ServerThread
    from test_serve_cli import _parse

    _, bare = directories
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(bare / "config.json", config_only / "config.json")
    args = _parse(str(config_only), "--skip-tokenizer-init", "--load-format", "dummy", "--device", "cpu",
                  "--max-model-len", "64", "--num-kv-blocks", "32", "--block-size", "4")
    llm, app, _ = build_served_app(args)
    body = {"prompt": PROMPTS, "temperature": 0, "max_tokens": 6, "ignore_eos": True, "return_token_ids": True}
    with ServerThread(app) as srv:
        done = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert done.status_code == 200, done.text
        choices = done.json()["choices"]
        assert [c["token_ids"] for c in choices] == tokens(LLM(bare, load_format="dummy", **OPTIONS))
        assert [c["prompt_token_ids"] for c in choices] == PROMPTS and {c["text"] for c in choices} == {""}
        for path, request in (("/v1/completions", {"prompt": "hi"}),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                              ("/tokenize", {"prompt": "hi"})):
            refused = httpx.post(srv.url + path, json=request, timeout=30)
            assert refused.status_code == 400 and "tokenizer" in refused.json()["error"]["message"], refused.text
    llm.llm_engine.shutdown()
    for flag in (["--chat-template", "t.jinja"], ["--reasoning-parser", "qwen3"], ["--tokenizer", str(bare)]):
        with pytest.raises(ValueError, match=f"--skip-tokenizer-init serves token ids only; {flag[0]} needs a "
                                             f"tokenizer"):
            check_server_options(_parse("--skip-tokenizer-init", *flag))


def test_hf_overrides_change_the_config_and_cut_a_checkpoint_to_its_first_layers(directories):
    """LLM(hf_overrides=...), vLLM's: fields that keep the tensors' shapes apply to a checkpoint (num_hidden_layers
    reads its first layers, the same model as the full one cut there); shape changes need random weights; an
    unknown field or a bad value is refused by name."""
    import torch
    from minillm.loader import load_model
    from minillm.loader.hf_overrides import first_layers
    from minillm.engine.worker import build_model

    full, bare = directories
    cut = LLM(full, hf_overrides={"num_hidden_layers": 1, "max_position_embeddings": 512}, **OPTIONS)
    config = cut.llm_engine.model_config
    assert (config.num_hidden_layers, config.max_position_embeddings) == (1, 512)
    reference_config, weights, _ = load_model(full)
    one_layer = build_model(config, first_layers(weights, 1), torch.device("cpu"), torch.float32)
    expected = []
    for prompt in PROMPTS:  # greedy decoding with the cut checkpoint, one full forward per token
        ids = list(prompt)
        for _ in range(GREEDY.max_tokens):
            with torch.inference_mode():
                hidden = one_layer(torch.tensor(ids), torch.arange(len(ids)))
                ids.append(int(one_layer.compute_logits(hidden)[-1].argmax()))
        expected.append(ids[len(prompt):])
    assert tokens(cut) == expected != tokens(LLM(full, **OPTIONS))
    tp = LLM(full, hf_overrides={"num_hidden_layers": 1}, tensor_parallel_size=2, **OPTIONS)
    try:  # each worker process reads the checkpoint itself and cuts it the same way
        assert tokens(tp) == expected
    finally:
        tp.llm_engine.shutdown()
    assert reference_config.num_hidden_layers > 1
    windowed = LLM(full, hf_overrides={"sliding_window": 4}, **OPTIONS)
    assert windowed.llm_engine.model_config.sliding_window == 4 and tokens(windowed) != tokens(LLM(full, **OPTIONS))
    wide = LLM(bare, load_format="dummy", hf_overrides={"hidden_size": 128, "num_attention_heads": 8}, **OPTIONS)
    assert (wide.llm_engine.model_config.hidden_size, wide.llm_engine.model_config.head_dim) == (128, 16)
    assert len(tokens(wide)[0]) == GREEDY.max_tokens
    with pytest.raises(ValueError, match=r"changes the shape of the checkpoint's weights \(hidden_size\)"):
        LLM(full, hf_overrides={"hidden_size": 128}, **OPTIONS)
    with pytest.raises(ValueError, match="the checkpoint has only 2 layers"):
        LLM(full, hf_overrides={"num_hidden_layers": 3}, **OPTIONS)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['hidden_dim'\]; allowed: architecture"):
        LLM(full, hf_overrides={"hidden_dim": 64}, **OPTIONS)
    with pytest.raises(ValueError, match="ModelConfig.rope_theta must be a finite number > 0, got -1"):
        LLM(full, hf_overrides={"rope_theta": -1}, **OPTIONS)
    with pytest.raises(TypeError, match="hf_overrides must be a mapping"):
        LLM(full, hf_overrides=[("rope_theta", 2.0)], **OPTIONS)
