"""A tiny random-weight engine behind the HTTP server, for the serving tests (tests/test_serve_*.py).

Byte-level tokens, two layers of width 32: a step takes a millisecond or two on the CPU, so hundreds of
requests fit in a test's seconds. TEMPLATE is a trivial chat template (the ByteTokenizer has none).
"""
from __future__ import annotations

import time

import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.async_llm import AsyncLLM
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine.executor import UniProcExecutor
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import RandomWeights, Worker
from minillm.serve.app import build_app
from tiny import ByteTokenizer

MODEL = "tiny-random"
CONFIG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=257)
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_engine(max_num_seqs: int = 16, num_kv_blocks: int = 128, max_model_len: int = 64,
                step_delay: float = 0.0, tokenizer=None, **options) -> LLMEngine:
    """The engine; step_delay (seconds) slows every step, so a watcher (the browser test) can see it work;
    tokenizer: another than the ByteTokenizer; `options`: more EngineConfig fields (e.g. enable_chunked_prefill=True)."""
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, block_size=4,
                          num_kv_blocks=num_kv_blocks, **options)
    worker = Worker(CONFIG, resolve_engine_config(config, CONFIG, torch.device("cpu")), torch.device("cpu"),
                    torch.float32, RandomWeights(seed=3))
    engine = LLMEngine(None, tokenizer or ByteTokenizer(), CONFIG, config, executor=UniProcExecutor(worker))
    if step_delay:
        step = engine.step

        def slow_step():
            time.sleep(step_delay)
            return step()
        engine.step = slow_step
    return engine


def tiny_app(engine: LLMEngine | None = None, **kwargs):
    """(app, AsyncLLM) around a tiny engine."""
    llm = AsyncLLM(engine or tiny_engine())
    return build_app(llm, MODEL, chat_template=TEMPLATE, **kwargs), llm
