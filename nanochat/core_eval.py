"""CORE, the DCLM paper's in-context-learning metric (arXiv 2406.11794), computed as nanochat computes
it (nanochat/core_eval.py and scripts/base_eval.py at commit 10231df): the same prompts, the same
few-shot draws, the same tokens scored, so a checkpoint gets the number nanochat would give it.

- The eval bundle (nanochat's eval_bundle.zip, unpacked) holds core.yaml (the task list under
  `icl_tasks`: label, icl_task_type, dataset_uri, num_fewshot as a one-element list, optional
  continuation_delimiter defaulting to " "), eval_data/<dataset_uri> (one JSON example per line)
  and eval_meta_data.csv (the "Random baseline" of each "Eval Task", in percent).
- Task types: multiple_choice ({query, choices, gold}: one prompt per choice), schema
  ({context_options, continuation, gold}: one prompt per context, the continuation shared) and
  language_modeling ({context, continuation}: right only if greedy decoding reproduces it).
- A task's examples are shuffled with random.Random(1337) (the files are often ordered), then
  max_per_task keeps the first N; few-shot examples are drawn from those N, for example idx by
  random.Random(1234 + idx).sample(every other index, num_fewshot).
- A prompt is its few-shot examples, each "<context><delimiter><answer>\\n\\n", then the example
  itself; language_modeling contexts are stripped of surrounding whitespace, and so is its prompt
  without the continuation.
- Tokens: BOS, then the prompt. The scored continuation is what follows the choices' common token
  prefix (multiple_choice), the contexts' common token suffix (schema), or what the prompt with
  the continuation adds to the prompt without it (language_modeling). A prompt longer than the
  model's context keeps its last tokens. All prompts of one example go through the model in one
  batch, right-padded with BOS.
- Scoring: the choice with the lowest mean cross-entropy over its continuation tokens is the
  prediction (ties: the first choice); a language_modeling example is right when the argmax at
  every continuation position is the next token.
- Centered accuracy = (accuracy - b) / (1 - b) with b the random baseline as a fraction: 0 is
  chance, 1 is perfect. CORE is the mean of the centered accuracies over the tasks.
- Under torchrun, rank r evaluates examples r, r + world_size, ...; the per-example results are
  summed over ranks, so every rank returns the single-process numbers.

    bundle = fetch_bundle(cache_dir="~/.cache/nanochat-hydra")     # nanochat's bundle, once
    metrics = evaluate_core(model, tokenizer, bundle, device, max_per_task=500)
    metrics["core/metric"], metrics["core/hellaswag"], metrics["core_accuracy/hellaswag"]

The tokenizer needs encode(text) -> ids and bos_id (nanochat/tokenizer.py's Tokenizer); the model
the forward() and sequence_len of nanochat/interface.py.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import fcntl
import hashlib
import json
import os
import random
import shutil
import stat
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
import yaml

from nanochat.atomic import replace_folder
from nanochat.data.download import fetch_url
from nanochat.device import autocast
from nanochat.distributed import all_reduce_sum_, is_main, rank, world_size
from nanochat.errors import InvalidArgument, UserError
from nanochat.logs import log

# nanochat's copy of the DCLM eval bundle (~162 MB), as scripts/base_eval.py downloads it. nanochat
# publishes no checksum for it, so none is pinned by default: fetch_bundle(sha256=...) pins one.
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_DELIMITER = " "
SHUFFLE_SEED = 1337  # nanochat's shuffle of each task's examples
FEWSHOT_SEED = 1234  # nanochat's few-shot draw for example idx uses FEWSHOT_SEED + idx
CONFIG_FILE = "core.yaml"
DATA_DIR = "eval_data"
META_FILE = "eval_meta_data.csv"
# Written into an unpacked bundle: where it came from, so a later fetch knows whether it is reusable.
SOURCE_FILE = ".nanochat-hydra-source.json"

# The fields each task type's examples must have, with their types.
_FIELDS = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}
_OPTIONS = {"multiple_choice": "choices", "schema": "context_options"}  # what gold indexes


# ---------------------------------------------------------------------------------------------
# The bundle


@dataclass(frozen=True)
class Task:
    """One entry of core.yaml, with its random baseline from eval_meta_data.csv."""

    label: str
    task_type: str  # one of TASK_TYPES
    dataset_uri: str  # relative to <bundle>/eval_data
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent, as the csv writes it


class EvalBundle:
    """An unpacked eval bundle: its tasks in core.yaml's order; examples are read on demand."""

    def __init__(self, root: Path, tasks: list[Task]):
        self.root = root
        self.tasks = {task.label: task for task in tasks}
        # Parsed once: a trainer evaluates CORE every few hundred steps, the files do not change.
        self._examples: dict[str, list[dict]] = {}

    @classmethod
    def load(cls, root: str | os.PathLike) -> EvalBundle:
        """Reads core.yaml and eval_meta_data.csv; a missing or malformed part is one sentence."""
        root = Path(root).expanduser()
        config_path, meta_path = root / CONFIG_FILE, root / META_FILE
        for path in (config_path, meta_path):
            if not path.is_file():
                raise UserError(f"{root} is not an eval bundle: it has no {path.name}.")
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise UserError(f"Eval bundle file {config_path} is not valid YAML ({_first_line(error)}).") from None
        entries = config.get("icl_tasks") if isinstance(config, dict) else None
        if not isinstance(entries, list) or not entries:
            raise UserError(f"Eval bundle file {config_path} has no icl_tasks list.")
        baselines = _read_baselines(meta_path)
        tasks: list[Task] = []
        for number, entry in enumerate(entries, 1):
            task = _parse_task(entry, number, config_path, baselines, meta_path)
            if any(task.label == other.label for other in tasks):
                raise UserError(f"Eval bundle file {config_path} lists task {task.label!r} twice.")
            if not (root / DATA_DIR / task.dataset_uri).is_file():
                raise UserError(
                    f"Eval bundle task {task.label!r} has no data file {root / DATA_DIR / task.dataset_uri}."
                )
            tasks.append(task)
        return cls(root, tasks)

    def select(self, labels: list[str] | None = None) -> list[Task]:
        """The tasks named (all of them for None), in the order given; an unknown name is one
        sentence with the closest labels, or all of them."""
        if labels is None:
            return list(self.tasks.values())
        if isinstance(labels, str) or not labels:
            raise InvalidArgument("{tasks} must be a list of at least one task label, or null for all.", tasks=labels)
        unknown = [label for label in labels if label not in self.tasks]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.tasks), n=3)
            known = (
                "did you mean " + " or ".join(close) + "?" if close else "its tasks are " + ", ".join(self.tasks) + "."
            )
            raise UserError(f"CORE task {unknown[0]!r} is not in the eval bundle at {self.root}; {known}")
        return [self.tasks[label] for label in labels]

    def examples(self, task: Task) -> list[dict]:
        """The task's examples in file order, each checked for its type's fields (a new list each
        call; the examples themselves are shared and must not be changed)."""
        if task.label not in self._examples:
            self._examples[task.label] = self._read_examples(task)
        return list(self._examples[task.label])

    def _read_examples(self, task: Task) -> list[dict]:
        path = self.root / DATA_DIR / task.dataset_uri
        examples = []
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    example = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(f"Eval bundle file {path} line {number} is not valid JSON ({error.msg}).") from None
                problem = _example_problem(example, task.task_type)
                if problem:
                    raise UserError(
                        f"Eval bundle file {path} line {number} is not a {task.task_type} example: {problem}."
                    )
                examples.append(example)
        if not examples:
            raise UserError(f"Eval bundle file {path} holds no examples.")
        return examples


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


