"""Parallelism (chapter 11): tensor and pipeline parallel workers on torch.distributed.

    LLM(model, tensor_parallel_size=2)             2 worker processes, each with half of every matmul
    LLM(model, pipeline_parallel_size=2)           2 worker processes, each with half of the layers
    LLM(moe_model, expert_parallel_size=2)         2 worker processes, each with half of every layer's experts
    LLM(model, disaggregation={"prefill": 1, "decode": 1})   prompts in one worker process, decoding in another
    torchrun --nproc-per-node 2 -m minillm.parallel.launch --model PATH --tensor-parallel-size 2

    state.py      which TP group / pipeline stage this process is; the collectives (no-ops with one rank)
                  and the byte counters behind them
    tensor.py     column- and row-parallel linears (Megatron's two all-reduces per block), the packed q/k/v
                  split with K/V-head replication, vocab-parallel embedding and LM head
    pipeline.py   layer partition over stages and the PPMissingLayer placeholders
    runner.py     the ModelRunner of one rank: micro-batches through the stages, sampling on one rank
    weights.py    a rank's share of the geometry (its KV pool) and of random weights
    expert.py     expert parallelism for MoE models (Mixtral): all-to-all dispatch and return of the tokens,
                  load-balance statistics (the router and expert loop are minillm.layers.moe)
    launch.py     the torchrun entry (rank 0 is engine and worker 0)
    disagg.py     prefill/decode disaggregation: a prefill worker and a decode worker process and the KV channel
                  between them (the router is minillm.engine.disagg_engine: LLM(model, disaggregation={...}))
    kv_transfer.py  a request's KV blocks packed into one contiguous tensor and scattered back into other blocks
"""
