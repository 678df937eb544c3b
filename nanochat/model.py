"""nanochat's classic GPT (the d12 / d20 / d32 speedrun models), in one readable file.

Architecture choices that differ from GPT-2 / nanoGPT:

- rotary position embeddings (base 10,000) on queries and keys; no learned position embeddings
- QK-norm: queries and keys are RMS-normalised after the rotary rotation
- grouped-query attention: `n_kv_head` key/value heads shared by `n_head` query heads
- ReLU^2 MLP activation, 4x expansion
- RMSNorm without learnable parameters, applied to the token embedding, before attention, before
  the MLP and before the head
- no biases in any linear layer
- untied token embedding and output head
- logits computed in fp32 and soft-capped to (-15, 15) with 15 * tanh(logits / 15); with targets,
  the head, the softcap and the cross-entropy run over chunks of tokens (nanochat/loss_head.py),
  so the full [tokens, vocab] fp32 logits are never materialised; the loss is the same to float
  rounding
- init: Linear std = 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in)), embedding std 1, and the
  output head plus every residual-branch output projection (attn.c_proj, mlp.c_proj) start at zero,
  so each block starts as the identity and the initial prediction is uniform
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.errors import InvalidArgument
from nanochat.loss_head import softcapped_cross_entropy

ROTARY_BASE = 10_000
LOGIT_SOFTCAP = 15.0
# The rotary table is tiny, so it covers 10x the training length: the model can then also be run
# on longer sequences than it was trained on (generation crops its context to sequence_len anyway).
ROTARY_LENGTH_FACTOR = 10
# fp32 logits per chunk of the loss head. On a CPU a chunk's few [tokens, vocab] buffers stay
# cache-sized; on a GPU chunks are large enough that the per-chunk kernel launches do not count
# (d20's 65,536 tokens x 65,536 vocab: 32 chunks of 2,048 tokens, 512 MiB per buffer).
LOSS_CHUNK_LOGITS = {"cpu": 2**20}
LOSS_CHUNK_LOGITS_ELSEWHERE = 2**27


@dataclass
class GPTConfig:
    """The shape of a GPT; conf/model/ holds the values (nanochat's depth rule in _gpt.yaml)."""

    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int  # query heads
    n_kv_head: int  # key/value heads; fewer than n_head means grouped-query attention
    n_embd: int

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"{{{name}}} must be a positive integer.", **{name: value})
        if self.n_embd % self.n_head:
            raise InvalidArgument("{n_embd} is not divisible by {n_head}.", n_embd=self.n_embd, n_head=self.n_head)
        if self.n_head % self.n_kv_head:
            raise InvalidArgument(
                "{n_head} is not divisible by {n_kv_head} (each key/value head must serve a whole number of "
                "query heads).",
                n_head=self.n_head,
                n_kv_head=self.n_kv_head,
            )
        if self.head_dim % 2:
            raise InvalidArgument(
                f"{{n_embd}} / {{n_head}} = {self.head_dim} is odd; rotary embeddings need an even head dimension.",
                n_embd=self.n_embd,
                n_head=self.n_head,
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, with no gain or bias to learn."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, shaped [1, seq_len, 1, head_dim // 2] to broadcast over
    a [B, T, n_heads, head_dim] tensor. Kept in fp32 here and cast to q/k's dtype at use time."""
    inverse_frequency = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inverse_frequency)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel i of the first half of each head together with channel i of the second half.

    The sign convention (rotation by -angle) is nanochat's, so checkpoints are interchangeable; the
    attention score depends only on the position difference either way.
    """
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((first * cos + second * sin, second * cos - first * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm caps |q.k| / sqrt(head_dim) at sqrt(head_dim), so attention logits cannot grow
        # without bound, a known source of loss spikes. (A rotation preserves each head's RMS, so
        # normalising before or after it gives the same result.)
        q = rms_norm(apply_rotary(q, cos, sin))
        k = rms_norm(apply_rotary(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # heads become a batch dimension
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), cos, sin)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """A language model with the interface of nanochat/interface.py, built from its shape:
    `GPT(sequence_len=..., vocab_size=..., n_layer=..., n_head=..., n_kv_head=..., n_embd=...)`."""

    def __init__(self, *, sequence_len: int, vocab_size: int, n_layer: int, n_head: int, n_kv_head: int, n_embd: int):
        super().__init__()
        config = GPTConfig(sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd)
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Derived from the config, so not saved in checkpoints; init_weights recomputes them after
        # to_empty() because a meta-device model has no values to copy.
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if self.transformer.wte.weight.device.type != "meta":
            self.init_weights()

    @classmethod
    def from_config(cls, config: GPTConfig) -> "GPT":
        return cls(**asdict(config))

    @property
    def sequence_len(self) -> int:
        return self.config.sequence_len

    @property
    def width(self) -> int:
        return self.config.n_embd

    def _rotary_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = self.config.sequence_len * ROTARY_LENGTH_FACTOR
        return rotary_tables(seq_len, self.config.head_dim, device=self.transformer.wte.weight.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (also after `to_empty()`)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.cos, self.sin = self._rotary_tables()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters by role, for the optimizer builders (see nanochat/interface.py)."""
        return {
            "embedding": [self.transformer.wte.weight],
            "unembedding": [self.lm_head.weight],
            "matrices": [p for p in self.transformer.h.parameters()],
            "other": [],  # no norm gains, biases or scalars: RMSNorm here has no parameters
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B convention: 6 per weight
        for every parameter except the embedding lookup (the lm_head is a real matmul and counts),
        plus 12 * n_layer * n_head * head_dim * sequence_len for the attention scores and values."""
        cfg = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len

    def _hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        assert T <= self.cos.size(1), f"sequence of {T} tokens exceeds the rotary table ({self.cos.size(1)})"
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = rms_norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin)
        return rms_norm(x)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # fp32 before the softcap and the cross-entropy: bf16's 8-bit mantissa is too coarse for a
        # log-softmax over tens of thousands of logits.
        logits = self.lm_head(hidden).float()
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"
    ) -> torch.Tensor:
        """idx: int64 [B, T]. Returns fp32 logits [B, T, vocab_size] without targets; with targets
        (int64 [B, T], -1 = ignore) the cross-entropy in nats: a scalar for "mean", [B, T] for
        "none" (ignored positions are 0 there)."""
        hidden = self._hidden_states(idx)
        if targets is None:
            return self._logits(hidden)
        chunk_logits = LOSS_CHUNK_LOGITS.get(hidden.device.type, LOSS_CHUNK_LOGITS_ELSEWHERE)
        loss = softcapped_cross_entropy(
            hidden.flatten(0, 1),
            self.lm_head.weight,
            targets.flatten(),
            LOGIT_SOFTCAP,
            loss_reduction,
            chunk_tokens=max(1, chunk_logits // self.config.vocab_size),
        )
        return loss.view_as(targets) if loss_reduction == "none" else loss

    @torch.no_grad()
    def generate(
        self,
        tokens: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[int]:
        """Sample `max_tokens` continuation tokens of the prompt `tokens` and return only those.

        No KV cache: every step re-reads the last `sequence_len` tokens. temperature 0 is greedy.
        Sampling draws from a private generator (seeded from `seed`, or randomly if None), so a
        fixed seed reproduces the sample and the global RNG is left untouched.
        """
        device = self.transformer.wte.weight.device
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        generated: list[int] = []
        for _ in range(max_tokens):
            context = ids[:, -self.config.sequence_len :]
            logits = self._logits(self._hidden_states(context)[:, -1])  # [1, vocab_size]
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth_largest, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            ids = torch.cat((ids, next_id), dim=1)
            generated.append(next_id.item())
        return generated
