"""Our GGUF reader and dequantizers against the `gguf` package (the oracle), and its errors on bad files.

Crafted files are written with gguf's GGUFWriter into tmp_path; the real file is the bundled SmolLM2.
"""
from __future__ import annotations

import os
import shutil
import struct
import time

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from minillm.loader.dequant import GGML_TYPES, dequantize_q4_0
from minillm.loader.gguf import GGUFError, GGUFFile
from minillm.loader.gguf_model import load_gguf_model
from minillm.loader.model_files import default_model_path

GGUF_PATH = default_model_path()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this module's big elementwise work on one thread.

    The CI/dev CPU has 2 cores shared by several test runs; there, OpenMP's spin-waiting makes a
    2-thread elementwise op 10x slower than a 1-thread one (measured: 16 s vs 1.3 s to load SmolLM2).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ours() -> GGUFFile:
    return GGUFFile(GGUF_PATH)


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(GGUF_PATH)


def write_gguf(path, arch: str = "llama", tensors: dict | None = None, kv: dict | None = None,
               alignment: int | None = None) -> str:
    """A GGUF with the given metadata and tensors; tensors map name -> (numpy array in PyTorch order, type)."""
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype, *sub) in (kv or {}).items():
        writer.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for name, (array, qtype) in (tensors or {}).items():
        if array.dtype == np.uint8:  # already-encoded blocks, as bytes
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif qtype in (QT.F32, QT.F16):
            writer.add_tensor(name, array.astype(np.float32 if qtype == QT.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf_quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()  # writes the tensor table, padding, then the data
    writer.close()
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------------
# The bundled file, read by us and by the gguf package
# ---------------------------------------------------------------------------------------------------
def test_metadata_matches_gguf_package(ours, reader):
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(theirs)
    for key, value in theirs.items():
        if isinstance(value, float):
            assert ours.metadata[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert ours.metadata[key] == value, key
    assert ours.version == 3 and ours.alignment == 32
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900


def test_tensor_table_matches_gguf_package(ours, reader):
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert info.ggml_type == int(t.tensor_type) and info.offset == t.data_offset, t.name
        assert info.nbytes == t.n_bytes, t.name
    types = [info.type_name for info in ours.tensors.values()]
    assert types.count("Q4_1") == 210 and types.count("Q8_0") == 1 and types.count("F32") == 61


def test_every_tensor_dequantizes_like_gguf(ours, reader):
    for t in reader.tensors:
        expected = torch.from_numpy(gguf_dequantize(t.data, t.tensor_type).astype(np.float32))
        got = ours.load_tensor(t.name)
        assert got.dtype == torch.float32 and got.shape == expected.shape, t.name
        assert (got - expected).abs().max().item() <= 1e-6, t.name
    assert ours.load_tensor("token_embd.weight").shape == (49152, 576)  # [vocab, hidden]
    assert ours.load_tensor("blk.0.ffn_down.weight").shape == (576, 1536)  # [out, in]


def test_whole_model_loads_in_seconds():
    # A Python loop over the ~3M blocks would take minutes; vectorized it is well under a second.
    # The bound is loose because this machine is shared by several test runs at once.
    start = time.perf_counter()
    config, weights = load_gguf_model(GGUF_PATH)
    count = sum(1 for _ in weights)
    elapsed = time.perf_counter() - start
    assert count == 2 + 9 * config.num_hidden_layers  # embed + final norm + 9 per layer (lm_head tied)
    assert elapsed < 15.0, f"loading took {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------------
# Dequantizers on synthetic data: quantized by gguf, decoded by us, compared with gguf's decoding
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.F16, QT.BF16, QT.F32])
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (7, 160), (2, 5, 64)])
def test_dequantizers_match_gguf(qtype, shape):
    rng = np.random.default_rng(hash((int(qtype), shape)) % 2**32)
    data = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    data[0, ..., :3] = [0.0, 1e-3, -7.5]  # a zero, a tiny and a large value in the first block
    packed = gguf_quantize(data, qtype)
    raw = torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).reshape(-1).copy())
    got = GGML_TYPES[int(qtype)].dequantize(raw).reshape(shape)
    expected = torch.from_numpy(gguf_dequantize(packed, qtype).astype(np.float32))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if qtype in (QT.F32, QT.BF16, QT.F16):
        return
    error = (got - torch.from_numpy(data)).abs().max().item()
    assert error <= np.abs(data).max() / (7 if qtype != QT.Q8_0 else 127) + 1e-6  # within one quantization step


