"""vLLM's skip_special_tokens and spaces_between_special_tokens in the engine (chapter 10).

With skip_special_tokens=False a special token's text ("<|260|>" from the test ByteTokenizer, "<|im_start|>" from
SmolLM2's tokenizer) is output text like any other: in the final text, in every streamed snapshot (each one a prefix
of the next, so the deltas add up to the final text), in the log-prob token texts, and where stop strings are looked
for. Requests that keep special tokens and requests that drop them share steps, the batched window decode included.
"""
from __future__ import annotations

import pytest

from minillm.engine.detokenizer import DetokenizerState, detokenize_incrementally
from minillm.sampling_params import ParamError, SamplingParams
from serve_tiny import tiny_engine
from tiny import ByteTokenizer, one_thread  # noqa: F401 (autouse fixture)

SPECIAL = 260  # a special token of the ByteTokenizer: no text, or "<|260|>"
# greedy, pushed towards the special token and "A": the frequency penalty makes them take turns
MIXED = dict(temperature=0, max_tokens=10, logit_bias={SPECIAL: 100.0, ord("A"): 97.0}, frequency_penalty=2.0)


def run(engine, requests: dict[str, SamplingParams], prompt: list[int] = list(b"Hi")) -> dict[str, list]:
    """Every output each request gave (a snapshot per step: what a stream shows), all requests stepped together."""
    for request_id, params in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list] = {request_id: [] for request_id in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out.outputs[0])
    return outputs


def assert_streams_add_up(snapshots: list) -> None:
    """Each snapshot's text extends the one before (nothing sent is taken back), up to the final text."""
    texts = [o.text for o in snapshots]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:])), texts


def test_kept_special_tokens_are_in_the_text_and_the_stream():
    tok = ByteTokenizer()
    outputs = run(tiny_engine(), {"drop": SamplingParams(**MIXED),
                                  "keep": SamplingParams(**MIXED, skip_special_tokens=False, logprobs=0)})
    drop, keep = outputs["drop"][-1], outputs["keep"][-1]
    assert drop.token_ids == keep.token_ids and {SPECIAL, ord("A")} <= set(keep.token_ids)
    assert drop.text == tok.decode(drop.token_ids) and "<|" not in drop.text
    assert keep.text == tok.decode(keep.token_ids, skip_special_tokens=False) and keep.text.startswith("<|260|>")
    assert_streams_add_up(outputs["keep"])
    assert outputs["keep"][0].text == "<|260|>"  # the first token alone: a special token is sent at once
    # the log-prob token texts add up to the text too (completions' text_offset counts on it)
    assert "".join(next(iter(lp.values())).decoded_token for lp in keep.logprobs) == keep.text


def test_a_stop_string_may_end_inside_a_special_tokens_text():
    """As in vLLM: the stop string is searched in the text, special tokens' text included, and cut there. While
    running, a stream never shows what the cut takes away."""
    stop = "60|>A"
    outputs = run(tiny_engine(), {"drop": SamplingParams(**MIXED, stop=stop),
                                  "keep": SamplingParams(**MIXED, stop=stop, skip_special_tokens=False)})
    keep, drop = outputs["keep"][-1], outputs["drop"][-1]
    assert keep.finish_reason == "stop" and keep.stop_reason == stop
    assert keep.text == "<|260|><|260|><|2"  # the tokens were 260 260 260 A: cut inside the third
    assert all(keep.text.startswith(o.text) for o in outputs["keep"])
    assert drop.finish_reason == "length" and "60|" not in drop.text  # no special text: nothing to match


def test_a_special_token_after_half_a_character_ends_its_wait():
    """The hold-back for unfinished UTF-8 characters counts a kept special token with its text's bytes: 0xE4 (the
    first byte of a 3-byte character) followed by "<|260|>" can no longer be completed, so all of it goes out,
    as one decode of the tokens shows it (counted as no bytes, the 0xE4 and the 0x80 after the special token looked
    like a character still missing its last byte)."""
    tok, prompt = ByteTokenizer(), list(b"Hi ")
    ids = prompt + [0xE4, SPECIAL, 0x80]
    kept = DetokenizerState.for_prompt(len(prompt), skip_special_tokens=False)
    assert detokenize_incrementally(tok, ids, kept) == "\ufffd<|260|>\ufffd" == tok.decode(ids[3:], False)
    dropped = DetokenizerState.for_prompt(len(prompt))
    assert detokenize_incrementally(tok, ids, dropped) == ""  # 0xE4 0x80: one byte short of a character


def test_a_real_tokenizer_in_one_batched_step_and_spaces_between_special_tokens():
    """SmolLM2's tokenizer (decode_batch: one call per step for every sequence, one per setting present) behind
    the tiny model, whose ids 0..299 are real tokens of it: <|im_start|> (1) is special. Its byte-level decoder
    writes special tokens back to back, so spaces_between_special_tokens changes nothing (Tokenizer.decode)."""
    from minillm.loader.model_files import default_model_path
    from minillm.loader.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(default_model_path())
    letter_a = tok.encode("A", add_special_tokens=False)[0]  # 49
    calls, decode_batch = [], tok.decode_batch

    def spy(batch, skip_special_tokens=True):
        calls.append(skip_special_tokens)
        return decode_batch(batch, skip_special_tokens)
    tok.decode_batch = spy
    mixed = dict(MIXED, logit_bias={1: 100.0, letter_a: 97.0})
    outputs = run(tiny_engine(tokenizer=tok), {
        "drop": SamplingParams(**mixed),
        "keep": SamplingParams(**mixed, skip_special_tokens=False),
        "keep_unspaced": SamplingParams(**mixed, skip_special_tokens=False, spaces_between_special_tokens=False)},
        prompt=[tok.encode(c, add_special_tokens=False)[0] for c in "Hello"])  # one token a letter: ids < 300
    drop, keep, unspaced = (outputs[k][-1] for k in ("drop", "keep", "keep_unspaced"))
    assert drop.token_ids == keep.token_ids == unspaced.token_ids
    assert drop.text == tok.decode(drop.token_ids) and "<|im_start|>" not in drop.text and "A" in drop.text
    assert keep.text == tok.decode(keep.token_ids, skip_special_tokens=False)
    assert keep.text.startswith("<|im_start|><|im_start|>")  # two special tokens, nothing between them
    assert unspaced.text == keep.text
    for name in ("keep", "keep_unspaced"):
        assert_streams_add_up(outputs[name])
    assert True in calls and False in calls  # steps decoded every window in a call per setting


