"""Multi-LoRA serving (chapter 10, section 7): many fine-tuned adapters over one base model, each request with its
own (vLLM's `enable_lora=True` and `LoRARequest`). request.py names an adapter, adapter.py reads and checks PEFT's format,
slots.py (engine) decides which device slot holds which adapter, layers.py (worker) adds each token's adapter
product inside every adapted Linear; the kernels are minillm.kernels.lora."""
from minillm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
