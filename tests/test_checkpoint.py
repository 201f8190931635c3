"""checkpoint.py: one run per folder, through an OS lock on the folder itself."""
import os

import pytest

import checkpoint


def test_a_run_folder_has_one_holder_at_a_time_and_is_freed_when_closed(tmp_path):
    held = checkpoint.lock_run_dir(tmp_path)
    try:
        with pytest.raises(checkpoint.CheckpointError, match=f"run folder in use by PID {os.getpid()}: {tmp_path}"):
            checkpoint.lock_run_dir(tmp_path)
        assert list(tmp_path.iterdir()) == []  # the folder itself is locked: nothing is written into it
    finally:
        os.close(held)
    os.close(checkpoint.lock_run_dir(tmp_path))  # closed (or its process dead): free again
