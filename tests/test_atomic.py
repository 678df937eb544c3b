"""Files and folders appear whole or not at all (nanochat/atomic.py)."""

import pytest

from nanochat.atomic import atomic_path, replace_folder


def test_a_file_written_through_atomic_path_replaces_the_old_one_only_on_success(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    with atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_replace_folder_puts_the_new_folder_in_place_and_leaves_nothing_hidden(tmp_path):
    final = tmp_path / "step_000010"
    final.mkdir()
    (final / "model.pt").write_text("old weights")
    (final / "only_in_old").write_text("")
    staging = tmp_path / ".step_000010.tmp"
    staging.mkdir()
    (staging / "model.pt").write_text("new weights")
    replace_folder(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["model.pt"]
    assert (final / "model.pt").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010"]


def test_replace_folder_into_a_free_name_is_a_rename(tmp_path):
    staging = tmp_path / ".out.tmp"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    replace_folder(staging, tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["out", "out/config.json"]