def _read_baselines(meta_path: Path) -> dict[str, float]:
    try:
        with open(meta_path, encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file))
        return {row["Eval Task"]: float(row["Random baseline"]) for row in rows}
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(
            f"Eval bundle file {meta_path} needs an 'Eval Task' and a numeric 'Random baseline' column "
            f"in every row ({type(error).__name__}: {error})."
        ) from None


def _parse_task(entry, number: int, config_path: Path, baselines: dict[str, float], meta_path: Path) -> Task:
    where = f"Eval bundle file {config_path}, task {number}"
    if not isinstance(entry, dict):
        raise UserError(f"{where} is not a mapping.")
    for key in ("label", "icl_task_type", "dataset_uri", "num_fewshot"):
        if key not in entry:
            raise UserError(f"{where} has no {key}.")
    label, task_type, uri = entry["label"], entry["icl_task_type"], entry["dataset_uri"]
    if not isinstance(label, str) or not label:
        raise UserError(f"{where} has label {label!r}, which is not a name.")
    where = f"Eval bundle file {config_path}, task {label!r}"
    if task_type not in TASK_TYPES:
        raise UserError(f"{where} has icl_task_type {task_type!r}; CORE knows {', '.join(TASK_TYPES)}.")
    parts = PurePosixPath(uri).parts if isinstance(uri, str) else ()
    if not parts or uri.startswith(("/", "\\")) or any(part == ".." or "\\" in part for part in parts):
        raise UserError(f"{where} has dataset_uri {uri!r}, which is not a relative path inside {DATA_DIR}/.")
    # core.yaml writes num_fewshot as a list (DCLM sweeps several); nanochat uses the first.
    shots = entry["num_fewshot"]
    shots = shots[0] if isinstance(shots, list) and shots else shots
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise UserError(f"{where} has num_fewshot {entry['num_fewshot']!r}, not a count of examples.")
    delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
    if not isinstance(delimiter, str):
        raise UserError(f"{where} has continuation_delimiter {delimiter!r}, which is not a string.")
    if label not in baselines:
        raise UserError(f"Eval bundle file {meta_path} has no random baseline for task {label!r}.")
    if not 0 <= baselines[label] < 100:
        raise UserError(f"Eval bundle file {meta_path} gives task {label!r} the random baseline {baselines[label]}%.")
    return Task(label, task_type, uri, shots, delimiter, baselines[label])


