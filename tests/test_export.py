"""`python -m nanochat.export`: a folder that Hugging Face transformers loads as NanoChatForCausalLM
with our logits, our greedy tokens and our token ids; refusals that change nothing."""

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import FAKE_VAL_BYTES
from runs import REPO, checkpoint_of
from test_model import random_model, random_tokens
from toy_models import PositionalTransformer

from nanochat.config import run_tool
from nanochat.data.shakespeare import ShakespeareCorpus
from nanochat.errors import UserError
from nanochat.export import export
from nanochat.export import main as export_main
from nanochat.model import GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip(
    "transformers", minversion="5.0", reason="the export tests load the folder with transformers 5 (the test extra)"
)

# Text whose merges span multi-byte characters, so that the tokenizer is not ASCII-only.
MULTILINGUAL = [
    "naïve café, déjà vu; Grüße aus Köln. ",
    "日本語のテキストです。 中文文本。 ",
    "Привет, мир! Ελληνικά γράμματα. ",
    "emoji 😀👍🏽 🇫🇷 and a family 👨‍👩‍👧. ",
    "كلمة عربية و עברית. ",
    "numbers 1234567 3.14159 2025-01-01 ",
    "it's we'll THEY'RE I'M ",
]
ODD_STRINGS = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\r\n",
    "\t\t x",
    "trailing spaces   ",
    "  leading",
    "a\u00a0b",  # no-break space
    "line\u2028separator",
    "e\u0301 (a combining accent)",
    "zero\u200bwidth",
    "\x00\x01\x7f control",
    "\ufeffBOM",
    "😀" * 7,
    "🏽",
    "'s 'T 'Ll 'VE",
    "don't DON'T",
    "12345678901234567890",
    "x" * 300,
    "<|bos|>",
    "<|bos|>ROMEO.\n<|bos|>",
    "<|user_start|>hi<|user_end|><|assistant_start|>hello<|assistant_end|>",
    "<|python_start|>1+1<|python_end|><|output_start|>2<|output_end|>",
    "<|bos",
    "bos|>",
    "<|not_special|>",
]


@pytest.fixture(scope="module")
def tokenizer(shakespeare_data_dir) -> Tokenizer:
    corpus = ShakespeareCorpus(shakespeare_data_dir, val_bytes=FAKE_VAL_BYTES)
    return Tokenizer.train([*corpus.iter_documents("train"), "".join(MULTILINGUAL) * 200], 768)


