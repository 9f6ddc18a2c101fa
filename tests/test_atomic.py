import pytest

from reid.atomic import atomic_dir, atomic_path, recover_dir


def test_success_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers still see the old file mid-write
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_swaps_a_whole_folder_in(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("old weights")
    (target / "config").write_text("old config")
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new weights")
        assert (target / "weights").read_text() == "old weights"  # untouched until the swap
        (tmp / "config").write_text("new config")
    assert sorted(p.read_text() for p in target.iterdir()) == ["new config", "new weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_dir_failure_keeps_the_old_folder_whole(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("old weights")
    (target / "config").write_text("old config")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new weights")
        raise RuntimeError("killed between the two files")
    assert sorted(p.read_text() for p in target.iterdir()) == ["old config", "old weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_recover_dir_finishes_a_swap_killed_between_its_renames(tmp_path):
    target = tmp_path / "ckpt"
    (tmp_path / ".ckpt.reid-old").mkdir()
    (tmp_path / ".ckpt.reid-old" / "weights").write_text("old weights")
    (tmp_path / ".ckpt.reid-tmp").mkdir()
    (tmp_path / ".ckpt.reid-tmp" / "weights").write_text("half")
    (tmp_path / "ckpt.tmp").mkdir()  # a folder of the user's that only looks like ours
    assert recover_dir(target) is True
    assert (target / "weights").read_text() == "old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.tmp"]
    assert recover_dir(target) is False  # nothing left to do
