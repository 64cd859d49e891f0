"""`minillm serve` flags: every EngineConfig field is a flag of vLLM's spelling, dicts as JSON (chapter 10)."""
from __future__ import annotations

import argparse

import pytest

from minillm.serve.cli import engine_options, register


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_engine_flags_reach_the_engine_config():
    args = _parse("--max-num-seqs", "4", "--enable-prefix-caching", "--speculative-config",
                  '{"method": "ngram", "num_speculative_tokens": 3}', "--quantization", "fp8")
    assert engine_options(args) == {"max_num_seqs": 4, "enable_prefix_caching": True,
                                    "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
    assert args.quantization == "fp8"


@pytest.mark.parametrize("text", ["{method: ngram}", '["ngram"]'])
def test_a_speculative_config_that_is_not_a_json_object_is_refused(text, capsys):
    with pytest.raises(SystemExit):
        _parse("--speculative-config", text)
    assert "JSON object" in capsys.readouterr().err
