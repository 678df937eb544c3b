"""CORE against a generated eval bundle (tests/core_bundle.py): prompts, few-shot draws, tokens and
scores checked against this file's own statement of nanochat's definitions, models whose scores are
known in advance (an oracle: 1; models that know nothing: the random baseline), two Gloo ranks, and
fetching the bundle from a loopback server, a zip or a folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from core_bundle import (
    LABELS,
    FileServer,
    bundle_texts,
    oracle_model,
    random_bigram_model,
    uniform_model,
    write_bundle,
    zip_folder,
)

from nanochat import core_eval
from nanochat.core_eval import (
    EvalBundle,
    evaluate_core,
    evaluate_task,
    fetch_bundle,
    fewshot_indices,
    prepare_example,
    render_prompts,
    task_examples,
)
from nanochat.data import download
from nanochat.errors import UserError
from nanochat.model import GPT
from nanochat.tokenizer import Tokenizer

PER_TASK = 300  # examples per generated task
VOCAB = 512
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("core"), per_task=PER_TASK)


@pytest.fixture(scope="module")
def bundle(bundle_root) -> EvalBundle:
    return EvalBundle.load(bundle_root)


@pytest.fixture(scope="module")
def tokenizer(bundle_root) -> Tokenizer:
    """A real BPE fitted to the bundle's text, so that the delimiter's space merges into the next
    word as it does with nanochat's tokenizer."""
    return Tokenizer.train(bundle_texts(bundle_root), VOCAB)


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith((".", "?")) and not re.search(r"[.?] [A-Z]", message)


# ---------------------------------------------------------------------------------------------
# This file's own statement of nanochat's definitions, read from the bundle's files directly.


def reference_data(root: Path, label: str, max_per_task: int | None = None) -> tuple[dict, list[dict]]:
    """core.yaml's entry for label and its examples: shuffled by random.Random(1337), first N kept."""
    entry = next(e for e in yaml.safe_load((root / "core.yaml").read_text())["icl_tasks"] if e["label"] == label)
    with open(root / "eval_data" / entry["dataset_uri"], encoding="utf-8") as file:
        data = [json.loads(line) for line in file]
    random.Random(1337).shuffle(data)
    return entry, data[:max_per_task] if max_per_task else data


def reference_prompts(entry: dict, data: list[dict], idx: int) -> list[str]:
    """Few-shot examples from random.Random(1234 + idx), then the example, each as context +
    delimiter + answer, blank lines between."""
    shots_wanted = entry["num_fewshot"][0]
    delimiter = entry.get("continuation_delimiter", " ")
    others = [i for i in range(len(data)) if i != idx]
    shots = [data[i] for i in random.Random(1234 + idx).sample(others, shots_wanted)] if shots_wanted else []
    item = data[idx]
    if entry["icl_task_type"] == "multiple_choice":
        solved = [shot["query"] + delimiter + shot["choices"][shot["gold"]] for shot in shots]
        return ["\n\n".join(solved + [item["query"] + delimiter + choice]) for choice in item["choices"]]
    if entry["icl_task_type"] == "schema":
        solved = [shot["context_options"][shot["gold"]] + delimiter + shot["continuation"] for shot in shots]
        return ["\n\n".join(solved + [option + delimiter + item["continuation"]]) for option in item["context_options"]]
    solved = [shot["context"].strip() + delimiter + shot["continuation"] for shot in shots]
    open_prompt = "\n\n".join(solved + [item["context"].strip() + delimiter])
    return [open_prompt.strip(), open_prompt + item["continuation"]]


