"""Device and precision: which device to train on, the autocast context, the peak FLOP/s that MFU
is measured against, how the host allocator keeps memory, and torch.compile with an eager fallback.

Speed decisions that depend on the machine are measured here at start-up: CPUs of one kind differ
(with and without native bf16 matmul instructions, e.g. AVX-512 BF16 / AMX). One thing is known
without measuring: an x86 CPU with neither runs bf16 matmuls in software, far slower than fp32, so
there bf16 is never chosen (a measurement on a busy machine once chose it, see choose_precision).
"""

import contextlib
import ctypes
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.distributed import local_rank
from nanochat.errors import UserError
from nanochat.logs import log

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

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest value mallopt takes (an int): free memory at the top of the heap is only given back
# beyond 2 GiB.
TRIM_THRESHOLD_BYTES = 2**31 - 1

# Rows of the activations the dtype measurement multiplies by each weight: enough for the matmul
# kernels to run at their full-size speed, few enough that start-up stays under a second.
PRECISION_PROBE_ROWS = 1024


def resolve_device(name: str) -> torch.device:
    """auto picks cuda > mps > cpu; under torchrun a CUDA device is this node's GPU number LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank())
    return torch.device(name)


def check_available(name: str, key: str) -> None:
    """A UserError naming the config key when it asks for a device this machine does not have."""
    missing = {"cuda": not torch.cuda.is_available(), "mps": not torch.backends.mps.is_available()}
    if missing.get(name, False):
        raise UserError(f"{key}={name} was asked for, but PyTorch sees no {name.upper()} device on this machine.")


def keep_freed_memory(enabled: bool, device: torch.device) -> str | None:
    """On a Linux (glibc) CPU run, keep freed buffers in the process instead of returning them to
    the kernel; call before the first large tensor. Returns a sentence for the log, or None.

    glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
    unmaps it on free, and trims the top of the heap above M_TRIM_THRESHOLD: a training step frees
    and reallocates its activations every step, so each step page-faults them back in, zeroed by
    the kernel. M_MMAP_MAX=0 serves large blocks from the heap and a 2 GiB trim threshold keeps
    them there for the next step, at the cost of a resident set that stays at its peak. (Setting
    either parameter also turns off glibc's sliding mmap threshold.) GPU runs keep their tensors on
    the device, so this only applies to device cpu.
    """
    if not enabled or device.type != "cpu":
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"system.keep_freed_memory: not a glibc Linux system ({platform.system()}), allocator left as it is"
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return "system.keep_freed_memory: glibc refused mallopt, allocator left as it is"
    return (
        "allocator: freed memory stays in this process (glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB; "
        "system.keep_freed_memory=false turns this off)"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, repeats: int = 3, budget_s: float = 1.0) -> float:
    """Best wall time of fn() over `repeats` calls after one warm-up call (kernel selection, first
    touch of its buffers); stops early once budget_s is spent, after at least one timed call."""
    fn()
    synchronize(device)
    deadline = time.perf_counter() + budget_s
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return best


def time_task(task: Callable[[torch.dtype], object], dtype: torch.dtype, device: torch.device) -> float:
    """Seconds task(dtype) takes (the measurement the precision choice rests on; tests replace it)."""
    return best_time(lambda: task(dtype), device)


NO_BF16_MATMULS = "this CPU has no bf16 matmul instructions (AVX-512 BF16 or AMX)"


def cpu_has_bf16_matmuls() -> bool:
    """False on an x86 CPU with neither AVX-512 BF16 nor AMX: torch's bf16 GEMM converts its operands
    in software there (20x to 200x slower than fp32 on the AVX2 EPYC this was measured on). True
    elsewhere (ARM's bf16 extensions are not reported by torch), where the measurement decides."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass
class PrecisionChoice:
    dtype: torch.dtype
    float32_s: float | None  # seconds for the whole measured work in fp32; None: nothing measured
    bfloat16_s: float | None  # in bf16; a lower bound when `complete` is false
    complete: bool  # false: bf16 was stopped once it had already taken longer than all of fp32

    @property
    def measured(self) -> bool:
        return self.float32_s is not None

    def describe(self, what: str) -> str:
        if not self.measured:
            return f"{what}: {NO_BF16_MATMULS}, so float32 without measuring"
        if self.dtype == torch.bfloat16:
            speed = f"{self.float32_s / self.bfloat16_s:.2f}x as fast as fp32"
        else:
            slower = self.bfloat16_s / self.float32_s
            speed = f"{'over ' if not self.complete else ''}{slower:.2f}x slower than fp32"
        threads = torch.get_num_threads()
        return (
            f"{what}: bf16 measured {speed} on {threads} thread{'s' if threads > 1 else ''}, "
            f"so {str(self.dtype).removeprefix('torch.')}"
        )


def choose_precision(
    tasks: Sequence[tuple[Callable[[torch.dtype], object], int]], device: torch.device
) -> PrecisionChoice:
    """bf16 or fp32, whichever runs `tasks` faster here. tasks: (task, count) pairs; task(dtype)
    does one piece of the real work in that dtype and counts `count` times in the total. bf16 is
    timed after fp32 and stopped as soon as it has taken longer than fp32's whole total, so a CPU
    where it is slow costs a fraction of a second to rule it out; a CPU known to lack bf16
    instructions (cpu_has_bf16_matmuls) is not measured at all.

    Where bf16 comes out ahead, fp32 is timed once more and each task keeps its better time before
    the totals are compared: on a busy machine the short fp32 timings are the ones that other
    processes stretch most, and a suite run beside two busy loops once measured software bf16
    "1.47x as fast" after one such fp32 pass."""
    if device.type == "cpu" and not cpu_has_bf16_matmuls():
        return PrecisionChoice(torch.float32, None, None, complete=False)

    def total(times: list[float]) -> float:
        return sum(count * seconds for (_, count), seconds in zip(tasks, times, strict=True))

    float32_times = [time_task(task, torch.float32, device) for task, _ in tasks]
    float32_s = total(float32_times)
    bfloat16_s = 0.0
    for task, count in tasks:
        bfloat16_s += count * time_task(task, torch.bfloat16, device)
        if bfloat16_s >= float32_s:
            return PrecisionChoice(torch.float32, float32_s, bfloat16_s, complete=False)
    float32_s = total([min(t, time_task(task, torch.float32, device)) for (task, _), t in zip(tasks, float32_times)])
    if bfloat16_s >= float32_s:
        return PrecisionChoice(torch.float32, float32_s, bfloat16_s, complete=True)
    return PrecisionChoice(torch.bfloat16, float32_s, bfloat16_s, complete=True)


def linear_tasks(weight_shapes: Sequence[tuple[int, int]], rows: int, device: torch.device) -> list:
    """The model's matmuls as choose_precision tasks: activations [rows, in] times each distinct
    weight [out, in], as F.linear runs them in fp32 and under bf16 autocast (casts included)."""
    counts: dict[tuple[int, int], int] = {}
    for shape in weight_shapes:
        counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    generator = torch.Generator(device=device).manual_seed(0)
    tasks = []
    for (fan_out, fan_in), count in counts.items():
        x = torch.randn(rows, fan_in, device=device, generator=generator)
        w = torch.randn(fan_out, fan_in, device=device, generator=generator)

        def task(dtype: torch.dtype, x=x, w=w) -> torch.Tensor:
            with autocast(device, dtype):
                return torch.nn.functional.linear(x, w)

        tasks.append((task, count))
    return tasks


def resolve_dtype(
    name: str, device: torch.device, weight_shapes: Sequence[tuple[int, int]] = (), rows: int = PRECISION_PROBE_ROWS
) -> tuple[torch.dtype, str | None]:
    """The autocast dtype, and a sentence for the log when it was measured.

    auto: bf16 on CUDA, where it is the norm (as nanochat); fp32 on MPS; on a CPU, bf16 only where
    the model's own matmuls (weight_shapes, with `rows` activation rows, at this thread count)
    measure faster in bf16 autocast than in fp32."""
    if name != "auto":
        return getattr(torch, name), None
    if device.type == "cuda":
        return torch.bfloat16, None
    if device.type != "cpu" or not weight_shapes:
        return torch.float32, None
    choice = choose_precision(linear_tasks(weight_shapes, rows, device), device)
    return choice.dtype, choice.describe("system.dtype=auto, the model's matmuls")


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of square matmuls at this dtype. One matmul per timing, so a dtype the device runs
    slowly (bf16 without native instructions, ~1-3 s per 1024^3 matmul) still finishes after a
    warm-up and one timed call."""
    return measure_peak_flops(device, dtype, [(size, size, size)], seconds)[0]


# Rows of activations the CPU peak measurement multiplies by the model's weights at most: its
# weight-gradient matmuls have this inner dimension; beyond a few thousand a matmul runs no faster.
PEAK_PROBE_ROWS = 4096
PEAK_PROBE_SQUARES = (512, 1024, 2048)


def peak_probe_shapes(weight_shapes: Sequence[tuple[int, int]], rows: int) -> list[tuple[int, int, int]]:
    """(m, k, n) matmuls of one training step: each weight [out, in] as the forward multiplies it
    (rows x in @ in x out), as the input gradient (rows x out @ out x in) and the weight gradient
    (out x rows @ rows x in), plus square ones; duplicates once."""
    rows = max(1, min(rows, PEAK_PROBE_ROWS))
    shapes = [(size, size, size) for size in PEAK_PROBE_SQUARES]
    for fan_out, fan_in in weight_shapes:
        shapes += [(rows, fan_in, fan_out), (rows, fan_out, fan_in), (fan_out, rows, fan_in)]
    return list(dict.fromkeys(shapes))


def measure_peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    shapes: Sequence[tuple[int, int, int]],
    seconds: float = 0.15,
    total_s: float = 10.0,
) -> tuple[float, tuple[int, int, int]]:
    """The best FLOP/s any of the (m, k, n) matmuls reaches at this dtype and thread count, and its
    shape: the practical peak of a device with no datasheet. Each is timed at its best over up to
    `seconds` (after a warm-up call); shapes left once total_s has passed are not measured."""
    generator = torch.Generator(device=device).manual_seed(0)
    best, best_shape = 0.0, shapes[0]
    deadline = time.perf_counter() + total_s
    for m, k, n in shapes:
        if best > 0 and time.perf_counter() > deadline:  # a dtype this device runs slowly: enough said
            break
        a = torch.randn(m, k, device=device, generator=generator).to(dtype)
        b = torch.randn(k, n, device=device, generator=generator).to(dtype)
        flops = 2 * m * k * n / best_time(lambda: torch.matmul(a, b), device, repeats=1_000_000, budget_s=seconds)
        if flops > best:
            best, best_shape = flops, (m, k, n)
    return best, best_shape


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_cache_path() -> Path:
    """Where the best CPU peak measured so far on this machine is kept: $NANOCHAT_CACHE_DIR, else
    $XDG_CACHE_HOME/nanochat, else ~/.cache/nanochat."""
    root = (
        os.environ.get("NANOCHAT_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanochat"
    )
    return Path(root) / "cpu_peak_flops.json"


def best_peak_so_far(key: str, measured: float) -> tuple[float, bool]:
    """max(measured, the best recorded under key), recording the new best; and whether the record
    won. A CPU shared with other work measures low when it is busy: the best of every measurement on
    this machine is the figure a quiet moment can reach. An unwritable cache only loses the memory."""
    path = peak_cache_path()
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        records = {}
    best = records.get(key, 0.0)
    if measured > best:
        records[key] = measured
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(records, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass
        return measured, False
    return best, True


def peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    override: float | None,
    weight_shapes: Sequence[tuple[int, int]] = (),
    rows: int = PEAK_PROBE_ROWS,
) -> tuple[float | None, str]:
    """The FLOP/s MFU divides by, and a sentence saying where it came from.

    On a GPU, the datasheet's dense bf16 peak. On a CPU (or MPS), measured now at the run's dtype
    and thread count: the best of square matmuls and of the model's own forward and backward
    matmuls (weight_shapes [out, in] with `rows` activation rows), so that no step of this model,
    eager or compiled, does more matmul work per second than the peak it is divided by; and since
    a machine shared with other work measures low while it is busy, the best such figure measured
    on this machine so far at this dtype and thread count (peak_cache_path()) if that is higher."""
    if override is not None:
        return float(override), f"MFU is against system.peak_flops={override:.3g} FLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, flops in GPU_PEAK_BF16_FLOPS:
            if pattern in name:
                return flops, f"MFU is against the {name} datasheet bf16 peak of {flops:.3g} FLOP/s"
        return None, f"no peak FLOP/s known for {name}: set system.peak_flops to log MFU"
    shapes = peak_probe_shapes(weight_shapes, rows)
    measured, (m, k, n) = measure_peak_flops(device, dtype, shapes)
    threads = torch.get_num_threads()
    dtype_name = str(dtype).removeprefix("torch.")
    key = f"{device.type}|{cpu_name() if device.type == 'cpu' else device}|{dtype_name}|{threads} threads"
    flops, from_record = best_peak_so_far(key, measured)
    note = (
        f"MFU on {device.type} is against a peak measured now: the best of {len(shapes)} {dtype_name} matmul shapes "
        f"(square and this model's forward and backward) on {threads} thread{'s' if threads > 1 else ''}, "
        f"{measured / 1e9:.1f} GFLOP/s at {m}x{k} @ {k}x{n}"
    )
    if from_record:
        note += f"; the best measured on this machine so far is higher, {flops / 1e9:.1f} GFLOP/s ({peak_cache_path()})"
    return flops, note


class CompiledOrEager:
    """torch.compile(fn), falling back to fn itself, with one line saying so, if the first call
    fails: compilation happens there (Inductor needs a C++ compiler on a CPU, a working Triton on a
    GPU). A failure of fn itself fails eager too and is raised. After the first successful call,
    errors are fn's own and propagate."""

    def __init__(self, fn: Callable, what: str, **compile_options):
        self.eager = fn
        self.what = what
        self.current = torch.compile(fn, **compile_options)
        self.compiled = True
        self.checked = False

    def fall_back(self, error: BaseException) -> None:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        log.info(f"torch.compile failed for {self.what} ({type(error).__name__}: {first_line[:200]}); running it eager")
        self.current, self.compiled, self.checked = self.eager, False, True

    def __call__(self, *args, **kwargs):
        if self.checked:
            return self.current(*args, **kwargs)
        try:
            result = self.current(*args, **kwargs)
        except Exception as error:
            self.fall_back(error)
            return self.eager(*args, **kwargs)
        self.checked = True
        return result
