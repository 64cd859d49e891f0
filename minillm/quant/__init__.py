"""Quantization (a later issue): gptq, awq, fp8, smoothquant, gguf_quants, nf4, prune."""
