"""SpeculativeConfig: which proposer drafts tokens, and how many per step (chapter on speculative decoding).

The user-facing shape is vLLM's, a plain dict on the engine options:

    LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                            "prompt_lookup_max": 3, "prompt_lookup_min": 2})
    LLM(speculative_config={"method": "self_speculative", "num_speculative_tokens": 3, "draft_num_layers": 4})
    LLM(speculative_config={"method": "draft_model", "model": "/path/to/small.gguf", "num_speculative_tokens": 4})
    LLM(speculative_config={"method": "eagle", "num_speculative_tokens": 4})   # shipped heads, or "model": DIR
    LLM(speculative_model="[ngram]", num_speculative_tokens=4)       # vLLM's older spelling, translated here

`SpeculativeConfig.from_engine_config` reads both spellings from an EngineConfig, once, and validates every field
with a message that names the bad value and the allowed range. Methods are registered in METHODS. The head methods
(Medusa, EAGLE, MTP) read the target's last hidden state (HIDDEN_STATE_KIND: which one), and their trained weights
from `model` (a directory written by `minillm train-heads`) or, without it, from the weights shipped for the
bundled model (minillm/speculative/weights/<method>/).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# method -> what it needs. Another proposer plugs in by adding its name here and a builder in engine_hooks.
METHODS: dict[str, str] = {
    "ngram": "prompt-lookup n-grams (Saxena 2023): no model, no training",
    "lookahead": "Jacobi window + n-gram pool fed by the target's own outputs (Fu et al. 2024)",
    "self_speculative": "the target's first draft_num_layers layers + final norm + LM head, weights shared",
    "draft_model": "a separate model with the same tokenizer, with its own paged KV cache",
    "ngram_tree": "prompt lookup with several continuations merged into a token tree, verified in one step",
    "medusa": "Medusa heads (Cai et al. 2024): K residual blocks on the last hidden state, the target's LM head",
    "eagle": "EAGLE (Li et al. 2024): one decoder layer drafting at the feature level, autoregressively",
    "mtp": "multi-token prediction (DeepSeek-V3): D sequential modules, one extra token each",
    "medusa_tree": "Medusa's heads, their top-k combined in a sparse token tree verified in one step",
    "eagle_tree": "EAGLE-2: the EAGLE head grows a dynamic draft tree, its most probable nodes verified in one step",
}
# head methods -> the target hidden state their proposer reads: after the final RMSNorm (what the LM head sees,
# Medusa's input) or before it (the residual stream: EAGLE's feature and DeepSeek-V3's h^0)
HIDDEN_STATE_KIND: dict[str, str] = {"medusa": "post_norm", "eagle": "pre_norm", "mtp": "pre_norm",
                                     "medusa_tree": "post_norm", "eagle_tree": "pre_norm"}
# methods that read `model`: a draft checkpoint, or a directory of trained heads
_READS_MODEL = ("draft_model", *HIDDEN_STATE_KIND)
_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
         "disable_by_batch_size", "draft_num_layers", "lookahead_ngram", "num_tree_nodes", "tree_search_width",
         "draft_ahead", "draft_vocab_size"}
# methods that draft through an LM head, so over a draft vocabulary when draft_vocab_size is set
_READS_DRAFT_VOCAB = ("draft_model", "self_speculative", *HIDDEN_STATE_KIND)
# methods that read num_tree_nodes (the draft nodes below the root of each verified tree)
_READS_TREE_NODES = ("medusa_tree", "eagle_tree")
# options with a default that only some methods read: given for another method, they would be ignored silently
# (checked where the given keys are known: from_dict)
_READ_ONLY_BY = {"prompt_lookup_max": ("ngram", "ngram_tree"), "prompt_lookup_min": ("ngram", "ngram_tree"),
                 "lookahead_ngram": ("lookahead",)}


# the most tokens one step drafts per sequence: a verify step scores k + 1 rows per sequence. Medusa's heads and
# MTP's modules draft one token each, so train-heads trains no more than this many (TrainOptions, HeadConfig)
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_DRAFT_LAYERS = 4  # self_speculative / draft_model: the target's first layers a draft keeps by default
MIN_DRAFT_VOCAB = 64  # draft_vocab_size: no smaller than the widest tree search (tree_search_width <= 64)


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None  # draft_model: a GGUF file, HF directory or `train-heads --kind draft` directory (None:
    # the shipped distilled draft, or a copy of the target's first layers: see draft_num_layers);
    # medusa/eagle/mtp: a directory from `minillm train-heads` (None: the weights shipped for the bundled model)
    prompt_lookup_max: int = 3  # ngram: longest suffix pattern tried
    prompt_lookup_min: int = 2  # ngram: shortest suffix pattern tried. vLLM's default is 1; here 2 measured faster
    # (H200, SmolLM2, P7's prompts, batch 1: 1.09x of plain decoding against 0.96x at 1, since a one-token match
    # drafts often and is rarely right, and a step with drafts cannot run async; benchmarks/RESULTS.md, 12-05)
    disable_by_batch_size: int | None = None  # no drafts while more sequences than this are running
    draft_num_layers: int | None = None  # self_speculative / draft_model without `model`: layers of the target
    # kept (None: DEFAULT_DRAFT_LAYERS; draft_model first takes the distilled draft shipped for the bundled model,
    # minillm/speculative/draft_weights.py, where one was trained on this target)
    lookahead_ngram: int = 3  # lookahead: n of the n-gram pool (N in the paper)
    num_tree_nodes: int | None = None  # medusa_tree / eagle_tree: draft nodes per tree below the root, at most
    # 63 (the root and 63 nodes: the attention's 64-bit ancestor masks); None: the method's default
    tree_search_width: int | None = None  # eagle_tree: children kept per expanded node and nodes expanded per depth
    # of EAGLE-2's search (its top-k), in [1, 64]; None: tree_proposers.EAGLE_TREE_WIDTH
    draft_ahead: bool | None = None  # head methods: start step N+1's greedy proposal at the end of step N and
    # collect it without waiting (draft_ahead.py). None: on for the head methods on a GPU (where the draft then runs
    # during the host's bookkeeping), off on a CPU (nothing overlaps there). H200, bench_spec_host.py, 2026-12-03,
    # median of 3 runs each: EAGLE 2.13 vs 2.26 ms/step, eagle_tree 3.06 vs 3.24 (drafting when asked)

    draft_vocab_size: int | None = None  # LM-head drafters: draft over the target's draft_vocab_size most frequent
    # answer tokens only (FR-Spec; draft_vocab.py), in [MIN_DRAFT_VOCAB, the vocabulary]; None: every token

    def __post_init__(self) -> None:
        check_method(self.method)
        for name, low in (("num_speculative_tokens", 1), ("prompt_lookup_max", 1), ("prompt_lookup_min", 1),
                          ("draft_num_layers", 1), ("lookahead_ngram", 2)):
            value = getattr(self, name)
            optional = name == "draft_num_layers"
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"speculative_config {name} must be {'None or ' if optional else ''}an integer "
                                 f">= {low}, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config num_speculative_tokens must be <= {MAX_SPECULATIVE_TOKENS} "
                             f"(MAX_SPECULATIVE_TOKENS: one verify step scores k + 1 rows per sequence), got "
                             f"{self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config needs prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} > {self.prompt_lookup_max}")
        d = self.disable_by_batch_size
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"speculative_config disable_by_batch_size must be None or an integer >= 1, got {d!r}")
        if self.draft_num_layers is not None and (self.method not in ("self_speculative", "draft_model")
                                                  or self.model is not None):
            raise ValueError(f"speculative_config draft_num_layers is only read by methods self_speculative and "
                             f"draft_model without model= (the target's first layers as the draft), got method "
                             f"{self.method!r}" + (f" with model {self.model!r}" if self.model is not None else ""))
        n = self.num_tree_nodes
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 63):
            raise ValueError(f"speculative_config num_tree_nodes must be None or an integer in [1, 63], got {n!r}")
        if n is not None and self.method not in _READS_TREE_NODES:
            raise ValueError(f"speculative_config num_tree_nodes is only read by methods "
                             f"{', '.join(_READS_TREE_NODES)}, got method {self.method!r}")
        w = self.tree_search_width
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 64):
            raise ValueError(f"speculative_config tree_search_width must be None or an integer in [1, 64], got {w!r}")
        if w is not None and self.method != "eagle_tree":
            raise ValueError(f"speculative_config tree_search_width is only read by method eagle_tree, got method "
                             f"{self.method!r}")
        if self.draft_ahead is not None and not isinstance(self.draft_ahead, bool):
            raise ValueError(f"speculative_config draft_ahead must be True, False or None, got {self.draft_ahead!r}")
        if self.draft_ahead and self.method not in HIDDEN_STATE_KIND:
            raise ValueError(f"speculative_config draft_ahead is only read by the head methods "
                             f"{', '.join(HIDDEN_STATE_KIND)}, got method {self.method!r}")
        v = self.draft_vocab_size
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < MIN_DRAFT_VOCAB):
            raise ValueError(f"speculative_config draft_vocab_size must be None or an integer >= {MIN_DRAFT_VOCAB} "
                             f"(at most the vocabulary; checked when the model is known), got {v!r}")
        if v is not None and self.method not in _READS_DRAFT_VOCAB:
            raise ValueError(f"speculative_config draft_vocab_size is only read by methods "
                             f"{', '.join(_READS_DRAFT_VOCAB)}, got method {self.method!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"speculative_config model must be a path (str) or None, got {self.model!r}")
        if self.model is not None and self.method not in _READS_MODEL:
            raise ValueError(f"speculative_config model= is only read by methods {', '.join(_READS_MODEL)}, "
                             f"got method {self.method!r} with model {self.model!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "SpeculativeConfig":
        """Validate a vLLM-style dict. `method` may be left out when `model` names one ("[ngram]", vLLM's
        spelling) or a path (then method is draft_model)."""
        if not isinstance(options, dict):
            raise TypeError(f"speculative_config must be a dict, got {type(options).__name__}")
        unknown = sorted(set(options) - _KEYS)
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(sorted(_KEYS))}")
        options = dict(options)
        model = options.get("model")
        if model in ("[ngram]", "ngram"):  # vLLM's speculative_model="[ngram]"
            options.pop("model")
            options.setdefault("method", "ngram")
        elif isinstance(model, str) and model in METHODS:
            options.pop("model")
            options.setdefault("method", model)
        elif model is not None:
            options.setdefault("method", "draft_model")
        if "method" not in options:
            raise ValueError(f"speculative_config needs a 'method' (one of {', '.join(METHODS)}) or a draft 'model'")
        check_method(options["method"])  # first: a misspelt method is the mistake to name, not a missing count
        if "num_speculative_tokens" not in options:
            raise ValueError("speculative_config needs 'num_speculative_tokens' (an integer >= 1)")
        for key, methods in _READ_ONLY_BY.items():
            if key in options and options["method"] not in methods:
                raise ValueError(f"speculative_config {key} is only read by method(s) {', '.join(methods)}, got "
                                 f"method {options['method']!r}")
        return cls(**options)

    @classmethod
    def from_engine_config(cls, engine_config: Any) -> "SpeculativeConfig | None":
        """The engine's speculative settings (None: no speculation), from `speculative_config=` or from the
        seed's spelling `speculative_model=` + `num_speculative_tokens=` (not both)."""
        options = getattr(engine_config, "speculative_config", None)
        model = getattr(engine_config, "speculative_model", None)
        k = getattr(engine_config, "num_speculative_tokens", None)
        if options is not None and (model is not None or k is not None):
            raise ValueError("give either speculative_config={...} or speculative_model=/num_speculative_tokens=, "
                             "not both")
        if options is None and model is None and k is None:
            return None
        if options is None:
            if model is None or k is None:
                raise ValueError(f"speculative_model= and num_speculative_tokens= go together, got "
                                 f"speculative_model={model!r}, num_speculative_tokens={k!r}")
            options = {"model": model, "num_speculative_tokens": k}
        return cls.from_dict(options)


