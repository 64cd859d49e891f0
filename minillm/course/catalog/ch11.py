"""Chapter 11: parallelism. Who holds which slice of the model, and what must travel between the ranks.

The exercises are the decisions of minillm.parallel and minillm.layers.moe: which slice of a linear layer a tensor-
parallel rank keeps (split_linear) and where the all-reduce goes (allreduce_placement), where a pipeline cuts a
step into micro-batches (micro_batch_bounds), which experts a token goes to (route_topk), and how a request's KV
blocks are packed for the prefill -> decode transfer and unpacked on the other side. The engine calls each through
`dispatch`; the graded tests simulate the ranks in one process by looping over rank indices. And the interview
question behind "TP within a node": the bytes each GPU sends in a ring all-reduce (ring_allreduce_bytes).
"""
from minillm.course.spec import Chapter, Exercise

CHAPTER = Chapter(11, "ch11_parallelism", "Parallelism: tensor, pipeline, expert parallel and disaggregation")

EXERCISES = [
    Exercise(
        id="ch11.split_linear", function="split_linear", source="minillm/parallel/tensor.py", points=10,
        nudge="A column-parallel rank computes some outputs completely; a row-parallel rank computes part of every "
              "output. Which dimension of W [out, in] is which, and who may add the bias?",
        hint="column: W.narrow(0, r*out/tp, out/tp) and the same slice of b; row: W.narrow(1, r*in/tp, in/tp), "
             "b on rank 0 only (None elsewhere: the all-reduce would add it tp times).",
        signature="split_linear(weight: torch.Tensor | None, bias: torch.Tensor | None, tp_rank: int, "
                  "tp_size: int, style: str) -> tuple[torch.Tensor | None, torch.Tensor | None]",
        called_from="minillm.parallel.tensor: the weight_loader of every column- and row-parallel layer "
                    "(qkv_proj, o_proj, gate_up_proj, down_proj) for each dense tensor it loads",
    ),
    Exercise(
        id="ch11.allreduce_placement", function="allreduce_placement", source="minillm/parallel/tensor.py",
        points=5,
        nudge="Which layer's output is a partial sum, and which is a complete slice that the next layer can use "
              "as it is?",
        hint="row -> True (when tp_size > 1), column and replicated -> False; a column layer must be followed by "
             "a row layer, else ValueError; tp_size 1 -> all False.",
        signature="allreduce_placement(styles: list[str], tp_size: int) -> list[bool]",
        called_from="minillm.parallel.tensor.plan_all_reduces (LlamaAttention and LlamaMLP at construction: "
                    "the layers' forward all-reduces where the plan says)",
    ),
    Exercise(
        id="ch11.moe_route", function="route_topk", source="minillm/layers/moe.py", points=10,
        nudge="Turn the router's scores into probabilities, keep each token's k best experts, and make the kept "
              "weights a distribution again.",
        hint="probs = softmax(logits.float(), dim=-1) over experts; w, ids = topk(probs, k); return w / w.sum(-1, "
             "keepdim=True), ids (fp32 weights, best first).",
        signature="route_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]",
        called_from="minillm.models.moe.MixtralSparseMoeBlock.forward and minillm.parallel.expert."
                    "expert_parallel_moe (every MoE layer, one process or expert-parallel)",
    ),
    Exercise(
        id="ch11.pack_kv_blocks", function="gather_kv_blocks", source="minillm/parallel/kv_transfer.py",
        points=5,
        nudge="The pool is [2, layers, blocks, ...]: take the request's blocks along the blocks dimension, in the "
              "order of its block table, into a tensor of their own.",
        hint="pool.index_select(2, block_ids): a copy, in table order (not sorted), K and V of every layer at once.",
        signature="gather_kv_blocks(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor",
        called_from="minillm.parallel.kv_transfer.pack_kv_blocks (the prefill worker, for every request it hands "
                    "to the decode worker)",
    ),
    Exercise(
        id="ch11.unpack_kv_blocks", function="scatter_kv_blocks", source="minillm/parallel/kv_transfer.py",
        writes=("pool",),  # written in place: its output
        points=5,
        nudge="The receiver's block table says where each logical block of the message goes in its own pool.",
        hint="pool.index_copy_(2, block_ids, packed): in place, logical block j -> physical block block_ids[j]; "
             "no other block touched.",
        signature="scatter_kv_blocks(pool: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None",
        called_from="minillm.parallel.kv_transfer.unpack_kv_blocks (the decode worker, for every request it "
                    "receives)",
    ),
    Exercise(
        id="ch11.pipeline_schedule", function="micro_batch_bounds", source="minillm/parallel/runner.py",
        points=10,
        nudge="Walk the sequences with a running token count and cut where each micro-batch has its share; keep "
              "every sequence, and never leave a micro-batch empty.",
        hint="n = min(M, seqs); after seq i: close group g = len(bounds) when acc * n >= total * g (integers, not "
             "acc >= g * (total / n)) or seqs left == groups still to open; end with num_seqs (the remainder is never "
             "dropped).",
        signature="micro_batch_bounds(query_lens: list[int], num_micro_batches: int) -> list[int]",
        called_from="minillm.parallel.runner.split_step (every step of a pipeline-parallel worker: pp micro-batches)",
    ),
    Exercise(
        id="ch11.ring_allreduce_bytes", function="ring_allreduce_bytes", source="minillm/bench/interview.py",
        points=5,
        nudge="Cut the tensor into one chunk per GPU; count the steps of a reduce-scatter and of an all-gather "
              "around the ring, and what each GPU sends per step.",
        hint="2 (world_size - 1) steps, one chunk of payload_bytes / world_size sent per step: "
             "2 (N - 1) / N * payload_bytes; 0 for one GPU.",
        signature="ring_allreduce_bytes(payload_bytes: float, world_size: int) -> float",
        called_from="chapter 11 (interview question: tensor or pipeline parallel?); not called by the engine",
    ),
]
