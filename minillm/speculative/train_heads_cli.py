"""`minillm train-heads`: distil Medusa / EAGLE / MTP heads or a draft model on the target's own outputs (chapter 9).

    minillm train-heads --kind eagle --steps 2000 --out heads/eagle [MODEL] [--device cuda] [--dtype bfloat16]
    minillm train-heads --kind medusa,eagle,mtp --out heads              # one dataset, heads/medusa, heads/eagle, ...
    minillm train-heads --kind medusa --tiny --out /tmp/medusa            # a smoke run with few prompts and steps
    minillm train-heads --kind eagle --device cuda --num-prompts 5000 --time-budget 290 --out heads/eagle
                                          # a budgeted GPU run: data (<= --data-share of the budget), then
                                          # training; prints the held-out top-1 agreement and EAGLE's stepped
                                          # mean accepted length on held-out requests (train_eval)

The prompts (minillm.speculative.train_prompts) are split into training and held-out requests before generation;
--held-out-fraction sets the share held out.

Then `LLM(speculative_config={"method": "eagle", "model": "heads/eagle", "num_speculative_tokens": 4})`; a draft
model (--kind draft) is a directory for {"method": "draft_model", "model": DIR} (its layers and final norm only:
it borrows the target's embedding and LM head, minillm/speculative/draft_weights.py). Needs torch, safetensors and
tqdm only (matplotlib for loss.png, if installed); no network: the prompts are built in and the target is local.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from minillm.speculative.train_heads import TRAIN_KINDS

SAVE_SECONDS = 15.0  # --time-budget: kept back per kind for the held-out evaluation and saving
DATA_SHARE = 0.3  # --time-budget: generation stops (keeping what it has) at this share of the budget
BUDGET_STEPS = 100_000  # --time-budget without --steps: the budget, not a step count, ends training
# --tiny: a smoke run that finishes in seconds on a laptop CPU (tests, CI)
TINY = {"num_prompts": 4, "max_prompt_tokens": 32, "max_new_tokens": 24, "seq_len": 32, "steps": 4,
        "rows_per_step": 2}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-heads", help="train Medusa/EAGLE/MTP heads or a draft model by "
                                                  "self-distillation on the target's own generations")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--kind", required=True, type=_kinds,
                   help=f"one of {', '.join(TRAIN_KINDS)}, or several joined by commas (trained on the same "
                        f"generations, each saved in OUT/<kind>)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default 1000; with --time-budget: as many as fit)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    p.add_argument("--dtype", default="auto", help="the target's dtype: auto (bf16 on cuda, fp32 on cpu), ...")
    p.add_argument("--num-prompts", type=int, default=256,
                   help="distinct prompts the target answers, held-out ones included (default 256; about 5,800 exist)")
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="a longer request's text is shortened to fit (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=192, help="tokens generated per prompt (default 192)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training row (default 256)")
    p.add_argument("--rows-per-step", type=int, default=16, help="rows per optimizer step (default 16)")
    p.add_argument("--unroll", type=int, default=3,
                   help="eagle: passes of the drafting chain trained after the teacher-forced one, on the head's "
                        "own features (training-time test; default 3, 0 = teacher forcing only)")
    p.add_argument("--num-heads", type=int, default=4, help="medusa heads (default 4)")
    p.add_argument("--mtp-depth", type=int, default=2, help="mtp modules, one extra token each (default 2)")
    p.add_argument("--draft-layers", type=int, default=4, help="--kind draft: the target's first L layers")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole command: after the data, each kind gets an equal share of what is "
                        "left and trains the steps that fit in it (at most --steps), its schedule shortened to match")
    p.add_argument("--held-out-fraction", type=float, default=0.05,
                   help="share of the prompts held out (answered greedily, never trained on) to measure the heads on")
    p.add_argument("--data-share", type=float, default=DATA_SHARE,
                   help=f"--time-budget: generation stops (keeping what it has) at this share (default {DATA_SHARE})")
    p.add_argument("--compare", default=None, metavar="DIR",
                   help="--kind eagle: also measure the EAGLE head in DIR (e.g. the shipped one) on the same "
                        "held-out requests")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="continue training the head saved in DIR (medusa, eagle or mtp: one --kind), e.g. the "
                        "shipped one, instead of starting from the target's last layer; pair it with a new "
                        "--sample-seed so the run sees new sampled answers")
    p.add_argument("--seed", type=int, default=0,
                   help="orders the prompts, so it decides the held-out ones (keep it when continuing with --init)")
    p.add_argument("--sample-seed", type=int, default=None,
                   help="seeds the sampled answers alone (default: --seed): the same held-out requests, new "
                        "training text")
    p.add_argument("--tiny", action="store_true", help="a few prompts, short rows, a few steps: a smoke run")
    p.set_defaults(func=_cmd_train_heads)


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TRAIN_KINDS]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"--kind takes distinct names from {', '.join(TRAIN_KINDS)} joined by "
                                         f"commas, got {text!r}")
    return kinds


def _cmd_train_heads(args: argparse.Namespace) -> int:
    from minillm.loader import load_model
    from minillm.platform import resolve_device, resolve_dtype

    start = time.perf_counter()
    try:  # every flag, the model and the heads' fit to it, before minutes of generation: one line, exit code 2
        sizes, options = _checked_options(args)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model_config, weights, tokenizer = load_model(args.model)
        _check_target(args, sizes, options, model_config)
    except (ValueError, TypeError, OSError) as err:
        return _error(err)
    try:  # what only the run can find (generation cut short by --time-budget, say): one line too, not a traceback
        _train(args, start, sizes, options, model_config, weights, tokenizer, device, dtype)
    except ValueError as err:
        return _error(err)
    return 0


def _error(err: Exception) -> int:
    print(f"minillm train-heads: error: {err}", file=sys.stderr)
    return 2


def _train(args: argparse.Namespace, start: float, sizes: dict[str, int], options: list, model_config: Any,
           weights: Any, tokenizer: Any, device: Any, dtype: Any) -> None:
    """Generate the data, train and save each kind, print what was measured (the flags are checked already)."""
    from minillm.engine.worker import build_model
    from minillm.speculative.train_data import distill_data
    from minillm.speculative.train_heads import train_heads

    target = build_model(model_config, weights, device, dtype).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    data_deadline = None if args.time_budget is None else start + args.data_share * args.time_budget
    data = distill_data(target, tokenizer, model_config, sizes["num_prompts"], sizes["max_new_tokens"],
                        sizes["seq_len"], device, dtype, seed=args.seed,
                        max_prompt_tokens=sizes["max_prompt_tokens"], deadline=data_deadline,
                        held_out_fraction=args.held_out_fraction, sample_seed=args.sample_seed)
    spent = time.perf_counter() - start
    share = f" ({100 * spent / args.time_budget:.0f}% of the budget)" if args.time_budget else ""
    documents = int(data.segments.max()) + 1 if data.segments is not None else 0
    print(f"data: {documents} training requests answered, {data.tokens.shape[0]} rows of {data.tokens.shape[1]} "
          f"tokens ({int(data.drafted.sum())} answer positions); {data.held_out.tokens.shape[0]} held-out requests; "
          f"{spent:.0f} s{share} (loading, generating, recording features)")
    from minillm.speculative.draft_vocab import answer_token_counts, save_token_counts
    counts = save_token_counts(args.out, answer_token_counts(data.tokens, data.drafted, model_config.vocab_size),
                               model_config)
    print(f"token counts of the answers (for a draft vocabulary) saved to {counts}")
    for i, option in enumerate(options):
        out = args.out if len(options) == 1 else os.path.join(args.out, option.kind)
        deadline = None
        if args.time_budget is not None:  # an equal share of what is left, less a few seconds to evaluate and save
            now, end = time.perf_counter(), start + args.time_budget
            deadline = now + max(0.0, end - now - SAVE_SECONDS * (len(options) - i)) / (len(options) - i)
        result = train_heads(target, model_config, data, option, out, deadline=deadline)
        history = result["history"]
        print(f"{option.kind}: {len(history)} steps ({1000 * result['seconds_per_step']:.1f} ms each), loss "
              f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, {time.perf_counter() - start:.0f} s so far; "
              f"saved to {result['out']}")
        if result["held_out_top1_agreement"]:  # head 1: the first draft's greedy acceptance; later ones: a bound
            print("  held-out top-1 agreement with the target, per head/step: "
                  + ", ".join(f"{a:.3f}" for a in result["held_out_top1_agreement"]))
        if result.get("held_out_acceptance"):  # eagle: the engine's greedy chain of k drafts on held-out requests
            _print_acceptance("this head", result["held_out_acceptance"])
    if args.compare:  # another EAGLE head (the shipped one, say) on the same held-out requests
        from minillm.speculative.head_kinds import load_heads
        from minillm.speculative.heads import TargetParts
        from minillm.speculative.train_eval import held_out_acceptance
        other, _ = load_heads("eagle", args.compare, model_config, device=device)
        _print_acceptance(args.compare, held_out_acceptance(other, TargetParts(target), data.held_out))


def _checked_options(args: argparse.Namespace) -> tuple[dict[str, int], list]:
    """The run's sizes and one TrainOptions per kind, or ValueError naming the flag, its value and its range."""
    from minillm.cli import check_output_path
    from minillm.sampling_params import check_seed
    from minillm.speculative.train_heads import TrainOptions
    from minillm.speculative.train_prompts import held_out_count, num_distinct_prompts

    steps = args.steps if args.steps is not None else 1000 if args.time_budget is None else BUDGET_STEPS
    sizes = dict(num_prompts=args.num_prompts, max_prompt_tokens=args.max_prompt_tokens,
                 max_new_tokens=args.max_new_tokens, seq_len=args.seq_len, steps=steps,
                 rows_per_step=args.rows_per_step)
    if args.tiny:
        sizes.update(TINY)
    for name, value in sizes.items():
        low = 2 if name == "num_prompts" else 1  # one prompt at least is held out, one at least trained on
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    available = num_distinct_prompts()  # docstrings differ between Python versions, and so does this count
    if sizes["num_prompts"] > available:
        print(f"--num-prompts {sizes['num_prompts']}: this Python builds {available} distinct prompts; using them all")
        sizes["num_prompts"] = available
    if not 0 < args.held_out_fraction < 1 or not 0 < args.data_share < 1:
        raise ValueError(f"--held-out-fraction and --data-share must be in (0, 1), got {args.held_out_fraction} "
                         f"and {args.data_share}")
    # a row is cut from the training documents end to end, each at most a prompt and an answer long (pack_rows
    # refused a longer one after the generation)
    trained = sizes["num_prompts"] - held_out_count(sizes["num_prompts"], args.held_out_fraction)
    most = trained * (sizes["max_prompt_tokens"] + sizes["max_new_tokens"])
    if sizes["seq_len"] > most:
        raise ValueError(f"--seq-len must be <= {most}: {trained} training prompts (--num-prompts less the held-out "
                         f"ones) of at most --max-prompt-tokens + --max-new-tokens tokens each, got {sizes['seq_len']}")
    if args.time_budget is not None and not 0 < args.time_budget < float("inf"):
        raise ValueError(f"--time-budget must be a finite number of seconds > 0, got {args.time_budget}")
    if args.compare and args.kind != ["eagle"]:
        raise ValueError(f"--compare measures an EAGLE head: use it with --kind eagle alone, got {args.kind}")
    _require_heads("--compare", args.compare, "eagle")
    if args.init is not None and (len(args.kind) != 1 or args.kind[0] == "draft"):
        raise ValueError(f"--init continues one head's training: use it with one --kind of medusa, eagle or mtp, "
                         f"got {args.kind}")
    _require_heads("--init", args.init, args.kind[0])
    for flag, seed in (("--seed", args.seed), ("--sample-seed", args.sample_seed)):
        if seed is not None:
            check_seed(seed, flag)  # torch.manual_seed's range; it was met only after the data was generated
    options = [TrainOptions(kind, sizes["steps"], num_heads=args.mtp_depth if kind == "mtp" else args.num_heads,
                            draft_num_layers=args.draft_layers, rows_per_step=sizes["rows_per_step"], lr=args.lr,
                            seed=args.seed, unroll=args.unroll, init=args.init)
               for kind in args.kind]  # they check --lr, --num-heads and --mtp-depth
    check_output_path(args.out, "--out", folder=True)  # was met when the trained heads were saved: they were lost
    return sizes, options


