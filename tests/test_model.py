import math

import pytest
import torch

from nanochat.model import GPT, GPTConfig, apply_rotary, rotary_tables

TINY = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)


def random_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    """A model whose zero-initialised projections are re-randomised, so every path carries signal
    (with classic init the blocks are identities and the head outputs zeros)."""
    torch.manual_seed(seed)
    model = GPT.from_config(config)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.2)
            block.mlp.c_proj.weight.normal_(std=0.2)
        model.lm_head.weight.normal_(std=1.0)
    return model


def random_tokens(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_d20_parameter_count_matches_nanochat():
    config = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280)
    with torch.device("meta"):
        model = GPT.from_config(config)
    assert model.num_params() == 560_988_160


def test_estimate_flops_matches_hand_computation():
    model = GPT.from_config(TINY)
    d, L, V, T, H = 32, 2, 64, 16, 4
    block_params = 4 * d * d + 2 * (d * 4 * d)  # q, k, v, proj + fc, proj
    non_embedding_params = L * block_params + V * d  # the lm_head counts, the embedding does not
    attention_flops = 12 * L * H * (d // H) * T
    assert model.estimate_flops() == 6 * non_embedding_params + attention_flops


def naive_reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The architecture written out independently: explicit masked softmax attention per head,
    rotary as multiplication of complex pairs (x_i + i x_{i + d/2}) by exp(-i * angle)."""
    cfg = model.config
    B, T = idx.shape
    head_dim = cfg.n_embd // cfg.n_head
    group = cfg.n_head // cfg.n_kv_head

    def rmsnorm(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    def rotate(x):  # [B, T, heads, head_dim]
        angles = torch.outer(
            torch.arange(T, dtype=torch.float64),
            10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim),
        )
        pairs = torch.complex(x[..., : head_dim // 2].double(), x[..., head_dim // 2 :].double())
        turned = pairs * torch.polar(torch.ones_like(angles), -angles)[None, :, None, :]
        return torch.cat((turned.real, turned.imag), dim=-1).float()

    x = rmsnorm(model.transformer.wte.weight[idx])
    causal = torch.ones(T, T).tril().bool()
    for block in model.transformer.h:
        a = block.attn
        h = rmsnorm(x)
        q = rmsnorm(rotate((h @ a.c_q.weight.T).view(B, T, cfg.n_head, head_dim)))
        k = rmsnorm(rotate((h @ a.c_k.weight.T).view(B, T, cfg.n_kv_head, head_dim)))
        v = (h @ a.c_v.weight.T).view(B, T, cfg.n_kv_head, head_dim)
        heads = []
        for head in range(cfg.n_head):
            kv_head = head // group
            scores = q[:, :, head] @ k[:, :, kv_head].transpose(1, 2) / math.sqrt(head_dim)
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append(weights @ v[:, :, kv_head])
        x = x + torch.cat(heads, dim=-1) @ a.c_proj.weight.T
        h = rmsnorm(x)
        x = x + (torch.relu(h @ block.mlp.c_fc.weight.T) ** 2) @ block.mlp.c_proj.weight.T
    logits = rmsnorm(x) @ model.lm_head.weight.T
    return 15 * torch.tanh(logits / 15)


def test_forward_matches_a_naive_reference_implementation():
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = random_model(config)
    idx = random_tokens(2, 11, 64)
    torch.testing.assert_close(model(idx), naive_reference_logits(model, idx), rtol=1e-4, atol=1e-4)


def test_changing_a_future_token_never_changes_earlier_logits():
    model = random_model()
    idx = random_tokens(2, TINY.sequence_len, TINY.vocab_size)
    changed = idx.clone()
    position = 9
    changed[:, position] = (changed[:, position] + 1) % TINY.vocab_size
    logits, changed_logits = model(idx), model(changed)
    torch.testing.assert_close(logits[:, :position], changed_logits[:, :position], rtol=0, atol=0)
    assert not torch.allclose(logits[:, position:], changed_logits[:, position:])


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(64, 8)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=generator), torch.randn(1, 1, 1, 8, generator=generator)

    def score(q_position: int, k_position: int) -> torch.Tensor:
        q_rotated = apply_rotary(q, cos[:, q_position : q_position + 1], sin[:, q_position : q_position + 1])
        k_rotated = apply_rotary(k, cos[:, k_position : k_position + 1], sin[:, k_position : k_position + 1])
        return (q_rotated * k_rotated).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    torch.testing.assert_close(score(3, 9), score(20, 26))
    assert not torch.allclose(score(5, 2), score(5, 3))
    rotated = apply_rotary(q, cos[:, 7:8], sin[:, 7:8])
    torch.testing.assert_close(rotated.norm(), q.norm())  # a rotation: lengths are preserved


def test_rotary_uses_nanochat_half_split_convention():
    # head_dim 2: one frequency (1.0); at position 1 the pair (x1, x2) = (1, 0) turns by -1 radian.
    cos, sin = rotary_tables(2, 2)
    rotated = apply_rotary(torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), cos[:, 1:2], sin[:, 1:2])
    torch.testing.assert_close(rotated.flatten(), torch.tensor([math.cos(1.0), -math.sin(1.0)]))


def test_loss_reduction_none_has_token_shape_and_averages_to_mean():
    model = random_model()
    idx = random_tokens(3, 12, TINY.vocab_size, seed=2)
    targets = random_tokens(3, 12, TINY.vocab_size, seed=3)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 12)
    torch.testing.assert_close(per_token.mean(), model(idx, targets))


def test_targets_equal_to_minus_one_are_excluded_from_the_loss():
    model = random_model()
    idx = random_tokens(2, 12, TINY.vocab_size, seed=4)
    targets = random_tokens(2, 12, TINY.vocab_size, seed=5)
    masked = targets.clone()
    masked[:, 6:] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert torch.all(model(idx, masked, loss_reduction="none")[:, 6:] == 0)
    torch.testing.assert_close(model(idx, masked), per_token[:, :6].mean())


def test_grouped_query_attention_runs_with_fewer_key_value_parameters():
    gqa_config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    gqa, mha = random_model(gqa_config), random_model(TINY)
    attn = gqa.transformer.h[0].attn
    assert attn.c_k.weight.shape == attn.c_v.weight.shape == (2 * 8, 32)
    assert gqa.num_params() == mha.num_params() - TINY.n_layer * 2 * (32 * 32 - 16 * 32)
    logits = gqa(random_tokens(2, 10, 64))
    assert logits.shape == (2, 10, 64) and torch.isfinite(logits).all()


def test_meta_construction_then_to_empty_and_init_weights_gives_a_working_model():
    with torch.device("meta"):
        model = GPT.from_config(TINY)
    assert model.cos.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = GPT.from_config(TINY)  # built directly on the CPU, rotary tables computed eagerly
    torch.testing.assert_close(model.cos, reference.cos)
    torch.testing.assert_close(model.sin, reference.sin)
    assert torch.all(model.lm_head.weight == 0)
    assert all(
        torch.all(b.attn.c_proj.weight == 0) and torch.all(b.mlp.c_proj.weight == 0) for b in model.transformer.h
    )
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, abs=0.05)
    c_fc = model.transformer.h[0].mlp.c_fc.weight  # fan_in 32, fan_out 128: std 1/sqrt(32)
    assert c_fc.std().item() == pytest.approx(1 / math.sqrt(32), rel=0.05)
    loss = model(random_tokens(2, 16, 64), random_tokens(2, 16, 64, seed=2))
    # Zero head -> uniform prediction -> loss is exactly ln(vocab_size).
    assert loss.item() == pytest.approx(math.log(64), abs=1e-5)


def test_logits_are_fp32_and_softcapped_to_15():
    model = random_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    logits = model(random_tokens(2, 16, 64))
    assert logits.dtype == torch.float32
    assert logits.abs().max().item() <= 15.0
    assert logits.abs().max().item() > 14.0  # the cap is actually reached, so the bound is tested


def test_forward_under_bf16_autocast_returns_fp32_logits():
    model = random_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(random_tokens(2, 16, 64))
        loss = model(random_tokens(2, 16, 64), random_tokens(2, 16, 64, seed=2))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_generate_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone():
    model = random_model()
    prompt = [1, 2, 3]
    torch.manual_seed(123)
    state_before = torch.get_rng_state()
    first = model.generate(prompt, max_tokens=20, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state_before)
    second = model.generate(prompt, max_tokens=20, temperature=1.0, seed=7)
    other = model.generate(prompt, max_tokens=20, temperature=1.0, seed=8)
    assert first == second and first != other
    assert len(first) == 20 and all(0 <= t < 64 for t in first)


def test_generate_with_top_k_one_is_greedy():
    model = random_model()
    assert model.generate([5, 6], 8, temperature=1.0, top_k=1, seed=3) == model.generate([5, 6], 8, temperature=0.0)
