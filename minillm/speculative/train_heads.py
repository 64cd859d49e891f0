"""Training draft heads by self-distillation: `minillm train-heads --kind {draft,medusa,eagle,mtp}` (chapter 9).

Data: minillm.speculative.train_data (the target's own answers to thousands of distinct requests, its pre-norm
features f on them; held-out *requests* for the evaluation). Losses: minillm.speculative.train_losses, each head's
distribution against the target's, KL(p_target || q_head). With p_t the target's law of token t + 1:

    medusa  head k at position t reads norm(f_t), guesses token t + 1 + k       target p_{t+k}
    eagle   g_t = layer(fc([f_t; embed(x_{t+1})])), guesses token t + 2          target p_{t+1}
            plus the feature regression SmoothL1(g_t, f_{t+1}) (the paper's L_reg; weights 1 and 0.1 as there),
            on features divided by their RMS so one scale suits every model; f_t gets uniform noise as in EAGLE;
            then `unroll` more passes of the drafting chain on the head's own features ("training-time test",
            minillm.speculative.train_eval), pass j weighted unroll_decay**j, the same two losses each; only the
            chains the engine drafts count (answer positions, one document)
    mtp     module k: h^k_t = TRM_k(M_k[norm(h^{k-1}_t); norm(embed(x_{t+k}))]), guesses token t + k + 1,
            target p_{t+k}; the D modules' losses are averaged (DeepSeek-V3's lambda, here 1/D)
    draft   the first L layers of the target (own weights, its embedding and LM head frozen), at answer positions:
            the classic distilled draft model, saved without the target's embedding and LM head
            (minillm.speculative.draft_weights) for speculative_config "draft_model"

Evaluation on the held-out requests' greedy answers: top-1 agreement per head, and for EAGLE the engine's greedy
mean accepted length at k = 5 (train_eval.held_out_acceptance), also every PROBE_EVERY steps as a learning curve.

AdamW with a linear warm-up and cosine decay; a tqdm bar; the loss curve saved as loss.json and loss.png (when
matplotlib is installed). Heads are saved with minillm.speculative.heads.save_heads (heads.safetensors +
config.json, bf16), the draft model with minillm.speculative.draft_weights.save_draft (draft.safetensors +
config.json, bf16).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.config import ModelConfig
from minillm.speculative.config import MAX_SPECULATIVE_TOKENS
from minillm.speculative.head_kinds import load_heads, new_heads
from minillm.speculative.head_proposer import DEFAULT_WINDOW
from minillm.speculative.heads import HEAD_KINDS, HeadConfig, TargetParts, num_parameters, save_heads
from minillm.speculative.train_data import DistillData, HeldOut
from minillm.speculative.train_eval import (ACCEPTANCE_DRAFTS, greedy_continued_acceptance, held_out_acceptance,
                                           held_out_top1, mixed_precision, simulated_acceptance, top1_agreement)
from minillm.speculative.train_losses import (  # noqa: F401  (the losses' names re-exported: tests, benchmarks)
    EAGLE_CLS_WEIGHT, HeadLoss, distill_kl, draft_loss, kl_to_target, target_law)

TRAIN_KINDS = ("draft", *HEAD_KINDS)
TIMING_STEPS = 10  # steps timed before a deadline shortens a run (the pace is taken from step WARM_STEPS on)
WARM_STEPS, REFIT_STEPS, LOG_EVERY = 3, (100, 500), 25  # the first steps pay one-off costs (lazy kernel loading)
EVAL_ROWS = 256  # held-out rows the simulated acceptance reads at most
CONTINUED_ROWS, CONTINUED_STARTS = 64, 8  # eagle: greedy_continued_acceptance on 512 held-out starts
PROBE_EVERY, PROBE_ROWS, PROBE_DOCS = 500, 32, 32  # eagle: the acceptance on held-out data, as training goes
EVAL_DOCS = 256  # held-out documents the top-1 agreement reads at most


@dataclasses.dataclass
class TrainOptions:
    kind: str
    steps: int
    num_heads: int = 4  # medusa heads / mtp modules
    draft_num_layers: int = 4  # kind "draft"
    rows_per_step: int = 8
    lr: float = 1e-3
    warmup: int | None = None  # linear warm-up steps; None: a tenth of the steps, at most 100 (zero-init Medusa
    # heads start far from their targets, and full-rate Adam steps on noisy first batches overshoot)
    seed: int = 0
    unroll: int = 3  # eagle: passes of the drafting chain after the teacher-forced one (training-time test)
    unroll_decay: float = 0.8  # eagle: weight of pass j is unroll_decay ** j
    window: int = DEFAULT_WINDOW  # eagle: real positions a chain attends to, as the proposer's window
    init: str | None = None  # a directory train_heads wrote (medusa, eagle, mtp): continue from those weights

    def __post_init__(self) -> None:
        if self.kind not in TRAIN_KINDS:
            raise ValueError(f"kind must be one of {', '.join(TRAIN_KINDS)}, got {self.kind!r}")
        for name in ("steps", "num_heads", "draft_num_layers", "rows_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kind in ("medusa", "mtp") and self.num_heads > MAX_SPECULATIVE_TOKENS:
            # each head (module) drafts one token; a verify step takes at most MAX_SPECULATIVE_TOKENS of them
            name = "num_heads (mtp: the depth, --mtp-depth)" if self.kind == "mtp" else "num_heads"
            raise ValueError(f"{name} must be an integer in [1, {MAX_SPECULATIVE_TOKENS}] (MAX_SPECULATIVE_TOKENS: "
                             f"the engine drafts at most that many tokens a step, one per head), got "
                             f"{self.num_heads!r}")
        if self.warmup is None:
            self.warmup = max(1, min(100, self.steps // 10))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"warmup must be None or an integer >= 1, got {self.warmup!r}")
        lr = self.lr  # inf (or nan) would train every weight to nan
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if isinstance(self.unroll, bool) or not isinstance(self.unroll, int) or not 0 <= self.unroll <= 8:
            raise ValueError(f"unroll must be an integer in [0, 8], got {self.unroll!r}")
        if not 0 < self.unroll_decay <= 1:
            raise ValueError(f"unroll_decay must be in (0, 1], got {self.unroll_decay!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.init is not None and self.kind == "draft":
            raise ValueError("init continues a head's training (medusa, eagle, mtp); a draft model starts from "
                             "the target's own layers")

    def check_target(self, model_config: ModelConfig) -> None:
        """What only the target decides (checked before any data is generated): a draft model of the target's
        first draft_num_layers layers needs that many; heads to continue (init) must be this kind, trained for this
        target (load_heads checks both), and as many as num_heads asks for."""
        if self.kind == "draft" and self.draft_num_layers > model_config.num_hidden_layers:
            raise ValueError(f"draft_num_layers={self.draft_num_layers} exceeds the target's "
                             f"{model_config.num_hidden_layers} layers")
        if self.init is not None:
            saved = load_heads(self.kind, self.init, model_config)[1].num_heads
            if saved != HeadConfig.for_target(self.kind, model_config, self.num_heads).num_heads:
                name = "num_heads (mtp: the depth, --mtp-depth)" if self.kind == "mtp" else "num_heads"
                raise ValueError(f"init={self.init} holds {saved} {self.kind} heads; {name} must match it to "
                                 f"continue them, got {self.num_heads}")


def initial_heads(config: HeadConfig, target_model: nn.Module, feature_scale: float = 1.0) -> nn.Module:
    """New heads as training starts them: Medusa at zero (each head = the LM head), EAGLE's and every MTP module's
    layer from the target's last layer (its neighbour in depth), MTP's output norms from the target's final norm.
    MTP's projection starts as `feature_scale` times the normalised feature (the features' RMS: what the copied
    layer saw as its input in the target), so module 1 starts near "one more target layer" instead of far off."""
    heads = new_heads(config)
    last_layer = target_model.model.layers[-1]
    if config.kind == "eagle":
        heads.layer.init_from_target_layer(last_layer)
    elif config.kind == "mtp":
        for module in heads.mtp:
            module.layer.init_from_target_layer(last_layer)
            with torch.no_grad():
                module.out_norm.copy_(target_model.model.norm.weight)
                module.proj.weight.mul_(feature_scale)
    return heads


def feature_rms(data: DistillData) -> float:
    """The scale EAGLE's feature regression (and its input noise) is measured in: the features' RMS over the answer
    positions (data.drafted) where known, the states the head regresses. The first token of a sequence is an
    attention sink whose pre-norm state is far from the rest (SmolLM2-135M: RMS 256 against about 28), so it is
    left out with the prompts."""
    total, count = 0.0, 0
    for start in range(0, data.features.shape[0], 256):  # in chunks: no fp32 copy of every feature at once
        features = data.features[start:start + 256].float()
        if data.drafted is not None:
            features = features[data.drafted[start:start + 256].to(features.device)]
        total, count = total + float(features.pow(2).sum()), count + features.numel()
    return math.sqrt(total / max(count, 1))


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_heads(target_model: nn.Module, model_config: ModelConfig, data: DistillData, options: TrainOptions,
                out_dir: str | Path, deadline: float | None = None) -> dict[str, Any]:
    """Train `options.kind` on `data` and save it into out_dir; returns the loss history (also in loss.json).

    `deadline` (a time.perf_counter() value): the step time is measured from step WARM_STEPS to TIMING_STEPS (the
    first steps load kernels and grow the allocator, so timing them overstates the pace) and again at REFIT_STEPS,
    and the run set to the steps that fit before it (at most options.steps); the warm-up and cosine schedule then
    span those. Losses are read back every LOG_EVERY steps, not every step (a read is a host sync that stops the
    CPU from queueing the next step while the GPU works)."""
    torch.manual_seed(options.seed)
    device = data.features.device
    target = TargetParts(target_model)
    options.check_target(model_config)
    if options.kind == "draft":
        from minillm.speculative.draft import independent_copy
        trainee = independent_copy(target_model, options.draft_num_layers).float()
        trainee.attention_backend = "torch"  # autograd through plain torch ops (no triton kernel has a backward)
        for p in (trainee.model.embed_tokens.weight, trainee.lm_head.weight):
            p.requires_grad_(False)  # the vocabulary matrices stay the target's
        loss_fn = lambda m, t, f, segments=None, drafted=None: draft_loss(m, target, t, f, drafted)  # noqa: E731
        config = None
    else:
        config = HeadConfig.for_target(options.kind, model_config, options.num_heads)
        scale = feature_rms(data)
        trainee = initial_heads(config, target_model, scale).to(device=device, dtype=torch.float32)
        if options.init is not None:  # fine-tuning: the saved head (checked against this target) replaces the start
            trainee.load_state_dict(load_heads(options.kind, options.init, model_config, device)[0].state_dict())
        loss_fn = HeadLoss(options.kind, target, scale, options.unroll, options.unroll_decay, options.window)
    trainee.train()
    params = [p for p in trainee.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0, betas=(0.9, 0.95))
    plan = {"steps": options.steps, "warmup": options.warmup}  # fitted below if a deadline needs it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, plan["steps"], plan["warmup"]))
    generator = torch.Generator(device=device).manual_seed(options.seed)
    all_tokens = data.tokens.to(device)  # once: a per-step host-to-device copy would wait for the GPU every step
    history: list[dict[str, float]] = []
    pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []  # read back LOG_EVERY steps at a time
    n = data.tokens.shape[0] - held_out_rows(data)  # rows built by hand: the last ones are held out
    probe = _acceptance_probe(options, trainee, target, data, n)
    segments, drafted = (None if x is None else x.to(device) for x in (data.segments, data.drafted))
    curve: list[dict[str, float]] = []  # eagle: (step, simulated mean accepted length) every PROBE_EVERY steps
    started = mark = time.perf_counter()
    with tqdm(total=options.steps, desc=f"training {options.kind}", unit="step") as bar:
        step = 0
        while step < plan["steps"]:
            if deadline is not None and step in (WARM_STEPS, TIMING_STEPS, *REFIT_STEPS):
                _synchronize(device)
                if step == WARM_STEPS:  # the first steps pay for kernel selection and allocation: not the pace
                    mark = time.perf_counter()
                else:
                    _fit_to_deadline(plan, options, step, (time.perf_counter() - mark) / (step - WARM_STEPS),
                                     deadline, bar)
            rows = torch.randperm(n, generator=generator, device=device)[:options.rows_per_step]  # no replacement
            tokens, features = all_tokens[rows], data.features[rows].float()
            with mixed_precision(device):  # where documents and answers are: read by EAGLE's and the draft's loss
                loss, parts = loss_fn(trainee, tokens, features, None if segments is None else segments[rows],
                                      None if drafted is None else drafted[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            pending.append((step, loss.detach(), parts))
            step += 1
            bar.update(1)
            if len(pending) == LOG_EVERY or step >= plan["steps"]:
                history += _read_back(pending)  # the one host sync of these steps
                pending.clear()
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
                if probe is not None and step % PROBE_EVERY == 0:
                    curve.append({"step": step, "mean_accepted_length": probe()})  # None: no position scorable
                    where = f"{PROBE_DOCS} held-out requests" if data.held_out is not None else \
                        f"{PROBE_ROWS} held-out rows"
                    bar.write(f"step {step}: mean accepted length {curve[-1]['mean_accepted_length']} on {where}")
                if deadline is not None and step > TIMING_STEPS and time.perf_counter() > deadline:
                    break  # a slower pace than measured: stop at the deadline rather than overrun it
    train_seconds = time.perf_counter() - started
    trainee.eval()
    out = Path(out_dir)
    result: dict[str, Any] = {"history": history, "out": str(out), "held_out_top1_agreement": None,
                              "simulated_acceptance": None, "greedy_continued_acceptance": None,
                              "held_out_acceptance": None, "seconds_per_step": train_seconds / len(history)}
    if options.kind == "draft":
        from minillm.speculative.draft_weights import save_draft
        trained = {"steps": len(history), "rows": n, "seq_len": int(data.tokens.shape[1]),
                   "seconds_per_step": result["seconds_per_step"], "final_loss": history[-1]["loss"]}
        save_draft(out, trainee, model_config, trained)
        save_loss_curve(history, out, options.kind)
    else:
        config.training = {"steps": len(history), "rows": n, "seq_len": int(data.tokens.shape[1]),
                           "rows_per_step": options.rows_per_step, "seconds_per_step": result["seconds_per_step"],
                           "final_loss": history[-1]["loss"], "parameters": num_parameters(trainee),
                           "continued_from": options.init}
        if data.held_out is not None:
            _evaluate_held_out(result, config.training, options, loss_fn, trainee, target, data.held_out)
            if options.kind == "eagle":
                config.training.update(unroll=options.unroll, acceptance_curve=curve)
            save_heads(out, trainee, config)
            save_loss_curve(history, out, options.kind)
            return result
        held = slice(n, min(n + EVAL_ROWS, data.tokens.shape[0]))
        held_tokens, held_features = data.tokens[held].to(device), data.features[held]
        result["held_out_top1_agreement"] = top1_agreement(loss_fn, trainee, held_tokens, held_features)
        config.training["held_out_top1_agreement"] = result["held_out_top1_agreement"]
        if options.kind == "eagle":
            config.training.update(unroll=options.unroll, acceptance_curve=curve)
            if held_tokens.shape[0] and held_tokens.shape[1] > ACCEPTANCE_DRAFTS:
                result["simulated_acceptance"] = simulated_acceptance(trainee, target, held_tokens, held_features,
                                                                      window=options.window)
                config.training["simulated_acceptance"] = result["simulated_acceptance"]
                # unbiased: every chosen start scored against the target's own greedy continuation from there
                result["greedy_continued_acceptance"] = greedy_continued_acceptance(
                    trainee, target_model, held_tokens[:CONTINUED_ROWS], window=options.window,
                    starts_per_row=CONTINUED_STARTS)
                config.training["greedy_continued_acceptance"] = result["greedy_continued_acceptance"]
        save_heads(out, trainee, config)
    save_loss_curve(history, out, options.kind)
    return result


def _evaluate_held_out(result: dict[str, Any], record: dict[str, Any], options: TrainOptions, loss_fn: HeadLoss,
                       heads: nn.Module, target: TargetParts, held: HeldOut) -> None:
    """The held-out documents' numbers into `result` and the saved config's `record`: top-1 agreement per head
    (train_eval.held_out_top1) and, for EAGLE, the stepped acceptance of the chain (train_eval.held_out_acceptance,
    the engine's greedy mean accepted length at k = ACCEPTANCE_DRAFTS on requests never trained on)."""
    result["held_out_top1_agreement"] = held_out_top1(loss_fn, heads, held, max_docs=EVAL_DOCS)
    record.update(held_out_top1_agreement=result["held_out_top1_agreement"],
                  held_out_documents=int(held.tokens.shape[0]))
    if options.kind == "eagle":
        result["held_out_acceptance"] = held_out_acceptance(heads, target, held, window=options.window)
        record["held_out_acceptance"] = result["held_out_acceptance"]


def _acceptance_probe(options: TrainOptions, heads: nn.Module, target: TargetParts, data: DistillData, n: int):
    """EAGLE with held-out data: a function returning the engine's mean accepted length estimated on the first
    PROBE_DOCS held-out documents (held_out_acceptance's walk) or, for rows built by hand, simulated on the first
    PROBE_ROWS held-out rows: a learning curve in the engine's own unit; None otherwise."""
    if options.kind != "eagle":
        return None
    if data.held_out is not None:
        return lambda: held_out_acceptance(heads, target, data.held_out, window=options.window,
                                           max_docs=PROBE_DOCS)["walked_accepted_length"]
    if n == data.tokens.shape[0] or data.tokens.shape[1] <= ACCEPTANCE_DRAFTS:
        return None
    rows = slice(n, n + PROBE_ROWS)
    tokens, features = data.tokens[rows].to(data.features.device), data.features[rows]
    return lambda: simulated_acceptance(heads, target, tokens, features, window=options.window)["mean_accepted_length"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_back(pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]) -> list[dict[str, float]]:
    """History entries for the pending steps, their losses fetched in one copy."""
    values = torch.stack([torch.stack([loss.float(), *(v.float() for v in parts.values())])
                          for _, loss, parts in pending]).tolist()
    return [{"step": step, "loss": row[0], **dict(zip(parts, row[1:]))}
            for (step, _, parts), row in zip(pending, values)]


def _fit_to_deadline(plan: dict[str, int], options: TrainOptions, step: int, seconds_per_step: float,
                     deadline: float, bar: tqdm) -> None:
    """Set plan["steps"] to what fits before the deadline at the measured pace (at most options.steps, never below
    TIMING_STEPS + 1), the warm-up in proportion."""
    affordable = step + int(max(0.0, deadline - time.perf_counter()) / max(seconds_per_step, 1e-9))
    steps = max(TIMING_STEPS + 1, min(options.steps, affordable))
    if steps != plan["steps"]:
        plan["warmup"] = max(1, options.warmup * steps // options.steps)
        plan["steps"] = steps
        bar.total = steps
        bar.refresh()


def held_out_rows(data: DistillData) -> int:
    """Rows kept out of training to measure the heads on, for rows built by hand (data.held_out None: distill_data
    holds out prompts instead): a tenth, none when there are fewer than 10 rows."""
    if data.held_out is not None:
        return 0
    n = data.tokens.shape[0]
    return n // 10 if n >= 10 else 0


def save_loss_curve(history: list[dict[str, float]], out: Path, kind: str) -> None:
    """loss.json always; loss.png when matplotlib is there (the GPU machine may lack it)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss.json").write_text(json.dumps({"kind": kind, "history": history}) + "\n")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for key in [k for k in history[0] if k != "step"]:
        ax.plot([h["step"] for h in history], [h[key] for h in history], label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{kind} heads: self-distillation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
