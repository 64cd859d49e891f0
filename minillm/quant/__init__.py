"""Quantization (chapters 7-8): how weights (and activations) are stored in fewer bits, and what that costs.

    base.py          the Linear seam: LinearMethod (create_weights / process_weights_after_loading / apply),
                     QuantizationConfig and the registry of names (vLLM's where they exist)
    rtn.py           the integer grid: round-to-nearest, groups, symmetric/asymmetric, int4 packing
    gptq.py awq.py   the algorithms that choose better codes from calibration data (calibration.py: the text)
    awq_block.py     AWQ's scales searched on each block's output (the reference code's objective)
    recipes.py       quantize_recipe: gptq+ (act-order, static groups, searched grids), awq+, awq+gptq
    int4.py          GPTQ's and AWQ's packed layouts and int4_linear, the weight-only matmul's call site
    weight_only.py   "rtn" (at load time), "gptq" and "awq" checkpoints       W4A16 / W3A16
    fp8.py           "fp8"          e4m3 weights and per-token activations   W8A8 float
    fp8_calibrated.py  fp8's calibrated recipe: smoothing, MSE row scales, GPTQ on the e4m3 grid
    fp8_block.py     "fp8_block"    e4m3 with tile / token-group scales      W8A8 float (DeepSeek-V3)
    smoothquant.py   "smoothquant"  outliers migrated into the weights      W8A8 int8
    nf4.py           "nf4"          NormalFloat4 + double quantization      W4A16
    llm_int8.py      "int8"         int8 with outlier columns in float      W8A8 int8 + fp
    int8_rtn.py      "int8_rtn"     the seam's first example               W8A16
    driver.py        quantize_model: a whole model, layer by layer, with calibration
    calibrated_layers.py  one layer of that walk: LayerRunner, and GPTQ / AWQ / SmoothQuant per layer
    checkpoint.py    save_quantized (safetensors + config.json + tokenizer) and load-time quantization
    gguf_quants.py   ggml's Q8_0 / Q4_0 / Q5_0 / Q4_K blocks, written by searched-scale quantizers
    gguf_export.py   a whole model as one GGUF (loader/gguf_writer.py: the container; gguf_tokenizer.py: an HF
                     tokenizer.json as GGUF metadata)
    prune.py         magnitude, Wanda and N:M (2:4) pruning; dense checkpoints with zeros
    cli.py           `minillm quantize`
"""
