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

Generation (generate_stream) fills a KV cache with one forward pass over the prompts, then feeds
one token per sequence per step; prompts of different lengths are left-padded and masked so that
each sequence sees exactly the tokens and rotary positions it would see alone.
"""

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.errors import InvalidArgument
from nanochat.interface import generate_batch
from nanochat.loss_head import softcapped_cross_entropy

ROTARY_BASE = 10_000
LOGIT_SOFTCAP = 15.0
# The rotary table is tiny, so it covers 10x the training length: the model can then also be run
# on longer sequences than it was trained on. It is also the context generation can fill
# (GPT.context_len): a sequence stops there, as there is no rotation for the next position.
ROTARY_LENGTH_FACTOR = 10
# fp32 logits per chunk of the loss head. On a CPU a chunk's few [tokens, vocab] buffers stay
# cache-sized; on a GPU chunks are large enough that the per-chunk kernel launches do not count
# (d20's 65,536 tokens x 65,536 vocab: 32 chunks of 2,048 tokens, 512 MiB per buffer).
LOSS_CHUNK_LOGITS = {"cpu": 2**20}
LOSS_CHUNK_LOGITS_ELSEWHERE = 2**27


@dataclass
class GPTConfig:
    """The shape of a GPT; conf/model/ holds the values (nanochat's depth rule in conf/base/gpt.yaml)."""

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


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_k: int | None, generators: list[torch.Generator]
) -> list[int]:
    """One token per row of logits [B, vocab]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k largest logits (ties at the k-th value stay in),
    row b drawn with generators[b]."""
    if temperature == 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]).tolist()


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A private generator, so that sampling never touches the global RNG."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class KVCache:
    """The keys and values of every layer for a batch of sequences being generated.

    Prompts of different lengths are left-padded to one width, so every sequence writes its next
    token into the same column. A row's positions count from its first real token, and no real
    query attends to a padding column, so each sequence sees exactly the tokens and rotary
    positions it would see alone. Each padding column attends to itself: a query with nothing to
    attend to is an edge case that SDPA kernels have answered with NaN (several CUDA kernels, older
    versions), and a NaN there would reach the real rows through the next layer's keys and values,
    masked or not (0 * NaN is NaN).
    """

    def __init__(self, lengths: list[int], capacity: int, n_layer: int, device: torch.device):
        self.padding = torch.tensor([max(lengths) - n for n in lengths], device=device)  # [B]
        self.capacity = capacity  # columns: padded prompt width + tokens fed back
        self.keys: list[torch.Tensor | None] = [None] * n_layer  # allocated at the first store: dtype of k
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.start = self.end = 0  # the columns [start, end) are the ones the current forward adds
        self.mask: torch.Tensor | None = None  # [B, 1, end - start, end]: which columns each new query sees

    def extend(self, count: int) -> torch.Tensor:
        """Take the next `count` columns for a forward pass; returns their positions, [B, count]."""
        assert self.end + count <= self.capacity, "KV cache overflow"
        self.start, self.end = self.end, self.end + count
        columns = torch.arange(self.end, device=self.padding.device)
        queries = columns[self.start :, None]  # [count, 1]
        visible = (columns >= self.padding[:, None, None]) & (columns <= queries)
        self.mask = (visible | (columns == queries)).unsqueeze(1)
        return (columns[None, self.start :] - self.padding[:, None]).clamp(min=0)  # padding: position 0

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns' k, v [B, n_kv_head, count, head_dim]; returns every column so far."""
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_empty(B, H, self.capacity, D)
            self.values[layer] = v.new_empty(B, H, self.capacity, D)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.start : self.end] = k
        values[:, :, self.start : self.end] = v
        return keys[:, :, : self.end], values[:, :, : self.end]

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (indices into the batch): the others have stopped."""
        self.padding = self.padding[rows]
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index  # its slot in a KVCache
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
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
        gqa = self.n_kv_head != self.n_head
        if cache is None:  # training and scoring: the whole sequence at once
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # generation: the new columns attend to the cached ones and to each other
            k, v = cache.store(self.layer_index, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_index)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), cos, sin, cache)
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
                h=nn.ModuleList([Block(config, index) for index in range(config.n_layer)]),
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

    @property
    def context_len(self) -> int:
        """The most tokens a generated sequence reaches, prompt included: the rotary table's length."""
        return self.cos.size(1)

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

    def _hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        T = idx.size(1)
        if cache is None:
            assert T <= self.cos.size(1), f"sequence of {T} tokens exceeds the rotary table ({self.cos.size(1)})"
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:  # each row at its own positions: [B, T, 1, head_dim // 2]
            positions = cache.extend(T)
            cos, sin = self.cos[0, positions], self.sin[0, positions]
        x = rms_norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, cache)
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

    def generate(
        self,
        tokens: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[int]:
        """The sampled continuation of the prompt `tokens`: max_tokens tokens, or fewer where the
        sequence fills the context (context_len tokens, prompt included). temperature 0 is greedy;
        a fixed seed reproduces the sample (see generate_stream)."""
        return self.generate_batch([tokens], max_tokens, temperature, top_k, seed)[0]

    def generate_batch(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        stop_token: int | None = None,
    ) -> list[list[int]]:
        """The continuation of each prompt, generated together (see generate_stream)."""
        return generate_batch(self, prompts, max_tokens, temperature, top_k, seed, stop_token)

    @torch.no_grad()
    def generate_stream(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        stop_token: int | None = None,
    ) -> Iterator[dict[int, int]]:
        """Continue several prompts in one batch, yielding each step's new tokens as {prompt index: token}.

        One forward pass over the (left-padded) prompts fills a KV cache; each step then feeds only
        the newest token of every sequence still going. A sequence stops after max_tokens tokens,
        after it emits stop_token (which is yielded), or when it fills the context: prompt plus
        continuation never exceed context_len tokens, so a prompt needs 1 to context_len - 1
        tokens (ValueError otherwise). The others go on.

        Prompt i samples from its own generator, seeded with seed + i (randomly if seed is None),
        so its tokens do not depend on the other prompts: with a fixed seed, the batch [a, b]
        gives a the tokens that [a] alone gives, and b those of [b] with seed + 1. The global RNG
        is left untouched. The caller chooses the precision (nanochat.device.autocast around the loop).
        """
        limit = self.context_len
        for index, prompt in enumerate(prompts):
            if not 0 < len(prompt) < limit:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens; a prompt needs 1 to {limit - 1} "
                    f"(the context holds {limit} tokens)"
                )
        budgets = [min(max_tokens, limit - len(prompt)) for prompt in prompts]  # tokens each may add
        steps = max(budgets, default=0)
        if steps <= 0:
            return
        device = self.transformer.wte.weight.device
        generators = [_generator(device, None if seed is None else seed + index) for index in range(len(prompts))]
        width = max(map(len, prompts))
        # The last token sampled is never fed back, so the cache needs steps - 1 columns past the prompts.
        cache = KVCache([len(p) for p in prompts], width + steps - 1, self.config.n_layer, device)
        padded = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)  # 0: masked
        rows = list(range(len(prompts)))  # the prompt index of each batch row still going
        logits = self._logits(self._hidden_states(padded, cache)[:, -1])
        for step in range(steps):
            tokens = sample_tokens(logits, temperature, top_k, [generators[row] for row in rows])
            yield dict(zip(rows, tokens))
            done = [token == stop_token or step + 1 == budgets[row] for row, token in zip(rows, tokens)]
            going = [i for i, row_done in enumerate(done) if not row_done]
            if not going:
                return
            if len(going) < len(rows):
                cache.keep(torch.tensor(going, device=device))
                rows, tokens = [rows[i] for i in going], [tokens[i] for i in going]
            logits = self._logits(self._hidden_states(torch.tensor(tokens, device=device)[:, None], cache)[:, -1])
