"""Launch setup: how a ModelRunner's forwards will run, decided once before the first step (chapter 4).

A decode step of a small model is bound by the host: each of its many small kernels costs about as much to launch
as to run (cuda_graph.py's docstring counts them). `configure(engine_config)` (or ModelRunner's `engine_config=`
argument) chooses how to pay less for that: on CUDA with `enforce_eager=False` (the default there), decode-only
steps, chain verify steps and token-tree verify steps replay CUDA graphs captured up front for batch-size buckets
(minillm/engine/cuda_graph.py); a step that is one fresh prompt replays a whole-forward graph per token bucket
(prompt_graph.py), other steps with prefill tokens piecewise graphs, where configured; every other step runs
eagerly. `compile=True` runs the forward through `torch.compile(dynamic=True)` instead (an alternative to graphs,
not a complement). The operator backend itself (torch reference or Triton kernels) is the model's
(minillm.layers.backend). All graphs are captured here, so no request waits for a capture.

Capture order matters for one more thing. The speculative heads that draft from the target's features (chapter 9)
read its last hidden state: Medusa after the final norm ("post_norm", the forward's own output), EAGLE and MTP
before it ("pre_norm", the residual stream), which the forward does not return. For those, `_keep_hidden_states`
registers a forward hook on the final norm that keeps it. Under CUDA graphs the hook copies it into a static
buffer, and a graph records that copy only if the hook exists when the graph is captured (`_capture` sets the
flag that lets the hook record), so the hook comes first, then the captures.

LaunchSetup is a mixin of ModelRunner (model_runner.py) and holds no state of its own: it sets the runner's
attributes that ModelRunner.__init__ creates (cuda_graphs, piecewise_graphs, prompt_graphs, forward_fn,
hidden_state_kind and the pre-norm hook's buffers), which its `forward` and `hidden_states` read every step.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from minillm.config import EngineConfig


class LaunchSetup:
    """ModelRunner's launch options (a mixin): CUDA graphs or torch.compile, and the pre-norm hook that must exist
    before the graphs are captured."""

    def configure(self, engine_config: EngineConfig) -> None:
        """Apply the engine's launch options: CUDA graphs for decode (CUDA, enforce_eager=False) or
        torch.compile (compile=True). Graphs are captured here, before the first request."""
        self.engine_config = engine_config
        self.cuda_graphs, self.piecewise_graphs, self.prompt_graphs, self.forward_fn = None, None, None, self.model
        self.lora_graphs = self.lora_piecewise_graphs = None
        from minillm.speculative.config import hidden_state_kind, tree_graph_batch, verify_query_lens
        from minillm.engine.cuda_graph import tree_graph_buckets
        from minillm.engine.piecewise_graph import MAX_PIECEWISE_TOKENS
        # token-tree verify steps: tree graphs of Q rows per sequence (not for MoE: their padding rows hold
        # garbage, which a router with expert capacity would let crowd out real rows)
        tree_q, tree_batch = tree_graph_batch(engine_config)
        if getattr(self.model_config, "num_local_experts", None):
            tree_q = None
        tree_buckets = tree_graph_buckets(engine_config.max_num_seqs, tree_q, tree_batch)
        # before any capture: a graph records the pre-norm copy only if the hook exists when it is captured
        piecewise_tokens = min(engine_config.max_num_batched_tokens, MAX_PIECEWISE_TOKENS)
        self._keep_hidden_states(hidden_state_kind(engine_config),
                                 max(engine_config.max_num_seqs * max(verify_query_lens(engine_config)),
                                     max(tree_buckets, default=0) * (tree_q or 0),
                                     piecewise_tokens if engine_config.piecewise_cuda_graphs else 0))
        if engine_config.compile:
            # Attention reads per-step Python metadata (lengths, the forward context): traced, it would recompile
            # every step. Kept out of the graph (vLLM's "piecewise" compilation), the rest fuses between the
            # attention calls, with symbolic token counts (dynamic=True).
            for module in self.attention_layers:
                if not getattr(module.forward, "_minillm_not_compiled", False):
                    module.forward = torch.compiler.disable(module.forward)
                    module.forward._minillm_not_compiled = True
            self.forward_fn = torch.compile(self.model, dynamic=True)
            return
        if engine_config.enforce_eager or self.device.type != "cuda":
            return
        if getattr(self.model, "attention_backend", "auto") not in ("auto", "triton"):
            # the torch path slices by Python lists of lengths, which a graph would freeze at capture time
            raise ValueError(f"CUDA graphs (enforce_eager=False) need the triton operator backend, got "
                             f"attention_backend={self.model.attention_backend!r}; use 'auto'/'triton' or "
                             f"enforce_eager=True")
        from minillm.engine.cuda_graph import DecodeCUDAGraphs
        max_model_len = engine_config.max_model_len or self.model_config.max_position_embeddings
        # query lengths (1,) or (1, 1 + k) with speculative decoding; tree graphs with a tree method
        # one rank: the decode graphs also take the LM head, greedy argmax and deferred-id gather off the host
        # (with tensor or pipeline parallelism the logits are gathered or exist on one stage only)
        one_rank = engine_config.tensor_parallel_size * engine_config.pipeline_parallel_size * \
            engine_config.expert_parallel_size == 1
        shape = (self.model, engine_config.max_num_seqs, -(-max_model_len // self.block_size), self.block_size,
                 self.model_config.hidden_size, self.dtype, self.device)
        graphs = DecodeCUDAGraphs(*shape, query_lens=verify_query_lens(engine_config), tree_query_len=tree_q,
                                  tree_max_batch=tree_batch, sample=one_rank)
        self._capture(graphs)
        self.cuda_graphs = graphs
        if self.lora is not None:  # multi-LoRA: a second set for the decode steps that use adapters
            lora_graphs = DecodeCUDAGraphs(*shape, query_lens=verify_query_lens(engine_config), sample=one_rank,
                                           lora=self.lora, prev_tokens=graphs.prev_tokens)
            self._capture(lora_graphs)
            self.lora_graphs = lora_graphs
        # steps with prefill tokens and token-tree steps no tree graph holds: piecewise graphs, unless a layer
        # mixes rows (MoE capacity). Heads that read the final norm's input (EAGLE, MTP) get it as from the decode
        # graphs: the hook's copy into _graph_pre_norm is recorded in the last piece, and every replay refreshes it
        if engine_config.piecewise_cuda_graphs and not getattr(self.model_config, "num_local_experts", None):
            from minillm.engine.piecewise_graph import PiecewiseCUDAGraphs
            from minillm.engine.prompt_graph import PromptCUDAGraphs
            pieces = PiecewiseCUDAGraphs(self.model, self.attention_layers, piecewise_tokens, self.device)
            self._capture(pieces)
            self.piecewise_graphs = pieces
            if self.lora is not None:  # multi-LoRA: the steps with prefill tokens that use adapters
                lora_pieces = PiecewiseCUDAGraphs(self.model, self.attention_layers, piecewise_tokens, self.device,
                                                  lora=self.lora)
                self._capture(lora_pieces)
                self.lora_piecewise_graphs = lora_pieces
            # the commonest of those steps, one fresh prompt, replays a whole-forward graph (attention included)
            prompts = PromptCUDAGraphs(self.model, piecewise_tokens, self.device)
            self._capture(prompts)
            self.prompt_graphs = prompts

    def release_graphs(self) -> bool:
        """Drop every captured graph, and with them their memory pool and the addresses they recorded (sleep mode,
        engine/sleep_mode.py, is about to move the weights and the KV pool). Steps run eagerly until configure()
        captures them again. True when there were graphs to drop."""
        graphs = (self.cuda_graphs, self.piecewise_graphs, self.prompt_graphs, self.lora_graphs,
                  self.lora_piecewise_graphs)
        self.cuda_graphs = self.piecewise_graphs = self.prompt_graphs = None
        self.lora_graphs = self.lora_piecewise_graphs = None
        self._graph_sampled = self._last_sampled = self._pre_norm = None  # tensors in the graphs' pool
        return any(g is not None for g in graphs)

    def _capture(self, graphs: Any) -> None:
        """graphs.capture(), with the flag that lets the pre-norm hook record its copy into the static buffer."""
        with torch.inference_mode():
            self._capturing_graphs = True
            try:
                graphs.capture()
            finally:
                self._capturing_graphs = False

    def _keep_hidden_states(self, kind: str | None, max_graph_tokens: int) -> None:
        """Prepare what return_hidden_states needs: for "pre_norm", a forward hook on the final norm (the fused
        residual norm returns (normed, residual stream)); nothing for "post_norm" (the forward's own output)."""
        if kind not in (None, "post_norm", "pre_norm"):
            raise ValueError(f"hidden state kind must be None, 'post_norm' or 'pre_norm', got {kind!r}")
        self.hidden_state_kind = kind
        if kind != "pre_norm" or self._pre_norm_hook is not None:
            return
        final_norm = getattr(getattr(self.model, "model", None), "norm", None)
        if not isinstance(final_norm, nn.Module):
            raise ValueError(f"pre-norm hidden states need the model's final norm at model.norm; "
                             f"{type(self.model).__name__} has none")
        if self.device.type == "cuda":
            self._graph_pre_norm = torch.empty(max_graph_tokens, self.model_config.hidden_size, dtype=self.dtype,
                                               device=self.device)
        runner = weakref.ref(self)  # the hook must not keep a finished engine's runner (and its KV pool) alive

        def keep_pre_norm(module: nn.Module, inputs: tuple, output: object) -> None:
            me = runner()
            if me is None or not isinstance(output, tuple):
                return
            stream = output[1]
            # another engine sharing these weights may be capturing its own graphs: not this buffer's business
            if me._capturing_graphs and torch.cuda.is_current_stream_capturing():
                me._graph_pre_norm[:stream.shape[0]].copy_(stream)  # recorded: every replay refreshes it
            me._pre_norm = stream
        self._pre_norm_hook = final_norm.register_forward_hook(keep_pre_norm)
        weakref.finalize(self, self._pre_norm_hook.remove)