def gpt_node(config: GPTConfig) -> dict:
    return {"_target_": "nanochat.model.GPT", **asdict(config)}


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def exported(request, tokenizer, tmp_path_factory):
    """(our model, the transformers model loaded from the export, the export folder)."""
    config = GPTConfig(
        sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=request.param, n_embd=64
    )
    model = random_model(config).eval()
    root = tmp_path_factory.mktemp("export")
    export(checkpoint_of(root / "run", gpt_node(config), model, tokenizer), root / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    return model, hf_model, root / "hf"


def test_transformers_loads_the_export_as_nanochat_and_gives_our_logits(exported):
    model, hf_model, folder = exported
    assert type(hf_model).__name__ == "NanoChatForCausalLM" and hf_model.dtype == torch.float32
    config = hf_model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (model.config.n_head, model.config.n_kv_head)
    tokens = random_tokens(3, model.sequence_len, model.config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    # Both are the same fp32 arithmetic in another order: differences are rounding, amplified by
    # two layers and bounded by the soft-cap's +-15. 1e-4 is ~100 fp32 ulps at 15; measured ~1e-5.
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours.std().item() > 1.0  # a model whose logits carry signal, not the zero-init head


def test_transformers_greedy_generate_gives_our_tokens_for_one_prompt_and_a_left_padded_batch(exported, tokenizer):
    model, hf_model, _ = exported
    bos = tokenizer.bos_id
    prompts = [[bos, *tokenizer.encode(text)] for text in ("ROMEO.\n", "The king hath", "To be, or not to be,")]
    ours = model.generate_batch(prompts, 32, temperature=0.0, stop_token=bos)
    with torch.no_grad():
        alone = hf_model.generate(torch.tensor([prompts[0]]), max_new_tokens=32, do_sample=False)
    assert alone[0, len(prompts[0]) :].tolist() == ours[0]
    # A batch, left-padded as transformers generates batches: the attention mask sets its positions.
    width = max(map(len, prompts))
    ids = torch.tensor([[bos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batch = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert [row[width:].tolist()[: len(out)] for row, out in zip(batch, ours)] == ours
    assert all(len(out) == 32 for out in ours)  # no early BOS: the comparison covers 32 tokens


def strings_to_tokenize(tokenizer: Tokenizer, shakespeare_data_dir) -> list[str]:
    corpus = ShakespeareCorpus(shakespeare_data_dir, val_bytes=FAKE_VAL_BYTES)
    lines = [line for doc in corpus.iter_documents("val") for line in doc.splitlines() if line.strip()][:150]
    rng = random.Random(0)
    pool = [*"abcXYZ019 .,;:!?'\"-_()[]{}", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "é", "e\u0301", "ß", "日", "語"]
    pool += ["😀", "🏽", "\u200d", "\x00", "€", "ﬁ", *SPECIAL_TOKENS, *"".join(MULTILINGUAL)]
    random_strings = ["".join(rng.choices(pool, k=rng.randint(1, 40))) for _ in range(150)]
    return [*ODD_STRINGS, *MULTILINGUAL, "".join(MULTILINGUAL), *lines, *random_strings]


def test_the_transformers_tokenizer_gives_our_ids(exported, tokenizer, shakespeare_data_dir):
    _, _, folder = exported
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_id
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (bos, bos, bos)
    strings = strings_to_tokenize(tokenizer, shakespeare_data_dir)
    assert len(strings) > 300
    for text in strings:
        ours = tokenizer.encode(text)  # special-token text stays text
        with_specials = tokenizer.encoding.encode(text, allowed_special="all")  # special-token text -> its id
        assert hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids == ours, text
        assert hf_tokenizer(text, add_special_tokens=False).input_ids == with_specials, text
        assert hf_tokenizer(text).input_ids == [bos, *with_specials], text  # BOS first, as in training
        assert hf_tokenizer.decode(ours) == tokenizer.decode(ours) == text, text
    merged = [t for t in tokenizer.encode("".join(MULTILINGUAL)) if len(tokenizer.decode_bytes([t])) > 1]
    assert len(merged) > 20  # the strings exercise merges, not bytes alone


def test_the_config_names_every_architectural_constant(exported):
    model, _, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps  # F.rms_norm's default in fp32
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["final_logit_softcapping"] == 15.0 and config["tie_word_embeddings"] is False
    assert config["intermediate_size"] == 4 * model.config.n_embd and config["hidden_act"] == "relu2"
    assert config["max_position_embeddings"] == model.sequence_len
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == config["bos_token_id"]


@pytest.fixture
def small_run(tokenizer, tmp_path):
    config = GPTConfig(sequence_len=16, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    return checkpoint_of(tmp_path / "run", gpt_node(config), random_model(config), tokenizer)


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_non_empty_folder_is_replaced_only_with_overwrite_and_only_if_it_is_an_export(small_run, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=f"^out={other} is not empty; pass overwrite=true to replace it.$"):
        export(small_run, other)
    with pytest.raises(UserError, match="holds something other than an exported model"):
        export(small_run, other, overwrite=True)
    assert folder_state(other) == {"keep.txt": b"mine"}
    out = tmp_path / "hf"
    export(small_run, out)
    first = folder_state(out)
    with pytest.raises(UserError, match="is not empty"):
        export(small_run, out)
    assert folder_state(out) == first
    export(small_run, out, overwrite=True)
    assert folder_state(out) == first  # the same checkpoint exports to the same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes", "run"]  # no temporary left behind


def test_another_architecture_is_refused_naming_it(tokenizer, tmp_path):
    shape = dict(sequence_len=16, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    node = {"_target_": "toy_models.PositionalTransformer", **shape}
    run = checkpoint_of(tmp_path / "run", node, PositionalTransformer(**shape), tokenizer)
    with pytest.raises(UserError, match="model._target_=toy_models.PositionalTransformer, which has no Hugging Face"):
        export(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{tmp}/nowhere", "out={tmp}/hf"], "{tmp}/nowhere does not exist."),
        (["{run}"], "out needs a value (it is ??? in the YAML): set out=<value>."),
        (["{run}", "out={tmp}/hf", "overwrite=yes please"], "overwrite=yes please must be true or false."),
        (["{run}", "out={tmp}/hf", "owerwrite=true"], "owerwrite is not a key of the config; did you mean overwrite?"),
    ],
    ids=["no-checkpoint", "no-out", "wrong-type", "unknown-key"],
)
def test_command_line_mistakes_are_one_sentence_and_exit_code_2(small_run, tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        run_tool("export", export_main, [a.format(tmp=tmp_path, run=small_run) for a in arguments])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "hf").exists()


def test_the_command_exports_and_refuses_a_second_export_into_the_same_folder(small_run, tmp_path):
    command = [sys.executable, "-m", "nanochat.export", str(small_run), f"out={tmp_path / 'hf'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    files = sorted((tmp_path / "hf").iterdir())
    assert len({f.stat().st_mode for f in files}) == 1  # model.safetensors as readable as the rest
    assert [f.name for f in files] == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert second.stderr == f"error: out={tmp_path / 'hf'} is not empty; pass overwrite=true to replace it.\n"
