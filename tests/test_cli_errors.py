"""Bad flags and values on every `minillm` subcommand: one line on stderr and exit code 2 (argparse's convention),
never a traceback, and before any long work starts (loading a model, generating data, a benchmark run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minillm.cli import main


@pytest.mark.parametrize("argv, words", [
    (["demo", "--device", "tpu"], "minillm demo: error: device='tpu' is not a device"),
    (["demo", "--model", "/nonexistent"], "minillm demo: error: /nonexistent: no such file or directory"),
    (["bench", "--device", "tpu"], "minillm bench: error: device='tpu' is not a device"),
    (["bench", "--model", "/nonexistent"], "minillm bench: error: /nonexistent: no such file"),
    # '' quietly meant auto (`device or "auto"`); demo and bench stack refused it
    (["bench", "--device", ""], "minillm bench: error: device='' is not a device"),
    (["bench", "--dtype", ""], "minillm bench: error: dtype='' is not supported"),
    (["bench", "--json", "/nonexistent/dir/x.json"], "cannot write /nonexistent/dir/x.json: the folder"),
    (["bench", "serve", "--plot", "/nonexistent/dir/x.png"], "cannot write /nonexistent/dir/x.png"),
    (["bench", "stack", "--device", "tpu"], "minillm bench stack: error: device='tpu' is not a device"),
    (["bench", "stack", "--model", "/nonexistent.gguf"], "minillm bench stack: error: /nonexistent.gguf: GGUF file"),
    (["bench", "stack", "--batch", "0"], "minillm bench stack: error: batch must be an integer >= 1, got 0"),
    (["bench", "stack", "--plot", "/nonexistent/dir/x.png"], "cannot write /nonexistent/dir/x.png"),
    # checked against the model's context before loading; the error blamed max_model_len, which nobody gave
    (["demo", "--max-tokens", "100000", "--device", "cpu"], "minillm demo: error: max_tokens must be <= 8064 (the "
     "model's 8192-token context less 128 for the demo's prompts), got 100000"),
    (["bench", "stack", "--prefix-len", "100000", "--device", "cpu"], "minillm bench stack: error: prefix_len + "
     "suffix_len + output_len must be <= 8184 (the model's 8192-token context less 8 for a verify step's drafts), "
     "got 100000 + 32 + 32"),
    (["estimate", "--model", "llama-3-8b", "--gpu-gb", "0"], "gpu_gb must be a number in [0.001, 100000], got 0.0"),
    (["estimate", "--model", "llama-3-8b", "--gpu-gb", "nan"], "gpu_gb must be a number in [0.001, 100000], got nan"),
    (["quantize", "--method", "rtn", "--device", "tpu", "--out", "x"], "minillm quantize: error: device='tpu'"),
    (["train-heads", "--kind", "eagle", "--device", "tpu", "--out", "x"], "minillm train-heads: error: device="),
    (["train-heads", "--kind", "eagle", "--lr", "nan", "--out", "x"], "lr must be a finite number > 0, got nan"),
    (["train-heads", "--kind", "medusa", "--num-heads", "0", "--out", "x"], "num_heads must be an integer >= 1"),
    (["train-heads", "--kind", "eagle", "--steps", "0", "--out", "x"], "--steps must be >= 1, got 0"),
    (["train-heads", "--kind", "eagle", "--time-budget", "inf", "--out", "x"], "--time-budget must be a finite"),
    # met after the model loaded (split_prompts), or after the generation (pack_rows): tracebacks
    (["train-heads", "/nonexistent", "--kind", "medusa", "--num-prompts", "1", "--out", "x"],
     "minillm train-heads: error: --num-prompts must be >= 2, got 1"),
    (["train-heads", "/nonexistent", "--kind", "medusa", "--num-prompts", "4", "--max-prompt-tokens", "16",
      "--max-new-tokens", "4", "--seq-len", "1000000", "--out", "x"],
     "--seq-len must be <= 60: 3 training prompts (--num-prompts less the held-out ones) of at most "
     "--max-prompt-tokens + --max-new-tokens tokens each, got 1000000"),
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
     "lr must be a finite number > 0, got inf"),
    # the engine drafts at most MAX_SPECULATIVE_TOKENS (16) a step; more heads were met after the data was made
    (["train-heads", "/nonexistent", "--kind", "medusa", "--num-heads", "1000", "--out", "x"],
     "num_heads must be an integer in [1, 16]"),
    (["train-heads", "/nonexistent", "--kind", "mtp", "--mtp-depth", "1000", "--out", "x"],
     "num_heads (mtp: the depth, --mtp-depth) must be an integer in [1, 16]"),
    (["train-heads", "/nonexistent", "--kind", "eagle", "--out", __file__], f"--out {__file__} is a file"),
    (["quantize", "/nonexistent", "--method", "gptq", "--out", __file__], f"--out {__file__} is a file"),
    # a flag the method does not read is refused, not dropped (rtn --act-order wrote desc_act false, exit 0)
    (["quantize", "/nonexistent", "--method", "rtn", "--act-order", "--out", "x"],
     "--act-order belongs to --method gptq / fp8_block, got --method rtn"),
    (["quantize", "/nonexistent", "--method", "fp8", "--sym", "--out", "x"], "--sym belongs to --method rtn / gptq"),
    (["quantize", "/nonexistent", "--method", "smoothquant", "--alpha", "2", "--out", "x"],
     "--alpha (SmoothQuant's migration strength) must be in [0, 1], got 2.0"),
    # a directory with files in it (the source checkpoint, an older one whose shards would outvote the new file)
    (["quantize", "/nonexistent", "--method", "rtn", "--out", os.path.dirname(__file__)],
     f"--out {os.path.dirname(__file__)} already holds files ("),
    (["quantize", "/nonexistent", "--method", "gguf-q4_0", "--out", "/nonexistent/dir/x.gguf"],
     "cannot write /nonexistent/dir/x.gguf: the folder /nonexistent/dir does not exist"),
    (["demo", "--model", "/nonexistent", "--out", __file__ + "/plots"], f"cannot create --out {__file__}/plots: "),
    # grading's numbers, checked before any grading (inf crashed after start, NaN turned the gate off, 0 jobs
    # quietly meant the default, a directory as --out failed after the whole run)
    (["grade", "ch01.rms_norm", "--timeout", "inf"], "--timeout must be a finite number of seconds > 0, got inf"),
    (["grade", "ch01.rms_norm", "--fail-under", "nan"], "--fail-under must be a percentage in [0, 100], got nan"),
    (["grade", "ch01.rms_norm", "--fail-under", "150"], "--fail-under must be a percentage in [0, 100], got 150"),
    (["grade", "ch01.rms_norm", "--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
    (["grade", "ch01.rms_norm", "--out", os.path.dirname(__file__)], "is a directory; give a file path"),
    (["bench", "--model", "/nonexistent", "--json", os.path.dirname(__file__)],
     f"cannot write {os.path.dirname(__file__)}: it is a directory; give a file path"),
    # the release folder and the autograder archive: an OSError traceback (exit 1), for release mid-copy
    (["release", __file__], f"minillm course release: error: DIR {__file__} is a file; give a directory"),
    (["course", "release", __file__ + "/sub"], f"cannot create DIR {__file__}/sub: {__file__} is not a writable"),
    pytest.param(["release", "/proc/minillm_release"], "cannot create", marks=pytest.mark.skipif(
        not os.path.isdir("/proc"), reason="needs /proc: a folder no one can create in, root included")),
    (["course", "gradescope", os.path.dirname(__file__)],
     f"minillm course gradescope: error: cannot write ZIP {os.path.dirname(__file__)}: it is a directory"),
    (["course", "gradescope", __file__ + "/x.zip"],
     f"cannot write {__file__}/x.zip: the folder {__file__} is not a directory"),
    pytest.param(["course", "gradescope", "/proc/minillm.zip"], "cannot write", marks=pytest.mark.skipif(
        not os.path.isdir("/proc"), reason="needs /proc: a folder no one can create in, root included")),
    # --smoke --jobs 0 was a ValueError traceback; a chapter name that matched nothing ran nothing and exited 0
    (["course", "notebooks", "--smoke", "--jobs", "0"],
     "minillm course notebooks: error: --jobs must be an integer >= 1, got 0"),
    (["course", "notebooks", "--smoke", "--jobs", "-1", "01_llm_inference"], "--jobs must be an integer >= 1, got -1"),
    (["course", "notebooks", "--smoke", "nosuchchapter"],
     "minillm course notebooks: error: no chapter 'nosuchchapter'; the chapters are 01_llm_inference, 02_kv_cache, "),
    (["course", "notebooks", "--check", "01_llm_inference", "nosuchchapter"], "no chapter 'nosuchchapter'; the chap"),
    (["course", "notebooks", "--no-execute", "nosuchchapter"], "no chapter 'nosuchchapter'; the chapters are"),
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


@pytest.mark.parametrize("layout", ["missing", "empty", "unrelated"])
def test_grade_refuses_an_impl_that_is_not_an_exercises_folder(layout, tmp_path, capsys):
    """`--impl PATH` that does not exist, or holds none of exercises/' modules, graded everything 0 (281 lines, exit
    0): a typo looked like a failing submission. It is refused before any grading, in one line naming the path."""
    folder = tmp_path / "submission"
    if layout != "missing":
        folder.mkdir()
    if layout == "unrelated":
        (folder / "notes.py").write_text("x = 1\n")
    assert main(["grade", "ch01.rms_norm", "--impl", str(folder)]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"minillm grade: error: implementation {str(folder)!r}"), err
    if layout == "missing":
        assert "is neither 'exercises', 'solutions' nor a folder" in err, err
    else:
        assert "holds none of the exercise modules (a folder laid out like exercises/: ch01_basics.py, " in err, err


def test_gradescope_gets_a_results_json_for_a_submission_it_cannot_grade(tmp_path, capsys):
    """On Gradescope an ungradable submission (no exercise module in it) still writes results.json: score 0 and
    the reason the learner sees, not "the autograder failed to produce any results"."""
    folder, out = tmp_path / "submission", tmp_path / "results" / "results.json"
    folder.mkdir()
    assert main(["grade", "--impl", str(folder), "--format", "gradescope", "--out", str(out)]) == 2
    results = json.loads(out.read_text())
    assert results["score"] == 0 and results["tests"] == []
    assert results["output"].startswith("Your submission could not be graded: implementation")
    assert "holds none of the exercise modules" in results["output"]
    assert "holds none of the exercise modules" in capsys.readouterr().err


@pytest.mark.parametrize("command, out", [(["release"], "student"), (["course", "gradescope"], "autograder.zip")])
def test_an_empty_chapters_list_is_refused(command, out, tmp_path, capsys):
    """`--chapters ''` (a shell variable left empty) released, or built the autograder of, every chapter."""
    assert main([*command, str(tmp_path / out), "--chapters", ""]) == 2
    err = capsys.readouterr().err
    assert "error: --chapters is empty; name the assignment's chapters, e.g. ch05,ch06" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / out).exists()


def test_python_dash_m_minillm_is_the_command():
    """`python -m minillm` (a venv not on PATH) ran nothing: "'minillm' is a package and cannot be directly
    executed"."""
    done = subprocess.run([sys.executable, "-m", "minillm", "estimate", "--model", "smollm2-135m"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "KV cache per token" in done.stdout
