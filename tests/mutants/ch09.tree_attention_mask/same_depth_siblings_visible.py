"""Ancestors, plus every earlier node at the same depth: siblings see each other (they share a position id)."""


def tree_attention_mask(parents):
    n = parents.shape[0]
    mask = torch.eye(n, dtype=torch.bool)
    depth = [0] * n
    for i in range(1, n):
        depth[i] = depth[int(parents[i])] + 1
        j = int(parents[i])
        while j >= 0:
            mask[i, j] = True
            j = int(parents[j])
        for s in range(i):
            if depth[s] == depth[i]:
                mask[i, s] = True
    return mask
