"""Two-rank runs leave the process group cleanly, every time.

torch._dynamo, imported after the process group exists, keeps references to it, so that
destroy_process_group() could not free it and Gloo's threads lived on into interpreter
finalization, where once in a while they aborted a finished rank (SIGABRT). init_from_env()
imports dynamo first; these tests show the threads are gone after shutdown() and that many
launches in a row, two at once on two cores, never abort (tests/teardown_probe.py)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO, train_command

pytestmark = pytest.mark.slow

PROBE = str(Path(__file__).with_name("teardown_probe.py"))
LAUNCHES = 30


def run(command: list[str]) -> subprocess.CompletedProcess:
    train_command()  # the guard: only slow tests start processes that train
    try:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("the probe did not finish within 600 s: a rank waited for its peer")


def leftover_threads(stdout: str) -> list[tuple[str, str]]:
    return re.findall(r"gloo threads before shutdown (\[[^]]*\]), after (\[[^]]*\])", stdout)


def test_leaving_the_process_group_joins_its_threads_under_torchrun():
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", PROBE])
    assert result.returncode == 0, result.stderr
    assert sorted(re.findall(r"rank (\d): gloo", result.stdout)) == ["0", "1"], result.stdout
    for before, after in leftover_threads(result.stdout):
        assert "pt_gloo_runloop" in before  # the probe did see the threads it must get rid of
        assert after == "[]"


def test_many_two_rank_launches_in_a_row_never_abort():
    result = run([sys.executable, PROBE, "--launches", str(LAUNCHES), "--at-once", "2"])
    statuses = re.findall(r"launch rank pid \d+: (.+)", result.stdout)
    assert len(statuses) == 2 * LAUNCHES, result.stdout + result.stderr
    assert [s for s in statuses if s != "exit 0"] == [], result.stderr[-3000:]
    assert result.returncode == 0
    assert [after for _, after in leftover_threads(result.stdout)] == ["[]"] * (2 * LAUNCHES)