def reference_rows(task_type: str, prompts: list[str], tokenizer, max_len: int) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per row: BOS + prompt, the continuation after the common prefix /
    before the common suffix / after the prompt without it, then the last max_len tokens."""
    rows = [[tokenizer.bos_id, *tokenizer.encode(prompt)] for prompt in prompts]
    if task_type == "multiple_choice":
        start = len(os.path.commonprefix(rows))
        spans = [(row, start, len(row)) for row in rows]
    elif task_type == "schema":
        shared = len(os.path.commonprefix([row[::-1] for row in rows]))
        spans = [(row, len(row) - shared, len(row)) for row in rows]
    else:
        spans = [(rows[1], len(rows[0]), len(rows[1]))]
    cropped = []
    for row, start, end in spans:
        drop = max(len(row) - max_len, 0)
        cropped.append((row[drop:], start - drop, end - drop))
    return cropped


def gold_spans(root: Path, tokenizer, max_len: int, max_per_task: int | None) -> dict[tuple[int, ...], tuple[int, int]]:
    """The oracle's knowledge: every gold row as the model receives it, with its continuation span."""
    spans = {}
    for label in LABELS:
        entry, data = reference_data(root, label, max_per_task)
        for idx, item in enumerate(data):
            rows = reference_rows(entry["icl_task_type"], reference_prompts(entry, data, idx), tokenizer, max_len)
            tokens, start, end = rows[item.get("gold", 0)]
            spans[tuple(tokens)] = (start, end)
    return spans


# ---------------------------------------------------------------------------------------------
# Scores known in advance


@pytest.mark.parametrize(("sequence_len", "max_per_task"), [(1024, None), (48, 80)])
def test_an_oracle_scores_one_on_every_task(bundle_root, bundle, tokenizer, capsys, sequence_len, max_per_task):
    """The oracle is right only where the scored tokens are exactly the continuation of exactly the
    prompt the reference renders (see core_bundle.oracle_model); at sequence_len=48 most prompts
    are cropped, so its rows are the cropped ones."""
    spans = gold_spans(bundle_root, tokenizer, sequence_len, max_per_task)
    model = oracle_model(spans, tokenizer.bos_id, VOCAB, sequence_len)
    model.train()
    metrics = evaluate_core(model, tokenizer, bundle, CPU, max_per_task=max_per_task)
    assert metrics == {
        "core/metric": 1.0,
        **{f"core/{label}": 1.0 for label in LABELS},
        **{f"core_accuracy/{label}": 1.0 for label in LABELS},
    }
    starts_with_bos = {bool(batch[:, 0].eq(tokenizer.bos_id).all()) for batch in model.batches}
    assert starts_with_bos == ({True} if sequence_len == 1024 else {True, False})  # crops happened only at 48
    assert model.training  # evaluated in eval mode, then restored
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"CORE {label}" for label in LABELS]
    assert "accuracy 1.0000, centered 1.0000" in lines[0] and re.search(r"in \d+\.\ds$", lines[0])


@pytest.mark.parametrize("make_model", [uniform_model, random_bigram_model])
def test_a_model_that_knows_nothing_scores_the_random_baseline(bundle, tokenizer, make_model):
    """Expected centered accuracy 0, within a bound derived from the number of examples.

    In a generated multiple_choice or schema example the k options are drawn from one distribution
    and the gold index uniformly and independently of them (core_bundle.py). These models' choice
    depends on the example's own text only (uniform logits: ties and rounding decided by the span
    lengths; the bigram table: each scored token and the one before it), so each example is right with
    probability 1/k independently: correct ~ Binomial(n, p), p = 1/k = baseline / 100.
    accuracy has standard deviation sqrt(p (1 - p) / n), and centered = (accuracy - p) / (1 - p)
    has mean 0 and standard deviation sigma = sqrt(p / ((1 - p) n)): at n = 300, 0.033 for k = 4
    and 0.058 for k = 2. We allow 4 sigma (a 6e-5 two-sided chance of failing at random). CORE is
    the mean over T tasks: sigma_CORE = sqrt(sum of sigma^2) / T.

    language_modeling tasks have baseline 0: uniform logits decode greedily to token 0 (the NUL
    byte, which no text here contains), so accuracy is exactly 0. For the bigram table the chance
    of a greedy match is not independent across examples (one table row serves every example
    whose context ends in ":"), so no binomial bound holds and those tasks are left out for it.
    """
    types = ("multiple_choice", "schema") if make_model is random_bigram_model else core_eval.TASK_TYPES
    tasks = [task for task in bundle.select() if task.task_type in types]
    metrics = evaluate_core(make_model(VOCAB, 1024), tokenizer, bundle, CPU, tasks=[task.label for task in tasks])
    sigmas = []
    for task in tasks:
        accuracy, centered = metrics[f"core_accuracy/{task.label}"], metrics[f"core/{task.label}"]
        p = task.random_baseline / 100
        assert centered == pytest.approx((accuracy - p) / (1 - p), abs=1e-12)
        if task.task_type == "language_modeling":
            assert accuracy == 0.0
            sigmas.append(0.0)
            continue
        sigma = math.sqrt(p / ((1 - p) * PER_TASK))
        assert abs(centered) <= 4 * sigma, f"{task.label}: centered {centered:.3f}, 4 sigma = {4 * sigma:.3f}"
        sigmas.append(sigma)
    assert metrics["core/metric"] == pytest.approx(sum(metrics[f"core/{t.label}"] for t in tasks) / len(tasks))
    core_sigma = math.sqrt(sum(s * s for s in sigmas)) / len(tasks)
    assert abs(metrics["core/metric"]) <= 4 * core_sigma


