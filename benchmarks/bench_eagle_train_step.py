"""How long one EAGLE training step takes, before and after the training-time-test rewrite (chapter 9, issue 11).

    before      the previous step: the head's own forward (DraftBlock, boolean [B, T, S] mask), the target's and
                the head's full-vocabulary log-softmax in fp32 (train_heads.distill_kl), the feature regression;
                one teacher-forced pass
    after U=0   train_heads.HeadLoss: the same pass through train_eval.unrolled_chain (an additive float mask
                for the proposer's 64-position window, so SDPA's fused kernels run), the KL from the target's
                expected embedding (one fp32 logsumexp per prediction, the target's law computed once)
    after U=3   the default: three more passes of the drafting chain on the head's own features

Every variant runs the whole optimizer step (AdamW, clipping) on SmolLM2-135M's shapes (hidden 576, 9/3 heads,
FFN 1536, vocabulary 49152, tied embeddings) with random bf16 target weights (a head step reads only the target's
embedding, final norm, LM head and, for its start, its last layer), 16 rows of 256 tokens, bf16 autocast, as
`train-heads` runs it. Reported per variant: the mean of the first 10 steps (what the old deadline fit measured,
kernel loading included) and the median of the steps after warm-up, and steps per minute against "before".
First a check that before and after U=0 compute the same loss on the same rows (no noise).

    python benchmarks/bench_eagle_train_step.py --out results/eagle_train_step_h200.json     (H200, ~1 minute)
    python benchmarks/bench_eagle_train_step.py --quick --out /tmp/eagle_step_cpu.json        (CPU smoke test)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.models.llama import LlamaForCausalLM
from minillm.speculative.heads import HeadConfig, TargetParts
from minillm.speculative.train_eval import mixed_precision, unrolled_chain
from minillm.speculative.train_heads import (EAGLE_CLS_WEIGHT, HeadLoss, distill_kl, initial_heads, kl_to_target,
                                             target_law)


def target_model(quick: bool, device: torch.device) -> tuple[LlamaForCausalLM, ModelConfig]:
    shape = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2) if quick else dict(vocab_size=49152, hidden_size=576,
                                                           intermediate_size=1536, num_attention_heads=9,
                                                           num_key_value_heads=3)
    config = ModelConfig(num_hidden_layers=1, max_position_embeddings=2048, rope_theta=1e5, tie_word_embeddings=True,
                         **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
    model = model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def before_loss(target: TargetParts, scale: float):
    """The step as it was: the head's own forward over the row, two full log-softmaxes."""
    def loss(head, tokens, features):
        b, length, _ = features.shape
        with torch.no_grad():
            p_logits = target.logits(target.final_norm(features))
        positions = torch.arange(length - 1, device=features.device).expand(b, -1)
        key_mask = torch.ones(b, length - 1, dtype=torch.bool, device=features.device)
        g, _ = head(features[:, :-1], target.embed(tokens[:, 1:]), positions, key_mask)
        regression = F.smooth_l1_loss(g.float() / scale, features[:, 1:].float() / scale)
        kl = distill_kl(target.logits(target.final_norm(g)), p_logits[:, 1:])
        return regression + EAGLE_CLS_WEIGHT * kl
    return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(loss_fn, head, tokens, features, steps: int, device: torch.device) -> list[float]:
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        with mixed_precision(device):
            loss = loss_fn(head, tokens, features)
            loss = loss[0] if isinstance(loss, tuple) else loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 60; quick 6)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    steps = args.steps or (6 if device.type == "cpu" else 60)
    model, config = target_model(args.quick, device)
    target = TargetParts(model)
    rows, length = (2, 64) if args.quick else (16, 256)
    torch.manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (rows, length), device=device)
    features = (torch.randn(rows, length, config.hidden_size, device=device) * 3).float()
    scale = float(features.pow(2).mean().sqrt())
    head_config = HeadConfig.for_target("eagle", config, 1)

    def fresh_head():
        torch.manual_seed(2)
        return initial_heads(head_config, model, scale).to(device=device, dtype=torch.float32)

    variants = {"before": before_loss(target, scale)}
    for unroll in (0, 3):  # the proposer's 64-position window, as train-heads trains
        variants[f"after U={unroll}"] = HeadLoss("eagle", target, scale, unroll=unroll)

    # correctness: the new path's pieces, without EAGLE's input noise and attending over the whole row as the old
    # step did, give the old loss on the same rows
    with torch.no_grad(), mixed_precision(device):
        head = fresh_head()
        old = float(variants["before"](head, tokens, features))
        g = unrolled_chain(head, features[:, :-1], target.embed(tokens[:, 1:]), 1, length)[0]
        kl = kl_to_target(target, g, target_law(target, features[:, 1:])).mean()
        new = float(F.smooth_l1_loss(g.float() / scale, features[:, 1:].float() / scale) + EAGLE_CLS_WEIGHT * kl)
    print(f"loss on the same rows, no noise: before {old:.5f}, after {new:.5f} (bf16 logits on a GPU: ~1e-3 apart)")

    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows,
               "seq_len": length, "vocab": config.vocab_size, "loss_before": old, "loss_after": new,
               "variants": {}}
    for name, loss_fn in variants.items():
        times = time_steps(loss_fn, fresh_head(), tokens, features, steps, device)
        first10 = statistics.mean(times[:10])
        steady = statistics.median(times[min(10, len(times) - 1):])
        results["variants"][name] = {"first10_mean_ms": 1e3 * first10, "median_ms": 1e3 * steady}
    base = results["variants"]["before"]["median_ms"]
    print(f"\n{'variant':12s} {'first 10 mean':>14s} {'median':>10s} {'steps/min':>10s} {'vs before':>10s}")
    for name, r in results["variants"].items():
        r["steps_per_minute"] = 60e3 / r["median_ms"]
        r["speedup_vs_before"] = base / r["median_ms"]
        print(f"{name:12s} {r['first10_mean_ms']:11.1f} ms {r['median_ms']:7.2f} ms {r['steps_per_minute']:10.0f} "
              f"{r['speedup_vs_before']:9.2f}x")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