def _example_problem(example, task_type: str) -> str | None:
    """Why example is not one of task_type's examples, or None."""
    if not isinstance(example, dict):
        return "it is not a JSON object"
    for field, kind in _FIELDS[task_type].items():
        value = example.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"its {field} is {value!r}, not a{'n' if kind is int else ''} {kind.__name__}"
    options = example.get(_OPTIONS.get(task_type))
    if task_type in _OPTIONS:
        if not options or not all(isinstance(option, str) for option in options):
            return "its options are not a non-empty list of strings"
        if not 0 <= example["gold"] < len(options):
            return f"its gold {example['gold']} is not the index of one of its {len(options)} options"
    return None


# ---------------------------------------------------------------------------------------------
# Fetching the bundle


def fetch_bundle(
    source: str | os.PathLike = EVAL_BUNDLE_URL,
    *,
    cache_dir: str | os.PathLike,
    sha256: str | None = None,
    show_progress: bool = True,
) -> EvalBundle:
    """The eval bundle from source: an http(s) URL of a zip, a local .zip, or an unpacked folder.

    A zip is unpacked into cache_dir/<its name without .zip>/, atomically (into a temporary folder
    renamed into place once complete and readable); a later call with the same URL, or the same
    local zip unchanged, reuses it without a download or an unpack. A URL is downloaded into
    cache_dir with the project's downloader (retries, resume) and deleted once unpacked. sha256,
    when given, pins the zip: a different one is one sentence naming both, and a downloaded file
    that fails it is deleted. Member paths that would leave the folder (absolute, or with ..) and
    links refuse the whole zip. A folder is used in place. Under torchrun call it on one rank
    first (distributed.main_first): the others then find the cache.
    """
    pinned = _checked_sha256(sha256)
    cache_dir = Path(cache_dir).expanduser()
    text = os.fspath(source)
    if urllib.parse.urlsplit(text).scheme in ("http", "https"):
        return _fetch_url_bundle(text, cache_dir, pinned, show_progress)
    if "://" in text:
        raise UserError(f"source={text!r} is not an http:// or https:// URL; downloads accept only those.")
    path = Path(text).expanduser()
    if path.is_dir():
        return EvalBundle.load(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with _locked(cache_dir):
            got = _sha256_of(path)
            if pinned and got != pinned:
                raise UserError(f"Eval bundle {path} has sha256 {got}, not the expected {pinned}.")
            target = cache_dir / _stem(path.name)
            origin = {"source": str(path.resolve()), "sha256": got}
            if _read_origin(target) == origin:
                return EvalBundle.load(target)
            return _unpack(path, target, origin)
    raise UserError(f"source={text!r} is neither an http(s) URL, a .zip file nor an eval bundle folder.")


def _fetch_url_bundle(url: str, cache_dir: Path, pinned: str | None, show_progress: bool) -> EvalBundle:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not name or name in (".", "..") or "\\" in name:
        name = "eval_bundle.zip"
    target = cache_dir / _stem(name)
    with _locked(cache_dir):
        origin = _read_origin(target)
        if origin is not None and origin["source"] == url and pinned in (None, origin["sha256"]):
            return EvalBundle.load(target)
        archive = fetch_url(
            url, cache_dir / name, zipfile.is_zipfile, "zip", "check the eval bundle's URL", show_progress=show_progress
        )
        got = _sha256_of(archive)
        if pinned and got != pinned:
            archive.unlink()
            raise UserError(f"{url} sent an eval bundle with sha256 {got}, not the expected {pinned}; it was deleted.")
        bundle = _unpack(archive, target, {"source": url, "sha256": got})
        archive.unlink()
        return bundle


def _checked_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
        raise InvalidArgument("{sha256} is not a sha256 digest (64 hex digits).", sha256=sha256)
    return sha256.lower()


def _stem(name: str) -> str:
    return name[: -len(".zip")] if name.lower().endswith(".zip") and len(name) > 4 else name + ".unpacked"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One fetch per cache dir at a time: a second process waits, then finds the bundle unpacked."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".eval_bundle.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_origin(target: Path) -> dict | None:
    try:
        origin = json.loads((target / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return origin if isinstance(origin, dict) and {"source", "sha256"} <= set(origin) else None


def _member_parts(member: zipfile.ZipInfo, archive: Path) -> tuple[str, ...]:
    """The member's path inside the unpack folder, refusing one that could end up outside it or is
    not a plain file or folder (a link would make later writes or readers follow it elsewhere)."""
    name = member.filename
    kind = stat.S_IFMT(member.external_attr >> 16)  # Unix file type, 0 when written elsewhere
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if kind == stat.S_IFLNK else "not a plain file or folder"
        raise UserError(f"Zip {archive} member {name!r} is {what}; eval bundles may hold only files and folders.")
    parts = tuple(part for part in name.replace("\\", "/").split("/") if part not in ("", "."))
    windows = PureWindowsPath(name)  # also catches "/x", "\\x" and "C:x"
    if windows.drive or windows.root or ".." in parts or "\0" in name:
        raise UserError(f"Zip {archive} member {name!r} would be written outside the folder it is unpacked into.")
    return parts


def _unpack(archive: Path, target: Path, origin: dict) -> EvalBundle:
    """Unpacks archive next to target, checks it is a bundle, then renames it to target."""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir(parents=True)
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = [(member, _member_parts(member, archive)) for member in zf.infolist()]
                for member, parts in members:
                    if not parts:
                        continue
                    destination = staging.joinpath(*parts)
                    if member.is_dir():
                        destination.mkdir(parents=True, exist_ok=True)
                        continue
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(destination, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as error:
            raise UserError(f"Zip {archive} cannot be unpacked ({error}).") from None
        # nanochat's zip holds one folder, eval_bundle/; a zip of the files themselves works too.
        roots = (
            [staging]
            if (staging / CONFIG_FILE).is_file()
            else [d for d in staging.iterdir() if (d / CONFIG_FILE).is_file()]
        )
        if len(roots) != 1:
            raise UserError(
                f"Zip {archive} is not an eval bundle: no {CONFIG_FILE} at its top or in one top-level folder."
            )
        EvalBundle.load(roots[0])
        (roots[0] / SOURCE_FILE).write_text(json.dumps(origin), encoding="utf-8")
        replace_folder(roots[0], target)  # a bundle from another source or zip is replaced
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return EvalBundle.load(target)


# ---------------------------------------------------------------------------------------------
# Prompts and tokens


def task_examples(bundle: EvalBundle, task: Task, max_per_task: int | None = None) -> list[dict]:
    """The examples CORE evaluates: shuffled with nanochat's seed, then the first max_per_task."""
    if max_per_task is not None and (not isinstance(max_per_task, int) or max_per_task < 1):
        raise InvalidArgument(
            "{max_per_task} must be a positive integer, or null for every example.", max_per_task=max_per_task
        )
    data = bundle.examples(task)
    random.Random(SHUFFLE_SEED).shuffle(data)
    data = data[:max_per_task]
    if task.num_fewshot >= len(data):
        raise UserError(
            f"CORE task {task.label!r} draws {task.num_fewshot} few-shot examples from the others, so it needs at "
            f"least {task.num_fewshot + 1} examples; it has {len(data)} (max_per_task={max_per_task})."
        )
    return data


def fewshot_indices(num_examples: int, idx: int, num_fewshot: int) -> list[int]:
    """nanochat's draw: a generator seeded by the example's index picks from every other index."""
    if num_fewshot == 0:
        return []
    others = [i for i in range(num_examples) if i != idx]
    return random.Random(FEWSHOT_SEED + idx).sample(others, num_fewshot)


def render_prompts(task: Task, item: dict, fewshot: list[dict]) -> list[str]:
    """The prompts of one example: one per choice (multiple_choice), one per context (schema), or
    without and with the continuation (language_modeling), each after the few-shot examples."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{d}{item['continuation']}" for context in item["context_options"]]
    shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
    prompt = f"{shots}{item['context'].strip()}{d}"
    # Stripped so that whitespace the continuation's first token would absorb (the delimiter's
    # trailing space) is not a token of its own: the prompt's tokens are then a prefix of the
    # tokens of the prompt with the continuation.
    return [prompt.strip(), prompt + item["continuation"]]


@dataclass
class PreparedExample:
    """The token rows of one example and, per row, the continuation's token span [start, end)."""

    tokens: list[list[int]]
    starts: list[int]
    ends: list[int]


def prepare_example(task: Task, data: list[dict], idx: int, tokenizer, max_len: int) -> PreparedExample:
    """data[idx]'s prompts as tokens, with their continuations located and, when longer than
    max_len, their oldest tokens dropped."""
    fewshot = [data[i] for i in fewshot_indices(len(data), idx, task.num_fewshot)]
    prompts = render_prompts(task, data[idx], fewshot)
    rows = [[tokenizer.bos_id, *tokenizer.encode(prompt)] for prompt in prompts]
    if task.task_type == "multiple_choice":
        start = _common_length(rows)  # the choices share the context: what follows differs
        example = PreparedExample(rows, [start] * len(rows), [len(row) for row in rows])
    elif task.task_type == "schema":
        shared = _common_length([row[::-1] for row in rows])  # the contexts differ: the shared tail is scored
        example = PreparedExample(rows, [len(row) - shared for row in rows], [len(row) for row in rows])
    else:
        without, with_ = rows
        if not len(without) < len(with_) or with_[: len(without)] != without:
            raise UserError(
                f"CORE task {task.label!r}, example {idx}: the prompt without its continuation does not tokenize "
                "to a prefix of the prompt with it, so the continuation's tokens cannot be located."
            )
        example = PreparedExample([with_], [len(without)], [len(with_)])
    return _crop(example, max_len, task, idx)


def _common_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share."""
    length = 0
    for column in zip(*rows):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def _crop(example: PreparedExample, max_len: int, task: Task, idx: int) -> PreparedExample:
    """Keeps each row's last max_len tokens, moving its span with it. The token before the span
    must stay: its logits predict the first continuation token."""
    cropped = PreparedExample([], [], [])
    for row, start, end in zip(example.tokens, example.starts, example.ends):
        drop = max(len(row) - max_len, 0)
        if start - drop < 1:
            raise UserError(
                f"CORE task {task.label!r}, example {idx}: its continuation of {end - start} tokens leaves no token "
                f"before it within the model's context of {max_len} tokens."
            )
        cropped.tokens.append(row[drop:])
        cropped.starts.append(start - drop)
        cropped.ends.append(end - drop)
    return cropped


# ---------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def is_correct(model, example: PreparedExample, task_type: str, gold: int | None, pad_id: int, device, dtype) -> bool:
    """Runs the example's rows through the model as one right-padded batch and scores them."""
    width = max(len(row) for row in example.tokens)
    ids = torch.full((len(example.tokens), width), pad_id, dtype=torch.long)
    for i, row in enumerate(example.tokens):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    ids = ids.to(device)
    if task_type == "language_modeling":
        with autocast(device, dtype):
            logits = model(ids)
        (start,), (end,) = example.starts, example.ends
        # logits at position t predict token t + 1
        return torch.equal(logits[0, start - 1 : end - 1].argmax(dim=-1), ids[0, start:end])
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -1  # nothing follows the last position
    with autocast(device, dtype):
        losses = model(ids, targets, loss_reduction="none").float().cpu()
    mean_losses = [
        losses[i, start - 1 : end - 1].mean().item() for i, (start, end) in enumerate(zip(example.starts, example.ends))
    ]
    prediction = min(range(len(mean_losses)), key=mean_losses.__getitem__)  # the first of equal losses
    return prediction == gold


def evaluate_task(
    model, tokenizer, task: Task, data: list[dict], device, dtype=torch.float32, max_len: int | None = None
) -> float:
    """Accuracy on data (as task_examples returns it), this rank taking every world_size-th example."""
    max_len = model.sequence_len if max_len is None else max_len
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank(), len(data), world_size()):
        example = prepare_example(task, data, idx, tokenizer, max_len)
        correct[idx] = float(
            is_correct(model, example, task.task_type, data[idx].get("gold"), tokenizer.bos_id, device, dtype)
        )
    all_reduce_sum_(correct)
    return correct.mean().item()


def centered(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1; random_baseline in percent."""
    chance = 0.01 * random_baseline
    return (accuracy - chance) / (1.0 - chance)


def longest_prompt(model) -> int:
    """The max_len that gives model nanochat's prompts: its context_len when it declares one (GPT's
    rotary table, 10 x sequence_len, on which nanochat runs its own GPT uncropped), else its
    sequence_len. The trainer and python -m nanochat.evaluate pass it to evaluate_core."""
    return getattr(model, "context_len", None) or model.sequence_len


def evaluate_core(
    model,
    tokenizer,
    bundle: EvalBundle,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    tasks: list[str] | None = None,
    max_per_task: int | None = None,
    max_len: int | None = None,
) -> dict[str, float]:
    """CORE of model over the bundle's tasks (or the named ones), each capped at max_per_task examples.

    Returns {"core/metric": CORE, "core/<label>": centered accuracy, "core_accuracy/<label>":
    accuracy}, the same on every rank. max_len (default model.sequence_len) is the longest prompt
    the model is given. nanochat crops only models that declare a maximum and runs its own GPT,
    whose rotary table covers 10x its training length, on longer prompts: max_len=10 *
    sequence_len reproduces that for this project's GPT. Rank 0 prints one line per task.
    """
    selected = bundle.select(tasks)
    if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
        raise InvalidArgument(
            "{max_len} must be an integer of at least 2 tokens, or null for model.sequence_len.", max_len=max_len
        )
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        for task in selected:
            start = time.perf_counter()
            data = task_examples(bundle, task, max_per_task)
            accuracy = evaluate_task(model, tokenizer, task, data, device, dtype, max_len)
            metrics[f"core/{task.label}"] = centered(accuracy, task.random_baseline)
            metrics[f"core_accuracy/{task.label}"] = accuracy
            if is_main():
                log.info(
                    f"CORE {task.label}: accuracy {accuracy:.4f}, centered {metrics[f'core/{task.label}']:.4f} "
                    f"({len(data)} examples, {task.num_fewshot}-shot {task.task_type}) in "
                    f"{time.perf_counter() - start:.1f}s"
                )
    finally:
        model.train(was_training)
    metrics["core/metric"] = sum(metrics[f"core/{task.label}"] for task in selected) / len(selected)
    return metrics