class FixedLosses(torch.nn.Module):
    """Per-token losses given in advance, whatever the tokens."""

    sequence_len = 64

    def __init__(self, losses: list[list[float]]):
        super().__init__()
        self.losses = torch.tensor(losses)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        return self.losses


def test_the_prediction_is_the_option_with_the_lowest_mean_loss_over_its_continuation():
    # Option 0 scores one token at loss 2, option 1 three tokens at loss 1: by mean option 1 wins,
    # by sum option 0. Losses outside the spans (position 0, the padding) are huge and must not count.
    example = core_eval.PreparedExample(tokens=[[0, 7, 8], [0, 7, 9, 9, 9]], starts=[2, 2], ends=[3, 5])
    model = FixedLosses([[100.0, 2.0, 100.0, 100.0, 100.0], [100.0, 1.0, 1.0, 1.0, 100.0]])
    assert core_eval.is_correct(model, example, "multiple_choice", 1, 0, CPU, torch.float32)
    assert not core_eval.is_correct(model, example, "multiple_choice", 0, 0, CPU, torch.float32)


def test_options_with_equal_losses_go_to_the_first_one():
    """nanochat takes list.index(min(losses)): of equal mean losses, the first option's."""
    example = core_eval.PreparedExample(tokens=[[0, 5, 6], [0, 5, 7], [0, 5, 8]], starts=[2, 2, 2], ends=[3, 3, 3])
    model = uniform_model(VOCAB, 64)
    outcomes = [core_eval.is_correct(model, example, "schema", gold, 0, CPU, torch.float32) for gold in range(3)]
    assert outcomes == [True, False, False]


# ---------------------------------------------------------------------------------------------
# Prompts, few-shot draws and tokens


@pytest.mark.parametrize("max_per_task", [None, 25])
def test_prompts_equal_an_independent_rendering_of_the_bundle_files(bundle_root, bundle, max_per_task):
    for task in bundle.select():
        entry, expected_data = reference_data(bundle_root, task.label, max_per_task)
        data = task_examples(bundle, task, max_per_task)
        assert data == expected_data  # the shuffle and the cap: few-shot examples come from these
        for idx in range(len(data)):
            shots = fewshot_indices(len(data), idx, task.num_fewshot)
            assert idx not in shots and len(set(shots)) == task.num_fewshot
            prompts = render_prompts(task, data[idx], [data[i] for i in shots])
            assert prompts == reference_prompts(entry, data, idx), f"{task.label} example {idx}"


def test_templates_on_hand_written_examples():
    """The exact text, written out, for each task type (nanochat's jinja templates rendered by hand)."""
    mc = core_eval.Task("mc", "multiple_choice", "mc.jsonl", 2, "\nAnswer: ", 25.0)
    shots = [{"query": "Q1?", "choices": ["x", "y"], "gold": 1}, {"query": "Q2?", "choices": ["z"], "gold": 0}]
    assert render_prompts(mc, {"query": "Q3?", "choices": ["a", "b"]}, shots) == [
        "Q1?\nAnswer: y\n\nQ2?\nAnswer: z\n\nQ3?\nAnswer: a",
        "Q1?\nAnswer: y\n\nQ2?\nAnswer: z\n\nQ3?\nAnswer: b",
    ]
    schema = core_eval.Task("schema", "schema", "s.jsonl", 1, " ", 50.0)
    shot = {"context_options": ["A did", "B did"], "continuation": "it.", "gold": 1}
    assert render_prompts(schema, {"context_options": ["C saw", "D saw"], "continuation": "them."}, [shot]) == [
        "B did it.\n\nC saw them.",
        "B did it.\n\nD saw them.",
    ]
    lm = core_eval.Task("lm", "language_modeling", "lm.jsonl", 1, " ", 0.0)
    shot = {"context": "  The cat sat on the \n", "continuation": "mat"}
    # Contexts are stripped; the prompt without the continuation loses the delimiter's space too.
    assert render_prompts(lm, {"context": "\tThe dog ate the ", "continuation": "bone"}, [shot]) == [
        "The cat sat on the mat\n\nThe dog ate the",
        "The cat sat on the mat\n\nThe dog ate the bone",
    ]


