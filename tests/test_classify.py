"""Sequence-classification and reward models (minillm/classification.py; LLM.classify, POST /classify): tiny
random transformers LlamaForSequenceClassification (3 labels, id2label named) and Qwen3ForSequenceClassification
(one label: a reward model) checkpoints, saved with save_pretrained; our probabilities and logits against
transformers' `model(input_ids).logits` (softmax / sigmoid), several prompts of several lengths batched in one
call; the labels; refusals (generation on a classifier, classify on a generative model, bad label configs, a
checkpoint without its head); the server's /classify in vLLM's shape."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from minillm.config import ModelConfig
from minillm.llm import LLM
from minillm.loader.hf import config_from_hf, load_hf_model
from minillm.loader.model_files import expected_weight_shapes, save_safetensors
from minillm.sampling_params import SamplingParams
from tiny import one_thread  # noqa: F401  (autouse fixture)
from tiny_moe import _redrawn, save_with_tokenizer

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=112, max_position_embeddings=128, rms_norm_eps=1e-6, head_dim=8)
LABELS = ["negative", "neutral", "positive"]
OPTIONS = dict(device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=32, block_size=4)
# the last prompt goes through the checkpoint's tokenizer ("a" is 0, "b" 1, "ab" 2)
PROMPTS = [[5, 6, 7], list(range(10, 41)), [9], [17] * 12, "ab a b ab"]


def _checkpoint(directory, kind: str):
    """A seeded random classifier saved with its tokenizer (weights redrawn so the probabilities are far from
    uniform); the transformers model, the oracle."""
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**SHAPE, id2label=dict(enumerate(LABELS)))
        model = transformers.LlamaForSequenceClassification(config)
    else:  # a reward model: one label, whose logit is the reward
        model = transformers.Qwen3ForSequenceClassification(transformers.Qwen3Config(**SHAPE, num_labels=1))
    return save_with_tokenizer(_redrawn(model), directory)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def classifier(request, tmp_path_factory):
    """(directory, transformers model, LLM) of one kind."""
    directory = tmp_path_factory.mktemp(request.param)
    model = _checkpoint(directory, request.param)
    return directory, model, LLM(directory, **OPTIONS)


def _reference(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def test_probs_match_transformers(classifier):
    _, model, llm = classifier
    outs = llm.classify(PROMPTS)  # every prompt in one call: batched by the engine
    one_label = model.config.num_labels == 1
    names = ["LABEL_0"] if one_label else LABELS
    config = llm.llm_engine.model_config
    assert config.labels == names and config.tie_word_embeddings  # (the one token an embedding request samples)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())  # the head counted, no LM head
    for prompt, out in zip(PROMPTS, outs):
        if not isinstance(prompt, str):
            assert out.prompt_token_ids == prompt
        logits = _reference(model, out.prompt_token_ids)
        want = logits.sigmoid() if one_label else logits.softmax(-1)
        torch.testing.assert_close(torch.tensor(out.outputs.logits), logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), want, atol=1e-4, rtol=1e-4)
        assert out.outputs.num_classes == len(names) and out.outputs.label == names[int(logits.argmax())]
    assert len({out.outputs.label for out in outs}) > 1 or one_label  # the prompts disagree: argmax is tested
    assert outs[-1].prompt == PROMPTS[-1] and outs[-1].prompt_token_ids == [2, 0, 1, 2]
    with pytest.raises(ValueError, match="prompt 1"):  # every prompt validated before any work
        llm.classify([[1, 2], []])
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_classifier_does_not_generate(classifier):
    _, model, llm = classifier
    with pytest.raises(ValueError, match=r"llama|qwen3") as err:
        llm.generate([[5, 6]], SamplingParams(max_tokens=2))
    assert "sequence-classification model" in str(err.value) and "LLM.classify" in str(err.value)
    with pytest.raises(ValueError, match="does not generate"):
        llm.llm_engine.add_request(None, [5, 6], SamplingParams(max_tokens=2))
    assert len(llm.embed([[5, 6]])[0].outputs.embedding) == 32  # an embedding request still runs


def test_classify_on_a_generative_model_is_refused():
    from serve_tiny import tiny_engine
    llm = LLM.from_engine(tiny_engine())
    with pytest.raises(ValueError, match="generative model.*not a classification model"):
        llm.classify(["abc"])


def test_the_config_and_weights_of_a_classifier(tmp_path):
    raw = {"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"], "vocab_size": 112,
           "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
           "id2label": {"1": "good", "0": "bad"}, "tie_word_embeddings": False}
    config = config_from_hf(raw)
    assert (config.num_labels, config.labels, config.tie_word_embeddings) == (2, ["bad", "good"], True)
    shapes = expected_weight_shapes(config)
    assert shapes["score.weight"] == (2, 32) and "lm_head.weight" not in shapes
    assert config_from_hf({**raw, "architectures": ["Qwen2ForCausalLM"]}).num_labels == 0
    assert config_from_hf({k: v for k, v in raw.items() if k != "id2label"}).labels == ["LABEL_0", "LABEL_1"]
    for bad, message in [({"id2label": {"0": "a", "2": "b"}}, "id2label must map every label index"),
                         ({"id2label": {}}, "id2label must map"),
                         ({"id2label": {"0": 7}}, "labels must be a list of num_labels=1 strings"),
                         ({"num_labels": 3}, "num_labels=3 but id2label names 2"),
                         ({"id2label": None, "num_labels": -1}, "num_labels must be a non-negative integer")]:
        with pytest.raises(ValueError, match=message) as err:
            config_from_hf({**raw, **bad}, source="x/config.json")
        assert str(err.value).startswith("x/config.json: ")
    with pytest.raises(ValueError, match="labels=.* needs num_labels >= 1"):
        ModelConfig(labels=["a"])
    with pytest.raises(ValueError, match="list of num_labels=2 strings"):
        ModelConfig(num_labels=2, labels=["a"])
    model = _checkpoint(tmp_path, "llama")  # the same checkpoint without its head: refused by name
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "score.weight"}
    (tmp_path / "model.safetensors").unlink()
    save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor score.weight"):
        load_hf_model(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_the_server_classifies_in_vllms_shape(tmp_path):
    import httpx

    from minillm.engine.async_llm import AsyncLLM
    from minillm.serve.app import build_app
    from minillm.serve.server import ServerThread
    from serve_tiny import tiny_app
    model = _checkpoint(tmp_path, "llama")
    app = build_app(AsyncLLM(LLM(tmp_path, **OPTIONS).llm_engine), "tiny-classifier")
    with ServerThread(app) as srv:
        answer = httpx.post(srv.url + "/classify", json={"model": "tiny-classifier", "input": ["ab a", "b ab b"]},
                            timeout=30).json()
        assert answer["object"] == "list" and answer["model"] == "tiny-classifier"
        assert answer["id"].startswith("classify-") and isinstance(answer["created"], int)
        assert answer["usage"] == {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0}
        for i, (data, ids) in enumerate(zip(answer["data"], [[2, 0], [1, 2, 1]])):
            want = _reference(model, ids).softmax(-1)
            assert data["index"] == i and data["num_classes"] == 3 and data["label"] == LABELS[int(want.argmax())]
            torch.testing.assert_close(torch.tensor(data["probs"]), want, atol=1e-4, rtol=1e-4)
        one = httpx.post(srv.url + "/classify", json={"input": [2, 0]}, timeout=30).json()["data"]
        assert len(one) == 1  # token ids, and the served model by default
        torch.testing.assert_close(torch.tensor(one[0]["probs"]), torch.tensor(answer["data"][0]["probs"]))
        for body, status, param in [({"input": []}, 400, "input"), ({"input": 5}, 400, "input"),
                                    ({"input": "a", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
                                    ({"input": [1, 500]}, 400, "input"), ({"input": "a", "model": "other"}, 404, None)]:
            response = httpx.post(srv.url + "/classify", json=body, timeout=30)
            assert response.status_code == status, response.text
            assert param is None or response.json()["error"]["param"].split(".")[0] == param  # (input.str: a
            # wrong type names the union's first shape, as /v1/embeddings does)
        completion = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
        assert completion.status_code == 400 and "does not generate" in completion.json()["error"]["message"]
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "tiny-classifier"
    generative, _ = tiny_app()
    with ServerThread(generative) as srv:
        response = httpx.post(srv.url + "/classify", json={"input": "abc"}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
        assert "not a classification model" in response.json()["error"]["message"]


@pytest.mark.slow
def test_a_pipeline_parallel_classifier(tmp_path):
    """The head sits on the last stage: the engine takes it from the first rank that has it."""
    model = _checkpoint(tmp_path, "llama")
    llm = LLM(tmp_path, pipeline_parallel_size=2, **OPTIONS)
    try:
        out = llm.classify([[5, 6, 7]])[0].outputs
    finally:
        llm.llm_engine.shutdown()
    torch.testing.assert_close(torch.tensor(out.probs), _reference(model, [5, 6, 7]).softmax(-1), atol=1e-4,
                               rtol=1e-4)
