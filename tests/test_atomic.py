"""Outputs appear whole or not at all."""

import pytest

from stagelens.atomic import atomic_path


def test_file_appears_only_after_a_successful_write(tmp_path):
    target = tmp_path / "sub" / "metrics.parquet"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".parquet" and tmp.name.startswith(".")
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert list(target.parent.iterdir()) == [target]


def test_a_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "probe.safetensors"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rewrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise ValueError
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_directories_replace_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert list(tmp_path.iterdir()) == [target]
