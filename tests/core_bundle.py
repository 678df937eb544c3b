"""A generated CORE eval bundle in the real layout, toy models over it, and a loopback file server.

The bundle is what nanochat's eval_bundle.zip holds, small: eval_bundle/core.yaml (icl_tasks with
label, dataset_uri, num_fewshot as a list, icl_task_type, continuation_delimiter present or absent,
keys CORE ignores), eval_bundle/eval_data/<category>/<task>.jsonl and eval_bundle/eval_meta_data.csv
(every column of DCLM's, a task core.yaml does not list). Every task type appears, with few-shot and
zero-shot tasks, delimiters that end in a space or that are left out, choices that share their first
words, contexts with whitespace around them and non-ASCII text.

In every multiple_choice and schema example the options are drawn from one distribution, and the
gold index is drawn uniformly and independently of them: a model that does not know the answer is
right with probability 1 / number of options, the random baseline the csv gives.
"""

from __future__ import annotations

import json
import random
import threading
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

_SYLLABLES = "ka lo mi ne ru sa ti vo ze bri dan fel gor hul jin kes lam mor nix pel qua ros sul tam ven wyl".split()
# Made-up words, fixed by seeds: two or three syllables each, one in 37 ending in a non-ASCII letter.
_BASE = sorted({"".join(random.Random(i).sample(_SYLLABLES, 2 + i % 2)) for i in range(400)})
WORDS = sorted({word[:-1] + "é" if i % 37 == 0 else word for i, word in enumerate(_BASE)})


def _mc_capital(rng: random.Random) -> dict:
    place, *cities = rng.sample(WORDS, 5)
    # Half the examples' choices all start with the same word: the common token prefix then reaches
    # into the choices, and only what follows it is scored.
    prefix = rng.choice(["", "Port ", "San "])
    return {"query": f"Question: What is the capital of {place.title()}?", "choices": [prefix + c for c in cities]}


def _mc_true_false(rng: random.Random) -> dict:
    a, b = rng.sample(WORDS, 2)
    return {"query": f"Every {a} is a {b}. True or false?", "choices": ["true", "false"]}


def _schema_pronoun(rng: random.Random) -> dict:
    a, b, thing, adjective = rng.sample(WORDS, 4)
    context = f"The {a} gave the {b} a {thing} because the"
    return {"context_options": [f"{context} {a}", f"{context} {b}"], "continuation": f"was very {adjective}."}


def _lm_copy(rng: random.Random) -> dict:
    words = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return {"context": f"Copy the words: {words}", "continuation": words}


def _lm_last_word(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(4, 9))
    # Whitespace around the context, as in some real files: nanochat strips it.
    padding = rng.choice(["", " ", "  \n", "\t"])
    return {"context": padding + " ".join(words[:-1]) + rng.choice(["", " ", "\n"]), "continuation": words[-1]}


# label, icl_task_type, dataset_uri, num_fewshot, continuation_delimiter (None: left out), baseline %, maker
TASKS = [
    ("capitals", "multiple_choice", "world_knowledge/capitals.jsonl", 3, "\nAnswer: ", 25, _mc_capital),
    ("true_false", "multiple_choice", "reading_comprehension/true_false.jsonl", 5, None, 50, _mc_true_false),
    ("pronouns", "schema", "language_understanding/pronouns.jsonl", 0, None, 50, _schema_pronoun),
    ("pronouns_fewshot", "schema", "language_understanding/pronouns_fs.jsonl", 2, " ", 50, _schema_pronoun),
    ("copy_words", "language_modeling", "symbolic_problem_solving/copy_words.jsonl", 4, "\nAnswer: ", 0, _lm_copy),
    ("last_word", "language_modeling", "language_understanding/last_word.jsonl", 0, None, 0, _lm_last_word),
]
LABELS = [task[0] for task in TASKS]


