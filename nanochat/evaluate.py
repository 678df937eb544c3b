"""A trained model measured: python -m nanochat.evaluate <run dir or checkpoint> [key=value ...]

    python -m nanochat.evaluate outputs/my_run                                   # bpb, full CORE, samples
    python -m nanochat.evaluate outputs/my_run core.tasks=[hellaswag,arc_easy] core.max_per_task=500
    python -m nanochat.evaluate outputs/my_run data=fineweb_edu bpb.tokens=10485760 core.enabled=false
    torchrun --standalone --nproc_per_node=8 -m nanochat.evaluate outputs/my_run   # the same, on 8 GPUs

The keys and their defaults are in conf/tools/evaluate.yaml, overridden as in train.py; the model
and tokenizer come from the newest complete checkpoint at the path (nanochat.finished).

- Bits per byte (val/bpb) on the first bpb.tokens tokens of the validation split of the run's own
  corpus (its data node, as trained), or of the corpus data=<name> chooses: the rows training
  evaluates (ValidationRows), scored by evaluation.evaluate_bpb.
- CORE (core/metric, core/<task>, core_accuracy/<task>) with nanochat/core_eval.py on every task
  of the eval bundle or the ones core.tasks names, each on its first core.max_per_task examples
  after nanochat's shuffle (null: all of them, as nanochat's final CORE); prompts get the model's
  whole context as in training (core_eval.longest_prompt).
- Samples: the run's sample.prompts (or samples.prompts) continued with evaluation.sample_completions.
- Everything is checked before the first forward pass (the checkpoint, the corpus, the bundle and
  its tasks and caps); the result is a table on stdout and a JSON file, <checkpoint>/evaluation.json
  by default, written to a temporary file and renamed into place, so a failed or interrupted
  evaluation leaves no file and an earlier one as it was.
- Under torchrun every rank loads the model and scores every world_size-th validation row and CORE
  example (rank 0 prepares the corpus and fetches the bundle first, the others then find them
  ready); the sums are reduced over ranks, so the figures are one process's, up to the float
  rounding of a different batching of the rows. Rank 0 samples, prints and writes the JSON file.
"""

import datetime
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from omegaconf import OmegaConf

from nanochat.atomic import atomic_path
from nanochat.config import build, run_tool
from nanochat.core_eval import evaluate_core, fetch_bundle, longest_prompt, task_examples
from nanochat.data.loader import ValidationRows
from nanochat.device import check_available, resolve_device, resolve_dtype
from nanochat.distributed import is_main, main_first, rank, run_as_rank, together, world_size
from nanochat.errors import InvalidArgument, UserError, show
from nanochat.evaluation import evaluate_bpb, sample_completions
from nanochat.finished import Finished, load_finished
from nanochat.schema import check_core_source, settings_from

RESULT_FILE = "evaluation.json"


@dataclass
class BpbSettings:
    """conf/tools/evaluate.yaml's bpb node."""

    tokens: int | None  # null: the run's eval.tokens; 0: no bits per byte
    batch_size: int

    def __post_init__(self):
        if self.tokens is not None and self.tokens < 0:
            raise InvalidArgument("{tokens} must be >= 0 (0 skips bits per byte), or null.", tokens=self.tokens)
        if self.batch_size < 1:
            raise InvalidArgument("{batch_size} must be positive.", batch_size=self.batch_size)


@dataclass
class CoreSettings:
    """conf/tools/evaluate.yaml's core node."""

    enabled: bool
    tasks: list[str] | None  # null: every task of the bundle
    max_per_task: int | None  # null: every example
    bundle: str
    sha256: str | None
    cache_dir: str

    def __post_init__(self):
        check_core_source(self.bundle, self.sha256, self.max_per_task, names=("bundle", "sha256", "max_per_task"))
        if self.tasks is not None and not self.tasks:
            raise InvalidArgument(
                "{tasks} names no task: list some, null for all of them, or set core.enabled=false.", tasks=self.tasks
            )


