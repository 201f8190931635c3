"""checkpoint.py: one run per folder, through an OS lock on the folder itself; torch's format written without torch."""
import os

import numpy as np
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


def test_the_torch_format_written_without_torch_is_what_torch_load_reads_back(tmp_path):
    """write_torch_format: every dtype a checkpoint may hold, strided and empty arrays, 0-d ones,
    tensors (a strided view among them) and plain values come back from torch.load(weights_only=True)
    equal to what torch.save of the same object gives."""
    import torch
    rng = np.random.default_rng(0)
    table = rng.standard_normal((9, 16)).astype(np.float32)
    arrays = {dtype: (rng.standard_normal(7) * 50).astype(dtype) for dtype in checkpoint.STORAGE_TYPES}
    obj = {"format": 1, "arrays": arrays, "strided": table[:6, :5], "empty": np.zeros((0, 4), np.float32),
           "scalar": np.array(2.5, np.float32), "tensor": torch.arange(12.0).reshape(3, 4)[:, ::2],
           "optimizer": torch.optim.Adam([torch.nn.Parameter(torch.ones(3))]).state_dict(),
           "words": ["a", "b\u00e9"], "counts": [3, 2], "nested": {"t": (0.9, 0.999), "n": None, "b": True}}
    checkpoint.write_torch_format(obj, tmp_path / "ours.pt")
    as_tensors = {**obj, "arrays": {k: torch.from_numpy(v) for k, v in arrays.items()},
                  "strided": torch.from_numpy(np.ascontiguousarray(table[:6, :5])), "empty": torch.zeros(0, 4),
                  "scalar": torch.tensor(2.5)}
    torch.save(as_tensors, tmp_path / "torch.pt")
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    theirs = torch.load(tmp_path / "torch.pt", weights_only=True)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return type(a) is type(b) and a == b
    assert same(ours, theirs)
    assert ours["strided"].is_contiguous() and ours["scalar"].shape == ()


def test_a_tensor_of_a_dtype_torch_load_cannot_take_is_refused(tmp_path):
    with pytest.raises(TypeError, match="complex128"):
        checkpoint.write_torch_format({"z": np.zeros(2, np.complex128)}, tmp_path / "z.pt")
