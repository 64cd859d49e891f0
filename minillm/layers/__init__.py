"""Model layers: RMSNorm and RoPE (chapter 1), attention over the KV cache (chapters 2-5), linear, sampler."""