def test_continuations_are_located_as_nanochat_locates_them(bundle_root, bundle, tokenizer):
    for task in bundle.select():
        entry, data = reference_data(bundle_root, task.label)
        for idx, item in enumerate(data):
            example = prepare_example(task, data, idx, tokenizer, max_len=1024)
            expected = reference_rows(task.task_type, reference_prompts(entry, data, idx), tokenizer, 1024)
            assert list(zip(example.tokens, example.starts, example.ends)) == expected
            scored = [tokenizer.decode(row[s:e]) for row, s, e in expected]
            if task.task_type == "multiple_choice" and all(c.startswith("Port ") for c in item["choices"]):
                assert not any(text.startswith(" Port") for text in scored)  # the shared word is context
            elif task.task_type == "schema":
                assert len(set(scored)) == 1 and scored[0].endswith(" " + item["continuation"])
            elif task.task_type == "language_modeling":
                without, with_ = reference_prompts(entry, data, idx)
                assert scored == [with_[len(without) :]]


def test_all_options_of_an_example_go_through_the_model_in_one_padded_batch(bundle_root, bundle, tokenizer):
    model = uniform_model(VOCAB, 1024)
    for label in ("capitals", "pronouns", "copy_words"):
        task = bundle.tasks[label]
        data = task_examples(bundle, task, max_per_task=10)
        model.batches.clear()
        evaluate_task(model, tokenizer, task, data, CPU)
        assert len(model.batches) == len(data)
        entry, _ = reference_data(bundle_root, label, 10)
        for idx, batch in enumerate(model.batches):
            rows = [
                tokens
                for tokens, _, _ in reference_rows(task.task_type, reference_prompts(entry, data, idx), tokenizer, 1024)
            ]
            width = max(len(row) for row in rows)
            assert batch.tolist() == [row + [tokenizer.bos_id] * (width - len(row)) for row in rows]


def test_a_prompt_longer_than_the_context_loses_its_oldest_tokens(bundle, tokenizer):
    for label in ("copy_words", "capitals"):
        task = bundle.tasks[label]
        data = task_examples(bundle, task)
        full = prepare_example(task, data, 0, tokenizer, max_len=10**6)
        max_len = min(len(row) for row in full.tokens) - 7
        cropped = prepare_example(task, data, 0, tokenizer, max_len=max_len)
        for row, start, end, short, short_start, short_end in zip(
            full.tokens, full.starts, full.ends, cropped.tokens, cropped.starts, cropped.ends
        ):
            drop = len(row) - max_len
            assert drop >= 7 and short == row[-max_len:] and short[0] != tokenizer.bos_id
            assert (short_start, short_end) == (start - drop, end - drop)
            assert short[short_start:short_end] == row[start:end]  # the continuation is kept whole
        too_short = full.ends[0] - full.starts[0]
        with pytest.raises(UserError, match=rf"continuation of {too_short} tokens leaves no token before it") as error:
            prepare_example(task, data, 0, tokenizer, max_len=too_short)
        assert one_sentence(str(error.value))


# ---------------------------------------------------------------------------------------------
# Two ranks


def small_gpt() -> GPT:
    """A GPT whose predictions differ between options: its zero-initialised output layers are
    given random weights."""
    torch.manual_seed(0)
    model = GPT(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.3)
        for block in model.transformer.h:
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
    return model


RANK_CAP = 40


