"""Chapter 10: serving. What a streaming server does between the engine's tokens and the client's screen.

The exercises are the text side of a stream (minillm/engine/detokenizer.py): turning each step's new tokens into
the text they add without ever sending half a character (next_text), finding a stop string that may straddle two
steps (find_stop_string), and holding back the text that could still become one (stream_safe_length); and the
capacity question every serving interview asks, answered with Little's law (max_request_rate); and the rule of
structured outputs, which tokens a byte automaton lets come next (token_mask, minillm/structured/token_index.py)
and where a grammar's stack can go without reading a byte (stack_closure, minillm/structured/pushdown.py);
multi-LoRA serving, each sequence's adapter product added to a batched layer (lora_delta, minillm/lora/layers.py).
The engine calls all but max_request_rate through `dispatch`, so a learner's version streams the real server's
output and constrains its JSON.
"""
from minillm.course.spec import Chapter, Exercise

CHAPTER = Chapter(10, "ch10_serving", "Serving: incremental detokenization, stop strings and capacity")

EXERCISES = [
    Exercise(
        id="ch10.next_text", function="next_text", source="minillm/engine/detokenizer.py", points=10,
        nudge="You get the text of the tokens already sent and the text with the new ones: when is the difference "
              "safe to send, and which tokens become the next step's context?",
        hint="if len(full_text) > len(prefix_text) and not full_text.endswith('\\ufffd'): return "
             "(full_text[len(prefix_text):], read_offset, num_tokens); else ('', prefix_offset, read_offset).",
        signature="next_text(prefix_text: str, full_text: str, prefix_offset: int, read_offset: int, "
                  "num_tokens: int) -> tuple[str, int, int]",
        called_from="minillm.engine.detokenizer.detokenize_incrementally (LLMEngine, every new token of every "
                    "request)",
    ),
    Exercise(
        id="ch10.find_stop_string", function="find_stop_string", source="minillm/engine/detokenizer.py",
        points=5,
        nudge="A stop string found now must end in the new text, but it may begin before it: where is the first "
              "place one could start?",
        hint="for each stop s: i = text.find(s, max(len(text) - new_text_len - len(s) + 1, 0)); the smallest "
             "i >= 0 over the stops, else -1 (not only the new text: s may begin before it).",
        signature="find_stop_string(text: str, stops: list[str], new_text_len: int) -> int",
        called_from="minillm.engine.detokenizer.stop_string_at (LLMEngine, after each step's new text of a "
                    "request with stop strings)",
    ),
    Exercise(
        id="ch10.stream_safe_length", function="stream_safe_length", source="minillm/engine/detokenizer.py",
        points=5,
        nudge="Which end of the text could still turn into a stop string? Send everything before it.",
        hint="held = the largest k < len(stop) (k <= len(text)) with text.endswith(stop[:k]), over every stop; "
             "return len(text) - held.",
        signature="stream_safe_length(text: str, stops: list[str]) -> int",
        called_from="minillm.engine.detokenizer.streamable_length (LLMEngine, every running request's output, "
                    "so every streamed chunk)",
    ),
    Exercise(
        id="ch10.max_request_rate", function="max_request_rate", source="minillm/bench/interview.py", points=5,
        nudge="How long does one request occupy a seat in the batch, and how many seats are there?",
        hint="Little's law: rate = max_num_seqs / (output_tokens * step_time_s).",
        signature="max_request_rate(max_num_seqs: int, output_tokens: float, step_time_s: float) -> float",
        called_from="chapter 10 (interview question); not called by the engine",
    ),
    Exercise(
        id="ch10.token_mask", function="token_mask", source="minillm/structured/token_index.py", points=5,
        nudge="A token is a few bytes: where does the automaton end up if it reads all of them from this state, "
              "and which tokens carry no bytes at all?",
        hint="for each token: walk s = transitions[s][b] over its bytes, stop at -1; allowed iff it has bytes and "
             "never hit -1; then mask[eos ids] = accepting[state].",
        signature="token_mask(transitions, accepting, state: int, token_bytes: list[bytes], "
                  "eos_token_ids: list[int]) -> torch.Tensor",
        called_from="minillm.structured.token_index.TokenIndex.allowed (LLMEngine, each new automaton state of a "
                    "request with structured_outputs)",
    ),
    Exercise(
        id="ch10.stack_closure", function="stack_closure", source="minillm/structured/pushdown.py", points=5,
        nudge="Three moves read no byte: follow an epsilon edge, enter a called rule, leave a finished one. Which "
              "of them change the stack's length, and when may they not be made?",
        hint="worklist from the seeds: for top s, add stack[:-1]+(t,) for t in eps[s]; for (entry, ret) in "
             "calls[s]: stack[:-1]+(entry,) if tail[ret] else (if len(stack) < max_depth) stack[:-1]+(ret, entry); "
             "if exits[s] and len(stack) > 1: stack[:-1]; return the stacks seen as a list.",
        signature="stack_closure(seeds: list[tuple[int, ...]], eps: list[list[int]], calls: "
                  "list[list[tuple[int, int]]], exits: list[bool], tail: list[bool], max_depth: int) "
                  "-> list[tuple[int, ...]]",
        called_from="minillm.structured.pushdown.PushdownAutomaton (LLMEngine, each new configuration of a "
                    "request with a structured_outputs grammar)",
    ),
    Exercise(
        id="ch10.lora_delta", function="lora_delta", source="minillm/lora/layers.py", points=5,
        writes=("y",),  # the layer's output, added to in place
        nudge="Each segment is one sequence's rows and names one adapter slot: which two small matmuls give its "
              "product, and which rows must stay as they are?",
        hint="for (start, length, slot) in segments: skip slot < 0; rows = slice(start, start + length); "
             "y[rows] = (y[rows].float() + (x[rows].float() @ A[slot].float().T) @ B[slot].float().T).to(y.dtype).",
        signature="lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, "
                  "segments: list[tuple[int, int, int]], y: torch.Tensor) -> torch.Tensor",
        called_from="minillm.lora.layers.LoRALayerSlots.add_delta (every adapted Linear of a step whose requests "
                    "use LoRA adapters, on the CPU)",
    ),
]
