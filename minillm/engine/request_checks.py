"""What the engine checks of a request before it queues it (chapters 1 and 10): the prompt and the parts of its
SamplingParams that depend on this engine (its vocabulary, context, KV pool, scheduling policy, tokenizer and
constraint compiler). SamplingParams checks the rest on its own; LLMEngine inherits these checks, and the server
and AsyncLLM call them before queuing, so a bad request is refused alone, with the field it got wrong."""
from __future__ import annotations

import numbers
from typing import Sequence as SequenceT

import torch

from minillm.engine.constraints import RequestConstraint
from minillm.engine.detokenizer import keeps_special_tokens
from minillm.engine.prompt_embeds import check_prompt_embeds
from minillm.sampling_params import ParamError, SamplingParams


class RequestChecks:
    """Mixed into LLMEngine: reads model_config, engine_config, max_model_len, tokenizer, scheduler, constraints,
    lora_slots."""

    def check_sampling_params(self, params: SamplingParams, pooling: bool = False) -> RequestConstraint | None:
        """ParamError, for this request only, for what SamplingParams cannot check alone: logit_bias token ids
        outside this model's vocabulary, a priority the scheduling policy would ignore (check_priority),
        skip_special_tokens=False with a tokenizer that cannot keep special tokens as text, n > 1 (an engine
        request is one sequence: LLM.generate, LLM.chat and the server submit params.choices()), and a constraint
        this engine cannot enforce (a bad regex or schema, an allowed token id outside the vocabulary). Returns the
        request's compiled constraint (engine/constraints.py; None without one), which add_request keeps. Reads only
        the configuration and the compiler's lock-guarded cache: safe beside a running step (AsyncLLM and the server
        check before queuing). A classification model (ModelConfig.num_labels) refuses every request but a
        pooling one (`pooling`: the params embedding_sampling_params made): it has no LM head to generate with."""
        if self.model_config.num_labels and not pooling:
            from minillm.classification import generation_refusal  # (it imports the engine's types)
            raise ValueError(generation_refusal(self.model_config))
        if params.n > 1:
            raise ParamError("n", f"n={params.n}: an engine request is one sequence; submit params.choices() (n "
                                  f"requests), as LLM.generate, LLM.chat and the OpenAI server do")
        self.check_priority(params.priority)
        if not params.skip_special_tokens and not keeps_special_tokens(self.tokenizer):
            raise ParamError("skip_special_tokens", f"skip_special_tokens=False needs a tokenizer that can decode "
                             f"special tokens as text; {type(self.tokenizer).__name__}.decode takes no such switch")
        for name in ("logprobs", "prompt_logprobs"):
            self.check_num_logprobs(name, getattr(params, name))
        from minillm.loader.no_tokenizer import NO_TOKENIZER, NoTokenizer  # lazy: the loader's package is heavy
        if params.stop_list and isinstance(self.tokenizer, NoTokenizer):  # they would never match an empty text
            raise ParamError("stop", f"stop strings {params.stop_list!r} are matched in the output text, and "
                                     f"{NO_TOKENIZER}; use stop_token_ids")
        vocab = self.model_config.vocab_size
        outside = [t for t in params.logit_bias or () if t >= vocab]
        if outside:
            raise ParamError("logit_bias", f"logit_bias token id {outside[0]} is outside the vocabulary [0, {vocab})")
        constraint = self.constraints.for_request(params)  # a bad schema, regex or token id raises here
        if constraint is not None and constraint.index is not None and params.min_tokens > 0:
            eos = () if params.ignore_eos else tuple(self.eos_token_ids)
            left = constraint.all_banned(constraint.index.start, [], eos + tuple(params.stop_token_ids or ()))
            if left is not None:  # no first token could be sampled: refused, not a failed generation
                raise ParamError("min_tokens", f"min_tokens={params.min_tokens} bans EOS and the stop_token_ids "
                                 f"{list(params.stop_token_ids or ())} until then, and every token the structured "
                                 f"output allows first ({left[:8]}) is among them: lower min_tokens or drop those "
                                 f"stop_token_ids")
        return constraint

    def check_num_logprobs(self, name: str, value: int | None) -> None:
        """ParamError unless `value` top log-probabilities per token (SamplingParams.logprobs or prompt_logprobs;
        -1: the whole vocabulary) are within this engine's EngineConfig.max_logprobs (-1: no cap), as vLLM checks."""
        if value is None:
            return
        vocab, cap = self.model_config.vocab_size, self.engine_config.max_logprobs
        cap = vocab if cap == -1 else cap
        if value == -1 and cap < vocab:
            raise ParamError(name, f"{name}=-1 asks for all {vocab} tokens of the vocabulary, but this engine "
                                   f"returns at most max_logprobs={cap}: start it with max_logprobs=-1 (no cap) or "
                                   f"ask for an integer in [0, {cap}]")
        if value > cap:
            raise ParamError(name, f"{name} must be an integer in [0, {cap}] (this engine's max_logprobs) or -1, "
                                   f"got {value}")

    def check_priority(self, priority: int) -> None:
        """ParamError unless this engine honours `priority`: any value under scheduling_policy='priority' (lower
        runs first), only 0 under 'fcfs', which would ignore it (as vLLM refuses a priority it cannot honour)."""
        policy = self.engine_config.scheduling_policy
        if priority != 0 and policy != "priority":
            raise ParamError("priority", f"priority={priority} needs scheduling_policy='priority'; this engine "
                                         f"schedules {policy!r}: build it with scheduling_policy='priority' or "
                                         f"leave priority at 0")

    def embedding_sampling_params(self, pooling_params, sampling_params: SamplingParams | None) -> SamplingParams:
        """What an embedding request (minillm/pooling.py) runs with: its prefill and one greedy token, which only
        ends it. TypeError / ValueError / ParamError for this request alone: pooling_params of the wrong type, given
        beside sampling_params, dimensions past the hidden size, or an engine that cannot pool (pooling_problem)."""
        from minillm.pooling import PoolingParams
        if not isinstance(pooling_params, PoolingParams):
            raise TypeError(f"pooling_params must be a minillm.pooling.PoolingParams, got "
                            f"{type(pooling_params).__name__}")
        if sampling_params is not None:
            raise ValueError("give sampling_params (a generation request) or pooling_params (an embedding request), "
                             "not both")
        problem = self.pooling_problem()
        if problem:
            raise ValueError(f"embedding requests are not supported here: {problem}")
        pooling_params.check(self.model_config.hidden_size)
        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, output_kind="final_only")

    def pooling_problem(self) -> str | None:
        """Why this engine cannot serve embedding requests, or None: they read their prompt rows' hidden states
        from the step's output, which an engine without speculation returns (one process, or the driver rank of
        tensor / pipeline / expert-parallel workers)."""
        if self.speculative is not None:
            return "this engine speculates (speculative_config): its steps keep the draft head's hidden states"
        return None

    def check_lora_request(self, lora_request) -> None:
        """ValueError/TypeError unless `lora_request` (None, or a LoRARequest) can run here: LoRA is on, and its
        adapter reads, fits this model and the slots' rank, and its id names no other directory (the adapter is
        read from disk the first time: the server calls this off its event loop)."""
        if lora_request is None:
            return
        if self.lora_slots is None:
            raise ValueError(f"lora_request {getattr(lora_request, 'lora_name', lora_request)!r} given, but this "
                             f"engine was built without enable_lora=True")
        self.lora_slots.check(lora_request)

    def kept_prompt_length(self, truncate: int | None) -> int | None:
        """How many of a prompt's last positions SamplingParams.truncate_prompt_tokens keeps (None: all)."""
        return self.max_model_len if truncate == -1 else truncate

    def validate_prompt(self, prompt: str | SequenceT[int] | torch.Tensor,
                        truncate: int | None = None) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt, or ValueError/TypeError saying what is wrong with it. An
        embeddings prompt (a tensor [n, hidden_size]) has n placeholder ids (minillm/engine/prompt_embeds.py).
        `truncate` (SamplingParams.truncate_prompt_tokens): only the last that many ids are kept (-1: as many as
        max_model_len), and a text prompt's text is then None."""
        if isinstance(prompt, torch.Tensor):
            embeds = check_prompt_embeds(prompt, self.model_config.hidden_size, self.engine_config.enable_prompt_embeds)
            prompt = [0] * embeds.shape[0]
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt is empty: give at least one character or one token id")
            text, token_ids = prompt, list(self.tokenizer.encode(prompt))
            if not token_ids:
                raise ValueError(f"prompt {prompt!r} encodes to zero tokens")
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or one token id")
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
            if bad:
                raise TypeError(f"a token-id prompt must hold ints (Python or numpy integers), got {bad[0]!r} "
                                f"({type(bad[0]).__name__})")
            text, token_ids = None, [int(t) for t in prompt]
        else:
            raise TypeError(f"prompt must be a str, a list of token ids or (with enable_prompt_embeds) a tensor of "
                            f"embeddings, got {type(prompt).__name__}")
        keep = self.kept_prompt_length(truncate)
        if keep is not None and len(token_ids) > keep:
            text, token_ids = None, token_ids[-keep:]
        vocab = self.model_config.vocab_size
        out_of_range = [t for t in token_ids if not 0 <= t < vocab]
        if out_of_range:
            raise ValueError(f"token id {out_of_range[0]} is outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}")
        bm = getattr(self.scheduler, "block_manager", None)  # a paged pool smaller than max_model_len
        needed = bm.peak_blocks(len(token_ids), self.engine_config.max_num_batched_tokens) if bm is not None else 0
        if bm is not None and needed > bm.max_blocks_per_seq:
            raise ValueError(f"prompt has {len(token_ids)} tokens, {needed} KV blocks of {bm.block_size}, but the "
                             f"pool gives one sequence at most {bm.max_blocks_per_seq} (its {bm.num_blocks} blocks "
                             f"minus a watermark of {bm.watermark_blocks}): give the KV cache more memory or shorten "
                             f"the prompt")
        return text, token_ids
