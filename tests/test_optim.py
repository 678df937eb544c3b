import pytest
import torch
from configs import build_optimizers

from nanochat.model import GPT, GPTConfig
from nanochat.muon import Muon, matmul, resolve_ns_bf16_matmul, resolve_ns_dtype, zeropower_via_newtonschulz5
from nanochat.muon import stacks as muon_stacks
from nanochat.optim import apply_schedule, check_groups_cover_model, muon_momentum

D4_LIKE = GPTConfig(sequence_len=32, vocab_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT.from_config(D4_LIKE)


def group_of(optimizers, name):
    return next(g for opt in optimizers for g in opt.param_groups if g["name"] == name)


@pytest.mark.parametrize("recipe", ["adamw", "adamw_muon"])
def test_every_parameter_is_in_exactly_one_group(model, recipe):
    optimizers = build_optimizers(model, recipe)
    grouped = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert all(g["initial_lr"] == g["lr"] for opt in optimizers for g in opt.param_groups)


def test_group_check_rejects_missing_and_duplicated_parameters(model):
    missing = torch.optim.AdamW(list(model.transformer.h.parameters()))
    with pytest.raises(ValueError, match="not in any param group: transformer.wte.weight, lm_head.weight"):
        check_groups_cover_model(model, [missing])
    everything = torch.optim.AdamW(list(model.parameters()))
    head_again = torch.optim.AdamW([model.lm_head.weight])  # torch itself only rejects repeats within one optimizer
    with pytest.raises(ValueError, match="in more than one param group: lm_head.weight"):
        check_groups_cover_model(model, [everything, head_again])
    check_groups_cover_model(model, [everything])


def test_adamw_decays_matrices_but_not_the_token_embedding(model):
    (optimizer,) = build_optimizers(model, "adamw", weight_decay=0.1, betas=[0.9, 0.99])
    decay, no_decay = group_of([optimizer], "decay"), group_of([optimizer], "no_decay")
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in no_decay["params"]] == [id(model.transformer.wte.weight)]
    assert any(p is model.lm_head.weight for p in decay["params"])
    assert decay["betas"] == (0.9, 0.99)


def test_adamw_muon_splits_parameters_and_scales_adam_lrs_with_width(model):
    adam, muon = build_optimizers(model, "adamw_muon", embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02)
    assert isinstance(adam, torch.optim.AdamW) and isinstance(muon, Muon)
    scale = (64 / 768) ** -0.5  # about 3.46 for a 64-wide model
    embedding, unembedding = group_of([adam], "embedding"), group_of([adam], "unembedding")
    assert embedding["lr"] == pytest.approx(0.2 * scale)
    assert unembedding["lr"] == pytest.approx(0.004 * scale)
    assert embedding["params"][0] is model.transformer.wte.weight
    assert unembedding["params"][0] is model.lm_head.weight
    (matrix,) = muon.param_groups
    assert matrix["lr"] == 0.02  # Muon's lr is not width-scaled
    assert {id(p) for p in matrix["params"]} == {id(p) for p in model.transformer.h.parameters()}


def test_newton_schulz_output_is_close_to_orthogonal():
    generator = torch.Generator().manual_seed(0)
    for shape in [(64, 128), (128, 64)]:
        G = torch.randn(shape, generator=generator)
        X = zeropower_via_newtonschulz5(G, steps=5)
        assert X.shape == shape and X.dtype == torch.bfloat16
        singular_values = torch.linalg.svdvals(X.float())
        assert singular_values.min() > 0.5 and singular_values.max() < 1.5
        assert singular_values.mean().item() == pytest.approx(1.0, abs=0.2)
        # Unlike the input, whose singular values spread over a wide range.
        input_singular_values = torch.linalg.svdvals(G)
        assert input_singular_values.max() / input_singular_values.min() > 5


def test_float32_newton_schulz_agrees_with_bf16_up_to_bf16_rounding():
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(64, 128, generator=generator)
    exact, rounded = zeropower_via_newtonschulz5(G, 5, torch.float32), zeropower_via_newtonschulz5(G, 5)
    assert exact.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    # 5 iterations of 3 matmuls, each output rounded to bf16 (2^-8 relative): at most ~15 roundings
    # add up, and the iteration does not amplify them near its fixed point.
    relative = (rounded.float() - exact).norm() / exact.norm()
    assert 2.0**-12 < relative < 15 * 2.0**-8  # bf16 rounding is there, and no more than that


