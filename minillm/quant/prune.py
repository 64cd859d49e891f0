"""Pruning: magnitude, Wanda and N:M (2:4) semi-structured sparsity for a model's linear layers (chapter 8).

Pruning sets weights to zero. Which ones is decided by a *score* per weight, and the lowest-scored go:

- magnitude   score = |W_ij|. The oldest rule: small weights contribute little. It ignores the inputs.
- Wanda       score = |W_ij| * ||X_j||_2 (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
              Language Models"): the weight times the L2 norm, over calibration tokens, of the input feature it
              multiplies. LLM activations have a few outlier features far larger than the rest; a small weight
              on such a feature moves the output more than a large weight on a quiet one, and magnitude pruning
              cannot see that. No weight update, no Hessian: one forward pass for the norms.

What the scores are compared against (the *comparison group*) matters as much as the score:

- per output row ("row"): each row of W loses the same fraction of its weights. Wanda's paper finds this
  much better than comparing across the whole layer for LLMs; every output keeps the same share of its inputs.
- per layer ("layer"): the lowest-scored fraction of the whole matrix (each q/k/v and gate/up matrix on
  its own, even where the model packs them into one Linear).
- N:M semi-structured (`nm_mask`): in every group of M consecutive input weights of a row, keep the N best.
  2:4 is what NVIDIA's sparse tensor cores (Ampere and later) execute at up to twice the dense rate: the
  hardware stores 2 values and 2-bit indices per group of 4. It always prunes exactly 50%.

Wanda prunes the model layer by layer, as GPTQ quantizes it (minillm/quant/driver.py): a decoder layer's input
norms are measured on the outputs of the layers before it *already pruned*, then all its linears are pruned,
then it runs again to feed the next layer. The result is a dense checkpoint full of zeros (`save_pruned`):
it loads anywhere, and shows the quality side of sparsity; the speed side needs sparse kernels.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.hooks import dispatch
from minillm.quant.checkpoint import save_quantized
from minillm.quant.driver import LayerRunner, QuantizedModel, check_no_experts, hf_state_dict

PRUNE_METHODS = ("magnitude", "wanda")
GRANULARITIES = ("row", "layer")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the magnitude-pruning score of every weight."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for weight [out, in] and input_norm [in] (the L2 norm of each input feature)."""
    if input_norm.dim() != 1 or input_norm.shape[0] != weight.shape[-1]:
        raise ValueError(f"input_norm must be [{weight.shape[-1]}] (one per input feature of a weight of shape "
                         f"{list(weight.shape)}), got {list(input_norm.shape)}")
    return weight.detach().abs().float() * input_norm.float().to(weight.device)


