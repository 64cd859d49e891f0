"""Bad flags and values on every `minillm` subcommand: one line on stderr and exit code 2 (argparse's convention),
never a traceback, and before any long work starts (loading a model, generating data, a benchmark run)."""
from __future__ import annotations

import pytest

from minillm.cli import main


@pytest.mark.parametrize("argv, words", [
    (["demo", "--device", "tpu"], "minillm demo: error: device='tpu' is not a device"),
    (["demo", "--model", "/nonexistent"], "minillm demo: error: /nonexistent: no such file or directory"),
    (["bench", "--device", "tpu"], "minillm bench: error: device='tpu' is not a device"),
    (["bench", "--model", "/nonexistent"], "minillm bench: error: /nonexistent: no such file"),
    (["bench", "--json", "/nonexistent/dir/x.json"], "cannot write /nonexistent/dir/x.json: the folder"),
    (["bench", "serve", "--plot", "/nonexistent/dir/x.png"], "cannot write /nonexistent/dir/x.png"),
    (["estimate", "--model", "llama-3-8b", "--gpu-gb", "0"], "gpu_gb must be > 0, got 0.0"),
    (["estimate", "--model", "llama-3-8b", "--gpu-gb", "nan"], "gpu_gb must be a finite number > 0, got nan"),
    (["quantize", "--method", "rtn", "--device", "tpu", "--out", "x"], "minillm quantize: error: device='tpu'"),
    (["train-heads", "--kind", "eagle", "--device", "tpu", "--out", "x"], "minillm train-heads: error: device="),
    (["train-heads", "--kind", "eagle", "--lr", "nan", "--out", "x"], "lr must be > 0, got nan"),
    (["train-heads", "--kind", "medusa", "--num-heads", "0", "--out", "x"], "num_heads must be an integer >= 1"),
    (["train-heads", "--kind", "eagle", "--steps", "0", "--out", "x"], "--steps must be >= 1, got 0"),
    (["train-heads", "--kind", "eagle", "--time-budget", "inf", "--out", "x"], "--time-budget must be a finite"),
    (["train-heads", "/nonexistent", "--kind", "eagle", "--out", "x"], "/nonexistent: no such file"),
    # checked against the model before any data is generated (it was after: minutes later, with a traceback)
    (["train-heads", "--kind", "draft", "--draft-layers", "99", "--out", "x"],
     "draft_num_layers=99 exceeds the target's 30 layers"),
    # met after the work (data generated, heads trained, a model quantized, the demo run): a traceback, or the
    # result lost; now before the model loads (the missing model would be named otherwise)
    (["train-heads", "/nonexistent", "--kind", "eagle", "--seed", str(2**70), "--out", "x"],
     "minillm train-heads: error: --seed must be an integer in [-2**63, 2**64 - 1], got 1180591620717411303424"),
    (["train-heads", "/nonexistent", "--kind", "eagle", "--sample-seed", str(-2**70), "--out", "x"],
     "--sample-seed must be an integer"),
    (["train-heads", "/nonexistent", "--kind", "eagle", "--lr", "inf", "--out", "x"],
     "--lr must be a finite number > 0, got inf"),
    (["train-heads", "/nonexistent", "--kind", "eagle", "--out", __file__], f"--out {__file__} is a file"),
    (["quantize", "/nonexistent", "--method", "gptq", "--out", __file__], f"--out {__file__} is a file"),
    (["quantize", "/nonexistent", "--method", "gguf-q4_0", "--out", "/nonexistent/dir/x.gguf"],
     "cannot write /nonexistent/dir/x.gguf: the folder /nonexistent/dir does not exist"),
    (["demo", "--model", "/nonexistent", "--out", __file__ + "/plots"], f"cannot create --out {__file__}/plots: "),
])
def test_bad_values_exit_2_with_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, words", [
    # argparse named the converter function: "invalid _group_size value: 'abc'"
    (["quantize", "--method", "rtn", "--group-size", "abc", "--out", "x"],
     "argument --group-size: group size must be -1 (per channel) or a positive integer, got 'abc'"),
    (["quantize", "--method", "fp8", "--smooth-alpha", "high", "--out", "x"],
     "'search' or a float in [0, 1], got high"),
    (["quantize", "--method", "fp8_block", "--block-size", "64x64", "--out", "x"], "multiples of 16, got 64x64"),
    # goodput against a negative or nan SLO counted no request, silently
    (["bench", "serve", "--slo-ttft-ms", "-1"], "argument --slo-ttft-ms: must be a finite number of milliseconds > 0"),
    (["bench", "serve", "--slo-tpot-ms", "nan"], "argument --slo-tpot-ms: must be a finite number of milliseconds"),
])
def test_bad_flag_values_are_argparse_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and words in err.strip().splitlines()[-1] and "Traceback" not in err, err