def _require_heads(flag: str, directory: str | None, kind: str) -> None:
    """A directory given to `flag` must hold `kind` heads train-heads saved (None: the flag was not given). Their
    target is checked once the model is loaded (_check_target)."""
    if directory is None:
        return
    from minillm.speculative.heads import CONFIG_FILE, WEIGHTS_FILE
    config = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(os.path.join(directory, WEIGHTS_FILE)) or not os.path.isfile(config):
        raise ValueError(f"{flag} {directory}: no {WEIGHTS_FILE} and {CONFIG_FILE} there (a directory train-heads "
                         f"wrote)")
    with open(config) as f:
        saved = json.load(f).get("kind")
    if saved != kind:  # met by load_heads after the data was generated (--compare: after training too)
        raise ValueError(f"{flag} {directory} holds {saved} heads, {kind} heads are needed here")


def _check_target(args: argparse.Namespace, sizes: dict[str, int], options: list, model_config: Any) -> None:
    """The flags only the target decides, before the generation: every request (a prompt of --max-prompt-tokens
    and --max-new-tokens of answer) within its context; each kind's fit (TrainOptions.check_target: --draft-layers,
    --init's heads); --compare's heads trained for it."""
    from minillm.speculative.heads import load_head_files

    context, prompt = model_config.max_position_embeddings, sizes["max_prompt_tokens"]
    if prompt >= context:
        raise ValueError(f"--max-prompt-tokens must be <= {context - 1} (the model's context of {context} tokens, "
                         f"less one for the answer), got {prompt}")
    if prompt + sizes["max_new_tokens"] > context:
        raise ValueError(f"--max-new-tokens must be <= {context - prompt} (the model's context of {context} tokens "
                         f"less --max-prompt-tokens {prompt}), got {sizes['max_new_tokens']}")
    for option in options:
        option.check_target(model_config)
    if args.compare:
        load_head_files(args.compare, "eagle", model_config)


def _print_acceptance(name: str, held: dict) -> None:
    """One EAGLE head's held-out stepped acceptance (train_eval.held_out_acceptance), in a line."""
    print(f"  held-out stepped acceptance of {name} (k={held['num_drafts']}, chain, greedy, bonus included; "
          f"{held['documents']} requests never trained on, every answer start drafted on the head's own features, "
          f"walked as the engine's verify steps): mean accepted length {held['walked_accepted_length']:.3f}; first "
          f"draft accepted {held['first_draft_acceptance']:.3f}; per draft: "
          + ", ".join("-" if a is None else f"{a:.3f}" for a in held["per_step_acceptance"]))