@dataclass
class SamplesSettings:
    """conf/tools/evaluate.yaml's samples node."""

    prompts: list[str] | None  # null: the run's sample.prompts
    tokens: int
    temperature: float
    top_k: int | None
    seed: int

    def __post_init__(self):
        if self.tokens < 1:
            raise InvalidArgument("{tokens} must be positive.", tokens=self.tokens)
        if self.temperature < 0:
            raise InvalidArgument("{temperature} must be >= 0 (0 is greedy).", temperature=self.temperature)
        if self.top_k is not None and self.top_k < 1:
            raise InvalidArgument("{top_k} must be positive, or null for no cut.", top_k=self.top_k)


@dataclass
class EvaluateSettings:
    """conf/tools/evaluate.yaml's top-level keys (data, a corpus node, is taken out before)."""

    bpb: dict
    core: dict
    samples: dict
    out: str | None
    device: Literal["auto", "cpu", "cuda", "mps"]
    dtype: Literal["auto", "float32", "bfloat16"]


@dataclass
class Plan:
    """What will be evaluated, every part checked and loaded, before the first forward pass."""

    finished: Finished
    device: torch.device
    dtype: torch.dtype
    out: Path
    rows: ValidationRows | None = None
    data: dict | None = None  # the corpus node bpb reads
    bundle: object = None  # core_eval.EvalBundle
    tasks: list | None = None  # core_eval.Task
    prompts: list[str] | None = None


def _device(name: str) -> torch.device:
    check_available(name, "device")
    return resolve_device(name)


