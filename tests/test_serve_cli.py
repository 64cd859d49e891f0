"""`minillm serve` flags: every EngineConfig field is a flag of vLLM's spelling, dicts as JSON (chapter 10)."""
from __future__ import annotations

import argparse
import re

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


def test_scheduling_policy_is_a_flag_with_its_choices(capsys):
    """--scheduling-policy (vLLM's flag) reaches EngineConfig.scheduling_policy; a field with a few allowed values
    takes only those, and --help lists them."""
    assert engine_options(_parse("--scheduling-policy", "priority")) == {"scheduling_policy": "priority"}
    assert "scheduling_policy" not in engine_options(_parse())  # left to EngineConfig's default, "fcfs"
    with pytest.raises(SystemExit):
        _parse("--scheduling-policy", "lifo")
    # (argparse quotes the choices in some Python versions and not in others)
    assert re.search(r"argument --scheduling-policy: invalid choice: 'lifo' \(choose from '?fcfs'?, '?priority'?\)",
                     capsys.readouterr().err)
    assert engine_options(_parse("--kv-layout", "contiguous", "--kv-cache-dtype", "fp8")) == {
        "kv_layout": "contiguous", "kv_cache_dtype": "fp8"}
    with pytest.raises(SystemExit):
        _parse("--help")
    assert "--scheduling-policy {fcfs,priority}" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["{method: ngram}", '["ngram"]'])
def test_a_speculative_config_that_is_not_a_json_object_is_refused(text, capsys):
    with pytest.raises(SystemExit):
        _parse("--speculative-config", text)
    assert "JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["busy", "99999"])
def test_a_bad_or_busy_port_fails_before_the_model_loads(port, capsys, monkeypatch):
    import socket

    import minillm.llm

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")
    monkeypatch.setattr(minillm.llm, "LLM", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        args = _parse("--port", str(taken.getsockname()[1]) if port == "busy" else port)
        assert args.func(args) == 2
    err = capsys.readouterr().err
    assert ("Address already in use" in err) if port == "busy" else ("[0, 65535]" in err), err


@pytest.mark.parametrize("flag", ["timeout", "template"])
def test_operator_options_fail_before_the_model_loads(flag, tmp_path, capsys, monkeypatch):
    """A negative --graceful-timeout (refused only after the model loaded and the banner printed) and a
    --chat-template file that does not parse (accepted, then every chat request got a 400 blaming the client)."""
    import minillm.llm

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was checked")
    monkeypatch.setattr(minillm.llm, "LLM", no_load)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }")
    argv = ["--port", "0", "--graceful-timeout", "-1"] if flag == "timeout" else ["--port", "0", "--chat-template",
                                                                                     str(template)]
    args = _parse(*argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    words = "--graceful-timeout must be a finite number of seconds >= 0, got -1" if flag == "timeout" else \
        f"--chat-template {template}: the chat template does not parse"
    assert words in err, err
