"""Our GGUF quantizers (Q8_0, Q4_0, Q5_0, Q4_K), our GGUF writer and `minillm quantize --method gguf-*`.

Oracles: the `gguf` package's dequantizers and GGUFReader read what we write, and its own quantizers (Q8_0,
Q4_0, Q5_0; it has none for Q4_K) set the error our searched grids must not exceed. The model-level tests use
a tiny Llama (2 layers, hidden 256 so Q4_K fits every row) with random weights and the bundled SmolLM2's
tokenizer metadata, so LLM(model=file) can load and generate from it.
"""
from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from minillm.loader import GGUFFile, default_model_path, expected_weight_shapes
from minillm.loader.gguf_model import config_from_gguf, load_gguf_model, unpermute_rotary
from minillm.loader.gguf_writer import GGUFValueType as V
from minillm.loader.gguf_writer import GGUFWriter
from minillm.quant.gguf_export import permute_rotary, tensor_types, write_gguf_model
from minillm.quant.gguf_quants import dequantize_tensor, gguf_type_for, gguf_type_id, quantize_tensor
from tiny import one_thread  # noqa: F401  (autouse fixture)

TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q4_K")


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with the awkward blocks real ones have: one large outlier, a zero block, a constant block,
    an all-positive block and a block with a single non-zero weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, 5] = 0.4
    w[1, :32] = 0.0
    w[1, 32:64] = -0.013
    w[2, :32] = w[2, :32].abs() + 0.01
    w[2, 64:96] = 0.0
    w[2, 70] = 0.05
    return w


def _sse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().sum())


@pytest.mark.parametrize("type_name", TYPES)
def test_our_bytes_decode_identically_in_both_dequantizers(type_name):
    w = _weights(3, 768)
    type_id, raw = quantize_tensor(w, type_name)
    assert type_id == gguf_type_id(type_name) and raw.dtype == torch.uint8
    ours = dequantize_tensor(raw, type_name, w.shape)
    theirs = gguf_dequantize(raw.numpy().reshape(3, -1), QT[type_name])
    assert torch.equal(ours, torch.from_numpy(np.array(theirs)))
    assert (ours[1, :32] == 0).all()  # a zero block stays exactly zero
    bpw = 8 * raw.numel() / w.numel()
    assert bpw == {"Q8_0": 8.5, "Q4_0": 4.5, "Q5_0": 5.5, "Q4_K": 4.5}[type_name]


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0"])
def test_searched_scales_never_lose_to_ggml_reference(type_name):
    """Block by block: rounding to the nearest level of the stored fp16 scale, with ggml's scale among the
    candidates, can only match or beat ggml's quantizer; overall it should beat it clearly."""
    w = _weights(16, 512, seed=1)
    ours = dequantize_tensor(quantize_tensor(w, type_name)[1], type_name, w.shape)
    ref = torch.from_numpy(gguf_dequantize(gguf_quantize(w.numpy(), QT[type_name]), QT[type_name]).copy())
    per_block = lambda d: (d - w).double().square().reshape(-1, 32).sum(1)  # noqa: E731
    assert (per_block(ours) <= per_block(ref) * (1 + 1e-6) + 1e-18).all()
    assert _sse(ours, w) < 0.97 * _sse(ref, w)


def test_q4_k_beats_the_unquantized_min_max_grid():
    """Q4_K stores 6-bit sub-block scales, yet its searched (scale, min) should beat plain min-max rounding with
    exact fp32 scale and min per 32 weights (the grid Q4_1 would use), and Q4_0 by far."""
    w = _weights(8, 512, seed=2)
    q4k = dequantize_tensor(quantize_tensor(w, "Q4_K")[1], "Q4_K", w.shape)
    blocks = w.reshape(-1, 32)
    lo, hi = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
    step = (hi - lo).clamp(min=1e-12) / 15
    minmax = ((blocks - lo) / step).round().clamp(0, 15) * step + lo
    q4_0 = dequantize_tensor(quantize_tensor(w, "Q4_0")[1], "Q4_0", w.shape)
    assert _sse(q4k, w) < 0.95 * _sse(minmax.reshape(w.shape), w)
    assert _sse(q4k, w) < 0.8 * _sse(q4_0, w)


def test_quantizers_validate_their_input():
    with pytest.raises(ValueError, match="blocks of 256"):
        quantize_tensor(torch.zeros(2, 576), "Q4_K")
    with pytest.raises(ValueError, match="blocks of 32; a row of shape \\[40\\]"):
        quantize_tensor(torch.zeros(40), "Q4_0")
    with pytest.raises(ValueError, match="NaN"):
        quantize_tensor(torch.full((32,), float("nan")), "Q8_0")
    with pytest.raises(ValueError, match="unknown GGUF type"):
        quantize_tensor(torch.zeros(32), "Q3_K")
    with pytest.raises(TypeError, match="floating-point"):
        quantize_tensor(torch.zeros(32, dtype=torch.int32), "Q8_0")
    # llama.cpp's fallbacks: Q4_K -> Q5_0 for SmolLM2's 576-wide rows; F16 when not even 32 fits
    assert gguf_type_for("Q4_K", (1536, 576)) == "Q5_0" and gguf_type_for("Q4_K", (576, 1536)) == "Q4_K"
    assert gguf_type_for("Q4_0", (8, 48)) == "F16"


