"""Start-up decisions taken by measurement (precision), the allocator setting, and torch.compile's
eager fallback. Measurements are simulated where the test is about the decision."""

import resource

import pytest
import torch

import nanochat.device as device_module
from nanochat.device import (
    CompiledOrEager,
    PrecisionChoice,
    choose_precision,
    keep_freed_memory,
    linear_tasks,
    resolve_dtype,
)

CPU = torch.device("cpu")
D4_SHAPES = [(256, 256)] * 16 + [(1024, 256)] * 4 + [(256, 1024)] * 4 + [(4096, 256)]


def simulate(monkeypatch, seconds_by_dtype: dict, bf16_instructions: bool = True) -> list:
    """Replace the timing of one task by seconds per dtype (a number, or a list taken in turn) on a
    CPU with or without bf16 matmul instructions; returns the log of calls."""
    calls = []

    def fake_time_task(task, dtype, device):
        calls.append(dtype)
        seconds = seconds_by_dtype[dtype]
        return seconds.pop(0) if isinstance(seconds, list) else seconds

    monkeypatch.setattr(device_module, "time_task", fake_time_task)
    monkeypatch.setattr(device_module, "cpu_has_bf16_matmuls", lambda: bf16_instructions)
    return calls


def test_auto_dtype_on_a_cpu_picks_fp32_when_bf16_measures_slower(monkeypatch):
    calls = simulate(monkeypatch, {torch.float32: 1.0, torch.bfloat16: 30.0})
    dtype, note = resolve_dtype("auto", CPU, D4_SHAPES, rows=64)
    assert dtype == torch.float32
    assert "slower than fp32" in note and "float32" in note
    # fp32 for each of the four distinct shapes, then bf16 stops at the first: it already took
    # longer than all of fp32 (16 x 30 > 25 x 1).
    assert calls == [torch.float32] * 4 + [torch.bfloat16]


def test_auto_dtype_on_a_cpu_picks_bf16_where_it_measures_faster(monkeypatch):
    simulate(monkeypatch, {torch.float32: 1.5, torch.bfloat16: 1.0})
    dtype, note = resolve_dtype("auto", CPU, D4_SHAPES, rows=64)
    assert dtype == torch.bfloat16
    assert "1.50x as fast as fp32" in note


def test_bf16_must_also_beat_a_second_timing_of_fp32(monkeypatch):
    # The first fp32 pass stretched threefold by other work: bf16 looks 1.5x as fast until fp32 is
    # timed again.
    calls = simulate(monkeypatch, {torch.float32: [3.0] * 4 + [1.0] * 4, torch.bfloat16: 2.0})
    dtype, note = resolve_dtype("auto", CPU, D4_SHAPES, rows=64)
    assert dtype == torch.float32 and "2.00x slower than fp32" in note
    assert calls == [torch.float32] * 4 + [torch.bfloat16] * 4 + [torch.float32] * 4


def test_auto_dtype_on_a_cpu_without_bf16_instructions_is_fp32_without_measuring(monkeypatch):
    calls = simulate(monkeypatch, {torch.float32: 1.0, torch.bfloat16: 0.5}, bf16_instructions=False)
    dtype, note = resolve_dtype("auto", CPU, D4_SHAPES, rows=64)
    assert (dtype, calls) == (torch.float32, [])
    assert note == (
        "system.dtype=auto, the model's matmuls: this CPU has no bf16 matmul instructions (AVX-512 BF16 or AMX), "
        "so float32 without measuring"
    )


def test_bf16_instructions_are_read_as_the_kernel_reports_them():
    """Against /proc/cpuinfo, an independent account of the same CPU flags (x86 Linux only)."""
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        pytest.skip("needs an x86-64 Linux /proc/cpuinfo")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    assert device_module.cpu_has_bf16_matmuls() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_auto_dtype_on_cuda_is_bf16_without_measuring(monkeypatch):
    calls = simulate(monkeypatch, {})
    assert resolve_dtype("auto", torch.device("cuda", 0), D4_SHAPES) == (torch.bfloat16, None)
    assert calls == []


def test_an_explicit_dtype_is_taken_as_given(monkeypatch):
    calls = simulate(monkeypatch, {})
    assert resolve_dtype("bfloat16", CPU, D4_SHAPES) == (torch.bfloat16, None)
    assert resolve_dtype("float32", CPU, D4_SHAPES) == (torch.float32, None)
    assert calls == []


def test_precision_measurement_runs_the_real_matmuls_at_the_given_shapes(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_bf16_matmuls", lambda: True)  # measured even without them
    tasks = linear_tasks([(48, 32), (48, 32), (16, 48)], rows=8, device=CPU)
    assert [count for _, count in tasks] == [2, 1]  # one task per distinct shape
    for task, _ in tasks:
        assert task(torch.float32).dtype == torch.float32
        assert task(torch.bfloat16).dtype == torch.bfloat16  # under autocast, as nn.Linear runs
    choice = choose_precision(tasks, CPU)
    assert isinstance(choice, PrecisionChoice) and choice.dtype in (torch.float32, torch.bfloat16)
    assert choice.float32_s > 0 and choice.bfloat16_s > 0


def test_keeping_freed_memory_stops_page_faults_on_reallocation():
    # Applied to this test process for good, as every in-process training run here applies it.
    note = keep_freed_memory(True, CPU)
    if "glibc" not in (note or "") or "refused" in note or "not a glibc" in note:
        pytest.skip(f"not a glibc Linux system: {note}")
    size = 64 * 2**20  # above glibc's largest dynamic mmap threshold (32 MiB)
    torch.ones(size // 4)  # allocated once, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(size // 4)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Unmapped on free, each 64 MiB buffer would fault in all of its 16,384 4-KiB pages again
    # (5 x 16,384). Kept, the heap serves them from pages already there; after other tests have
    # fragmented this process's heap, one of them may still land on fresh pages.
    assert faults < 2 * 16384


def test_keeping_freed_memory_is_off_when_asked_and_off_the_cpu():
    assert keep_freed_memory(False, CPU) is None
    assert keep_freed_memory(True, torch.device("cuda", 0)) is None


def test_compile_failure_says_so_in_one_line_and_runs_eager(monkeypatch, capsys):
    def failing_compile(fn, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("simulated: no C++ compiler found\nlong traceback follows")

        return compiled

    monkeypatch.setattr(device_module.torch, "compile", failing_compile)
    double = CompiledOrEager(lambda x: 2 * x, "the test function")
    assert double(torch.tensor(3.0)).item() == 6.0
    assert double(torch.tensor(4.0)).item() == 8.0  # stays eager, silently
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "torch.compile failed for the test function (RuntimeError: simulated: no C++ compiler found); running it eager"
    ]
    assert not double.compiled


def test_a_function_that_fails_eager_too_raises_its_own_error(monkeypatch):
    monkeypatch.setattr(device_module.torch, "compile", lambda fn, **options: fn)

    def broken(x):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        CompiledOrEager(broken, "broken")(1)
