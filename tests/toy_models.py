"""A second architecture, outside nanochat/, to show that a model is a component: GPT-2's shape
(learned absolute positions, LayerNorm with gain and bias, GELU MLP, biases everywhere) with the
project's model interface (nanochat/interface.py). It takes the same shape keys as conf/model/,
so `model._target_=toy_models.PositionalTransformer` alone swaps it in."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_kv_head: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.norm_attention = nn.LayerNorm(n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.key_value = nn.Linear(n_embd, 2 * n_kv_head * self.head_dim)
        self.out = nn.Linear(n_embd, n_embd)
        self.norm_mlp = nn.LayerNorm(n_embd)
        self.up = nn.Linear(n_embd, 4 * n_embd)
        self.down = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.norm_attention(x)
        q = self.query(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.key_value(h).view(B, T, 2, self.n_kv_head, self.head_dim).unbind(2)
        y = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=self.n_kv_head != self.n_head
        )
        x = x + self.out(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.norm_mlp(x))))


class PositionalTransformer(nn.Module):
    def __init__(self, *, sequence_len: int, vocab_size: int, n_layer: int, n_head: int, n_kv_head: int, n_embd: int):
        super().__init__()
        self.sequence_len = sequence_len
        self.width = n_embd
        self.n_layer, self.n_head = n_layer, n_head
        self.token = nn.Embedding(vocab_size, n_embd)
        self.position = nn.Embedding(sequence_len, n_embd)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, n_kv_head) for _ in range(n_layer)])
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        in_blocks = list(self.blocks.parameters())
        return {
            "embedding": [self.token.weight, self.position.weight],
            "unembedding": [self.head.weight],
            "matrices": [p for p in in_blocks if p.ndim == 2],
            "other": [p for p in in_blocks if p.ndim != 2] + list(self.norm.parameters()),
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        lookups = self.token.weight.numel() + self.position.weight.numel()
        head_dim = self.width // self.n_head
        return 6 * (self.num_params() - lookups) + 12 * self.n_layer * self.n_head * head_dim * self.sequence_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"):
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.token(idx) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).float()
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)
        return loss.view_as(targets) if loss_reduction == "none" else loss

    @torch.no_grad()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=None) -> list[int]:
        generator = torch.Generator(device=self.head.weight.device)
        generator.manual_seed(seed if seed is not None else 0)
        ids = torch.tensor([tokens], device=self.head.weight.device)
        out = []
        for _ in range(max_tokens):
            logits = self(ids[:, -self.sequence_len :])[:, -1]
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[:, -1:], float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, next_id], 1)
            out.append(next_id.item())
        return out