def check_method(method: Any) -> None:
    """ValueError naming `method` and the allowed ones unless it is a registered method (METHODS)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown speculative method {method!r}; allowed: {', '.join(METHODS)}")


# methods whose verify steps score token trees: those carry a tree mask, so they replay tree graphs (a decode
# graph whose static inputs hold the tree masks, minillm/engine/cuda_graph.py) of tree_graph_batch's shape, not the
# chain graphs of verify_query_lens
TREE_METHODS = ("ngram_tree", "medusa_tree", "eagle_tree")


def verify_query_lens(engine_config: Any) -> tuple[int, ...]:
    """The query lengths model_runner.configure captures CUDA graphs for: (1,) without speculation, (1, 1 + k)
    with it, as long as 1 + k fits the paged decode kernel (MAX_DECODE_QUERY_LEN; longer verify steps and token
    trees, TREE_METHODS, take the piecewise graphs where those are on, else run eagerly)."""
    from minillm.forward_context import MAX_DECODE_QUERY_LEN
    spec = SpeculativeConfig.from_engine_config(engine_config)
    if spec is None or spec.method in TREE_METHODS or 1 + spec.num_speculative_tokens > MAX_DECODE_QUERY_LEN:
        return (1,)
    return (1, 1 + spec.num_speculative_tokens)


def tree_graph_batch(engine_config: Any) -> tuple[int | None, int | None]:
    """(Q, max batch) of the tree graphs model_runner.configure captures: Q = the most new tokens a tree method's
    verify step gives one sequence (the root and the tree's nodes: eagle_tree 1 + num_tree_nodes, medusa_tree
    1 + its node count, ngram_tree its trie's node budget, root included), and the most sequences a step drafts
    for (disable_by_batch_size; None: every batch). (None, None) for a method that drafts no trees. A proposer
    may draft smaller trees (the scheduler trims them, requests end): a tree graph takes any tree of <= Q rows."""
    spec = SpeculativeConfig.from_engine_config(engine_config)
    if spec is None or spec.method not in TREE_METHODS:
        return None, None
    from minillm.speculative.tree import MAX_TREE_NODES
    from minillm.speculative.tree_proposers import EAGLE_TREE_NODES, NGRAM_TREE_NODES, NODES_PER_LEVEL
    if spec.method == "ngram_tree":
        q_len = NGRAM_TREE_NODES
    elif spec.method == "eagle_tree":
        q_len = 1 + (spec.num_tree_nodes or EAGLE_TREE_NODES)
    else:  # medusa_tree: build_medusa_tree_proposer's count, with depth at most num_speculative_tokens
        q_len = 1 + (spec.num_tree_nodes or min(NODES_PER_LEVEL * spec.num_speculative_tokens, MAX_TREE_NODES - 1))
    return q_len, spec.disable_by_batch_size


def hidden_state_kind(engine_config: Any) -> str | None:
    """Which hidden state the runner returns with each step (StepOutput.hidden_states): "post_norm" or "pre_norm"
    for a head method, None (nothing returned, nothing kept) otherwise."""
    spec = SpeculativeConfig.from_engine_config(engine_config)
    return None if spec is None else HIDDEN_STATE_KIND.get(spec.method)
