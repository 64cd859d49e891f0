"""Each node sees itself and its parent, but not the rest of its root path (grandparents and up)."""


def tree_attention_mask(parents):
    n = parents.shape[0]
    mask = torch.eye(n, dtype=torch.bool)
    child = torch.arange(1, n)
    mask[child, parents[1:]] = True
    return mask