def examples(maker: Callable[[random.Random], dict], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for number in range(count):
        row = maker(rng)
        options = row.get("choices", row.get("context_options"))
        if options is not None:
            row["gold"] = rng.randrange(len(options))  # uniform, independent of the options
        row["id"] = number  # a field CORE does not read, as real files have
        rows.append(row)
    return rows


def write_bundle(directory: Path, per_task: int = 60) -> Path:
    """Writes directory/eval_bundle/ (per_task examples per task) and returns that folder."""
    root = directory / "eval_bundle"
    entries, meta = [], []
    for index, (label, task_type, uri, shots, delimiter, baseline, maker) in enumerate(TASKS):
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = examples(maker, per_task, seed=index)
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        entry = f"-\n  label: {label}\n  dataset_uri: {uri}\n  num_fewshot: [{shots}]\n  icl_task_type: {task_type}\n"
        if delimiter is not None:
            entry += f"  continuation_delimiter: {json.dumps(delimiter)}\n"
        entries.append(entry + "  has_categories: false\n")
        kind = task_type.replace("_", " ")
        meta.append(f'{label},generated,{kind},{shots},{per_task},{baseline},,"Generated {label}, for tests."\n')
    (root / "core.yaml").write_text("icl_tasks:\n" + "".join(entries), encoding="utf-8")
    header = "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
    unlisted = "not_in_core,generated,multiple choice,0,10,25,,A task core.yaml does not list.\n"
    (root / "eval_meta_data.csv").write_text(header + "".join(meta) + unlisted, encoding="utf-8")
    return root


def zip_folder(folder: Path, zip_path: Path, extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    """Zips folder under its own name (as eval_bundle.zip holds eval_bundle/), plus extra members."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
        for info, data in extra:
            archive.writestr(info, data)
    return zip_path


def bundle_texts(root: Path) -> list[str]:
    """Every string in the bundle's examples, to train a tokenizer that fits them."""
    texts = []
    for path in sorted((root / "eval_data").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            for value in json.loads(line).values():
                texts += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    return texts


class LogitModel(nn.Module):
    """The part of the model interface CORE uses (sequence_len, forward with and without targets)
    over a function from token ids [B, T] to logits [B, T, V]; records every batch it is given."""

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], sequence_len: int):
        super().__init__()
        self.logits = logits
        self.sequence_len = sequence_len
        self.batches: list[torch.Tensor] = []

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"):
        self.batches.append(idx.clone())
        logits = self.logits(idx)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)
        return loss.view_as(targets) if loss_reduction == "none" else loss


def uniform_model(vocab_size: int, sequence_len: int) -> LogitModel:
    """Every token equally likely everywhere: all options tie, and greedy decoding gives token 0."""
    return LogitModel(lambda idx: torch.zeros(*idx.shape, vocab_size), sequence_len)


def random_bigram_model(vocab_size: int, sequence_len: int, seed: int = 0) -> LogitModel:
    """Logits that depend on the current token through a fixed random table: options no longer tie,
    but nothing in the table knows which option is gold."""
    table = torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3.0
    return LogitModel(lambda idx: table[idx], sequence_len)


def oracle_model(
    gold_spans: dict[tuple[int, ...], tuple[int, int]], pad_id: int, vocab_size: int, sequence_len: int
) -> LogitModel:
    """Knows every gold row (the tokens of a gold prompt, as given to the model) and its continuation
    span [start, end). On a gold row it predicts the continuation's tokens confidently and every
    token before them confidently wrong, so only a scorer that reads exactly the continuation
    finds the gold row best; any other row gets uniform logits."""

    def logits(idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*idx.shape, vocab_size)
        for b, row in enumerate(idx.tolist()):
            length = len(row)
            while length > 1 and row[length - 1] == pad_id:  # right padding
                length -= 1
            span = gold_spans.get(tuple(row[:length]))
            if span is None:
                continue
            start, end = span
            for t in range(length - 1):
                right = t + 1 >= start and t + 1 < end
                out[b, t, row[t + 1] if right else (row[t + 1] + 1) % vocab_size] = 20.0
        return out

    return LogitModel(logits, sequence_len)


class FileServer:
    """Serves `files` (URL path -> bytes) on 127.0.0.1, 404 for anything else, and records each
    request as (method, path)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                server.requests.append((self.command, self.path))
                data = server.files.get(self.path)
                if data is None:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
