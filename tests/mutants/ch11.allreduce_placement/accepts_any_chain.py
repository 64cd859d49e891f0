"""Places the all-reduces right but accepts a column-parallel layer whose sharded output nothing can read."""


def allreduce_placement(styles, tp_size):
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    for style in styles:
        if style not in ("column", "row", "replicated"):
            raise ValueError(f"unknown style {style!r}")
    return [tp_size > 1 and style == "row" for style in styles]