# Where scale fields live in each block (byte offsets of fp16 d, and of dmin/m where the type has one).
SCALE_OFFSETS = {QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def random_blocks(qtype, n_blocks: int, seed: int) -> np.ndarray:
    """Random block bytes (every bit pattern of the quants and sub-scales) with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        blocks[:, offset:offset + 2] = rng.uniform(-2, 2, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", list(SCALE_OFFSETS))
@pytest.mark.parametrize("n_blocks", [1, 3, 40])
def test_5bit_and_k_quant_dequantizers_match_gguf(qtype, n_blocks):
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    rows = 2 if n_blocks % 2 == 0 else 1
    packed = random_blocks(qtype, n_blocks, seed=n_blocks + int(qtype)).reshape(rows, -1)
    expected = gguf_dequantize(packed, qtype)
    got = GGML_TYPES[int(qtype)].dequantize(torch.from_numpy(packed.reshape(-1).copy()))
    assert expected.shape == (rows, n_blocks // rows * block_size)
    error = (got.reshape(expected.shape) - torch.from_numpy(expected)).abs().max().item()
    assert error <= 1e-6 * np.abs(expected).max()


def test_q4_0_nibble_order_by_hand():
    # Byte j holds element j (low nibble) and element j+16 (high nibble): build it by hand, no oracle.
    low, high = np.arange(16, dtype=np.uint8), (15 - np.arange(16)).astype(np.uint8)
    block = np.concatenate([np.array([0.5], dtype=np.float16).view(np.uint8), low | (high << 4)])
    got = dequantize_q4_0(torch.from_numpy(block.copy()))
    expected = np.concatenate([(low.astype(np.float32) - 8) * 0.5, (high.astype(np.float32) - 8) * 0.5])
    assert got.tolist() == expected.tolist()


def test_crafted_file_all_value_types_and_custom_alignment(tmp_path):
    VT = gguf.GGUFValueType
    kv = {
        "t.u8": (250, VT.UINT8), "t.i8": (-100, VT.INT8), "t.u16": (65000, VT.UINT16), "t.i16": (-32000, VT.INT16),
        "t.u32": (4_000_000_000, VT.UINT32), "t.i32": (-2_000_000_000, VT.INT32), "t.f32": (0.25, VT.FLOAT32),
        "t.bool": (True, VT.BOOL), "t.str": ("héllo ✓", VT.STRING), "t.u64": (2**63 + 5, VT.UINT64),
        "t.i64": (-(2**62), VT.INT64), "t.f64": (1e-300, VT.FLOAT64),
        "t.arr_i32": ([1, -2, 3], VT.ARRAY, VT.INT32), "t.arr_str": (["a", "", "ü b"], VT.ARRAY, VT.STRING),
        "t.arr_f32": ([0.5, -1.5], VT.ARRAY, VT.FLOAT32),
    }
    rng = np.random.default_rng(0)
    tensors = {"a": (rng.standard_normal((3, 64)), QT.Q4_1), "b": (rng.standard_normal(5), QT.F32),
               "c": (rng.standard_normal((2, 32)), QT.Q8_0), "d": (rng.standard_normal((4, 3)), QT.F16)}
    path = write_gguf(tmp_path / "all.gguf", kv=kv, tensors=tensors, alignment=64)
    f = GGUFFile(path)
    assert f.alignment == 64 and f.data_start % 64 == 0
    for key, (value, *_) in kv.items():
        assert f.metadata[key] == value, key
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        assert f.tensors[t.name].offset % 64 == 0
        expected = gguf_dequantize(t.data, t.tensor_type).astype(np.float32)
        assert f.load_tensor(t.name).numpy().tolist() == expected.tolist(), t.name
    assert f.load_tensor("d").shape == (4, 3) and f.load_tensor("b").shape == (5,)


# ---------------------------------------------------------------------------------------------------
# Errors: each names the path and what is wrong
# ---------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(GGUFError, match=r"nope\.gguf: GGUF file not found"):
        GGUFFile(path)


def _prefix_copy(tmp_path, n: int) -> str:
    path = tmp_path / f"first_{n}.gguf"
    with open(GGUF_PATH, "rb") as src:
        path.write_bytes(src.read(n))
    return os.fspath(path)


def test_truncated_files(tmp_path, ours):
    with pytest.raises(GGUFError, match=r"first_10\.gguf: truncated: 10 bytes"):
        GGUFFile(_prefix_copy(tmp_path, 10))
    with pytest.raises(GGUFError, match=r"truncated or corrupt: reading metadata 'tokenizer.ggml.tokens'"):
        GGUFFile(_prefix_copy(tmp_path, 20_000))  # cut inside the token list
    size = os.path.getsize(GGUF_PATH)
    path = _prefix_copy(tmp_path, size - 1000)
    with pytest.raises(GGUFError) as info:
        GGUFFile(path)
    message = str(info.value)
    last = max(ours.tensors.values(), key=lambda info: info.offset)  # the tensor that now runs past the end
    assert message == (f"{path}: truncated: tensor {last.name} needs bytes {last.offset}..{last.offset + last.nbytes} "
                       f"but file has {size - 1000}")


def test_corrupt_magic_and_version(tmp_path):
    data = bytearray(open(GGUF_PATH, "rb").read(4096))
    bad = tmp_path / "bad_magic.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match=r"bad_magic\.gguf: not a GGUF file: bad magic b'GGML'"):
        GGUFFile(bad)
    v2 = tmp_path / "v2.gguf"  # version 2 has the same little-endian layout as 3
    shutil.copyfile(GGUF_PATH, v2)
    with open(v2, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", 2))
    assert GGUFFile(v2).version == 2 and len(GGUFFile(v2).tensors) == 272
    for version, pattern in [(1, "unsupported GGUF version 1"), (7, "unsupported GGUF version 7"),
                             (0x03000000, "big-endian")]:
        patched = tmp_path / f"v{version}.gguf"
        patched.write_bytes(data[:4] + struct.pack("<I", version) + data[8:])
        with pytest.raises(GGUFError, match=pattern):
            GGUFFile(patched)


def test_unsupported_quant_type_names_it(tmp_path):
    q2k = np.random.default_rng(1).integers(0, 256, (2, 84), dtype=np.uint8)  # one 84-byte Q2_K block per row
    path = write_gguf(tmp_path / "q2k.gguf", tensors={"w": (q2k, QT.Q2_K)})
    f = GGUFFile(path)  # opening works: the error comes when the tensor is read
    assert f.tensors["w"].type_name == "Q2_K" and f.tensors["w"].shape == (2, 256)
    with pytest.raises(GGUFError, match=r"q2k\.gguf: tensor 'w' has type Q2_K, which minillm cannot decode; "
                                        r"supported types: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, "
                                        r"Q6_K, BF16"):
        f.load_tensor("w")
    with pytest.raises(GGUFError, match=r"no tensor named 'missing'"):
        f.load_tensor("missing")


# ---------------------------------------------------------------------------------------------------
# GGUF -> ModelConfig + HF-named weights
# ---------------------------------------------------------------------------------------------------
def test_config_from_smollm2_metadata():
    config, _ = load_gguf_model(GGUF_PATH)
    assert (config.architecture, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == \
        ("llama", 30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings, config.rope_theta) == (49152, 8192, 100000.0)
    assert config.tie_word_embeddings and config.rope_scaling is None and not config.attention_bias
    assert config.rms_norm_eps == pytest.approx(1e-5) and (config.bos_token_id, config.eos_token_id) == (1, 2)


@pytest.mark.slow
def test_weights_equal_transformers_state_dict():
    """Every tensor, q_proj/k_proj included (so the un-permutation is right), equals transformers' GGUF load."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF_PATH), gguf_file=os.path.basename(GGUF_PATH),
                                              dtype=torch.float32)
    state = hf.state_dict()
    _, weights = load_gguf_model(GGUF_PATH)
    names = set()
    for name, tensor in weights:
        names.add(name)
        assert tensor.shape == state[name].shape, name
        assert (tensor - state[name]).abs().max().item() <= 1e-6, name
    assert names == set(state) - {"lm_head.weight"}  # tied: the model reuses embed_tokens


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to W_q / W_k of a Llama (written here from its definition)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_gguf_from_hf(path, arch: str = "llama", drop: tuple = (), replace: dict | None = None, kv: dict | None = None):
    """A random 2-layer HF model written as llama.cpp would: GGUF names, permuted Q/K (llama), F32."""
    import transformers

    VT = gguf.GGUFValueType
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=80, max_position_embeddings=128, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))
    elif arch == "qwen3":  # per-head q/k norms (head_dim 32: not hidden / heads, as in Qwen3's configs)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32,
                                                                       tie_word_embeddings=False))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    tensors = {}
    for hf_name, array in state.items():
        if hf_name.startswith("model.layers."):
            _, _, layer, *rest = hf_name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            gguf_name = f"blk.{layer}.{layer_names[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                array = llama_cpp_permute(array, 4 if module == "self_attn.q_proj" else 2)
        else:
            gguf_name = names[hf_name]
        if gguf_name not in drop:
            tensors[gguf_name] = ((replace or {}).get(gguf_name, array), QT.F32)
    meta = {f"{arch}.block_count": (2, VT.UINT32), f"{arch}.embedding_length": (64, VT.UINT32),
            f"{arch}.feed_forward_length": (96, VT.UINT32), f"{arch}.attention.head_count": (4, VT.UINT32),
            f"{arch}.attention.head_count_kv": (2, VT.UINT32), f"{arch}.context_length": (128, VT.UINT32),
            f"{arch}.attention.layer_norm_rms_epsilon": (1e-6, VT.FLOAT32),
            f"{arch}.rope.freq_base": (10000.0, VT.FLOAT32), f"{arch}.vocab_size": (80, VT.UINT32)}
    if arch == "qwen3":
        meta[f"{arch}.attention.key_length"] = (32, VT.UINT32)
    meta.update(kv or {})
    return write_gguf(path, arch=arch, tensors=tensors, kv=meta), model.state_dict()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_round_trips_with_gqa_unpermute(tmp_path, arch):
    path, state = tiny_gguf_from_hf(tmp_path / f"{arch}.gguf", arch=arch)
    config, weights = load_gguf_model(path)
    assert (config.architecture, config.attention_bias, config.tie_word_embeddings) == (arch, arch == "qwen2", False)
    assert config.qk_norm == (arch == "qwen3") and config.head_dim == (32 if arch == "qwen3" else 16)
    loaded = dict(weights)
    assert set(loaded) == set(state)  # lm_head included: not tied; q/k/v biases for qwen2, q/k norms for qwen3
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name


