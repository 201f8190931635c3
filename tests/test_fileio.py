"""fileio.py: atomic writes and the clean-up of what a killed writer leaves behind."""
import os
import subprocess
import sys

import pytest

import fileio


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    fileio.atomic_write(target, lambda tmp: tmp.write_text("first"))
    assert target.read_text() == "first"

    def failing(tmp):
        tmp.write_text("half of the sec")
        raise OSError("disk full")
    with pytest.raises(OSError):
        fileio.atomic_write(target, failing)
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_remove_stale_temp_files_keeps_those_of_running_processes(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # reaped: its PID names no process now
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".corpus-x-arrays.npz.tmp{finished.pid}": False, f".checkpoint.pt.tmp{finished.pid}": False,
                 f".corpus-x-meta.json.tmp{os.getpid()}": True, f".corpus-y-arrays.npz.tmp{running.pid}": True,
                 f".notes.tmp{finished.pid}x": True, "corpus-x-arrays.npz": True, ".hidden.tmp": True}
        for name in names:
            (tmp_path / name).write_text("partial")
        removed = fileio.remove_stale_temp_files(tmp_path)
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in removed) == sorted(name for name, kept in names.items() if not kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, kept in names.items() if kept)
    assert fileio.remove_stale_temp_files(tmp_path / "missing") == []