def test_muon_with_float32_newton_schulz_steps_by_the_fp32_update():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 64))
    before = weight.detach().clone()
    weight.grad = torch.randn(32, 64)
    Muon([weight], lr=0.05, momentum=0.0, nesterov=False, ns_dtype="float32").step()
    expected = before - 0.05 * zeropower_via_newtonschulz5(weight.grad, 5, torch.float32)
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-7)


def test_muon_refuses_an_unknown_newton_schulz_dtype():
    with pytest.raises(ValueError, match="ns_dtype='float16' is not one of auto, bfloat16, float32"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_dtype="float16")


@pytest.mark.parametrize("shape, shape_scale", [((32, 64), 1.0), ((64, 16), 2.0)])
def test_first_muon_step_moves_weights_by_lr_times_orthogonalised_gradient(shape, shape_scale):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    before = weight.detach().clone()
    weight.grad = torch.randn(shape)
    momentum, lr = 0.9, 0.05
    Muon([weight], lr=lr, momentum=momentum, nesterov=True, ns_steps=5).step()
    # From a zero buffer: buffer = (1 - m) g, and the Nesterov blend is g + m * (buffer - g).
    nesterov_update = weight.grad + momentum * ((1 - momentum) * weight.grad - weight.grad)
    expected = before - lr * shape_scale * zeropower_via_newtonschulz5(nesterov_update, 5).float()
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-6)


def test_muon_momentum_buffer_is_an_ema_of_gradients():
    weight = torch.nn.Parameter(torch.zeros(8, 8))
    optimizer = Muon([weight], lr=0.1, momentum=0.5)
    grads = [torch.full((8, 8), 2.0), torch.full((8, 8), 4.0)]
    for grad in grads:
        weight.grad = grad
        optimizer.step()
    # 0 -> 0.5 * 2 = 1 -> 0.5 * 1 + 0.5 * 4 = 2.5
    torch.testing.assert_close(optimizer.state[weight]["momentum_buffer"], torch.full((8, 8), 2.5))


def test_muon_rejects_non_matrix_parameters():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_muon_momentum_warms_up_linearly_then_holds():
    assert muon_momentum(0, 0.85, 0.95, 300) == pytest.approx(0.85)
    assert muon_momentum(150, 0.85, 0.95, 300) == pytest.approx(0.90)
    assert muon_momentum(300, 0.85, 0.95, 300) == pytest.approx(0.95)
    assert muon_momentum(1000, 0.85, 0.95, 300) == pytest.approx(0.95)
    assert muon_momentum(0, 0.85, 0.95, 0) == 0.95


def test_apply_schedule_sets_lr_from_initial_lr_and_muon_momentum(model):
    optimizers = build_optimizers(
        model, "adamw_muon", matrix_lr=0.02, momentum_start=0.85, momentum=0.95, momentum_warmup_steps=300
    )
    adam, muon = optimizers
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.85)  # step 0 value at build time
    initial = [g["initial_lr"] for opt in optimizers for g in opt.param_groups]
    apply_schedule(optimizers, step=150, lr_mult=0.5)
    assert [g["lr"] for opt in optimizers for g in opt.param_groups] == pytest.approx([lr * 0.5 for lr in initial])
    assert muon.param_groups[0]["momentum"] == pytest.approx(0.90)
    assert "momentum" not in adam.param_groups[0]  # AdamW groups are left without momentum keys
    apply_schedule(optimizers, step=151, lr_mult=1.0)  # multipliers do not compound
    assert [g["lr"] for opt in optimizers for g in opt.param_groups] == pytest.approx(initial)


