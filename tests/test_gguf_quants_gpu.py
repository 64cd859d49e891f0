"""GGUF quantizers on CUDA (the GPU machines have no `gguf` package, so this file does not import it): the bytes
decode to the same weights as the CPU's, up to a block whose candidate scales tie to rounding."""
from __future__ import annotations

import pytest
import torch

from minillm.quant.gguf_quants import dequantize_tensor, quantize_tensor


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0", "Q4_K"])
def test_gpu_quantizers_match_cpu(type_name):
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    cpu = quantize_tensor(w, type_name)[1]
    gpu = quantize_tensor(w.cuda(), type_name)[1]
    assert gpu.is_cuda and gpu.dtype == torch.uint8 and gpu.shape == cpu.shape
    block_bytes = {"Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q4_K": 144}[type_name]
    same = (gpu.cpu().reshape(-1, block_bytes) == cpu.reshape(-1, block_bytes)).all(1).float().mean()
    assert same > 0.999, float(same)
    err_cpu = (dequantize_tensor(cpu, type_name, w.shape) - w).square().sum()
    err_gpu = (dequantize_tensor(gpu.cpu(), type_name, w.shape) - w).square().sum()
    assert abs(float(err_gpu / err_cpu) - 1) < 1e-3
