"""system.compile: one compiled graph (training), evaluation and samples eager, and a run that goes
on eager, saying so in one line, when compilation fails. Compilation is simulated by replacing
torch.compile, except in the slow test that compiles for real."""

import pytest
import torch
from runs import train
from test_train import tiny_run_overrides, train_records

import nanochat.device as device_module


def run_losses(data_dir, run_dir, *extra) -> tuple[list[float], float]:
    final = train(*tiny_run_overrides(data_dir, "trainer.num_iterations=6", "eval.every=3", *extra), run_dir=run_dir)
    return [r["train/loss"] for r in train_records(run_dir)], final["val/bpb"]


def test_a_run_whose_compilation_fails_says_so_once_and_trains_eager(
    shakespeare_data_dir, tmp_path, monkeypatch, capsys
):
    eager = run_losses(shakespeare_data_dir, tmp_path / "eager", "system.compile=false")

    def no_compiler(fn, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

        return compiled

    monkeypatch.setattr(device_module.torch, "compile", no_compiler)
    capsys.readouterr()
    fallen_back = run_losses(shakespeare_data_dir, tmp_path / "compiled", "system.compile=true")
    notes = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert notes == [
        "torch.compile failed for the model (RuntimeError: InvalidCxxCompiler: No working C++ compiler found in "
        "torch._inductor.config.cpp.cxx); running it eager"
    ]
    assert fallen_back == eager


class FailingBackward(torch.autograd.Function):
    """The identity, whose backward fails as a compiled backward graph that cannot be built would."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated: the backward graph did not compile")


def test_a_backward_that_fails_to_compile_redoes_the_first_micro_step_eager(
    shakespeare_data_dir, tmp_path, monkeypatch, capsys
):
    eager = run_losses(shakespeare_data_dir, tmp_path / "eager", "system.compile=false")
    monkeypatch.setattr(
        device_module.torch, "compile", lambda fn, **options: lambda *a, **k: FailingBackward.apply(fn(*a, **k))
    )
    capsys.readouterr()
    fallen_back = run_losses(shakespeare_data_dir, tmp_path / "compiled", "system.compile=true")
    out = capsys.readouterr().out
    assert out.count("torch.compile failed for the model") == 1
    assert "simulated: the backward graph did not compile" in out
    assert fallen_back == eager


def test_evaluation_and_samples_never_run_the_compiled_model(shakespeare_data_dir, tmp_path, monkeypatch):
    calls = []

    def recording_compile(fn, **options):
        def compiled(*args, **kwargs):
            calls.append((torch.is_grad_enabled(), kwargs.get("loss_reduction", "mean"), args[0].shape))
            return fn(*args, **kwargs)

        return compiled

    monkeypatch.setattr(device_module.torch, "compile", recording_compile)
    run_losses(shakespeare_data_dir, tmp_path / "run", "system.compile=true")
    # 6 steps x 2 micro-steps, all training calls: evaluations at 0, 3 and 6 and the samples ran
    # the uncompiled model.
    assert calls == [(True, "mean", torch.Size([8, 64]))] * 12


@pytest.mark.slow  # end to end with real cold compilations (tens of seconds on a 2-core CPU)
def test_compiling_builds_the_training_graphs_once_and_nothing_for_evaluation(shakespeare_data_dir, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_losses(shakespeare_data_dir, tmp_path / "run", "system.compile=true", "optimizer=adamw_muon")
    counters = torch._dynamo.utils.counters
    # The model's frame once and Muon's Newton-Schulz once per stacked shape (two here: 128 x 128
    # and 128 x 512), each one graph: evaluation (eval mode, no_grad, per-token losses) never
    # reached dynamo, so nothing was compiled a second time.
    assert dict(counters["frames"]) == {"total": 3, "ok": 3}
    assert counters["stats"]["unique_graphs"] == 3
    assert dict(counters["graph_break"]) == {}
