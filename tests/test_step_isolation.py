"""A batched step that raises is rerun one request at a time (minillm/engine/step_isolation.py): only the request
that fails alone ends in "error"."""
from __future__ import annotations

import pytest

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.sampling_params import SamplingParams
from test_engine import _PoisonedModel, greedy_reference, model_and_config, run  # noqa: F401 (a fixture)
from tiny import ByteTokenizer, one_thread  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize("layout", [dict(scheduling="static", kv_layout="contiguous"),
                                    dict(scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=24),
                                    dict(scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=24,
                                         async_scheduling=True)])
def test_failing_batch_is_rerun_one_by_one_and_only_the_culprit_fails(model_and_config, layout):
    """Three requests in one batch, one of which breaks the forward: the step is rerun one request at a time, the
    two good ones get exactly plain decoding's tokens, the bad one alone ends in "error", nothing leaks."""
    model, config = model_and_config
    engine = LLMEngine(_PoisonedModel(model), ByteTokenizer(), config,
                       EngineConfig(max_model_len=32, max_num_seqs=3, **layout))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    free = engine.scheduler.num_free_blocks()
    for rid, prompt in (("a", [1, 2]), ("poison", [99, 1]), ("c", [3, 4, 5])):
        engine.add_request(rid, prompt, params)
    done = run(engine)
    assert done["poison"].outputs[0].finish_reason == "error"
    assert "poisoned token 99" in done["poison"].outputs[0].error
    assert done["a"].outputs[0].token_ids == greedy_reference(model, [1, 2], 4)
    assert done["c"].outputs[0].token_ids == greedy_reference(model, [3, 4, 5], 4)
    assert engine.scheduler.num_free_blocks() == free


def test_a_step_that_fails_for_everyone_still_ends_every_request(model_and_config):
    """A failure that is nobody's in particular (here: every forward raises) fails each rerun too: every request
    ends in "error" with the reason, the engine stays usable."""
    model, config = model_and_config

    class Broken(_PoisonedModel):
        def forward(self, input_ids, positions):
            raise RuntimeError("device gone")

    engine = LLMEngine(Broken(model), ByteTokenizer(), config,
                       EngineConfig(max_model_len=32, max_num_seqs=3, scheduling="continuous", kv_layout="paged",
                                    block_size=4, num_kv_blocks=24))
    for rid in "xyz":
        engine.add_request(rid, [1, 2], SamplingParams(max_tokens=2))
    done = run(engine)
    assert {r: o.outputs[0].error for r, o in done.items()} == {r: "RuntimeError: device gone" for r in "xyz"}
    assert not engine.has_unfinished_requests() and engine.scheduler.num_free_blocks() == 24


def test_a_request_whose_text_cannot_be_made_fails_alone(model_and_config):
    """An exception while making one request's output (its text, here a tokenizer that cannot decode token 99)
    used to escape the engine's step after the tokens were in: the requests beside it lost their outputs and
    every later step raised again. Now that request ends in "error", the others get plain decoding's tokens."""
    model, config = model_and_config

    class Fussy(ByteTokenizer):
        def decode(self, ids, *args, **kwargs):
            if 99 in list(ids):
                raise ValueError("cannot decode token 99 (test)")
            return super().decode(ids, *args, **kwargs)

        def decode_batch(self, batch, *args, **kwargs):
            return [self.decode(ids, *args, **kwargs) for ids in batch]

    engine = LLMEngine(model, Fussy(), config, EngineConfig(max_model_len=32, max_num_seqs=3, scheduling="continuous",
                                                            kv_layout="paged", block_size=4, num_kv_blocks=24))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for rid, prompt in (("a", [1, 2]), ("bad", [5, 99]), ("c", [3, 4, 5])):
        engine.add_request(rid, prompt, params)
    done = run(engine)
    assert done["bad"].outputs[0].finish_reason == "error"
    assert "cannot decode token 99" in done["bad"].outputs[0].error
    assert done["a"].outputs[0].token_ids == greedy_reference(model, [1, 2], 4)
    assert done["c"].outputs[0].token_ids == greedy_reference(model, [3, 4, 5], 4)
    assert not engine.has_unfinished_requests() and engine.scheduler.num_free_blocks() == 24
