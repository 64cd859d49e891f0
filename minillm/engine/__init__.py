"""The engine: sequences, block manager and schedulers (chapters 2, 5, 6), model runner, CUDA graphs (chapter 4)."""
