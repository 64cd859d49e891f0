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
])
def test_bad_values_exit_2_with_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
