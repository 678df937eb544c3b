"""`python -m nanochat.generate`: prompts from the command line or a file, one streamed token by
token, several in batches that give each prompt the text it gets alone; mistakes are one sentence."""

import sys
from dataclasses import asdict

import pytest
from runs import checkpoint_of
from test_model import random_model

from nanochat.config import run_tool
from nanochat.finished import load_finished
from nanochat.generate import main as generate_main
from nanochat.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def run_dir(shakespeare_tokenizer, tmp_path_factory):
    config = GPTConfig(  # context_len 160: the rotary table of 10 x sequence_len
        sequence_len=16, vocab_size=shakespeare_tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64
    )
    node = {"_target_": "nanochat.model.GPT", **asdict(config)}
    return checkpoint_of(tmp_path_factory.mktemp("generate") / "run", node, random_model(config), shakespeare_tokenizer)


def generate_cli(*argv: str) -> None:
    run_tool("generate", generate_main, [str(a) for a in argv])


def expected_samples(run_dir, prompts: list[str], max_tokens: int, temperature: float, seed: int) -> list[str]:
    finished = load_finished(run_dir)
    bos = finished.tokenizer.bos_id
    encoded = [[bos] + finished.tokenizer.encode(p) for p in prompts]
    outputs = finished.model.generate_batch(encoded, max_tokens, temperature, 50, seed=seed, stop_token=bos)
    return [finished.tokenizer.decode(out[:-1] if out[-1:] == [bos] else out) for out in outputs]


def test_one_prompt_is_printed_token_by_token_as_it_is_sampled(run_dir, monkeypatch):
    produced = []  # tokens sampled so far, as each write to stdout happens
    original = GPT.generate_stream

    def counting(self, *args, **kwargs):
        for step in original(self, *args, **kwargs):
            produced.append(step)
            yield step

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append((len(produced), text))

        def flush(self):
            pass

    recorder = Recorder()
    monkeypatch.setattr(GPT, "generate_stream", counting)
    monkeypatch.setattr(sys, "stdout", recorder)
    generate_cli(run_dir, "prompt=The king", "max_tokens=12", "temperature=0")
    monkeypatch.undo()
    (text,) = expected_samples(run_dir, ["The king"], 12, 0.0, 0)
    assert "".join(t for _, t in recorder.writes) == f"The king{text}\n"
    assert recorder.writes[0] == (0, "The king")  # the prompt, before any sampling
    counts = [count for count, t in recorder.writes[1:-1] if t]
    assert counts[0] == 1 and counts == sorted(counts) and len(set(counts)) > len(produced) // 2


def test_several_prompts_are_printed_in_order_the_same_in_any_batch_size(run_dir, capsys):
    prompts = ["ROMEO.", "The king hath", "To be"]
    texts = expected_samples(run_dir, prompts, 10, 0.8, 3)
    expected = "".join(f"--- {i + 1}/3 ---\n{p}{t}\n" for i, (p, t) in enumerate(zip(prompts, texts)))
    for batch_size in (1, 2, 8):
        generate_cli(
            run_dir, "prompt=[ROMEO.,The king hath,To be]", "max_tokens=10", "seed=3", f"batch_size={batch_size}"
        )
        assert capsys.readouterr().out == expected


def test_prompts_come_one_per_line_from_a_file(run_dir, capsys, tmp_path):
    (tmp_path / "prompts.txt").write_text("ROMEO.\n\n  \nThe king hath\n", encoding="utf-8")
    generate_cli(run_dir, f"prompts_file={tmp_path / 'prompts.txt'}", "max_tokens=10", "seed=3")
    first, second = expected_samples(run_dir, ["ROMEO.", "The king hath"], 10, 0.8, 3)
    assert capsys.readouterr().out == f"--- 1/2 ---\nROMEO.{first}\n--- 2/2 ---\nThe king hath{second}\n"


def test_without_a_seed_a_random_one_is_drawn_and_printed(run_dir, capsys):
    generate_cli(run_dir, "prompt=ROMEO.", "max_tokens=8")
    captured = capsys.readouterr()
    seed = int(captured.err.split("seed=", 1)[1].split()[0])
    generate_cli(run_dir, "prompt=ROMEO.", "max_tokens=8", f"seed={seed}")
    assert capsys.readouterr().out == captured.out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{tmp}/nowhere", "prompt=a"], "{tmp}/nowhere does not exist."),
        (["{tmp}", "prompt=a"], "{tmp} holds no complete checkpoint"),
        (
            ["{run}", "prompts_file={tmp}/long.txt"],
            "prompt 1 is {long} tokens with its BOS, which leaves no room in the model's context of 160 tokens.",
        ),
        (["{run}", "prompts_file={tmp}/missing.txt"], "prompts_file={tmp}/missing.txt does not exist."),
        (
            ["{run}", "prompts_file={tmp}/blank.txt"],
            "prompts_file={tmp}/blank.txt holds no prompt (every line is blank).",
        ),
        (["{run}", "prompt=a", "tempreature=0"], "tempreature is not a key of the config; did you mean temperature?"),
        (["{run}", "prompt=a", "temperature=hot"], "temperature=hot must be a number."),
        (["{run}", "prompt=a", "top_k=0"], "top_k=0 must be positive, or null for no cut."),
        (["{run}", "prompt=a", "max_tokens=0"], "max_tokens=0 must be positive."),
        (["{run}"], "nothing to continue: give prompt=<text> or prompts_file=<file, a prompt per line>."),
        (
            ["{run}", "prompt=a", "prompts_file={tmp}/blank.txt"],
            "prompt=a and prompts_file={tmp}/blank.txt are both set",
        ),
        (
            ["{run}", "prompt=Hello, world"],
            "prompt=Hello, world does not parse as one value in Hydra's override grammar",
        ),
        (["{run}", "prompt=[]"], "prompt=[] holds no prompt; an empty string is one (BOS alone)."),
        (["prompt=a"], "the first argument must be a run dir or checkpoint folder"),
    ],
    ids=[
        "no-path",
        "no-checkpoint",
        "prompt-too-long",
        "no-prompts-file",
        "blank-prompts-file",
        "unknown-key",
        "wrong-type",
        "bad-top-k",
        "bad-max-tokens",
        "no-prompt",
        "two-prompt-sources",
        "unquoted-comma",
        "empty-list",
        "no-location",
    ],
)
def test_mistakes_are_one_sentence_and_exit_code_2_with_nothing_printed(
    run_dir, shakespeare_tokenizer, tmp_path, capsys, arguments, message
):
    long_prompt = "€" * 200  # 160 tokens at least: the tokenizer learned no merge of these bytes
    (tmp_path / "long.txt").write_text(long_prompt + "\n", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    long = 1 + len(shakespeare_tokenizer.encode(long_prompt))
    with pytest.raises(SystemExit) as exit_info:
        generate_cli(*(a.format(tmp=tmp_path, run=run_dir) for a in arguments))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.out == ""
    assert captured.err.startswith(f"error: {message.format(tmp=tmp_path, long=long)}")
    assert captured.err.count("\n") == 1


def test_an_empty_prompt_samples_from_bos_alone(run_dir, capsys):
    generate_cli(run_dir, "prompt=", "max_tokens=8", "seed=2")
    (text,) = expected_samples(run_dir, [""], 8, 0.8, 2)
    assert capsys.readouterr().out == f"{text}\n" and text