def test_rope_scaling_from_metadata(tmp_path):
    VT = gguf.GGUFValueType
    path, _ = tiny_gguf_from_hf(tmp_path / "yarn.gguf", kv={
        "llama.rope.scaling.type": ("yarn", VT.STRING), "llama.rope.scaling.factor": (4.0, VT.FLOAT32),
        "llama.rope.scaling.original_context_length": (32, VT.UINT32)})
    config, _ = load_gguf_model(path)
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def test_metadata_that_cannot_split_into_heads_says_so_once(tmp_path):
    """A hidden size that is no multiple of the heads is named as that (it once read as a false "partial rotary
    (64 < head_dim 0)"), with the file named once (get() inside a try named it twice)."""
    VT = gguf.GGUFValueType
    path, _ = tiny_gguf_from_hf(tmp_path / "heads.gguf", kv={"llama.attention.head_count": (3, VT.UINT32)})
    with pytest.raises(GGUFError, match=r"^[^ ]*heads\.gguf: metadata llama\.embedding_length=64 is not a multiple of "
                                        r"llama\.attention\.head_count=3"):
        load_gguf_model(path)
    path, _ = tiny_gguf_from_hf(tmp_path / "ffn.gguf", kv={"llama.feed_forward_length": (0, VT.UINT32)})
    with pytest.raises(GGUFError) as err:
        load_gguf_model(path)
    assert str(err.value).count("ffn.gguf") == 1 and "feed_forward_length must be a positive integer" in str(err.value)


