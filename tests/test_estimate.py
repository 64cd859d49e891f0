"""The memory estimator: the seed's 70B table, the KV-cache formula, real parameter counts, input validation."""
from __future__ import annotations

import pytest

from minillm.bench import estimate as est
from minillm.bench.cli import main


def test_seed_table_70b_is_140_70_35_gb():
    rows = {r["dtype"]: r for r in est.seed_table()}
    assert rows["fp16"]["nominal_70b_gb"] == pytest.approx(140.0)
    assert rows["int8"]["nominal_70b_gb"] == pytest.approx(70.0)
    assert rows["int4"]["nominal_70b_gb"] == pytest.approx(35.0)
    # the real Llama-2-70B is a little smaller than its name
    assert rows["fp16"]["llama2_70b_gb"] == pytest.approx(137.953, abs=1e-3)


@pytest.mark.parametrize("name,expected", [
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-2-70b", 68_976_648_192),
    ("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496), ("smollm2-135m", 134_515_008)])
def test_counted_params_match_published_checkpoints(name, expected):
    # the exact element counts of the released safetensors / GGUF files
    assert est.get_preset(name).counted_params == expected


def test_kv_cache_formula_llama2_70b():
    # 2 (K and V) x 80 layers x 8 KV heads x 128 dims x 2 bytes = 327,680 bytes per token
    e = est.estimate("llama-2-70b", "fp16", context=4096, batch=8)
    assert e.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert e.kv_cache_bytes == 327_680 * 4096 * 8
    assert e.weight_bytes == 68_976_648_192 * 2
    assert e.total_bytes == e.weight_bytes + e.kv_cache_bytes


def test_gqa_shrinks_kv_cache_and_int_weights_keep_fp16_kv():
    # Llama-2-7B (32 KV heads) vs Llama-3-8B (8 KV heads): 4x less cache per token at the same dims
    a = est.estimate("llama-2-7b", "bf16", context=1000, batch=3)
    b = est.estimate("llama-3-8b", "bf16", context=1000, batch=3)
    assert a.kv_cache_bytes == 4 * b.kv_cache_bytes
    q = est.estimate("llama-3-8b", "int4", context=1000, batch=3)
    assert q.kv_dtype == "fp16" and q.kv_cache_bytes == b.kv_cache_bytes
    assert q.weight_bytes == b.weight_bytes / 4
    assert est.estimate("llama-3-8b", "int4", 1000, 3, kv_dtype="fp8").kv_cache_bytes == b.kv_cache_bytes / 2


def test_custom_shape_and_param_override():
    shape = est.custom_shape(70e9, num_layers=80, num_kv_heads=8, head_dim=128)
    e = est.estimate(shape, "int8", context=7, batch=5)
    assert e.weight_bytes == 70e9
    assert e.kv_cache_bytes == 2 * 80 * 8 * 128 * 2 * 7 * 5  # int8 weights keep an fp16 (2-byte) cache
    assert est.estimate("llama-2-70b", "fp16", num_params=70e9).weight_bytes == 140e9


@pytest.mark.parametrize("kwargs,match", [
    ({"model": "llama-9b"}, "unknown model preset 'llama-9b'; allowed: llama-2-7b"),
    ({"dtype": "fp5"}, "unknown dtype 'fp5'; allowed: fp32, fp16, bf16, fp8, int8, int4"),
    ({"context": 0}, r"context must be an integer in \[1, 1,000,000,000\], got 0"),
    ({"batch": -2}, r"batch must be an integer in \[1, 1,000,000\], got -2"),
    ({"batch": 2.5}, "batch must be an integer"),
    ({"num_params": -1.0}, r"num_params must be a number in \[1, 1e\+15\], got -1.0"),
    # beyond float range: an OverflowError from math.isfinite(int), or "inf GB" and "nan GPUs" printed
    ({"context": 10**310}, r"context must be an integer in \[1, 1,000,000,000\], got about 10\*\*310"),
    ({"batch": 10**400}, r"batch must be an integer in \[1, 1,000,000\], got about 10\*\*400"),
    ({"num_params": 1e308}, r"num_params must be a number in \[1, 1e\+15\], got 1e\+308"),
    ({"context": float("nan")}, "context must be an integer"),
    ({"kv_dtype": "int3"}, "unknown dtype 'int3'"),
])
def test_invalid_inputs_name_the_value_and_the_allowed_range(kwargs, match):
    args = {"model": "llama-2-7b", "dtype": "fp16", "context": 16, "batch": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        est.estimate(**args)


def test_custom_shape_rejects_zero_layers():
    with pytest.raises(ValueError, match=r"num_layers must be an integer in \[1, 10,000\], got 0"):
        est.custom_shape(1e9, num_layers=0, num_kv_heads=8, head_dim=128)


def test_cli_table_and_estimate(capsys):
    assert main(["estimate", "--table"]) == 0
    out = capsys.readouterr().out
    assert "140 GB" in out and "70 GB" in out and "35 GB" in out
    assert main(["estimate", "--model", "llama-2-70b", "--dtype", "fp16", "--context", "4096", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "137.95 GB" in out and "10.74 GB" in out and "148.69 GB" in out
    assert main(["estimate", "--params", "70b", "--layers", "80", "--kv-heads", "8", "--head-dim", "128",
                 "--dtype", "int4", "--context", "1", "--batch", "1"]) == 0
    assert "35.00 GB" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--model", "gpt-5"], "allowed: llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b, smollm2-135m"),
    (["--model", "llama-2-7b", "--dtype", "q4"], "allowed: fp32, fp16, bf16, fp8, int8, int4"),
    (["--model", "llama-2-7b", "--context", "-5"], "context must be an integer in [1, 1,000,000,000], got -5"),
    (["--params", "7b"], "give --model"),
    (["--model", "smollm2-135m", "--context", "1" + "0" * 310], "got about 10**310"),  # was an OverflowError
    (["--model", "smollm2-135m", "--batch", "1" + "0" * 400], "batch must be an integer in [1, 1,000,000]"),
    (["--params", "1e308", "--layers", "1", "--kv-heads", "1", "--head-dim", "1"],  # printed "inf GB", exit 0
     "num_params must be a number in [1, 1e+15], got 1e+308"),
    (["--params", "1e200", "--layers", "1", "--kv-heads", "1", "--head-dim", "1", "--context", "1" + "0" * 300],
     "num_params must be a number in [1, 1e+15]"),
    (["--model", "llama-3-8b", "--gpu-gb", "1e-300"], "gpu_gb must be a number in [0.001, 100000], got 1e-300"),
    # the table is fixed: these were ignored, exit 0, and never checked
    (["--table", "--model", "nonsense", "--context", "-5"],
     "--table prints the fixed 70B table and reads no other flag; drop --model, --context"),
    (["--table", "--dtype", "int4"], "drop --dtype"),
])
def test_cli_errors_exit_2_with_a_clear_message(argv, match, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_largest_inputs_give_finite_numbers():
    """Every input at its LIMITS bound: the bytes and the GPU count stay finite floats."""
    top = {name: high for name, (_, high) in est.LIMITS.items()}
    low = est.LIMITS["gpu_gb"][0]
    shape = est.custom_shape(top["num_params"], top["num_layers"], top["num_kv_heads"], top["head_dim"])
    table = est.format_estimate(est.estimate(shape, "fp32", top["context"], top["batch"]), gpu_gb=low)
    assert "inf" not in table and "nan" not in table
