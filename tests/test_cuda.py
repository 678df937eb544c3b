"""The CUDA code paths: pinned batches, no host sync inside the micro-step loop, fused AdamW, bf16 by
default, the chunked loss head and batched Muon on a GPU. Skipped on a machine without CUDA; run
them with `pytest -m cuda` (tests/benchmarks/gpu_check.sh does)."""

import pytest
import torch
from configs import build_optimizers
from runs import assemble_run
from test_loss_head import plain_loss, relative_error
from test_optim import mixed_matrices, per_matrix_muon_step
from test_train import tiny_run_overrides, train_records

from nanochat.data.loader import Prefetcher, TokenLoader
from nanochat.loss_head import softcapped_cross_entropy
from nanochat.model import GPT, GPTConfig
from nanochat.muon import Muon

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_a_cuda_run_never_waits_for_the_gpu_inside_its_micro_steps(shakespeare_data_dir, tmp_path):
    run = assemble_run(
        *tiny_run_overrides(shakespeare_data_dir, "trainer.num_iterations=4", "system.device=cuda"),
        run_dir=tmp_path / "run",
    )
    trainer = run.trainer
    assert trainer.dtype == torch.bfloat16  # system.dtype=auto on CUDA
    assert all(optimizer.defaults["fused"] for optimizer in trainer.optimizers)
    micro_step = trainer._micro_step
    pinned = []

    def strict_micro_step(first):
        # Any synchronising call (.item(), a copy from pageable memory, nonzero, ...) raises here.
        torch.cuda.set_sync_debug_mode("error")
        try:
            return micro_step(first)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    class RecordingLoader:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            batch = next(self.inner)
            pinned.append(all(t.is_pinned() for t in batch))
            return batch

        def __getattr__(self, name):  # state_dict(), close()
            return getattr(self.inner, name)

    trainer._micro_step = strict_micro_step
    trainer.train_loader = RecordingLoader(trainer.train_loader)
    run.fit()
    losses = [r["train/loss"] for r in train_records(tmp_path / "run")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert pinned and all(pinned)


def test_prefetched_batches_are_pinned_for_asynchronous_copies(shakespeare_data_dir, shakespeare_tokenizer):
    from nanochat.data.shakespeare import ShakespeareCorpus

    files = ShakespeareCorpus(shakespeare_data_dir, val_bytes=50_000).files("train")
    prefetcher = Prefetcher(TokenLoader(files, shakespeare_tokenizer, 4, 32), pin_memory=True)
    try:
        inputs, targets = next(prefetcher)
        assert inputs.is_pinned() and targets.is_pinned()
    finally:
        prefetcher.close()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_loss_head_on_cuda_equals_the_plain_head(reduction):
    generator = torch.Generator(device=CUDA).manual_seed(0)
    hidden = torch.randn(300, 64, device=CUDA, generator=generator, requires_grad=True)
    weight = torch.randn(1001, 64, device=CUDA, generator=generator, requires_grad=True)
    targets = torch.randint(0, 1001, (300,), device=CUDA, generator=generator)
    targets[::7] = -1
    results = []
    for loss_fn in (plain_loss, lambda *a: softcapped_cross_entropy(*a[:3], 15.0, a[3], 64)):
        loss = loss_fn(hidden, weight, targets, reduction)
        results.append((loss.detach(), *torch.autograd.grad(loss.sum(), (hidden, weight))))
    (plain, *plain_grads), (chunked, *chunked_grads) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for ours, reference in zip(chunked_grads, plain_grads, strict=True):
        assert relative_error(ours, reference) < 1e-5


def test_gpt_under_bf16_autocast_on_cuda_trains_with_the_chunked_head():
    torch.manual_seed(0)
    model = GPT.from_config(GPTConfig(sequence_len=64, vocab_size=1001, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
    model.to(CUDA)
    idx = torch.randint(0, 1001, (4, 64), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_batched_muon_on_cuda_equals_per_matrix_steps_in_bf16():
    params = [p.to(CUDA).detach().requires_grad_() for p in mixed_matrices()]
    reference = [p.detach().clone().requires_grad_() for p in params]
    optimizer = Muon(params, lr=0.02, momentum=0.9, ns_dtype="auto")
    buffers = {}
    for step in range(3):
        generator = torch.Generator(device=CUDA).manual_seed(step)
        for p, q in zip(params, reference, strict=True):
            p.grad = torch.randn(p.shape, device=CUDA, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        per_matrix_muon_step(reference, 0.02, 0.9, buffers, torch.bfloat16)  # auto is bf16 on CUDA
    for p, q in zip(params, reference, strict=True):
        assert ((p - q).norm() / q.norm()).item() < 2**-7


def test_adamw_is_fused_on_cuda():
    torch.manual_seed(0)
    model = GPT.from_config(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.to(CUDA)
    for recipe in ("adamw", "adamw_muon"):
        adam = build_optimizers(model, recipe)[0]
        assert isinstance(adam, torch.optim.AdamW) and adam.defaults["fused"]
