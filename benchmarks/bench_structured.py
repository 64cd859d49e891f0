"""What structured outputs cost: decode with and without a constraint on the bundled SmolLM2 (chapter 10).

    python benchmarks/bench_structured.py [MODEL] [--batch 1 16 64] [--max-tokens 128] [--variants ...]
                                          [--out results.json]

For each batch size, the same chat prompts (each asks for a JSON description), greedy, four ways in one process:

    plain        no constraint, the engine's defaults (async scheduling where the device allows it)
    plain sync   no constraint, async_scheduling=False: the synchronous steps a constrained request forces
    json         structured_outputs=StructuredOutputsParams(json=SCHEMA): a mask per row per step
    regex        structured_outputs=StructuredOutputsParams(regex=REGEX)
    json_object  structured_outputs=StructuredOutputsParams(json_object=True): any JSON, on the pushdown automaton
    gbnf         structured_outputs=StructuredOutputsParams(grammar=JSON_GBNF): JSON written as a GBNF grammar

(`--variants` picks some of them.)

A constrained request finishes when its format is complete, so the variants write different numbers of tokens:
the figure to compare is the time per engine step (ms/step) and per token. `mask ms/step` is the host time of
the engine's constrain_step (masks and bans along each row's path) per step, timed by wrapping it; the first
sight of each automaton state builds its mask (the vocabulary walked as a trie), later ones are dict lookups, so
each constrained variant runs twice: cold (new states) and "warm" (the same prompts again: every mask cached, as
on a server that sees one schema many times).
Every constrained output is checked (the JSON parses, the regex matches). Prints a table, writes the raw JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "city": {"enum": ["Paris", "London", "Tokyo", "Lagos", "Lima"]},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    "bio": {"type": "string", "maxLength": 200}}, "required": ["name", "age", "city", "hobbies", "bio"]}
REGEX = r"[A-Z][a-z]+ (lives|works|studies) in [A-Z][a-z]+(, [a-z ]{1,40})*\."
JSON_GBNF = r"""
root    ::= object
value   ::= object | array | string | number | "true" | "false" | "null"
object  ::= "{" ws ( member ( ws "," ws member )* )? ws "}"
member  ::= string ws ":" ws value
array   ::= "[" ws ( value ( ws "," ws value )* )? ws "]"
string  ::= "\"" ( [^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number  ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws      ::= [ \t\n]{0,2}
"""
TOPICS = ["a baker", "a pilot", "a student", "a painter", "a nurse", "a chess player", "a farmer", "a poet"]


def run(llm, batch: int, max_tokens: int, structured, again: bool = False) -> dict:
    from minillm import SamplingParams
    import minillm.engine.llm_engine as llm_engine
    messages = [[{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} (#{i}) as JSON."}]
                for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=structured)
    if not again:  # warm-up (graphs, kernels); a second run of a constrained variant finds its masks cached
        llm.chat(messages[:1], SamplingParams(temperature=0.0, max_tokens=4, structured_outputs=structured))
    spent = [0.0]
    inner = llm_engine.constrain_step

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    llm_engine.constrain_step = timed
    engine = llm.llm_engine
    steps = engine.num_steps
    start = time.perf_counter()
    try:
        outs = llm.chat(messages, params)
    finally:
        llm_engine.constrain_step = inner
    elapsed = time.perf_counter() - start
    steps = engine.num_steps - steps
    texts = [o.outputs[0].text for o in outs]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid = None
    if structured is not None and structured.json is not None:
        valid = sum(_parses(t) for t in texts)
    elif structured is not None and structured.regex is not None:
        valid = sum(bool(re.fullmatch(structured.regex, t)) for t in texts)
    elif structured is not None:  # json_object, the GBNF JSON grammar: any JSON (an object for the grammar)
        valid = sum(_parses(t, required=()) for t in texts)
    return dict(seconds=round(elapsed, 4), steps=steps, output_tokens=tokens,
                ms_per_step=round(1e3 * elapsed / max(steps, 1), 3), tok_per_s=round(tokens / elapsed, 1),
                mask_ms_per_step=round(1e3 * spent[0] / max(steps, 1), 3), valid=valid,
                finished_stop=sum(o.outputs[0].finish_reason == "stop" for o in outs), sample=texts[0][:160])


def _parses(text: str, required=tuple(SCHEMA["required"])) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return not required or (isinstance(value, dict) and set(required) <= set(value))


def _constraint(**kw):
    from minillm.sampling_params import StructuredOutputsParams
    return StructuredOutputsParams(**kw)


VARIANTS = {"plain": lambda: ({}, None), "plain sync": lambda: ({"async_scheduling": False}, None),
            "json": lambda: ({}, _constraint(json=SCHEMA)), "regex": lambda: ({}, _constraint(regex=REGEX)),
            "json_object": lambda: ({}, _constraint(json_object=True)),
            "gbnf": lambda: ({}, _constraint(grammar=JSON_GBNF))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="a GGUF file or HF directory (default: bundled)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="which variants (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch
    from minillm import LLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = {} if args.model is None else {"model": args.model}
    if device == "cuda":  # two engines share the GPU (async on and off): a fixed KV pool each
        kw["kv_cache_memory"] = 4 << 30
    rows = []
    variants = [(name, *VARIANTS[name]()) for name in (args.variants or VARIANTS)]
    llms = {}
    for batch in args.batch:
        for name, options, structured in variants:
            key = tuple(sorted(options.items()))
            if key not in llms:
                llms[key] = LLM(max_num_seqs=max(args.batch), **kw, **options)
            for again in (False, True) if structured is not None else (False,):
                label = name + (" warm" if again else "")
                row = dict(variant=label, batch=batch, **run(llms[key], batch, args.max_tokens, structured, again))
                rows.append(row)
                print(f"batch {batch:3d} {label:10s} {row['ms_per_step']:8.3f} ms/step {row['tok_per_s']:9.1f} tok/s "
                      f"mask {row['mask_ms_per_step']:6.3f} ms/step  valid {row['valid']}  stop "
                      f"{row['finished_stop']}", flush=True)
    result = dict(command="python benchmarks/bench_structured.py " + " ".join(argv or sys.argv[1:]),
                  device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  schema=SCHEMA, regex=REGEX, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
