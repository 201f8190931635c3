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


def test_check_input_path_refuses_fifo_and_folder(tmp_path):
    text = tmp_path / "words.txt"
    text.write_text("a b\n")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert fileio.check_input_path(text, "--eval-similarity file") == text
    assert fileio.check_input_path(tmp_path, "--dataset", allow_dir=True) == tmp_path
    with pytest.raises(fileio.PathKindError, match="--eval-similarity file is not a regular file"):
        fileio.check_input_path(fifo, "--eval-similarity file")
    with pytest.raises(fileio.PathKindError, match="is a folder"):
        fileio.check_input_path(tmp_path, "--vectors file")
    with pytest.raises(FileNotFoundError, match="--vectors file not found"):
        fileio.check_input_path(tmp_path / "missing.txt", "--vectors file")


def test_check_outputs_apart_follows_links_and_folders(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "book.txt").write_text("a b\n")
    link = tmp_path / "link.txt"
    link.symlink_to(corpus / "book.txt")
    inputs = {"the corpus": corpus, "the checkpoint": None}
    with pytest.raises(ValueError, match="--export .* is inside the corpus"):
        fileio.check_outputs_apart({"--export": corpus / "vectors.txt"}, inputs)
    with pytest.raises(ValueError, match="--export .* is inside the corpus"):
        fileio.check_outputs_apart({"--export": link}, inputs)
    with pytest.raises(ValueError, match="--export .* is the vectors"):
        fileio.check_outputs_apart({"--export": link}, {"the vectors": corpus / "book.txt"})
    fileio.check_outputs_apart({"--export": tmp_path / "vectors.txt", "--plot-out": None}, inputs)
