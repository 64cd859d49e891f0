"""A step's results turned into what the caller sees: log-probs, incremental text, stop checks, finished requests
(chapters 1, 9 and 10).

StepOutputs is a mixin of LLMEngine (llm_engine.py), holding no state of its own: it reads the engine's tokenizer,
scheduler, eos_token_ids, max_model_len and its per-request detokenizer state (`_requests`), and appends finished ids
to `_finished_since_last_step`. After a step's tokens are in the sequences (the scheduler's postprocess), the
engine calls `_emit_outputs`: for each new token, its log-probs (`_scored_tokens` picked them per accepted token),
then the text it adds (the detokenizer's two windows, decoded for the whole step in one tokenizer call) and the
stop checks (a stop token, a stop string that ends in the new text, max_tokens, max_model_len). A finished request
is finished (`_finish`: its blocks freed at once); a running one reports its text minus whatever could still
become a stop string (`_output`). The async step (async_step.py) and the disaggregated engine use the same methods.
"""
from __future__ import annotations

import logging
import time

from minillm.engine.detokenizer import (decode_text, decode_windows, detokenize_incrementally, stop_string_at,
                                        streamable_length)
from minillm.engine.model_runner import token_logprobs
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.engine.step_input import StepOutput, TokenLogprobs
from minillm.outputs import RequestOutput, TokenLogprobDict, logprob_dict
from minillm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class StepOutputs:
    """LLMEngine's output loop (a mixin): see the module docstring."""

    def _emit_outputs(self, seqs: list[Sequence], tokens: list[list[int]], scored: list[list[TokenLogprobs] | None],
                      outputs: list[RequestOutput]) -> None:
        """The per-request output loop of a step whose tokens are in the sequences already: log-probs, incremental
        text and stop checks for each new token; finished requests are finished (blocks freed) and every request
        the caller will see this step gets its RequestOutput appended to `outputs`."""
        try:
            decoded = self._decode_step_windows(seqs, tokens)
        except Exception:  # each sequence then decodes alone below, so a failure is its request's own
            decoded = [None] * len(seqs)
        for seq, new_tokens, entries, texts in zip(seqs, tokens, scored, decoded):
            reason = None
            try:
                for j, position in enumerate(range(seq.num_tokens - len(new_tokens), seq.num_tokens)):
                    if entries is not None:  # before the stop check: a stop token keeps its log-prob, later none
                        seq.logprobs.append(self._logprob_dict(entries[j], seq.sampling_params))
                        seq.cumulative_logprob += entries[j].logprob
                    reason = self._check_stop(seq, position, texts)
                    if reason is not None:  # a stop inside a multi-token step: the tokens after it never happened
                        seq.truncate_output(position + 1)
                        break
            except Exception as err:  # its text or log-probs cannot be made: this request fails, the step goes on
                logger.exception("request %s: output failed; finishing it with 'error'", seq.request_id)
                outputs.append(self._finish(seq, "error", error=f"{type(err).__name__}: {err}"))
                continue
            if reason is not None:
                outputs.append(self._finish(seq, reason))
            elif seq.sampling_params.output_kind == "cumulative":
                outputs.append(self._output(seq))

    def _scored_tokens(self, batch: ScheduledBatch, output: StepOutput,
                       tokens: list[list[int]]) -> list[list[TokenLogprobs] | None]:
        """Attach the step's prompt log-probs; return, per sequence that asked for logprobs, one entry per
        accepted token (None for the others). An accepted token is the one sampled at its row (plain and
        sample-and-match steps); a token the rejection rule resampled is scored from the returned logits."""
        scored: list[list[TokenLogprobs] | None] = [None] * len(batch.seqs)
        for i, seq in enumerate(batch.seqs):
            params = seq.sampling_params
            if params.prompt_logprobs is not None:
                if output.prompt_logprobs is not None:
                    seq.prompt_logprobs.extend(self._logprob_dict(e, params) for e in output.prompt_logprobs[i])
                elif tokens[i] and len(seq.prompt_logprobs) < seq.num_prompt_tokens:
                    # past its prompt (this step sampled) without every prompt score: the executor ignored the ask.
                    # A chunk with none to score (a recompute after preemption re-reading scored rows) is fine.
                    raise ValueError("prompt_logprobs were requested but this executor returned none")
            if params.logprobs is None or not tokens[i]:
                continue
            if output.logprobs is None or len(output.logprobs[i]) != len(output.sampled_token_ids[i]):
                raise ValueError("logprobs were requested but this executor returned none for the sampled rows")
            entries = []
            for j, token in enumerate(tokens[i]):
                if j < len(output.sampled_token_ids[i]) and output.sampled_token_ids[i][j] == token:
                    entries.append(output.logprobs[i][j])
                elif output.logits is not None and len(output.logits[i]) > j:  # raw ones where processors ran
                    logits = output.logits if output.raw_logits is None else output.raw_logits
                    entries.extend(token_logprobs(logits[i][j:j + 1], [token], [params.logprobs]))
                else:
                    raise ValueError(f"accepted token {token} at row {j} was not sampled there and the step "
                                     f"returned no logits to score it")
            scored[i] = entries
        return scored

    def _logprob_dict(self, entry: TokenLogprobs, params: SamplingParams) -> TokenLogprobDict:
        skip = params.skip_special_tokens
        if not params.detokenize:  # ids and numbers only: decoded_token stays None
            return logprob_dict(*entry, decode=lambda token_id: None)
        return logprob_dict(*entry, decode=lambda token_id: self._token_text(token_id, skip))

    def _token_text(self, token_id: int, skip_special_tokens: bool = True) -> str:
        """A log-prob entry's token as text: its own bytes, as in context (decoding one SentencePiece token alone
        drops the space its U+2581 stands for: ' w58' came out 'w58', unlike its bytes and the output's text), an
        unfinished UTF-8 character as U+FFFD. Tokenizers without token_bytes decode the token alone. A special
        token has no bytes: its text is "" as in the output text, or with skip_special_tokens=False its own text
        ("<|im_end|>"), so that the token texts still add up to the output text."""
        token_bytes = getattr(self.tokenizer, "token_bytes", None)
        if token_bytes is None:
            return decode_text(self.tokenizer, [token_id], skip_special_tokens)
        raw = token_bytes(token_id)
        if raw or skip_special_tokens:
            return raw.decode("utf-8", errors="replace")
        return decode_text(self.tokenizer, [token_id], skip_special_tokens=False)  # a special token, kept as text

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        params = seq.sampling_params
        return (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids

    def _decode_step_windows(self, seqs: list[Sequence], tokens: list[list[int]]) -> list[tuple[str, str] | None]:
        """Per sequence of the step, the two detokenizer windows' texts for its one new token, decoded for all
        sequences in one tokenizer call (detokenizer.decode_windows); None where `_check_stop` decodes for itself
        (multi-token steps, stop tokens, a step of one sequence, a tokenizer without decode_batch)."""
        picked = [i for i, (seq, new) in enumerate(zip(seqs, tokens)) if len(new) == 1 and
                  seq.sampling_params.detokenize and not self._is_stop_token(seq, new[0])] if len(seqs) > 1 else []
        decoded: list[tuple[str, str] | None] = [None] * len(seqs)
        if len(picked) > 1 and hasattr(self.tokenizer, "decode_batch"):  # else nothing to gain: decode one by one
            windows = [(seqs[i].token_ids, self._requests[seqs[i].request_id].detok) for i in picked]
            for i, texts in zip(picked, decode_windows(self.tokenizer, windows)):
                decoded[i] = texts
        return decoded

    def _check_stop(self, seq: Sequence, position: int, decoded: tuple[str, str] | None = None) -> str | None:
        """Update the sequence's text for its token at `position` (the tokens before it were checked already);
        return a finish reason or None. `decoded`: the detokenizer windows' texts, when already decoded
        (`_decode_step_windows`; only for a step's single new token)."""
        params = seq.sampling_params
        token = seq.token_ids[position]
        if self._is_stop_token(seq, token):
            # the text held before it (an unfinished character: U+FFFD) goes out, and, as in vLLM, the stop token's
            # own text only with include_stop_str_in_output ("<|im_end|>" with skip_special_tokens=False, "" without)
            if self._flush_pending(seq, position + 1 if params.include_stop_str_in_output else position):
                return "stop"  # that text completed a stop string: it is the stop_reason (vLLM's order too)
            # vLLM's stop_reason: the id for a stop_token_ids entry, None for EOS (EOS is checked first there too)
            is_eos = token in self.eos_token_ids and not params.ignore_eos
            seq.stop_reason = None if is_eos else token
            return "stop"
        state = self._requests[seq.request_id]
        # the common single-token step reads the list itself; a multi-token step a prefix of it
        token_ids = seq.token_ids if position + 1 == seq.num_tokens else seq.token_ids[:position + 1]
        new_text = "" if not params.detokenize else detokenize_incrementally(
            self.tokenizer, token_ids, state.detok, decoded if position + 1 == seq.num_tokens else None)
        if new_text:
            seq.output_text += new_text
            # min_tokens holds stop strings back as well as stop tokens (vLLM: checked past min_tokens tokens)
            past_min = position + 1 - seq.num_prompt_tokens > params.min_tokens
            cut = stop_string_at(seq.output_text, params.stop_list, len(new_text)) if past_min else -1
            if cut >= 0:
                _cut_at_stop_string(seq, cut)
                return "stop"
        if seq.constraint is not None and seq.constraint.finished_at(seq, position):
            return "stop"  # the structured output is complete: only EOS could follow (engine/constraints.py)
        if position + 1 - seq.num_prompt_tokens >= params.max_tokens or position + 1 >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        seq.finish_reason = reason
        seq.error = error
        seq.finish_time = time.perf_counter()
        if reason == "length" and self._flush_pending(seq, seq.num_tokens):  # a character still pending at the end
            seq.finish_reason = "stop"  # completed a stop string
        self.scheduler.finish(seq)
        self._requests.pop(seq.request_id, None)
        self._finished_since_last_step.append(seq.request_id)
        return RequestOutput.from_sequence(seq)

    def _flush_pending(self, seq: Sequence, end: int) -> bool:
        """Add the text of the tokens before `end` not in the output text yet: those the detokenizer still holds (an
        unfinished UTF-8 character, decoded as U+FFFD now that no token will complete it) and, where `_check_stop`
        keeps a stop token's text, that token; True if that completed a stop string (the text is cut there)."""
        state = self._requests.get(seq.request_id)
        if state is None or state.detok.read_offset >= end or not seq.sampling_params.detokenize:
            return False
        ids, skip = seq.token_ids[:end], state.detok.skip_special_tokens
        tail = decode_text(self.tokenizer, ids[state.detok.prefix_offset:], skip)
        head = decode_text(self.tokenizer, ids[state.detok.prefix_offset:state.detok.read_offset], skip)
        state.detok.read_offset = end
        seq.output_text += tail[len(head):]
        cut = stop_string_at(seq.output_text, seq.sampling_params.stop_list, max(len(tail) - len(head), 0))
        if cut >= 0:
            _cut_at_stop_string(seq, cut)
        return cut >= 0

    def _output(self, seq: Sequence) -> RequestOutput:
        """A running request's output: text that might still become a stop string is held back."""
        params = seq.sampling_params
        if params.include_stop_str_in_output:  # a stop string that completes stays in the text: nothing to hold
            return RequestOutput.from_sequence(seq)
        safe = streamable_length(seq.output_text, params.stop_list)
        return RequestOutput.from_sequence(seq, text=seq.output_text[:safe])


def _cut_at_stop_string(seq: Sequence, cut: int) -> None:
    """End the text at the stop string that begins at `cut` (the first listed, when several do; it becomes the
    request's stop_reason): before it, or after it with include_stop_str_in_output."""
    params = seq.sampling_params
    stop = next(s for s in params.stop_list if seq.output_text.startswith(s, cut))
    seq.stop_reason = stop
    seq.output_text = seq.output_text[:cut + len(stop) if params.include_stop_str_in_output else cut]