# -- the container -------------------------------------------------------------------------------------------
METADATA = {  # key -> (value, type, element type): one of every type the reader supports
    "a.u8": (250, V.UINT8, None), "a.i8": (-7, V.INT8, None), "a.u16": (65000, V.UINT16, None),
    "a.i16": (-700, V.INT16, None), "a.u32": (70000, V.UINT32, None), "a.i32": (-70000, V.INT32, None),
    "a.f32": (1.5, V.FLOAT32, None), "a.bool": (True, V.BOOL, None), "a.str": ("héllo <|im_end|>", V.STRING, None),
    "a.u64": (2 ** 40, V.UINT64, None), "a.i64": (-2 ** 40, V.INT64, None), "a.f64": (0.1, V.FLOAT64, None),
    "a.i32s": ([1, -2, 3], V.ARRAY, V.INT32), "a.strs": (["x", "", "yy"], V.ARRAY, V.STRING),
    "a.f32s": ([1.0, 2.5], V.ARRAY, V.FLOAT32), "a.bools": ([True, False], V.ARRAY, V.BOOL),
    "a.empty": ([], V.ARRAY, V.UINT8),
}


@pytest.mark.parametrize("alignment", [32, 64])
def test_writer_round_trips_through_both_readers(tmp_path, alignment):
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(path, alignment=alignment)
    writer.add_metadata("general.architecture", "llama")
    for key, (value, vtype, etype) in METADATA.items():
        writer.add_metadata(key, value, vtype, etype)
    writer.add_metadata("a.nested", [[1, 2], [3]], V.ARRAY, V.ARRAY)
    w = _weights(4, 256)
    expected = {}
    for type_name in ("F32", "F16") + TYPES:
        type_id, raw = quantize_tensor(w, type_name)
        writer.add_tensor(f"w.{type_name}", tuple(w.shape), type_id, lambda raw=raw: raw)  # lazily, as the model
        expected[f"w.{type_name}"] = dequantize_tensor(raw, type_name, w.shape)
    writer.add_tensor("odd", (3,), 0, torch.tensor([1.0, 2.0, 3.0]).view(torch.uint8))  # 12 bytes: padded
    expected["odd"] = torch.tensor([1.0, 2.0, 3.0])
    writer.write()

    ours = GGUFFile(path)
    assert ours.version == 3 and ours.alignment == alignment
    for key, (value, vtype, etype) in METADATA.items():
        assert ours.metadata[key] == pytest.approx(value) and ours.metadata_types[key] == (vtype, etype), key
    assert ours.metadata["a.nested"] == [[1, 2], [3]]
    for name, tensor in expected.items():
        assert torch.equal(ours.load_tensor(name), tensor), name
    reader = gguf.GGUFReader(path)
    for key, (value, vtype, etype) in METADATA.items():
        field = reader.fields[key]
        assert field.contents() == pytest.approx(value) and field.types[0] == vtype, key
    for t in reader.tensors:
        data = gguf_dequantize(t.data, t.tensor_type).reshape(expected[t.name].shape)
        assert torch.equal(torch.from_numpy(np.array(data, dtype=np.float32)), expected[t.name]), t.name
        assert (t.data_offset - reader.data_offset) % alignment == 0


def test_writer_validates_its_input(tmp_path):
    writer = GGUFWriter(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="power of two"):
        GGUFWriter(tmp_path / "y.gguf", alignment=48)
    with pytest.raises(ValueError, match="does not fit UINT8"):
        writer.add_metadata("k", 300, V.UINT8)
    with pytest.raises(TypeError, match="cannot hold a dict"):
        writer.add_metadata("k", {"a": 1})
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size 256"):
        writer.add_tensor("t", (2, 576), gguf_type_id("Q4_K"), torch.zeros(1, dtype=torch.uint8))
    writer.add_tensor("t", (2, 32), gguf_type_id("Q8_0"), lambda: torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="got 10 bytes, but shape \\[2, 32\\] in Q8_0 takes 68"):
        writer.write()
    assert not (tmp_path / "x.gguf").exists()  # nothing half-written under the real name


# -- a whole model -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source GGUFFile with SmolLM2's tokenizer, tiny config, HF-named random weights)."""
    source = GGUFFile(default_model_path())
    config = dataclasses.replace(config_from_gguf(source), hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                 max_position_embeddings=256)
    g = torch.Generator().manual_seed(0)
    weights = {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * shape[-1] ** -0.5)
               for name, shape in expected_weight_shapes(config).items()}
    return source, config, weights


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    source, config, weights = tiny
    out = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf_model(out / f"tiny-{t}.gguf", config, weights, t, source, progress=False)
            for t in ("Q4_0", "Q4_K", "Q8_0")}


