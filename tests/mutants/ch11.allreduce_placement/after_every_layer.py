"""All-reduces after every layer of the chain, the column-parallel one too (summing different ranks' outputs)."""


def allreduce_placement(styles, tp_size):
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    for i, style in enumerate(styles):
        if style not in ("column", "row", "replicated"):
            raise ValueError(f"unknown style {style!r}")
        if style == "column" and (i + 1 == len(styles) or styles[i + 1] != "row"):
            raise ValueError("a column-parallel layer must feed a row-parallel one")
    return [tp_size > 1 and style != "replicated" for style in styles]
