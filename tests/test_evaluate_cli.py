"""`python -m nanochat.evaluate` on a tiny finished run, in this process: the JSON's val bpb, CORE
and samples equal what the library's own functions give on the same rows, tasks and prompts, and
every mistake is one sentence with exit code 2 and no JSON file written."""

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from core_bundle import LABELS, FileServer, write_bundle, zip_folder
from omegaconf import OmegaConf
from runs import REPO, SUBPROCESSES_ALLOWED, checkpoint_of, train
from test_model import random_model
from test_train import fake_corpus_overrides, tiny_run_overrides

from nanochat.config import build, run_tool
from nanochat.core_eval import EvalBundle, evaluate_core
from nanochat.data.loader import ValidationRows
from nanochat.evaluate import main as evaluate_main
from nanochat.evaluation import evaluate_bpb, sample_completions
from nanochat.finished import load_finished
from nanochat.model import GPTConfig

CPU = torch.device("cpu")
SEQUENCE_LEN = 64  # tiny_run_overrides' model.sequence_len


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle"), per_task=20)


@pytest.fixture(scope="module")
def run_dir(shakespeare_data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    overrides = ["trainer.num_iterations=3", "eval.every=-1", "system.dtype=float32"]
    train(*tiny_run_overrides(shakespeare_data_dir, *overrides), run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def untrained_dir(shakespeare_tokenizer, tmp_path_factory):
    """A checkpoint with no training config: no data node, no eval.tokens, no sample prompts."""
    config = GPTConfig(
        sequence_len=32, vocab_size=shakespeare_tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32
    )
    node = {"_target_": "nanochat.model.GPT", **asdict(config)}
    return checkpoint_of(
        tmp_path_factory.mktemp("untrained") / "run", node, random_model(config), shakespeare_tokenizer
    )


def evaluate_cli(*argv) -> None:
    run_tool("evaluate", evaluate_main, [str(a) for a in argv])


def result_of(run_dir) -> dict:
    return json.loads((load_finished(run_dir).path / "evaluation.json").read_text(encoding="utf-8"))


def test_bpb_core_and_samples_equal_the_library_functions_on_the_same_rows_tasks_and_prompts(
    run_dir, bundle_root, tmp_path, capsys
):
    tasks = ["capitals", "pronouns", "copy_words"]
    evaluate_cli(
        run_dir,
        "bpb.tokens=1024",
        "bpb.batch_size=4",
        f"core.bundle={bundle_root}",
        f"core.tasks=[{','.join(tasks)}]",
        "core.max_per_task=10",
        "samples.prompts=[The king,ROMEO.]",
        "samples.tokens=6",
        "device=cpu",
    )
    result = result_of(run_dir)
    finished = load_finished(run_dir)
    model, tokenizer = finished.model, finished.tokenizer
    # bits per byte: the run's validation split, its first 1024 tokens as 64-token rows
    corpus = build("data", OmegaConf.create(finished.config["data"]))
    rows = ValidationRows(corpus.files("val"), tokenizer, 1024 // SEQUENCE_LEN, SEQUENCE_LEN)
    expected_bpb = evaluate_bpb(model, rows.batches(0, 1, 16), tokenizer.token_bytes(), CPU, torch.float32)
    assert result["metrics"]["val/bpb"] == pytest.approx(expected_bpb, rel=1e-9)
    assert result["bpb"]["tokens"] == 1024 and result["bpb"]["data"] == finished.config["data"]
    # CORE: the chosen tasks only, as evaluate_core gives them
    expected_core = evaluate_core(
        model, tokenizer, EvalBundle.load(bundle_root), CPU, tasks=tasks, max_per_task=10, max_len=10 * SEQUENCE_LEN
    )
    core_keys = {key for key in result["metrics"] if key.startswith("core")}
    assert core_keys == set(expected_core) and {key: result["metrics"][key] for key in core_keys} == expected_core
    assert result["core"]["tasks"] == tasks and result["core"]["examples"] == {task: 10 for task in tasks}
    # samples: greedy continuations of the prompts given
    expected_samples = sample_completions(
        model, tokenizer, ["The king", "ROMEO."], 6, temperature=0.0, top_k=50, seed=0, device=CPU, dtype=torch.float32
    )
    assert [(s["prompt"], s["completion"]) for s in result["samples"]] == expected_samples
    assert result["step"] == 3 and result["checkpoint"] == str(finished.path)
    out = capsys.readouterr().out
    assert re.search(rf"val/bpb\s+{result['metrics']['val/bpb']:.4f}\s+1,024 validation tokens", out)
    assert re.search(rf"core/metric\s+{expected_core['core/metric']:.4f}", out)
    for task in tasks:
        assert re.search(rf"core/{task}\s+{expected_core[f'core/{task}']:.4f}\s+accuracy", out)
    assert f"written to {finished.path / 'evaluation.json'}" in out


def test_defaults_take_the_runs_eval_tokens_and_prompts_and_every_task(run_dir, bundle_root, tmp_path):
    out = tmp_path / "reports" / "all.json"
    evaluate_cli(run_dir, f"core.bundle={bundle_root}", "core.max_per_task=8", "samples.tokens=4", f"out={out}")
    result = json.loads(out.read_text(encoding="utf-8"))
    config = load_finished(run_dir).config
    assert result["bpb"]["tokens"] == config["eval"]["tokens"]
    assert result["core"]["tasks"] == LABELS and "core/metric" in result["metrics"]
    assert [s["prompt"] for s in result["samples"]] == config["sample"]["prompts"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["all.json"]  # no temporary file left


def test_another_corpus_is_chosen_with_data(untrained_dir, shakespeare_data_dir, tmp_path):
    out = tmp_path / "eval.json"
    corpus = fake_corpus_overrides(shakespeare_data_dir)[:2]  # data.data_dir, data.val_bytes
    evaluate_cli(untrained_dir, "data=shakespeare", *corpus, "bpb.tokens=256", "core.enabled=false", f"out={out}")
    result = json.loads(out.read_text(encoding="utf-8"))
    finished = load_finished(untrained_dir)
    data = build("data", OmegaConf.create(result["bpb"]["data"]))
    assert str(data.data_dir) == str(shakespeare_data_dir)
    rows = ValidationRows(data.files("val"), finished.tokenizer, 256 // 32, 32)
    expected = evaluate_bpb(finished.model, rows.batches(0, 1, 8), finished.tokenizer.token_bytes(), CPU, torch.float32)
    assert result["metrics"] == {"val/bpb": pytest.approx(expected, rel=1e-9)}
    assert result["samples"] == []  # the checkpoint records no sample prompts


@pytest.fixture(scope="module")
def server():
    server = FileServer()
    yield server
    server.close()


MISTAKES = [
    (["{tmp}/nowhere"], "{tmp}/nowhere does not exist."),
    (["{tmp}"], "{tmp} holds no complete checkpoint"),
    (
        ["{run}", "core.bundle={url}/missing.zip"],
        "{url}/missing.zip answered HTTP 404 Not Found; check the eval bundle's URL.",
    ),
    (
        ["{run}", "core.bundle={zip}", "core.sha256=" + "ab" * 32],
        "Eval bundle {zip} has sha256 {zip_sha}, not the expected " + "ab" * 32 + ".",
    ),
    (
        ["{run}", "core.bundle={url}/eval_bundle.zip", "core.sha256=" + "cd" * 32],
        "{url}/eval_bundle.zip sent an eval bundle with sha256 {zip_sha}, not the expected " + "cd" * 32 + "; it was "
        "deleted.",
    ),
    (["{run}", "core.bundle=ftp://example.com/b.zip"], "core.bundle=ftp://example.com/b.zip is not an http:// or"),
    (["{run}", "core.sha256=xyz"], "core.sha256=xyz is not a sha256 digest (64 hex digits), or null."),
    (
        ["{run}", "core.bundle={bundle}", "core.tasks=[capitals,hellaswag]"],
        "core.tasks=[capitals, hellaswag] names 'hellaswag', which the eval bundle at {bundle} does not have; its tasks "
        "are " + ", ".join(LABELS) + ".",
    ),
    (
        ["{run}", "core.bundle={bundle}", "core.tasks=[capitols]"],
        "core.tasks=[capitols] names 'capitols', which the eval bundle at {bundle} does not have (did you mean capitals?); its tasks are",
    ),
    (["{run}", "core.tasks=[]"], "core.tasks=[] names no task: list some, null for all of them, or set core.enabled"),
    (
        ["{run}", "core.bundle={bundle}", "core.max_per_task=3"],
        "CORE task 'capitals' draws 3 few-shot examples from the others, so it needs at least 4 examples; it has 3 "
        "(core.max_per_task=3).",
    ),
    (["{run}", "core.max_per_task=0"], "core.max_per_task=0 must be a positive number of examples, or null"),
    (["{run}", "bpb.tokens=10"], "bpb.tokens=10 is less than one row of the model's sequence_len=64 tokens."),
    (["{run}", "bpb.tokens=-1"], "bpb.tokens=-1 must be >= 0 (0 skips bits per byte), or null."),
    (["{run}", "bpb.tokenz=5"], "bpb.tokenz is not a key of bpb; did you mean bpb.tokens?"),
    (["{run}", "data=wikipedia"], "data=wikipedia is not a choice of data; the choices are"),
    (["{run}", "samples.temperature=-1"], "samples.temperature=-1 must be >= 0 (0 is greedy)."),
    (
        ["{untrained}", "core.enabled=false"],
        "checkpoint {checkpoint} records no eval.tokens: give bpb.tokens=<tokens>.",
    ),
    (
        ["{untrained}", "core.enabled=false", "bpb.tokens=64"],
        "checkpoint {checkpoint} records no data corpus: choose one with data=<name> (conf/data/), or skip bits per "
        "byte with bpb.tokens=0.",
    ),
]


@pytest.mark.parametrize("arguments, message", MISTAKES, ids=[" ".join(a[1:]) or a[0] for a, _ in MISTAKES])
def test_mistakes_are_one_sentence_exit_code_2_and_leave_the_earlier_result(
    run_dir, untrained_dir, bundle_root, server, tmp_path, capsys, arguments, message
):
    zip_path = zip_folder(bundle_root, tmp_path / "eval_bundle.zip")
    server.files["/eval_bundle.zip"] = zip_path.read_bytes()
    values = dict(
        tmp=tmp_path,
        run=run_dir,
        untrained=untrained_dir,
        checkpoint=load_finished(untrained_dir).path,
        url=server.url,
        zip=zip_path,
        zip_sha=hashlib.sha256(zip_path.read_bytes()).hexdigest(),
        bundle=bundle_root,
    )
    results = [load_finished(d).path / "evaluation.json" for d in (run_dir, untrained_dir)]
    before = {path: path.read_bytes() if path.exists() else None for path in results}
    cache = f"core.cache_dir={tmp_path / 'cache'}"
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli(*(a.format(**values) for a in arguments), cache)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    # stderr ends with the one-line error (a download's progress line may come before it)
    *progress, error = captured.err.splitlines()
    assert error.startswith(f"error: {message.format(**values)}") and error.endswith((".", "?"))
    assert all(line.startswith("files ") for line in progress) and captured.out == ""
    assert "Traceback" not in captured.out + captured.err
    assert {path: path.read_bytes() if path.exists() else None for path in results} == before
    assert not list(tmp_path.glob("**/.*.tmp"))


@pytest.mark.slow  # starts python -m nanochat.evaluate
def test_the_module_runs_from_the_command_line_and_exits_2_on_a_mistake(run_dir, bundle_root, tmp_path):
    assert SUBPROCESSES_ALLOWED["now"]
    out = tmp_path / "cli.json"
    command = [sys.executable, "-m", "nanochat.evaluate"]
    settings = ["bpb.tokens=128", f"core.bundle={bundle_root}", "core.tasks=[capitals]", "core.max_per_task=8"]
    done = subprocess.run(
        [*command, str(run_dir), *settings, "samples.prompts=[]", f"out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["metrics"]) == {"val/bpb", "core/metric", "core/capitals", "core_accuracy/capitals"}
    assert "core/capitals" in done.stdout and f"written to {out}" in done.stdout
    refused = subprocess.run([*command, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: {tmp_path} holds no complete checkpoint")
    assert "Traceback" not in refused.stderr


@pytest.mark.slow  # starts torchrun and python -m nanochat.evaluate
def test_two_ranks_under_torchrun_report_what_one_process_reports(run_dir, bundle_root, tmp_path):
    assert SUBPROCESSES_ALLOWED["now"]
    settings = [
        "bpb.tokens=1024",
        "bpb.batch_size=3",  # 16 rows: one process batches 6 times, each rank 3 times (8 rows, the last padded)
        f"core.bundle={bundle_root}",
        "core.max_per_task=10",
        "samples.prompts=[ROMEO.]",
        "samples.tokens=6",
        "device=cpu",
    ]
    single, ranks = tmp_path / "one.json", tmp_path / "two.json"
    module = ["-m", "nanochat.evaluate", str(run_dir)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def launch(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)

    done = launch(sys.executable, *module, *settings, f"out={single}")
    assert done.returncode == 0, done.stderr
    done = launch(*torchrun, *module, *settings, f"out={ranks}")
    assert done.returncode == 0, done.stderr
    one, two = (json.loads(path.read_text(encoding="utf-8")) for path in (single, ranks))
    assert (one["ranks"], two["ranks"]) == (1, 2)
    # Each CORE example is scored alone, with the same shapes on either side: the same accuracies.
    core = {key: value for key, value in one["metrics"].items() if key.startswith("core")}
    assert len(core) == 1 + 2 * len(LABELS) and {key: two["metrics"][key] for key in core} == core
    # bpb sums the same per-token losses in float64; only which rows share a forward pass differs,
    # which changes a matmul's blocking, not its operands: each fp32 loss moves by a few roundings
    # (fp32 epsilon 1.2e-7, grown through two layers), far below 1e-5 of the total.
    assert two["metrics"]["val/bpb"] == pytest.approx(one["metrics"]["val/bpb"], rel=1e-5)
    assert two["samples"] == one["samples"] and two["bpb"] == one["bpb"]
    # rank 0 alone prints the table
    assert done.stdout.count("core/metric") == 1 and done.stdout.count(f"written to {ranks}") == 1
    # a mistake under torchrun: one sentence, from rank 0, and nothing written
    done = launch(*torchrun, *module, "core.max_per_task=0", f"out={tmp_path / 'refused.json'}")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: [rank 0] core.max_per_task=0 must be a positive number of examples, or null for all of them."
    ], done.stderr
    assert not (tmp_path / "refused.json").exists()
    # a file rank 0 cannot write (its parent is a file) stops both ranks with rank 0's sentence,
    # rather than leaving rank 1 at the closing barrier of a process group rank 0 has left
    done = launch(*torchrun, *module, *settings, f"out={single / 'inner.json'}")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: [rank 0] cannot write {single / 'inner.json'}: ")
    assert "Connection closed by peer" not in done.stderr and "DistBackendError" not in done.stderr