@pytest.mark.parametrize("recipe", ["adamw", "adamw_muon"])
def test_three_optimizer_steps_move_every_parameter_of_a_freshly_initialised_model(model, recipe):
    # With the zero-initialised head and output projections, gradient reaches one level deeper per
    # step: step 1 moves lm_head, step 2 the embedding and the c_proj's, step 3 everything else.
    optimizers = build_optimizers(model, recipe)
    before = [p.detach().clone() for p in model.parameters()]
    idx = torch.randint(0, D4_LIKE.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(idx, idx).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    unchanged = [name for (name, p), b in zip(model.named_parameters(), before) if torch.equal(b, p)]
    assert unchanged == []


def per_matrix_muon_step(params, lr, momentum, buffers, ns_dtype):
    """Muon's step written one matrix at a time (the reference the batched step must equal)."""
    with torch.no_grad():
        for p in params:
            buffer = buffers.setdefault(p, torch.zeros_like(p))
            buffer.lerp_(p.grad, 1 - momentum)
            update = zeropower_via_newtonschulz5(p.grad.lerp(buffer, momentum), 5, ns_dtype)
            p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def mixed_matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    """Square, wide and tall matrices, the tall ones stacked with the wide ones' transposes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(32, 32), (32, 128), (128, 32), (32, 32), (128, 32), (16, 24)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    generator = torch.Generator().manual_seed(0)
    stack = torch.randn(5, 32, 96, generator=generator)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2**-7)):
        batched = zeropower_via_newtonschulz5(stack, 5, dtype).float()
        single = torch.stack([zeropower_via_newtonschulz5(m, 5, dtype).float() for m in stack])
        assert ((batched - single).norm() / single.norm()).item() < tolerance


@pytest.mark.parametrize("ns_dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2**-7)])
def test_batched_muon_steps_equal_per_matrix_steps(ns_dtype, tolerance):
    params, reference = mixed_matrices(), mixed_matrices()
    optimizer = Muon(params, lr=0.02, momentum=0.9, nesterov=True, ns_steps=5, ns_dtype=ns_dtype)
    assert len(muon_stacks(params)) == 3  # (32, 32) x2, (32, 128) x4 with the tall ones, (16, 24)
    buffers = {}
    for step in range(3):
        generator = torch.Generator().manual_seed(100 + step)
        for p, q in zip(params, reference, strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        per_matrix_muon_step(reference, 0.02, 0.9, buffers, getattr(torch, ns_dtype))
    for p, q in zip(params, reference, strict=True):
        assert ((p - q).norm() / q.norm()).item() < tolerance
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], buffers[q])


def test_auto_newton_schulz_dtype_is_measured_on_a_cpu_and_bf16_elsewhere(monkeypatch, capsys):
    import nanochat.device as device_module
    import nanochat.muon as muon_module

    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})
    timings = {torch.float32: 1.0, torch.bfloat16: 40.0}
    monkeypatch.setattr(device_module, "time_task", lambda task, dtype, device: timings[dtype])
    monkeypatch.setattr(device_module, "cpu_has_bf16_matmuls", lambda: True)
    params = mixed_matrices()
    assert resolve_ns_dtype("auto", params, 5) == "float32"
    assert "optimizer.ns_dtype=auto, Muon's Newton-Schulz: bf16 measured over" in capsys.readouterr().out
    timings[torch.bfloat16] = 0.5
    assert resolve_ns_dtype("auto", params, 5) == "float32"  # measured once per process and shapes
    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})
    assert resolve_ns_dtype("auto", params, 5) == "bfloat16"
    with torch.device("meta"):
        on_a_gpu_like_device = [torch.nn.Parameter(torch.empty(8, 8))]
    assert resolve_ns_dtype("auto", on_a_gpu_like_device, 5) == "bfloat16"
    assert resolve_ns_dtype("float32", params, 5) == "float32"


def test_an_emulated_bf16_matmul_is_a_bf16_gemm_within_fp32_summation_error():
    """Both the native bf16 GEMM and the emulated one (fp32 GEMM of the bf16 operands) must equal the
    exact product of the bf16 operands rounded to bf16, up to half a bf16 ulp of the result plus the
    textbook bound on an fp32 sum of k products: k * 2^-24 * sum of |a| |b|."""
    generator = torch.Generator().manual_seed(0)
    k = 256
    a = torch.randn(64, k, generator=generator).bfloat16()
    b = torch.randn(k, 96, generator=generator).bfloat16()
    exact = a.double() @ b.double()
    bound = 2.0**-8 * exact.abs() + k * 2.0**-24 * (a.double().abs() @ b.double().abs())
    for product in (matmul(a, b), matmul(a, b, torch.float32)):
        assert product.dtype == torch.bfloat16
        assert ((product.double() - exact).abs() <= bound).all()
    assert not torch.equal(matmul(a, b, torch.float32).double(), exact)  # the bound is not met by being exact


def test_emulated_bf16_newton_schulz_is_nearer_the_native_one_than_bf16_rounding_takes_either_from_exact():
    generator = torch.Generator().manual_seed(0)
    stack = torch.randn(4, 64, 192, generator=generator)
    exact = zeropower_via_newtonschulz5(stack.double(), 5, torch.float64)
    native = zeropower_via_newtonschulz5(stack, 5, torch.bfloat16).double()
    emulated = zeropower_via_newtonschulz5(stack, 5, torch.bfloat16, gemm_dtype=torch.float32)
    assert emulated.dtype == torch.bfloat16
    distance = lambda x, y: ((x - y).norm() / y.norm()).item()  # noqa: E731
    emulated = emulated.double()
    assert distance(emulated, native) < min(distance(native, exact), distance(emulated, exact))


def test_auto_bf16_matmul_is_emulated_on_a_cpu_where_it_measures_faster_and_native_elsewhere(monkeypatch, capsys):
    import nanochat.device as device_module
    import nanochat.muon as muon_module

    monkeypatch.setattr(muon_module, "_BF16_MATMUL_CHOICES", {})
    timings = {torch.float32: 1.0, torch.bfloat16: 40.0}  # keyed by the GEMM's dtype: fp32 = emulated
    monkeypatch.setattr(device_module, "time_task", lambda task, dtype, device: timings[dtype])
    monkeypatch.setattr(device_module, "cpu_has_bf16_matmuls", lambda: True)
    params = mixed_matrices()
    assert resolve_ns_bf16_matmul("auto", params, 5) == "emulated"
    assert "torch's bf16 GEMM took" in capsys.readouterr().out
    monkeypatch.setattr(muon_module, "_BF16_MATMUL_CHOICES", {})
    timings[torch.bfloat16] = 0.5
    assert resolve_ns_bf16_matmul("auto", params, 5) == "native"
    with torch.device("meta"):
        on_a_gpu_like_device = [torch.nn.Parameter(torch.empty(8, 8))]
    assert resolve_ns_bf16_matmul("auto", on_a_gpu_like_device, 5) == "native"
    assert resolve_ns_bf16_matmul("emulated", on_a_gpu_like_device, 5) == "emulated"


def test_auto_newton_schulz_choices_on_a_cpu_without_bf16_instructions_are_fp32_and_emulated_unmeasured(
    monkeypatch, capsys
):
    import nanochat.device as device_module
    import nanochat.muon as muon_module

    monkeypatch.setattr(muon_module, "_NS_CHOICES", {})
    monkeypatch.setattr(muon_module, "_BF16_MATMUL_CHOICES", {})
    measured = []
    monkeypatch.setattr(device_module, "time_task", lambda task, dtype, device: measured.append(dtype) or 1.0)
    monkeypatch.setattr(device_module, "cpu_has_bf16_matmuls", lambda: False)
    params = mixed_matrices()
    assert resolve_ns_dtype("auto", params, 5) == "float32"
    assert resolve_ns_bf16_matmul("auto", params, 5) == "emulated"
    assert measured == []
    out = capsys.readouterr().out
    assert "optimizer.ns_dtype=auto, Muon's Newton-Schulz: this CPU has no bf16 matmul instructions" in out
    assert "optimizer.ns_bf16_matmul=auto, Muon's bf16 Newton-Schulz: this CPU has no bf16 matmul" in out


def test_muon_with_emulated_bf16_matmuls_steps_by_the_emulated_newton_schulz_update():
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(128, 256, generator=generator))  # smaller ones sum in the same order
    weight.grad = torch.randn(128, 256, generator=generator)
    before = weight.detach().clone()
    Muon([weight], lr=0.05, momentum=0.0, nesterov=False, ns_dtype="bfloat16", ns_bf16_matmul="emulated").step()
    for gemm_dtype, expect_equal in ((torch.float32, True), (None, False)):  # emulated, and native to tell apart
        update = zeropower_via_newtonschulz5(weight.grad, 5, torch.bfloat16, gemm_dtype).float()
        expected = before - 0.05 * update
        # add_(update, alpha) rounds once where `expected` rounds twice, each by at most 2^-24 of the
        # operands' magnitudes; native GEMMs move the update itself by bf16 roundings
        bound = 2.0**-22 * (before.abs() + 0.05 * update.abs())
        assert bool(((weight.detach() - expected).abs() <= bound).all()) == expect_equal
    with pytest.raises(ValueError, match="ns_bf16_matmul='fast' is not one of auto, native, emulated"):
        Muon([weight], ns_bf16_matmul="fast")
