"""EAGLE-2's tree search as CUDA graphs (chapter 9): one graph per (batch bucket, depth, topk, beam).

EagleProposer.draft_tree grows a draft tree level by level with static shapes and no host reads (the window
pass, then depth - 1 calls of the draft layer on `beam` frontier nodes each, a top-k over the vocabulary per
node). Run op by op that is about 30 kernel launches per level, several milliseconds of launch latency for a
search whose arithmetic takes a fraction of that; recorded once per shape and replayed, it is one launch.

The bookkeeping is DraftGraphs' (head_proposer.py): static inputs per power-of-two batch bucket, filled by the
host before each replay, one memory pool. The tree layout is depth by depth, so a deeper search holds every
shallower one as a prefix of its candidates: near the end of a request (depth trimmed to the tokens left) the
bucket's deepest graph serves and the caller keeps the levels it may use, instead of capturing a graph per depth.
"""
from __future__ import annotations

import warnings

import torch

from minillm.speculative.head_proposer import DraftGraphs, RequestWindow, Window


class TreeDraftGraphs(DraftGraphs):
    """propose_tree(windows, depth, topk, beam) -> (the candidates packed as eagle.pack_candidates packs them,
    int32 [B, 3M] on the device: a view of the graph's static output, the depth searched). The packing is
    recorded in the graph: four launches fewer per search than packing after the replay."""

    def _run(self, bucket: int, key: tuple[int, int, int]) -> torch.Tensor:
        from minillm.speculative.eagle import pack_candidates
        depth, topk, beam = key
        features, packed = self.inputs[bucket]
        return pack_candidates(*self.proposer.draft_tree(Window.from_packed(features, packed), depth, topk, beam))

    def propose_tree(self, windows: list[RequestWindow], depth: int, topk: int, beam: int
                     ) -> tuple[torch.Tensor, int] | None:
        """One replay for the batch (None after a capture failure: the caller searches eagerly from then on)."""
        bucket = self.bucket(len(windows))
        deeper = [d for b, (d, t, w) in self.graphs if b == bucket and (t, w) == (topk, beam) and d >= depth]
        key = (bucket, (min(deeper) if deeper else depth, topk, beam))
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(bucket, key[1], windows[0][0])
            except RuntimeError as err:  # a capture failure costs speed, never a request
                warnings.warn(f"eagle_tree: CUDA graph capture failed ({err}); searching eagerly")
                return None
        graph, out = self.graphs[key]
        self._fill(windows, bucket)
        graph.replay()
        return out[:len(windows)], key[1][0]
