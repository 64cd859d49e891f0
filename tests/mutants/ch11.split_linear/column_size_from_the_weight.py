"""Takes a column shard's size from the weight's shape, so a bias handed over alone (weight None: how the engine
loads a column-parallel bias, such as Qwen2's qkv_proj bias) crashes."""


def split_linear(weight, bias, tp_rank, tp_size, style):
    if style not in ("column", "row") or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad style {style!r} or rank {tp_rank} of {tp_size}")
    dim = 0 if style == "column" else 1
    if weight is not None and weight.shape[dim] % tp_size:
        raise ValueError(f"{weight.shape[dim]} not divisible by {tp_size}")
    if style == "column":
        size = weight.shape[0] // tp_size
        w = None if weight is None else weight[tp_rank * size:(tp_rank + 1) * size]
        return w, (None if bias is None else bias[tp_rank * size:(tp_rank + 1) * size])
    size = None if weight is None else weight.shape[1] // tp_size
    w = None if weight is None else weight[:, tp_rank * size:(tp_rank + 1) * size]
    return w, (bias if tp_rank == 0 else None)
