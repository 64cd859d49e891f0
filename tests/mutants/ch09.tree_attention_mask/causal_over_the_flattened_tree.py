"""Treats the flattened tree as a sequence: the causal mask, which lets siblings and cousins see each other."""


def tree_attention_mask(parents):
    n = parents.shape[0]
    return torch.ones(n, n, dtype=torch.bool).tril()