def core_on_rank(rank: int, init_file: str, root: str, tokenizer_path: str, results: str) -> None:
    torch.set_num_threads(1)  # the same arithmetic as the single-process run in the test
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        metrics = evaluate_core(
            small_gpt(), Tokenizer.load(tokenizer_path), EvalBundle.load(root), CPU, max_per_task=RANK_CAP
        )
        Path(results, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_two_ranks_give_every_rank_the_single_process_result(bundle_root, bundle, tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    mp.spawn(
        core_on_rank,
        args=(str(tmp_path / "rendezvous"), str(bundle_root), str(tmp_path / "tokenizer.json"), str(tmp_path)),
        nprocs=2,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_core(small_gpt(), tokenizer, bundle, CPU, max_per_task=RANK_CAP)
    finally:
        torch.set_num_threads(threads)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == single and ranks[1] == single
    # Not a trivially equal result: the model's accuracies are not all the same value.
    assert len({single[f"core_accuracy/{label}"] for label in LABELS}) > 2


# ---------------------------------------------------------------------------------------------
# Task selection and the bundle's files


def test_an_unknown_task_is_one_sentence_naming_the_closest(bundle):
    with pytest.raises(
        UserError, match=r"CORE task 'capitalz' is not in the eval bundle at .*; did you mean capitals\?"
    ) as error:
        bundle.select(["capitals", "capitalz"])
    assert one_sentence(str(error.value))
    with pytest.raises(UserError, match="its tasks are capitals, true_false, pronouns, ") as error:
        evaluate_core(uniform_model(VOCAB, 64), None, bundle, CPU, tasks=["zzz"])
    assert one_sentence(str(error.value))


def test_caps_too_small_for_the_few_shot_draw_are_one_sentence(bundle, tokenizer):
    with pytest.raises(
        UserError, match=r"'true_false' draws 5 few-shot examples .* at least 6 examples; it has 5 \(max_per_task=5\)"
    ):
        evaluate_core(uniform_model(VOCAB, 64), tokenizer, bundle, CPU, tasks=["true_false"], max_per_task=5)
    with pytest.raises(UserError, match="max_per_task=0 must be a positive integer"):
        evaluate_core(uniform_model(VOCAB, 64), tokenizer, bundle, CPU, max_per_task=0)


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _bad_line(path: Path, line: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = line + "\n"
    path.write_text("".join(lines), encoding="utf-8")


MALFORMED = {
    "no core.yaml": (lambda root: (root / "core.yaml").unlink(), r"is not an eval bundle: it has no core\.yaml\."),
    "no task list": (
        lambda root: (root / "core.yaml").write_text("tasks: []\n"),
        r"core\.yaml has no icl_tasks list\.",
    ),
    "unknown type": (
        lambda root: _rewrite(root / "core.yaml", "icl_task_type: schema", "icl_task_type: generation"),
        r"task 'pronouns' has icl_task_type 'generation'; CORE knows multiple_choice, schema, language_modeling\.",
    ),
    "escaping data file": (
        lambda root: _rewrite(root / "core.yaml", "dataset_uri: world_knowledge/", "dataset_uri: ../../"),
        r"has dataset_uri '\.\./\.\./capitals\.jsonl', which is not a relative path inside eval_data/\.",
    ),
    "missing data file": (
        lambda root: (root / "eval_data/world_knowledge/capitals.jsonl").unlink(),
        r"task 'capitals' has no data file .*capitals\.jsonl\.",
    ),
    "no baseline": (
        lambda root: _rewrite(root / "eval_meta_data.csv", "\npronouns,", "\nnouns,"),
        r"eval_meta_data\.csv has no random baseline for task 'pronouns'\.",
    ),
    "baseline not a number": (
        lambda root: _rewrite(root / "eval_meta_data.csv", ",multiple choice,3,300,25,", ",multiple choice,3,300,n/a,"),
        r"needs an 'Eval Task' and a numeric 'Random baseline' column in every row",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_bundle_is_one_sentence(bundle_root, tmp_path, case):
    mutate, message = MALFORMED[case]
    root = shutil.copytree(bundle_root, tmp_path / "eval_bundle")
    mutate(root)
    with pytest.raises(UserError, match=message) as error:
        EvalBundle.load(root)
    assert one_sentence(str(error.value))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"capitals\.jsonl line 3 is not valid JSON \("),
        (
            '{"query": "Q", "choices": ["a", "b"], "gold": 2}',
            "line 3 is not a multiple_choice example: its gold 2 is not the index",
        ),
        (
            '{"query": "Q", "choices": "ab", "gold": 0}',
            "line 3 is not a multiple_choice example: its choices is 'ab', not a list",
        ),
        ('{"query": "Q", "choices": ["a"]}', "line 3 is not a multiple_choice example: its gold is None, not an int"),
    ],
)
def test_a_malformed_example_is_one_sentence_naming_its_line(bundle_root, tmp_path, line, message):
    root = shutil.copytree(bundle_root, tmp_path / "eval_bundle")
    _bad_line(root / "eval_data/world_knowledge/capitals.jsonl", line)
    bundle = EvalBundle.load(root)
    with pytest.raises(UserError, match=message) as error:
        bundle.examples(bundle.tasks["capitals"])
    assert one_sentence(str(error.value))


# ---------------------------------------------------------------------------------------------
# Fetching


@pytest.fixture
def server():
    file_server = FileServer()
    yield file_server
    file_server.close()


@pytest.fixture(scope="module")
def bundle_zip(bundle_root, tmp_path_factory) -> Path:
    return zip_folder(bundle_root, tmp_path_factory.mktemp("zip") / "eval_bundle.zip")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    ours = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != core_eval.SOURCE_FILE)
    return names == ours and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_a_url_is_downloaded_checked_unpacked_and_then_reused(server, bundle_root, bundle_zip, tmp_path):
    server.files["/bundles/eval_bundle.zip"] = bundle_zip.read_bytes()
    url, cache = f"{server.url}/bundles/eval_bundle.zip", tmp_path / "cache"
    bundle = fetch_bundle(url, cache_dir=cache, sha256=sha256(bundle_zip), show_progress=False)
    assert bundle.root == cache / "eval_bundle" and list(bundle.tasks) == LABELS
    assert same_files(bundle_root, bundle.root)
    # The zip is deleted once unpacked; no temporary folder is left.
    assert sorted(p.name for p in cache.iterdir()) == [".download.lock", ".eval_bundle.lock", "eval_bundle"]
    requests = len(server.requests)
    again = fetch_bundle(url, cache_dir=cache, sha256=sha256(bundle_zip), show_progress=False)
    assert again.root == bundle.root and len(server.requests) == requests  # not a single request


def test_a_wrong_checksum_names_both_and_keeps_nothing(server, bundle_zip, tmp_path):
    server.files["/eval_bundle.zip"] = bundle_zip.read_bytes()
    url, cache, wrong = f"{server.url}/eval_bundle.zip", tmp_path / "cache", "ab" * 32
    with pytest.raises(
        UserError,
        match=f"sent an eval bundle with sha256 {sha256(bundle_zip)}, not the expected {wrong}; it was deleted",
    ) as error:
        fetch_bundle(url, cache_dir=cache, sha256=wrong, show_progress=False)
    assert one_sentence(str(error.value))
    assert sorted(p.name for p in cache.iterdir()) == [".download.lock", ".eval_bundle.lock"]


def test_a_cached_bundle_does_not_satisfy_a_checksum_it_was_not_fetched_with(server, bundle_zip, tmp_path):
    server.files["/eval_bundle.zip"] = bundle_zip.read_bytes()
    url, cache = f"{server.url}/eval_bundle.zip", tmp_path / "cache"
    fetch_bundle(url, cache_dir=cache, show_progress=False)
    requests = len(server.requests)
    with pytest.raises(UserError, match="not the expected " + "cd" * 32):
        fetch_bundle(url, cache_dir=cache, sha256="cd" * 32, show_progress=False)
    assert len(server.requests) > requests  # fetched again to check it


def test_a_url_that_fails_is_one_sentence(server, tmp_path):
    with pytest.raises(
        UserError,
        match=re.escape(f"{server.url}/missing.zip answered HTTP 404 Not Found; check the eval bundle's URL."),
    ) as error:
        fetch_bundle(f"{server.url}/missing.zip", cache_dir=tmp_path / "cache", show_progress=False)
    assert one_sentence(str(error.value))
    assert not (tmp_path / "cache" / "missing").exists()


def test_a_download_that_is_not_a_zip_is_fetched_again_then_refused(server, tmp_path):
    server.files["/eval_bundle.zip"] = b"<html>an error page</html>"
    with pytest.raises(
        UserError, match="failed after 2 tries; last error: the 26 bytes received are not a valid zip file"
    ):
        download.fetch_url(
            f"{server.url}/eval_bundle.zip",
            tmp_path / "eval_bundle.zip",
            zipfile.is_zipfile,
            "zip",
            "check it",
            max_tries=2,
            backoff=0.01,
            show_progress=False,
        )
    assert [method for method, _ in server.requests] == ["HEAD", "GET", "GET"]
    assert not (tmp_path / "eval_bundle.zip").exists()


@pytest.mark.parametrize("source", ["ftp://127.0.0.1/eval_bundle.zip", "file:///etc/passwd"])
def test_only_http_urls_are_downloaded(tmp_path, source):
    with pytest.raises(UserError, match="is not an http:// or https:// URL"):
        fetch_bundle(source, cache_dir=tmp_path)


def _regular(name: str) -> zipfile.ZipInfo:
    return zipfile.ZipInfo(name)


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (lambda tmp: _regular("eval_bundle/../../../evil.txt"), "would be written outside the folder"),
        (lambda tmp: _regular(str(tmp / "evil_absolute.txt")), "would be written outside the folder"),
        (lambda tmp: _symlink("eval_bundle/eval_data/evil_link.jsonl"), "is a symbolic link"),
    ],
    ids=["dot-dot", "absolute", "symlink"],
)
def test_zip_members_that_escape_or_link_are_refused(bundle_root, tmp_path, member, message):
    info = member(tmp_path)
    archive = zip_folder(bundle_root, tmp_path / "evil.zip", extra=[(info, b"/etc/passwd")])
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=rf"Zip .*evil\.zip member '{re.escape(info.filename)}' {message}") as error:
        fetch_bundle(archive, cache_dir=cache)
    assert one_sentence(str(error.value))
    assert list(tmp_path.rglob("evil*")) == [archive]  # nothing written anywhere
    assert sorted(p.name for p in cache.iterdir()) == [".eval_bundle.lock"]


