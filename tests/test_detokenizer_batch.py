"""One tokenizer call per step for every sequence's detokenizer windows: the same text as decoding them one by one."""
from __future__ import annotations

import pytest

from minillm.engine.detokenizer import DetokenizerState, decode_windows, detokenize_incrementally
from minillm.loader.model_files import default_model_path
from minillm.loader.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


def test_decode_batch_equals_decode_and_rejects_negative_ids(tokenizer):
    lists = [[], [1], tokenizer.encode("héllo wörld 🙂", add_special_tokens=False), [0, 2, 49151]]
    assert tokenizer.decode_batch(lists) == [tokenizer.decode(ids) for ids in lists]
    # ids past the tokenizer's vocabulary (a padded embedding's rows, which a model may sample) are no text
    assert tokenizer.decode_batch([[5], [49152, 5, 10**6]]) == [tokenizer.decode([5])] * 2
    with pytest.raises(ValueError, match="unknown token id -1"):
        tokenizer.decode([3, -1])


class _OneByOne:  # a tokenizer without decode_batch: decode_windows falls back to decode
    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.calls = inner, 0

    def decode(self, ids):
        self.calls += 1
        return self.inner.decode(ids)


@pytest.mark.parametrize("batched", [True, False])
def test_decoded_windows_give_the_same_stream_as_decoding_each(tokenizer, batched):
    """Emoji and accents span several byte-level tokens: the held-back U+FFFD cases included."""
    texts = ["Grüße aus Köln 🙂🙂 done", "日本語のテキスト and ascii", "plain words only"]
    streams = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    prompt = [1, 2, 3]
    plain = [DetokenizerState.for_prompt(len(prompt)) for _ in texts]
    batch = [DetokenizerState.for_prompt(len(prompt)) for _ in texts]
    out_plain, out_batch = ["" for _ in texts], ["" for _ in texts]
    decoder = tokenizer if batched else _OneByOne(tokenizer)
    for step in range(max(map(len, streams))):
        live = [i for i, s in enumerate(streams) if step < len(s)]
        ids = {i: prompt + streams[i][:step + 1] for i in live}
        for i, texts_i in zip(live, decode_windows(decoder, [(ids[i], batch[i]) for i in live])):
            out_batch[i] += detokenize_incrementally(tokenizer, ids[i], batch[i], texts_i)
        for i in live:
            out_plain[i] += detokenize_incrementally(tokenizer, ids[i], plain[i])
    assert out_batch == out_plain
    assert out_plain == [tokenizer.decode(s) for s in streams]
    if not batched:
        assert decoder.calls == 2 * sum(map(len, streams))


def test_invalid_bytes_stream_out_at_once_and_split_characters_whole():
    """Lone UTF-8 lead bytes (0xE4 starts a 3-byte character) never complete: once a second token shows the first
    can no longer be completed, the text goes out, U+FFFD included (a stream of them was silent until the end, and a
    stop string holding U+FFFD could not match). A character split over tokens, even with tokens of no bytes
    between its pieces, still comes out whole."""
    from tiny import ByteTokenizer

    from minillm.engine.detokenizer import incomplete_tail
    assert incomplete_tail(b"ab\xe4") == 1 and incomplete_tail("\U0001d526".encode()[:3]) == 3
    assert incomplete_tail(b"\xe4\xe4") == 1 and incomplete_tail(b"ab") == incomplete_tail(b"\xe4x") == 0
    assert incomplete_tail("🙂".encode()) == 0 and incomplete_tail(b"\x80\x80") == 0
    tok = ByteTokenizer()
    prompt = list(b"Hi ")
    state, ids, pieces = DetokenizerState.for_prompt(len(prompt)), list(prompt), []
    for t in [0xE4, 0x41, 0xE4, 0xE4]:
        ids.append(t)
        pieces.append(detokenize_incrementally(tok, ids, state))
    assert pieces[0] == "" and pieces[1] == "\ufffdA" and pieces[2] == ""  # 0xE4 alone may still be completed
    assert pieces[3] == "\ufffd"  # the first 0xE4 cannot be any more: it goes out; the second waits
    state, ids, pieces = DetokenizerState.for_prompt(len(prompt)), list(prompt), []
    for b in "h\U0001d526llo 🙂".encode():
        for t in (b, 300, 300):  # special tokens (no bytes) between the bytes of a character
            ids.append(t)
            pieces.append(detokenize_incrementally(tok, ids, state))
    assert "".join(pieces) == "h\U0001d526llo 🙂"


def test_bytes_held_before_a_stop_token_become_text():
    """An unfinished character held when a stop token ends the request is text (U+FFFD), as when max_tokens ends
    it: the output text was once missing it (decode of the output tokens had it)."""
    from test_engine import tiny_config, tiny_model
    from tiny import ByteTokenizer

    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.sampling_params import SamplingParams
    config = tiny_config(num_hidden_layers=2)
    engine = LLMEngine(tiny_model(config), ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=32, max_model_len=64, max_num_seqs=2))
    # 0xE4 (it starts a 3-byte character) until the frequency penalty lets the stop token 0x41 win
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias={0xE4: 50.0, 0x41: 45.0}, frequency_penalty=2.0,
                            stop_token_ids=[0x41])
    engine.add_request("r", list(b"Hi"), params)
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    out = done[0].outputs[0]
    assert out.token_ids[-2:] == [0xE4, 0x41] and out.finish_reason == "stop"
    assert out.text == ByteTokenizer().decode(out.token_ids[:-1]) and out.text.endswith("\ufffd")
