"""One tokenizer call per step for every sequence's detokenizer windows: the same text as decoding them one by one."""
from __future__ import annotations

import pytest

from minillm.engine.detokenizer import DetokenizerState, decode_windows, detokenize_incrementally
from minillm.loader.model_files import default_model_path
from minillm.loader.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


def test_decode_batch_equals_decode_and_rejects_unknown_ids(tokenizer):
    lists = [[], [1], tokenizer.encode("héllo wörld 🙂", add_special_tokens=False), [0, 2, 49151]]
    assert tokenizer.decode_batch(lists) == [tokenizer.decode(ids) for ids in lists]
    with pytest.raises(ValueError, match="unknown token id 49152"):
        tokenizer.decode_batch([[5], [49152]])
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


def test_invalid_bytes_stream_out_after_a_bounded_hold():
    """Lone UTF-8 lead bytes (0xE4 starts a 3-byte character) never complete: after MAX_PENDING_TOKENS held tokens
    the text goes out, U+FFFD included, so a stream of them is not silent until the end and a stop string holding
    U+FFFD can match. A character split over tokens still comes out whole."""
    from tiny import ByteTokenizer

    from minillm.engine.detokenizer import MAX_PENDING_TOKENS
    tok = ByteTokenizer()
    prompt = list(b"Hi ")
    state, ids, pieces = DetokenizerState.for_prompt(len(prompt)), list(prompt), []
    for t in [0xE4] * (MAX_PENDING_TOKENS + 2):
        ids.append(t)
        pieces.append(detokenize_incrementally(tok, ids, state))
    assert pieces[:MAX_PENDING_TOKENS] == [""] * MAX_PENDING_TOKENS  # still possibly half a character
    assert "".join(pieces) and set("".join(pieces)) == {"\ufffd"}
    assert state.read_offset > len(prompt)  # the window moved on
    state, ids, pieces = DetokenizerState.for_prompt(len(prompt)), list(prompt), []
    for t in "héllo 🙂".encode():
        ids.append(t)
        pieces.append(detokenize_incrementally(tok, ids, state))
    assert "".join(pieces) == "héllo 🙂" and "\ufffd" not in "".join(pieces)