def test_a_local_folder_is_used_in_place(bundle_root, tmp_path):
    bundle = fetch_bundle(bundle_root, cache_dir=tmp_path / "cache")
    assert bundle.root == bundle_root and not (tmp_path / "cache").exists()


def test_a_local_zip_is_unpacked_once_and_again_when_it_changes(bundle_root, bundle_zip, tmp_path, monkeypatch):
    local, cache = Path(shutil.copy(bundle_zip, tmp_path / "eval_bundle.zip")), tmp_path / "cache"
    bundle = fetch_bundle(local, cache_dir=cache, sha256=sha256(bundle_zip))
    assert bundle.root == cache / "eval_bundle" and same_files(bundle_root, bundle.root)
    unpack = core_eval._unpack
    monkeypatch.setattr(core_eval, "_unpack", lambda *args: pytest.fail("unpacked a second time"))
    assert fetch_bundle(local, cache_dir=cache).root == bundle.root
    monkeypatch.setattr(core_eval, "_unpack", unpack)
    smaller = write_bundle(tmp_path / "smaller", per_task=10)
    zip_folder(smaller, local)  # the same file, new contents
    assert fetch_bundle(local, cache_dir=cache).root == bundle.root and same_files(smaller, bundle.root)
    with pytest.raises(UserError, match=f"has sha256 {sha256(local)}, not the expected {sha256(bundle_zip)}"):
        fetch_bundle(local, cache_dir=cache, sha256=sha256(bundle_zip))
    assert local.exists()  # the user's own file is never deleted


def test_a_zip_that_is_not_a_bundle_and_a_source_that_is_nothing_are_one_sentence(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(
        UserError, match=r"other\.zip is not an eval bundle: no core\.yaml at its top or in one top-level folder\."
    ) as error:
        fetch_bundle(archive, cache_dir=tmp_path / "cache")
    assert one_sentence(str(error.value))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".eval_bundle.lock"]
    (tmp_path / "notes.txt").write_text("not a bundle")
    with pytest.raises(UserError, match="is neither an http\\(s\\) URL, a .zip file nor an eval bundle folder"):
        fetch_bundle(tmp_path / "notes.txt", cache_dir=tmp_path / "cache")
