"""Measurement (chapter 1): serving metrics, the roofline, the memory estimator and the `minillm demo` job.

    harness   TTFT / TPOT / latency / throughput and their percentiles from RequestOutput.metrics
    roofline  arithmetic intensity (exercise ch01.arithmetic_intensity), this machine's peaks, the roofline plot
    estimate  weights + KV cache memory for a model size, dtype, context and batch (`minillm estimate`)
    workload  `minillm bench`: an offline batch of exact-length prompts
    demo      `minillm demo` (what `make run` runs)
    plots     request timelines and TTFT / TPOT bars
    quality   perplexity(llm, texts) from the engine's prompt log-probabilities
    cli       registers demo / estimate / bench with `minillm`
"""

from minillm.bench.quality import perplexity  # noqa: E402,F401  (the one-call entry point)
