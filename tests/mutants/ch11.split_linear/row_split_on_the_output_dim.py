"""Splits a row-parallel weight by output rows (dim 0), like a column-parallel one, instead of by input columns."""


def split_linear(weight, bias, tp_rank, tp_size, style):
    if style not in ("column", "row") or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad style {style!r} or rank {tp_rank} of {tp_size}")

    def shard(t, dim):
        if t.shape[dim] % tp_size:
            raise ValueError(f"{t.shape[dim]} not divisible by {tp_size}")
        size = t.shape[dim] // tp_size
        return t.narrow(dim, tp_rank * size, size)

    if style == "column":
        return (None if weight is None else shard(weight, 0)), (None if bias is None else shard(bias, 0))
    return (None if weight is None else shard(weight, 0)), (bias if tp_rank == 0 else None)