def _validation_rows(finished: Finished, bpb: BpbSettings, data: dict | None) -> tuple[ValidationRows, dict]:
    trained = finished.config
    tokens = bpb.tokens if bpb.tokens is not None else trained.get("eval", {}).get("tokens")
    if tokens is None:
        raise UserError(f"checkpoint {finished.path} records no eval.tokens: give bpb.tokens=<tokens>.")
    sequence_len = finished.model.sequence_len
    if tokens < sequence_len:
        raise UserError(f"bpb.tokens={tokens} is less than one row of the model's sequence_len={sequence_len} tokens.")
    node = data if data is not None else trained.get("data")
    if node is None:
        raise UserError(
            f"checkpoint {finished.path} records no data corpus: choose one with data=<name> (conf/data/), "
            "or skip bits per byte with bpb.tokens=0."
        )
    corpus = build("data", OmegaConf.create(node))
    corpus.prepare()
    rows = ValidationRows(corpus.files("val"), finished.tokenizer, tokens // sequence_len, sequence_len)
    return rows, node


def _core_tasks(bundle, core: CoreSettings) -> list:
    unknown = [label for label in core.tasks or [] if label not in bundle.tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(bundle.tasks), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(
            f"core.tasks={show(core.tasks)} names {unknown[0]!r}, which the eval bundle at {bundle.root} does not "
            f"have{hint}; its tasks are {', '.join(bundle.tasks)}."
        )
    tasks = bundle.select(core.tasks)
    for task in tasks:
        try:
            task_examples(bundle, task, core.max_per_task)
        except UserError as error:  # too few examples for the task's few-shot draw
            raise UserError(str(error).replace("(max_per_task=", "(core.max_per_task=")) from None
    return tasks


def plan(location: str, config: dict) -> tuple[Plan, BpbSettings, CoreSettings, SamplesSettings]:
    """Every setting checked, the checkpoint loaded, the validation rows read and the bundle
    fetched; a mistake in any of them is one UserError, before any evaluation runs."""
    config = dict(config)
    data = config.pop("data", None)
    settings = settings_from(EvaluateSettings, config)
    bpb = settings_from(BpbSettings, settings.bpb, "bpb")
    core = settings_from(CoreSettings, settings.core, "core")
    samples = settings_from(SamplesSettings, settings.samples, "samples")
    device = _device(settings.device)
    dtype, _ = resolve_dtype(settings.dtype, device)  # auto: bf16 on CUDA, fp32 elsewhere (nothing measured)
    finished = load_finished(location, device)
    out = Path(settings.out).expanduser() if settings.out else finished.path / RESULT_FILE
    if out.is_dir():
        raise UserError(f"out={settings.out} is a folder; give the path of the JSON file to write.")
    result = Plan(finished, device, dtype, out)
    if bpb.tokens != 0:
        result.rows, result.data = _validation_rows(finished, bpb, data)
    if core.enabled:
        result.bundle = fetch_bundle(core.bundle, cache_dir=core.cache_dir, sha256=core.sha256)
        result.tasks = _core_tasks(result.bundle, core)
    prompts = samples.prompts
    if prompts is None:
        prompts = finished.config.get("sample", {}).get("prompts", [])
    result.prompts = list(prompts)
    return result, bpb, core, samples


def evaluate(location: str, config: dict) -> dict:
    """Runs the evaluation conf/tools/evaluate.yaml's keys (config, resolved) describe on the
    checkpoint at location; returns what it writes to the JSON file, after writing it."""
    p, bpb, core, samples = main_first("preparing the evaluation", lambda: plan(location, config))
    model, tokenizer = p.finished.model, p.finished.tokenizer
    metrics: dict[str, float] = {}
    details: dict = {}
    if p.rows is not None:
        batches = p.rows.batches(rank(), world_size(), bpb.batch_size)
        metrics["val/bpb"] = evaluate_bpb(model, batches, tokenizer.token_bytes(), p.device, p.dtype)
        details["bpb"] = {
            "tokens": len(p.rows) * model.sequence_len,
            "rows": len(p.rows),
            "data": p.data,
        }
    if p.bundle is not None:
        labels = [task.label for task in p.tasks]
        max_len = longest_prompt(model)
        metrics.update(
            evaluate_core(
                model,
                tokenizer,
                p.bundle,
                p.device,
                p.dtype,
                tasks=labels,
                max_per_task=core.max_per_task,
                max_len=max_len,
            )
        )
        details["core"] = {
            "bundle": str(p.bundle.root),
            "source": core.bundle,
            "tasks": labels,
            "max_per_task": core.max_per_task,
            "examples": {task.label: len(task_examples(p.bundle, task, core.max_per_task)) for task in p.tasks},
            "max_len": max_len,
        }
    completions = []
    if p.prompts and is_main():
        completions = sample_completions(
            model,
            tokenizer,
            p.prompts,
            samples.tokens,
            temperature=samples.temperature,
            top_k=samples.top_k,
            seed=samples.seed,
            device=p.device,
            dtype=p.dtype,
        )
    result = {
        "checkpoint": str(p.finished.path),
        "step": p.finished.step,
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(p.device),
        "dtype": str(p.dtype).removeprefix("torch."),
        "ranks": world_size(),
        "metrics": metrics,
        **details,
        "samples": [{"prompt": prompt, "completion": completion} for prompt, completion in completions],
        "settings": config,
    }
    # together: a file rank 0 cannot write stops every rank with its sentence, not just rank 0
    with together("writing the result"):
        if is_main():
            _write_json(p.out, result)
    if is_main():
        print(table(result))
        print(f"written to {p.out}")
    return result


def table(result: dict) -> str:
    """The console report: one row per metric, then the samples."""
    metrics = result["metrics"]
    ranks = f", {result['ranks']} ranks" if result["ranks"] > 1 else ""
    lines = [f"{result['checkpoint']} (step {result['step']}, {result['device']}, {result['dtype']}{ranks})"]
    rows = []
    if "val/bpb" in metrics:
        bpb = result["bpb"]
        rows.append(("val/bpb", f"{metrics['val/bpb']:.4f}", f"{bpb['tokens']:,} validation tokens"))
    if "core/metric" in metrics:
        core = result["core"]
        rows.append(
            ("core/metric", f"{metrics['core/metric']:.4f}", f"mean centered accuracy of {len(core['tasks'])} tasks")
        )
        for label in core["tasks"]:
            rows.append(
                (
                    f"core/{label}",
                    f"{metrics[f'core/{label}']:.4f}",
                    f"accuracy {metrics[f'core_accuracy/{label}']:.4f} on {core['examples'][label]:,} examples",
                )
            )
    if rows:
        width = max(len(name) for name, _, _ in rows)
        lines += [f"  {name:<{width}}  {value:>8}  {detail}" for name, value, detail in rows]
    for sample in result["samples"]:
        lines.append(f"  sample | {sample['prompt']!r} -> {sample['completion']!r}")
    return "\n".join(lines)


def _write_json(path: Path, result: dict) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}.") from None


def main(location: str, config: dict) -> None:
    evaluate(location, config)


if __name__ == "__main__":
    run_as_rank(lambda: run_tool("evaluate", main))