@pytest.mark.parametrize("name", ["skip_special_tokens", "spaces_between_special_tokens"])
def test_the_switches_must_be_bools(name):
    with pytest.raises(ParamError, match=f"{name} must be a bool, got str: 'no'") as err:
        SamplingParams(**{name: "no"})
    assert err.value.param == name
    with pytest.raises(ParamError, match=f"{name} must be a bool, got int: 0"):
        SamplingParams(**{name: 0})


def test_a_tokenizer_that_cannot_keep_special_tokens_refuses_the_request():
    class DropsThem:  # decode(ids) only: every request that keeps the default is served
        eos_token_id = 257

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return ByteTokenizer().decode(ids)

    engine = tiny_engine(tokenizer=DropsThem())
    with pytest.raises(ParamError, match="skip_special_tokens=False needs a tokenizer") as err:
        engine.add_request("keep", [1, 2], SamplingParams(skip_special_tokens=False))
    assert err.value.param == "skip_special_tokens" and not engine.has_unfinished_requests()
    assert run(engine, {"drop": SamplingParams(max_tokens=2)}, [1, 2])["drop"][-1].finish_reason is not None


@pytest.mark.parametrize("skip", [True, False])
def test_include_stop_str_in_output_keeps_a_stop_tokens_text(skip):
    """As vLLM: a request ended by a stop token (EOS or stop_token_ids) leaves that token's text out of the answer,
    unless include_stop_str_in_output, which keeps it as it keeps a stop string: "<|260|>" with
    skip_special_tokens=False (a special token's text is "" when skipped), "A" for a byte token either way. The
    log-prob token texts then add up to the text, the stop token's included."""
    tok = ByteTokenizer()
    for stop_token in (SPECIAL, ord("A")):
        params = dict(MIXED, stop_token_ids=[stop_token], skip_special_tokens=skip, logprobs=0)
        outputs = run(tiny_engine(), {"cut": SamplingParams(**params),
                                      "kept": SamplingParams(**params, include_stop_str_in_output=True)})
        cut, kept = outputs["cut"][-1], outputs["kept"][-1]
        assert cut.token_ids == kept.token_ids and kept.token_ids[-1] == stop_token
        assert (cut.finish_reason, cut.stop_reason) == (kept.finish_reason, kept.stop_reason) == ("stop", stop_token)
        assert cut.text == tok.decode(cut.token_ids[:-1], skip)
        assert kept.text == tok.decode(kept.token_ids, skip)
        assert "".join(next(iter(lp.values())).decoded_token for lp in kept.logprobs) == kept.text
        assert_streams_add_up(outputs["kept"])


def test_a_kept_stop_tokens_text_may_complete_a_stop_string():
    """vLLM checks stop strings in the text the step added, the kept stop token's included: "|>A" ends with the
    stop token A, so with include_stop_str_in_output the stop string is the stop_reason; without, A adds no text
    and the stop token is the reason."""
    params = dict(MIXED, stop_token_ids=[ord("A")], stop="|>A", skip_special_tokens=False)
    outputs = run(tiny_engine(), {"cut": SamplingParams(**params),
                                  "kept": SamplingParams(**params, include_stop_str_in_output=True)})
    cut, kept = outputs["cut"][-1], outputs["kept"][-1]
    assert cut.token_ids == kept.token_ids == [SPECIAL] * 3 + [ord("A")]
    assert (cut.stop_reason, cut.text) == (ord("A"), "<|260|>" * 3)
    assert (kept.stop_reason, kept.text) == ("|>A", "<|260|>" * 3 + "A")


def test_detokenize_false_gives_the_same_ids_and_no_text():
    """vLLM's detokenize=False: the same tokens and log-probabilities, an empty text throughout, decoded_token None;
    stop strings (matched in the text) are refused by name, stop_token_ids still stop."""
    outputs = run(tiny_engine(), {"text": SamplingParams(**MIXED, logprobs=1),
                                  "ids": SamplingParams(**MIXED, logprobs=1, detokenize=False),
                                  "stop": SamplingParams(**MIXED, detokenize=False, stop_token_ids=[ord("A")])})
    text, ids, stop = outputs["text"][-1], outputs["ids"][-1], outputs["stop"][-1]
    assert ids.token_ids == text.token_ids and text.text and all(o.text == "" for o in outputs["ids"])
    assert [{t: lp.logprob for t, lp in d.items()} for d in ids.logprobs] == \
        [{t: lp.logprob for t, lp in d.items()} for d in text.logprobs]
    assert all(lp.decoded_token is None for d in ids.logprobs for lp in d.values())
    assert stop.finish_reason == "stop" and stop.stop_reason == ord("A") and stop.text == ""
    with pytest.raises(ParamError, match="detokenize=False leaves empty"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ParamError, match="detokenize must be a bool"):
        SamplingParams(detokenize=1)