def test_rotary_permutation_is_llama_cpps():
    w = torch.arange(4 * 64 * 3, dtype=torch.float32).reshape(4 * 64, 3)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 4), 4), w)
    assert torch.equal(permute_rotary(w, 4)[:2, 0], torch.tensor([0.0, 32 * 3]))  # rows j and j + head_dim / 2 pair


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q8_0"])
def test_model_file_reads_back_in_both_readers(tiny, written, type_name):
    source, config, weights = tiny
    path = written[type_name]
    ours = GGUFFile(path)
    assert config_from_gguf(ours) == config
    skipped = ("general.file_type",) + tuple(k for k in source.metadata if k.startswith("llama."))
    for key, value in source.metadata.items():  # tokenizer, chat template, general.*: copied with their types
        if key not in skipped:
            assert ours.metadata[key] == value and ours.metadata_types[key] == source.metadata_types[key], key
    assert ours.metadata["general.file_type"] == {"Q4_0": 2, "Q8_0": 7, "Q4_K": 14}[type_name]
    types = tensor_types(config, type_name)
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.norm.weight"] == "F32"
    reader = gguf.GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(ours.tensors)
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert t.tensor_type.name == info.type_name and tuple(int(d) for d in reversed(t.shape)) == info.shape
        if t.name.startswith("blk.0.") or t.name == "output_norm.weight":  # a sample: token_embd is big
            theirs = gguf_dequantize(t.data, t.tensor_type).reshape(info.shape)
            assert torch.equal(torch.from_numpy(np.array(theirs, dtype=np.float32)),
                               ours.load_tensor(t.name))
    bound = {"Q8_0": 0.01, "Q4_K": 0.12, "Q4_0": 0.15}[type_name]  # relative error of Gaussian weights
    for name, tensor in load_gguf_model(ours)[1]:  # unpermuted by the loader: back in HF order
        rel = float((tensor - weights[name]).norm() / weights[name].norm())
        assert rel < (1e-9 if types[name] == "F32" else bound), (name, rel)


def test_llm_generates_from_the_written_file(written):
    from minillm.llm import LLM
    from minillm.sampling_params import SamplingParams
    llm = LLM(model=written["Q4_K"], max_model_len=64, max_num_seqs=2)
    assert llm.llm_engine.model_config.hidden_size == 256
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4 and isinstance(out[0].outputs[0].text, str)
    assert "<|im_start|>" in llm.tokenizer.chat_template  # the chat template came along


def test_transformers_reads_the_written_file_as_we_do(written):
    """An independent GGUF reader (transformers: its own metadata parsing, name mapping, dequantizers and
    tokenizer conversion) builds the same model from our file. (The Q/K row order is checked above: both readers
    undo llama.cpp's permutation, and ours gives back the weights we wrote.)"""
    import os

    from transformers import AutoModelForCausalLM

    from minillm.engine.worker import build_model
    from minillm.forward_context import forward_context, prefill_metadata
    from minillm.loader import load_model
    path = written["Q4_K"]
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    config, weights, _ = load_model(path)
    ours = build_model(config, weights, torch.device("cpu"), torch.float32)
    ids = torch.tensor([1, 504, 3458, 282, 4649, 314, 9001, 30, 216])
    with torch.no_grad(), forward_context(prefill_metadata([len(ids)])):
        got = ours.compute_logits(ours(ids, torch.arange(len(ids))))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert torch.allclose(got, ref, atol=2e-4, rtol=1e-4), float((got - ref).abs().max())


def test_cli_writes_a_gguf(tmp_path, written, capsys):
    from minillm.cli import main
    out = tmp_path / "again.gguf"
    assert main(["quantize", written["Q4_K"], "--method", "gguf-q8_0", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    assert {t.type_name for t in GGUFFile(out).tensors.values()} == {"Q8_0", "F32"}
    assert main(["quantize", written["Q4_K"], "--method", "gguf-q4_0", "--out", str(tmp_path / "dir")]) == 2
    assert "FILE.gguf" in capsys.readouterr().err


def test_cli_converts_an_hf_directory(tmp_path, tiny, capsys):
    """An HF directory has a tokenizer.json, not GGUF keys: the converted tokenizer must split text the same way."""
    from safetensors.torch import save_file

    from minillm.cli import main
    from minillm.loader import Tokenizer
    from minillm.quant.checkpoint import hf_config_dict, save_tokenizer
    from minillm.quant.gguf_tokenizer import PROBES
    source, config, weights = tiny
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config_dict(config)))
    save_file(weights, str(hf / "model.safetensors"))
    original = Tokenizer.from_gguf(source)
    save_tokenizer(original, str(hf))
    out = tmp_path / "from-hf.gguf"
    assert main(["quantize", str(hf), "--method", "gguf-q8_0", "--out", str(out)]) == 0, capsys.readouterr().err
    written = GGUFFile(out)
    assert written.metadata["tokenizer.ggml.pre"] == "smollm"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert written.metadata[key] == source.metadata[key], key
    rebuilt = Tokenizer.from_gguf(written)
    for text in PROBES + ("<|im_start|>user\nHi 42<|im_end|>",):
        assert rebuilt.encode(text) == original.encode(text), text
    assert config_from_gguf(written) == config
