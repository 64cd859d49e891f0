"""minillm.kernels: the Triton kernels of minillm (imported as `minillm.kernels.xxx`, never as a bare `kernels`).

    flash_attention.py  flash_attn_varlen, flash_attention     FlashAttention-2 forward, packed or fixed-length
                                                              batches, GQA, bottom-right causal, lse (chapter 3)
    paged_attention.py  paged_decode_attention                 split-KV decode over the paged KV cache (chapter 5)
    decode_merge.py     merge_attention_states                 its merge of the splits: the log-sum-exp merge in torch
                                                              and Triton, and fused into the split kernel (chapter 4)
    fp8_kv_tile.py      _fp8_tile                              its FP8 cache reads: e4m3 bytes widened to fp16 tiles
    fused.py            rms_norm, rotary_embedding_,           memory-bound fused ops: residual + RMSNorm, RoPE in
                        silu_and_mul, store_kvcache           place, SwiGLU gate, KV-cache scatter (chapters 1, 2, 4)
    rope_store.py       rotary_and_store_kvcache_              RoPE on q/k and the KV-cache store in one launch
                                                              (what Attention runs when handed the RoPE module)
    int4_gemm.py        int4_gemm                              INT4 weight-only GEMM (GPTQ layout, unpacked in
                                                              registers, split-K for decode) (chapter 8)
    int4_layout.py      repack_int4, sort_act_order,           its layout: repack from QuantizedWeight, act-order,
                        dequantize_int4                       the torch reference (chapter 8)
    scaled_mm.py        scaled_mm                              W8A8 GEMM: 8-bit operands, per-token x per-channel
                                                              scales in the epilogue (chapters 7-8)
    fp8_gemm.py         per_token_quant_fp8, fp8_gemm          FP8 e4m3: activations quantized per token, the
                                                              FP8 GEMM (chapters 7-8)
    int8_gemm.py        per_token_quant_int8, int8_gemm        the same for INT8, int32 accumulation (chapters 7-8)
    gemv.py             gemv, gemv_rms_norm                    dense fp16/bf16 y = x W^T for M <= 16 rows (decode):
                                                              weight streaming, split-K with one launch, SwiGLU
                                                              computed in the loads (chapter 4); int8 codes with
                                                              per-row scales (int8_rtn's decode, chapter 7)
    nf4_gemv.py         nf4_gemv                               NF4 weight-only y = x W^T for M <= 16 rows: packed
                                                              4-bit levels decoded in registers (chapter 7)
    gemv_config.py      GemvConfig, default_config,            its launches: the rule read off the H200 sweep and the
                        tuned_config                          measured winners per shape
    int4_mma.py,        int4 kernels for decode sizes:         bf16-halves tensor-core and packed-fp16 CUDA-core
    int4_gemv.py,       int4_dispatch times them per shape     INT4 GEMMs; int4_dispatch picks per (M bucket,
    int4_dispatch.py,   and keeps the fastest correct one      shape); int4_tuning: configs, split-K, workspace
    int4_tuning.py
    int4_dequant.py     int4_dequant_matmul (prefill sizes)    INT4 -> bf16 into a scratch buffer, then cuBLAS: the
                                                              dispatcher's candidate from M = 16 up (chapter 8)
    paged_prefill.py    paged_prefill_attention                FlashAttention reading cached K/V through the block
                                                              table: chunks and prefix hits, no gather (chapter 5)
    flash_attention_hopper.py                                  TMA-descriptor FlashAttention for sm_90, opt-in
                                                              (backend="hopper"; slower than the portable kernel)
    fp8_block_gemm.py   per_token_group_quant_fp8,             FP8 with DeepSeek-style block scales: activations per
                        fp8_block_gemm                        token and K-group, weights per tile (chapter 8)
    argmax.py           argmax_last_dim                        greedy decoding's argmax in two stages over many SMs
    topk_logprobs.py    topk_log_softmax                       the k most probable tokens' log-probabilities in two
                                                              stages (EAGLE-2's tree search, chapter 9)
    lora.py             lora_shrink, lora_expand, lora_fused   multi-LoRA serving: the segmented-gather shrink
                                                              (x A^T) and expand (+= s B^T) over adapter slots,
                                                              one launch for a batch of mixed adapters; both in
                                                              one launch at decode (lora_fused_pays decides)
    hardware.py         num_sms, SMALL_MATRIX                  the SM count the launch heuristics size grids by;
                                                              where a matrix is small (launch-bound at decode)
    sliding_window.py   sliding_window_mask, check_window      sliding-window attention's band (Mistral, Qwen2):
                                                              the torch mask the paged kernels are tested against

On a machine without CUDA they run through Triton's interpreter (TRITON_INTERPRET=1, set by `import minillm`),
in fp32 and slowly: fine for tests at small sizes. This package imports nothing at import time (no triton), so
`import minillm.kernels` stays cheap; import the module you need.
"""

if __name__ == "kernels":
    # Found as a bare top-level `kernels`: the repository root is on sys.path (`python -m pytest` or a notebook run
    # from the checkout), so this folder shadows the PyPI package `kernels` that transformers (>= 5.25 depends on
    # it) imports. Hand the name over to that package when one is installed elsewhere on sys.path; without one,
    # stay an empty module (no `__version__`, so transformers' probe finds no usable `kernels`).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if isinstance(p, str) and os.path.realpath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _pypi_kernels = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _pypi_kernels  # the import system returns what sys.modules holds after this runs
        _spec.loader.exec_module(_pypi_kernels)
