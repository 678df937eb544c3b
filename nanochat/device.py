"""Device and precision: which device to train on, the autocast context, and the peak FLOP/s
that MFU is measured against."""

import contextlib
import time

import torch

from nanochat.distributed import local_rank

# Dense bf16 tensor-core peaks (no 2:4 sparsity), from the vendors' datasheets. Matched in order
# against torch.cuda.get_device_name(), so more specific names come first.
GPU_PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("RTX A6000", 155e12),
    ("V100", 125e12),  # fp16: V100 has no bf16 tensor cores
)


def resolve_device(name: str) -> torch.device:
    """auto picks cuda > mps > cpu; under torchrun a CUDA device is this node's GPU number LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank())
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on CUDA, where it is the norm; fp32 elsewhere unless asked."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of square matmuls at this dtype: the practical peak of a device with no datasheet."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm up the kernel choice
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float | None, str]:
    """The FLOP/s MFU divides by, and a sentence saying where it came from."""
    if override is not None:
        return float(override), f"MFU is against system.peak_flops={override:.3g} FLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, flops in GPU_PEAK_BF16_FLOPS:
            if pattern in name:
                return flops, f"MFU is against the {name} datasheet bf16 peak of {flops:.3g} FLOP/s"
        return None, f"no peak FLOP/s known for {name}: set system.peak_flops to log MFU"
    flops = measure_matmul_flops(device, dtype)
    return flops, (
        f"MFU on {device.type} is against a peak measured now by a {str(dtype).removeprefix('torch.')} "
        f"matmul: {flops / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads"
    )