def test_wrong_tensor_shape_names_tensor_and_shapes(tmp_path):
    bad = np.zeros((64, 64), dtype=np.float32)  # k_proj must be [kv_heads * head_dim, hidden] = [32, 64]
    path, _ = tiny_gguf_from_hf(tmp_path / "bad_shape.gguf", replace={"blk.1.attn_k.weight": bad})
    with pytest.raises(GGUFError, match=r"bad_shape\.gguf: tensor model\.layers\.1\.self_attn\.k_proj\.weight "
                                        r"\(blk\.1\.attn_k\.weight in the file\) has shape \[64, 64\] but the "
                                        r"config expects \[32, 64\]"):
        load_gguf_model(path)


def test_missing_tensor_is_named(tmp_path):
    path, _ = tiny_gguf_from_hf(tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf_model(path)


def test_unsupported_architecture(tmp_path):
    VT = gguf.GGUFValueType
    path = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2", kv={"gpt2.block_count": (2, VT.UINT32)},
                      tensors={"token_embd.weight": (np.zeros((8, 32)), QT.F32)})
    with pytest.raises(GGUFError, match=r"gpt2\.gguf: unsupported architecture 'gpt2' \(general\.architecture\); "
                                        r"minillm reads GGUF files of: llama, qwen2, qwen3"):
        load_gguf_model(path)
