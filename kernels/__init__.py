"""minillm.kernels: the Triton kernels of minillm (imported as `minillm.kernels.xxx`, never as a bare `kernels`).

    flash_attention.py  flash_attn_varlen, flash_attention     FlashAttention-2 forward, packed or fixed-length
                                                              batches, GQA, bottom-right causal, lse (chapter 3)
    paged_attention.py  paged_decode_attention,                split-KV decode over the paged KV cache (FP8-ready),
                        merge_attention_states                log-sum-exp merge of partial attentions (chapter 5)
    fused.py            rms_norm, rotary_embedding_,           memory-bound fused ops: residual + RMSNorm, RoPE in
                        silu_and_mul, store_kvcache           place, SwiGLU gate, KV-cache scatter (chapters 1, 2, 4)

On a machine without CUDA they run through Triton's interpreter (TRITON_INTERPRET=1, set by `import minillm`),
in fp32 and slowly: fine for tests at small sizes. This package imports nothing at import time (no triton), so
`import minillm.kernels` stays cheap; import the module you need.
"""
