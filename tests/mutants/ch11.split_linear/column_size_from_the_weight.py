"""Takes a column shard's size from the weight's shape, so a bias handed over alone (weight None: how the engine
loads a column-parallel bias, such as Qwen2's qkv_proj bias) crashes."""


def split_linear(weight, bias, tp_rank, tp_size, style):
    if style not in ("column", "row") or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad style {style!r} or rank {tp_rank} of {tp_size}")
    out_features, in_features = weight.shape if weight is not None else (None, None)
    if style == "column":
        if out_features % tp_size:
            raise ValueError(f"{out_features} not divisible by {tp_size}")
        lo, hi = tp_rank * out_features // tp_size, (tp_rank + 1) * out_features // tp_size
        return weight[lo:hi], (None if bias is None else bias[lo:hi])
    if in_features is not None and in_features % tp_size:
        raise ValueError(f"{in_features} not divisible by {tp_size}")
    if weight is None:
        return None, (bias if tp_rank == 0 else None)
    lo, hi = tp_rank * in_features // tp_size, (tp_rank + 1) * in_features // tp_size
    return weight[:, lo:hi], (bias if tp_rank == 0 else None)
