"""Files written so that a crash never leaves half of one, and the disk checks around them.

Every file the project writes (caches, checkpoints, exports, pictures) goes through
atomic_write: the bytes land in a hidden temporary file beside the target, which is renamed
over it only once complete. A kill -9 or power cut leaves the old file or the new one.
"""
import os
import re
import shutil
import stat
from pathlib import Path


def temp_path(path):
    """The hidden temporary file atomic_write fills for path (named after this process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path, write):
    """Call write(tmp_path), then rename it into place; the temporary file never outlives the call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(path):
    """Raise OSError now if atomic_write(path) could not create its temporary file."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb"):
            pass
    finally:
        if tmp.exists():
            tmp.unlink()


def free_bytes(path):
    """Free bytes on the disk that holds path's folder (NaN where it cannot be asked)."""
    try:
        return shutil.disk_usage(Path(path).parent).free
    except OSError:
        return float("nan")


_TEMP_NAME_RE = re.compile(r"\..+\.tmp(\d+)")  # atomic_write's temp names: .NAME.tmpPID


def _process_running(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_files(folder):
    """Delete atomic_write's temp files in folder whose writer is no longer running; returns them.

    A writer killed mid-write (kill -9, power cut) leaves its hidden .NAME.tmpPID behind. Files
    of running processes (another run writing the same cache right now) are kept. Best effort:
    a file that cannot be deleted stays.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp*"):
        match = _TEMP_NAME_RE.fullmatch(path.name)
        if match and not _process_running(int(match.group(1))):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


class PathKindError(ValueError):
    """A path that exists but is not what it must be (a FIFO, a device, a folder for a file)."""


def check_input_path(path, what, allow_dir=False):
    """Return path if it is a regular file (or a folder, where allowed); raise otherwise.

    Opening a FIFO blocks until a writer comes and a device streams forever, so every input is
    checked by kind before it is opened. FileNotFoundError and PathKindError carry one line that
    names `what` (for example "--eval-similarity file").
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as err:
        raise PathKindError(f"{what} cannot be read: {path} ({err.strerror})") from None
    if stat.S_ISREG(mode) or (allow_dir and stat.S_ISDIR(mode)):
        return path
    kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
    raise PathKindError(f"{what} is {kind}: {path}")


def _same_or_inside(output, protected):
    return output == protected or protected in output.parents


def check_outputs_apart(outputs, inputs):
    """Raise ValueError if an output path would overwrite an input or land inside an input folder.

    outputs and inputs map a label ("--export", "the corpus") to a path; paths are compared after
    resolving links, so a symlink or a relative spelling of an input is caught too. An input that
    is a folder protects every file under it.
    """
    resolved_inputs = [(label, Path(path).resolve()) for label, path in inputs.items() if path]
    for out_label, out_path in outputs.items():
        if not out_path:
            continue
        target = Path(out_path).resolve()
        for in_label, source in resolved_inputs:
            if _same_or_inside(target, source):
                where = "is" if target == source else "is inside"
                raise ValueError(f"{out_label} {out_path} {where} {in_label} ({source}); "
                                 "choose another output path")