# >>> exercise ch08.two_four_mask
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (bool, same shape) with exactly the `n` highest scores kept in every `m` consecutive entries of
    the last dim (2:4: two of every four input weights). Among equal scores any n may be kept.

    Entry j of the last dim is in group j // m. (Exercise ch08.two_four_mask: its stub keeps these checks.)
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1 or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor with at least 1 dim, got "
                        f"{getattr(scores, 'dtype', type(scores).__name__)}")
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n > m:
        raise ValueError(f"n:m keeps n of every m weights, so n <= m; got {n}:{m}")
    if scores.shape[-1] % m:
        raise ValueError(f"the last dim ({scores.shape[-1]}) must be a multiple of m={m}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    # >>> solution
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    keep = groups.topk(n, dim=-1, sorted=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)
    # <<< solution
# <<< exercise


def unstructured_mask(scores: torch.Tensor, sparsity: float, granularity: str = "row") -> torch.Tensor:
    """Keep-mask pruning round(sparsity * count) lowest scores per output row ("row") or in the whole matrix
    ("layer"); exactly that many, whatever the ties."""
    _check_sparsity(sparsity)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [out, in], got shape {list(scores.shape)}")
    flat = scores if granularity == "row" else scores.reshape(1, -1)
    k = round(sparsity * flat.shape[1])
    mask = torch.ones(flat.shape, dtype=torch.bool, device=scores.device)
    if k:
        mask.scatter_(1, flat.topk(k, dim=1, largest=False, sorted=False).indices, False)
    return mask.reshape(scores.shape)


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")


class InputNorms:
    """Accumulates sum_t x_tj^2 over every token t seen at a linear's input; `.norm()` is ||X_j||_2 per feature j."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum_sq += x.square().sum(dim=0)
        self.tokens += x.shape[0]

    def norm(self) -> torch.Tensor:
        return self.sum_sq.sqrt().float()


def prune_linear(layer: nn.Module, scores: torch.Tensor, sparsity: float, granularity: str = "row",
                 nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero the pruned weights of a minillm Linear in place; returns the keep-mask. For "layer" granularity each
    packed shard (q, k, v; gate, up) is its own matrix."""
    if nm is not None:
        mask = dispatch("ch08.two_four_mask", nm_mask)(scores, *nm)
    elif granularity == "layer" and getattr(layer, "shard_ids", ()):
        mask = torch.empty_like(scores, dtype=torch.bool)
        for sid in layer.shard_ids:
            offset, size = layer.shard_slice(sid)
            mask[offset:offset + size] = unstructured_mask(scores[offset:offset + size], sparsity, "layer")
    else:
        mask = unstructured_mask(scores, sparsity, granularity)
    layer.weight.data.mul_(mask.to(layer.weight.dtype))
    return mask


def _check_args(method: str, sparsity: float | None, nm: tuple[int, int] | None, granularity: str,
                calibration: Any, vocab_size: int) -> float:
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(PRUNE_METHODS)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if nm is not None:
        if not isinstance(nm, tuple) or len(nm) != 2:
            raise ValueError(f"nm must be a pair (n, m) such as (2, 4), got {nm!r}")
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(f"{nm[0]}:{nm[1]} sparsity is always {implied:g}; got sparsity={sparsity}")
        sparsity = implied
    _check_sparsity(sparsity)
    if method == "wanda":
        if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0 \
                or calibration.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"wanda needs calibration token ids [n_samples, seq_len] (calibration."
                             f"tokenize_to_sequences), got {getattr(calibration, 'shape', calibration)!r}")
        if int(calibration.min()) < 0 or int(calibration.max()) >= vocab_size:
            raise ValueError(f"calibration ids must lie in [0, {vocab_size}), got [{int(calibration.min())}, "
                             f"{int(calibration.max())}]")
    return sparsity


@torch.no_grad()
def prune_model(model: nn.Module, method: str = "wanda", sparsity: float | None = 0.5,
                calibration: torch.Tensor | None = None, *, nm: tuple[int, int] | None = None,
                granularity: str = "row", batch_size: int = 4, progress: bool = True) -> nn.Module:
    """A pruned copy of a dense LlamaForCausalLM: every decoder linear (q, k, v, o, gate, up, down) loses
    `sparsity` of its weights by `method` ("magnitude" or "wanda": calibration ids [n, seq_len] needed), per
    output row or per layer, or in an n:m pattern (nm=(2, 4); sparsity is then 1 - n/m). Embeddings, the LM
    head and the norms are kept, as in Wanda's paper."""
    check_no_experts(model, "prune_model (minillm quantize --method prune-*)")
    sparsity = _check_args(method, sparsity, nm, granularity, calibration, model.config.vocab_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = copy.deepcopy(model)
    runner = LayerRunner(model, calibration, batch_size) if method == "wanda" else None
    for layer in tqdm(model.model.layers, desc=f"prune {method}", unit="layer", disable=not progress):
        linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
        if runner is not None:
            # one pass measures all four inputs on the dense layer, as Wanda does; then prune, then feed forward
            norms = {lin: InputNorms(lin.input_size, lin.weight.device) for lin in linears}
            runner.run(layer, {lin: acc.add for lin, acc in norms.items()})
        for lin in linears:
            w = lin.weight.data
            scores = wanda_scores(w, norms[lin].norm()) if runner is not None else magnitude_scores(w)
            prune_linear(lin, scores, sparsity, granularity, nm)
        if runner is not None:
            runner.run(layer, advance=True)
    return model


def linear_sparsity(model: nn.Module) -> float:
    """The fraction of zero weights in the decoder's linear layers."""
    zeros = total = 0
    for name, module in model.named_modules():
        if ".layers." in name and hasattr(module, "quant_method") and hasattr(module, "weight"):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)


def save_pruned(model: nn.Module, out_dir: str, tokenizer: Any = None, source: str | None = None) -> str:
    """Write a pruned model as a dense HF checkpoint (safetensors + config.json + tokenizer) that LLM(model=out_dir)
    loads; the zeros are stored like any other weight."""
    return save_quantized(QuantizedModel(config=model.config, state=hf_state_dict(model)), out_dir, tokenizer, source)
