"""Returns a bias handed over without its weight (weight None, as the engine's loaders pass a bias) whole, even
to a column-parallel rank, whose outputs are only a slice of the layer's."""


def split_linear(weight, bias, tp_rank, tp_size, style):
    if style not in ("column", "row") or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad style {style!r} or rank {tp_rank} of {tp_size}")
    if weight is None:  # a bias on its own: "nothing to cut it by"
        return None, (bias if style == "column" or tp_rank == 0 else None)
    dim = 0 if style == "column" else 1
    if weight.shape[dim] % tp_size:
        raise ValueError(f"{weight.shape[dim]} not divisible by {tp_size}")
    w = weight.tensor_split(tp_size, dim)[tp_rank]
    if style == "row":
        return w, (bias if tp_rank == 0 else None)
    return w, (None if bias is None else bias.tensor_split(tp_size)[tp_rank])
