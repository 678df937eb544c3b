"""The token-exact shard builder: with it, 1 process of 2b rows and 2 ranks of b rows read the same tokens."""

import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAKE_VAL_BYTES
from hydra.utils import instantiate
from token_exact_shards import exact_token_documents, publish_token_exact_shards

from nanochat.data.hub import HubShardCorpus
from nanochat.data.loader import TokenLoader
from nanochat.data.shakespeare import ShakespeareCorpus

T = 64  # sequence_len
B = 2  # rows per rank
NUM_TRAIN = 5  # train shards
ROW_GROUPS_PER_TRAIN_SHARD = 2  # 10 train row groups: 10 steps of 2 row groups cross the epoch twice
NUM_VAL = 6  # val row groups: an even count, so both set-ups give the same number of val batches
STEPS = 10


@pytest.fixture(scope="module")
def source_text(shakespeare_data_dir) -> str:
    corpus = ShakespeareCorpus(shakespeare_data_dir, val_bytes=FAKE_VAL_BYTES)
    return "\n\n".join(corpus.iter_documents("train"))


@pytest.fixture(scope="module")
def published(tmp_path_factory, shakespeare_tokenizer, source_text):
    data_dir = tmp_path_factory.mktemp("token_exact")
    overrides = publish_token_exact_shards(
        data_dir,
        shakespeare_tokenizer,
        tokens_per_row_group=B * T,
        num_train=NUM_TRAIN,
        num_val=NUM_VAL,
        source_text=source_text,
        seed=0,
        row_groups_per_train_shard=ROW_GROUPS_PER_TRAIN_SHARD,
    )
    corpus = HubShardCorpus(
        data_dir, base_url="unused://", num_shards=NUM_TRAIN, total_shards=NUM_TRAIN + 1, val_shard=NUM_TRAIN
    )
    return data_dir, overrides, corpus


def _loaders(files, tokenizer, seed: int, **kwargs):
    single = TokenLoader(files, tokenizer, batch_size=2 * B, sequence_len=T, seed=seed, **kwargs)
    ranks = [
        TokenLoader(files, tokenizer, batch_size=B, sequence_len=T, rank=r, world_size=2, seed=seed, **kwargs)
        for r in range(2)
    ]
    return single, ranks


def _assert_same_batch(single_batch, rank_batches) -> None:
    for i, name in enumerate(("inputs", "targets")):
        joined = torch.cat([batch[i] for batch in rank_batches])
        assert torch.equal(single_batch[i], joined), name


def test_every_row_group_is_one_document_of_exactly_b_times_t_minus_one_tokens(published, shakespeare_tokenizer):
    _, _, corpus = published
    files = corpus.files("train") + corpus.files("val")
    assert all(path.exists() for path in files)
    documents = []
    for path in files:
        parquet = pq.ParquetFile(path)
        assert parquet.schema_arrow.field("text").type == "string"
        for group in range(parquet.metadata.num_row_groups):
            texts = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
            assert len(texts) == 1
            assert len(shakespeare_tokenizer.encode(texts[0])) == B * T - 1
            documents += texts
    assert len(documents) == NUM_TRAIN * ROW_GROUPS_PER_TRAIN_SHARD + NUM_VAL
    assert len(set(documents)) == len(documents)  # distinct slices, so a misrouted row group would show
    assert pq.ParquetFile(corpus.files("val")[0]).metadata.num_row_groups == NUM_VAL


@pytest.mark.parametrize("seed", [0, 42])
def test_one_process_of_2b_rows_reads_the_train_rows_of_two_ranks_of_b_rows(published, shakespeare_tokenizer, seed):
    _, _, corpus = published
    single, ranks = _loaders(corpus.files("train"), shakespeare_tokenizer, seed)
    for _ in range(STEPS):
        _assert_same_batch(next(single), [next(rank) for rank in ranks])
    # 10 steps of 2 row groups read 2 epochs of 10, and the next batch's first token (BOS) from a third
    assert single.state_dict()["epoch"] == 2


def test_one_process_of_2b_rows_reads_the_val_rows_of_two_ranks_of_b_rows(published, shakespeare_tokenizer):
    _, _, corpus = published
    single, ranks = _loaders(corpus.files("val"), shakespeare_tokenizer, seed=0, shuffle=False, loop=False)
    single_batches, rank_batches = list(single), [list(rank) for rank in ranks]
    assert len(single_batches) == len(rank_batches[0]) == len(rank_batches[1]) == NUM_VAL // 2 - 1
    for step, single_batch in enumerate(single_batches):
        _assert_same_batch(single_batch, [batches[step] for batches in rank_batches])


def test_the_returned_overrides_give_train_py_these_shards_and_this_tokenizer(published, shakespeare_tokenizer):
    from nanochat.config import compose_cli  # registers the config's resolvers; only this test needs it

    data_dir, overrides, corpus = published
    cfg = compose_cli(overrides)
    assert cfg.data.data_dir == str(data_dir)
    built = instantiate(cfg.data)
    built.prepare()  # every shard present and a text parquet file
    assert built.files("train") == corpus.files("train") and built.files("val") == corpus.files("val")
    # As train.py builds it; a corpus with no documents makes any attempt to retrain fail loudly.
    tokenizer = instantiate(cfg.tokenizer).load_or_train(corpus=None)
    assert tokenizer.fingerprint() == shakespeare_tokenizer.fingerprint()
    assert cfg.tokenizer.vocab_size == shakespeare_tokenizer.vocab_size


def test_too_little_source_text_is_refused(shakespeare_tokenizer, source_text):
    with pytest.raises(ValueError, match="yields only"):
        exact_token_documents(shakespeare_tokenizer, source_text[:2000], B * T - 1, count=50)
