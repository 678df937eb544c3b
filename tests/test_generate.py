"""Generation with a KV cache: the same tokens as recomputing the whole sequence every step, a
batch of prompts of different lengths as each prompt alone, stops per sequence, training-time
samples through the same path."""

import pytest
import torch
from test_model import random_model, random_tokens
from toy_models import PositionalTransformer

from nanochat.evaluation import sample_completions
from nanochat.interface import generate_batch
from nanochat.model import GPT, GPTConfig, KVCache

SMALL = dict(sequence_len=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64)


def generate_without_cache(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding as it was before the KV cache: every step runs the model over the whole
    sequence so far, with the causal mask of training."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt) :]


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa2", "gqa1"])
def test_cached_greedy_generation_equals_recomputing_the_whole_sequence(n_kv_head):
    model = random_model(GPTConfig(**SMALL, n_kv_head=n_kv_head)).eval()
    prompt = random_tokens(1, 7, SMALL["vocab_size"])[0].tolist()
    cached = model.generate(prompt, 64, temperature=0.0)
    assert cached == generate_without_cache(model, prompt, 64)
    assert len(cached) == 64 and len(set(cached)) > 8  # a model whose output is far from constant


def test_the_cache_mask_hides_padding_and_leaves_no_query_without_a_key():
    cache = KVCache([3, 1], capacity=4, n_layer=1, device=torch.device("cpu"))
    assert cache.extend(3).tolist() == [[0, 1, 2], [0, 0, 0]]  # the second row's two padding columns: 0
    prefill = cache.mask[:, 0].int().tolist()
    assert prefill[0] == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # causal
    assert prefill[1] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # padding sees itself; the token sees no padding
    assert cache.extend(1).tolist() == [[3], [1]]
    assert cache.mask[:, 0].int().tolist() == [[[1, 1, 1, 1]], [[0, 0, 1, 1]]]


@pytest.mark.parametrize(
    "temperature, top_k", [(0.0, None), (1.0, None), (0.8, 10)], ids=["greedy", "sampled", "top_k"]
)
def test_a_batch_of_prompts_of_different_lengths_equals_each_prompt_alone(temperature, top_k):
    model = random_model(GPTConfig(**SMALL, n_kv_head=2)).eval()
    prompts = [random_tokens(1, n, SMALL["vocab_size"], seed=n)[0].tolist() for n in (1, 9, 4, 17)]
    together = model.generate_batch(prompts, 24, temperature=temperature, top_k=top_k, seed=11)
    alone = [model.generate(p, 24, temperature=temperature, top_k=top_k, seed=11 + i) for i, p in enumerate(prompts)]
    assert together == alone
    assert len({tuple(out) for out in together}) == len(prompts)


def test_a_sequence_that_emits_the_stop_token_stops_there_and_the_others_go_on():
    model = random_model(GPTConfig(**SMALL, n_kv_head=2)).eval()
    prompts = [random_tokens(1, n, SMALL["vocab_size"], seed=n)[0].tolist() for n in (3, 8, 5)]
    unstopped = model.generate_batch(prompts, 20, temperature=0.0)
    # A token that the first sequence emits a few steps in and the second never does.
    stop = next(t for t in unstopped[0][3:] if t not in unstopped[1])
    stopped = model.generate_batch(prompts, 20, temperature=0.0, stop_token=stop)

    def cut_after_stop(out: list[int]) -> list[int]:
        return out[: out.index(stop) + 1] if stop in out else out

    assert stopped == [cut_after_stop(out) for out in unstopped]
    assert len(stopped[0]) < 20 and stopped[0][-1] == stop
    assert stopped[1] == unstopped[1]  # went on to max_tokens after the first one stopped


def test_a_sequence_stops_where_it_fills_the_context_and_the_others_go_on():
    model = random_model(GPTConfig(**{**SMALL, "sequence_len": 16}, n_kv_head=2)).eval()
    assert model.context_len == 160  # the rotary table: 10 x sequence_len
    long, short = (random_tokens(1, n, SMALL["vocab_size"], seed=n)[0].tolist() for n in (157, 3))
    outputs = model.generate_batch([long, short], 10, temperature=0.0)
    assert [len(out) for out in outputs] == [3, 10]
    assert outputs == [generate_without_cache(model, long, 3), generate_without_cache(model, short, 10)]
    with pytest.raises(ValueError, match="prompt 0 has 160 tokens; a prompt needs 1 to 159"):
        model.generate(random_tokens(1, 160, SMALL["vocab_size"])[0].tolist(), 1)
    with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
        model.generate_batch([short, []], 1)


def test_generation_runs_under_bf16_autocast_with_the_cache_in_bf16(monkeypatch):
    model = random_model(GPTConfig(**SMALL, n_kv_head=2)).eval()
    stored = []
    original_store = KVCache.store

    def recording_store(cache, layer, k, v):
        keys, values = original_store(cache, layer, k, v)
        stored.append((keys.dtype, values.dtype))
        return keys, values

    monkeypatch.setattr(KVCache, "store", recording_store)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model.generate_batch([[1, 2, 3], [4]], 6, temperature=1.0, seed=0)
    assert [len(out) for out in outputs] == [6, 6] and all(0 <= t < SMALL["vocab_size"] for out in outputs for t in out)
    # prefill and 5 tokens fed back, 2 layers each: the cache holds what autocast's layers produce
    assert stored == [(torch.bfloat16, torch.bfloat16)] * 12


def test_a_model_without_generate_stream_falls_back_to_generate_per_prompt():
    toy = PositionalTransformer(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    toy.init_weights()
    toy.eval()
    prompts = [[1, 2, 3], [4, 5]]
    alone = [toy.generate(p, 12, temperature=1.0, seed=5 + i) for i, p in enumerate(prompts)]
    stop = alone[0][4]
    expected = [out[: out.index(stop) + 1] if stop in out else out for out in alone]
    assert generate_batch(toy, prompts, 12, temperature=1.0, seed=5, stop_token=stop) == expected


def test_training_samples_are_batched_and_end_at_bos(shakespeare_tokenizer):
    tokenizer = shakespeare_tokenizer
    bos = tokenizer.bos_id
    model = random_model(GPTConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size}, n_kv_head=2))
    with torch.no_grad():  # logits below the soft-cap, BOS likely where token 100 is: with these seeds
        model.lm_head.weight.mul_(0.25)  # one sample ends at BOS, the others run to max_tokens
        model.lm_head.weight[bos] = 6 * model.lm_head.weight[100]
    model.train()
    prompts = ["ROMEO.\n", "To be, or not to be,", "The king hath"]
    samples = sample_completions(model, tokenizer, prompts, 16, 0.8, 50, 7, torch.device("cpu"), torch.float32)
    assert model.training  # put back in train mode
    model.eval()
    alone = [model.generate([bos] + tokenizer.encode(p), 16, 0.8, 50, seed=7 + i) for i, p in enumerate(prompts)]
    assert samples == [
        (p, tokenizer.decode(out[: out.index(bos)] if bos in out else out)) for p, out in zip(prompts, alone)
    ]
    ended_at_bos = [bos in out for out in alone]
    assert any(ended_at_bos) and not all(ended_at_bos)
