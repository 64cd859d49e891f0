"""minillm: LLM inference optimization, built step by step. `from minillm import LLM, SamplingParams`."""
from minillm import platform as _platform  # noqa: F401  (sets TRITON_INTERPRET before triton loads)
from minillm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "LoRARequest", "PoolingParams",
           "EmbeddingRequestOutput", "ClassificationRequestOutput"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import minillm` stays cheap for the grader and the CLI
    if name == "LLM":
        from minillm.llm import LLM
        return LLM
    if name in ("RequestOutput", "CompletionOutput", "EmbeddingRequestOutput", "ClassificationRequestOutput"):
        from minillm import outputs
        return getattr(outputs, name)
    if name == "PoolingParams":
        from minillm.pooling import PoolingParams
        return PoolingParams
    if name == "LoRARequest":
        from minillm.lora.request import LoRARequest
        return LoRARequest
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")
