"""Run folders and checkpoints: where a run writes, what a checkpoint holds, how it is read back.

A checkpoint is one dict in torch.save's format, read with torch.load(weights_only=True) (tensors,
numbers, strings, lists and dicts only: never a pickle). This module writes that format itself,
so that a run training numpy tables (tables.py) writes its checkpoints without importing torch.
It holds everything a resume needs: the model's and the optimizer's state, the vocabulary, the
run's arguments, and the training state (epoch, position inside it, step count, the epoch's
running loss, the best PIP loss so far and the history of every logged scalar). The trainer and
evaluate.py read it through this module.
"""
import argparse
import collections
import fcntl
import io
import json
import os
import pickle
import sys
import warnings
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np

import fileio

FORMAT = 1
# Extra bytes a checkpoint holds besides its tensors and words (the state, the args, zip records).
OVERHEAD_BYTES = 1 << 16
# torch's name for the storage of each dtype a checkpoint's tensors may have.
STORAGE_TYPES = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
                 "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
                 "uint8": "ByteStorage", "bool": "BoolStorage"}
# Bytes of a tensor written at a time: a strided table (the CPU kernel's) is copied a block at a time.
WRITE_BLOCK_BYTES = 1 << 24


class CheckpointError(Exception):
    """A checkpoint or run folder the user pointed at cannot be used; reported in one line, exit 2."""


def make_run_dir(args):
    """A new folder for the run under --log-dir (a suffix where the name is taken), with args.json."""
    name = args.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.log_dir) / name
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(args.log_dir) / f"{name}-{suffix}"
    run_dir.mkdir(parents=True)
    write_arguments(run_dir, args)
    return run_dir


def write_arguments(run_dir, args):
    """The run's arguments as its args.json, which --resume reads."""
    fileio.atomic_write(Path(run_dir) / "args.json", lambda tmp: tmp.write_text(json.dumps(vars(args), indent=2)))


def lock_run_dir(run_dir):
    """Hold an exclusive lock on the run folder for as long as the returned descriptor is open
    (os.close it; the kernel releases it when the process dies, so a kill -9 leaves no stale
    lock). The folder itself is locked: nothing is written into it. A folder another process
    holds is refused, naming it."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(os.fstat(fd))
        os.close(fd)
        raise CheckpointError(f"run folder in use by {f'PID {holder}' if holder else 'another process'}: {run_dir} "
                              "(one run at a time per folder)") from None
    except OSError:  # a file system without locks: run unguarded, as before locks existed
        pass
    return fd


def _lock_holder(folder_stat):
    """The process holding a flock on the folder with this stat, from /proc/locks (Linux); None where unknown."""
    where = f"{os.major(folder_stat.st_dev):02x}:{os.minor(folder_stat.st_dev):02x}:{folder_stat.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if "FLOCK" in fields and where in fields:
                    return int(fields[fields.index(where) - 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def remove_unused_run_dir(run_dir):
    """Remove a new run's folder that holds no checkpoint, only its args.json and TensorBoard
    events: a run that failed or was stopped before its first checkpoint leaves no folder that
    --resume could only refuse. A folder holding anything else stays. Best effort."""
    run_dir = Path(run_dir)
    try:
        files = list(run_dir.iterdir())
        if all(p.name == "args.json" or p.name.startswith("events.out.tfevents.") for p in files):
            for path in files:
                path.unlink()
            run_dir.rmdir()
    except OSError:
        pass


def saved_arguments(run_dir):
    """The arguments a run folder was started with (its args.json), as a dict."""
    args_file = Path(run_dir) / "args.json"
    if not args_file.is_file():
        raise CheckpointError(f"--resume {run_dir}: no args.json there (is it a run directory?)")
    try:
        saved = json.loads(args_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--resume {run_dir}: cannot read args.json ({err})") from err
    if not isinstance(saved, dict):
        kind = "null" if saved is None else f"a JSON {type(saved).__name__}"
        raise CheckpointError(f"--resume {run_dir}: args.json holds {kind}, not an object of the run's arguments")
    return saved


def resume_arguments(parser, given, run_dir, overridable):
    """The arguments of a resumed run: its saved ones, where the command line gave flags in
    `overridable` those instead. Saved values pass through the parser as if typed, so an edited
    args.json is checked like a command line; flags added since the run was saved take their
    defaults. `given` maps each flag's dest to its command-line value, None where not given."""
    defaults = vars(parser.parse_args([]))
    saved = {**defaults, **{k: v for k, v in saved_arguments(run_dir).items() if k in defaults}}
    merged = {**saved, **{k: given[k] for k in overridable if given.get(k) is not None}}

    def refuse(message):
        raise CheckpointError(f"--resume {run_dir}: args.json: {message}")
    checked = vars(_parse_with(parser, _as_command_line(parser, merged, refuse), refuse))
    checked["resume"] = str(run_dir)
    _warn_ignored(parser, given, checked, overridable, run_dir)
    return argparse.Namespace(**checked)


def _warn_ignored(parser, given, saved, overridable, run_dir):
    """One warning naming the flags given with --resume that it cannot change. Values equal to the
    saved ones pass silently: a --multi-node run resumes with its launch command plus --resume."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    ignored = [f"{flags[k]} {given[k]} (the run's: {'none' if saved.get(k) is None else saved[k]})"
               for k in sorted(given)
               if given[k] is not None and k not in (*overridable, "resume") and given[k] != saved.get(k)]
    if ignored:
        warnings.warn(f"--resume {run_dir} continues with the run's saved settings; ignored: {', '.join(ignored)}")


def _parse_with(parser, argv, on_error):
    """parser.parse_args(argv), its errors going to on_error instead of exiting."""
    exit_on_error = parser.error
    parser.error = on_error
    try:
        return parser.parse_args(argv)
    finally:
        parser.error = exit_on_error


def _as_command_line(parser, values, refuse):
    """The argv that gives `values` (dest -> value) to parser: what args.json stands for."""
    argv, switch_values = [], {}
    for action in parser._actions:
        if action.nargs == 0 and action.dest != "help":  # flags without a value: store_true, store_const, --x/--no-x
            possible = switch_values.setdefault(action.dest, set())
            possible.update({action.default, True, False} if isinstance(action, argparse.BooleanOptionalAction)
                            else {action.default, action.const})
    for action in parser._actions:
        if not action.option_strings or action.dest not in values or action.dest == "help":
            continue
        value, flag = values[action.dest], action.option_strings[0]
        if action.type is None and action.nargs != 0 and not _strings(value):
            refuse(f"{action.dest} = {value!r}: {flag} takes text")
        if action.nargs == 0:
            if value not in switch_values[action.dest]:
                refuse(f"{action.dest} = {value!r} is not a value {flag} can give")
            if isinstance(action, argparse.BooleanOptionalAction) and value != action.default:
                argv.append(flag if value else action.option_strings[1])
            elif not isinstance(action, argparse.BooleanOptionalAction) and value == action.const != action.default:
                argv.append(flag)
        elif value is None or value == action.default:
            continue
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _strings(value):
    """Whether value is what a flag that takes text holds: a string, a list of them, or None."""
    return value is None or isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


def save(path, model, optimizer, corpus, args, state):
    """Everything a resume needs, written atomically; a failed write keeps the previous file."""
    ckpt = {"format": FORMAT, "model_name": args.model_name, "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "words": corpus.words, "counts": corpus.counts.tolist(), "corpus_hash": corpus.hash,
            "args": dict(vars(args)), **state}
    try:
        fileio.atomic_write(path, lambda tmp: write_torch_format(ckpt, tmp))
    except OSError as err:
        reason = err.strerror or _first_line(err)
        raise OSError(f"cannot write checkpoint {path}: {reason} ({fileio.free_bytes(path) / 2**20:.1f} MiB free "
                      "on its disk)") from err


# ---------------------------------------------------------------------------------------------
# torch.save's format, written without torch: a zip holding data.pkl (the object, pickled with
# protocol 2, each tensor a call of torch._utils._rebuild_tensor_v2 on a storage that names a
# record), the records data/0, data/1, ... (each tensor's bytes, in the byte order the record
# byteorder names), and version.

class _Global:
    """A module-level name (module.name) the pickle stream refers to, which this process need not import."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # the pickler takes only callables for a reduce's function
        raise TypeError(f"{self.module}.{self.name} is called by torch.load, not here")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGES = {np.dtype(dtype): _Global("torch", name) for dtype, name in STORAGE_TYPES.items()}
_GLOBALS = (_REBUILD_TENSOR, *_STORAGES.values())


class _Record:
    """One tensor's values (array, any strides), the zip record named key."""

    def __init__(self, key, array):
        self.key, self.array = key, array


class _TensorPickler(pickle.Pickler):
    """The C pickler, writing numpy arrays and torch tensors as torch.save writes tensors (C
    order, each in a record of its own). The globals it names (_GLOBALS) are memoised before
    it starts: _globals_prefix defines them at the head of the stream, and the pickler refers
    to them by memo index, never importing them."""

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.memo = {id(name): (index, name) for index, name in enumerate(_GLOBALS)}
        self.records = []

    def reducer_override(self, obj):
        array = _host_array(obj)
        if array is None:
            return NotImplemented
        if array.dtype not in _STORAGES:
            raise TypeError(f"a checkpoint cannot hold a tensor of dtype {array.dtype}")
        record = _Record(str(len(self.records)), array)
        self.records.append(record)
        strides = tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
        return _REBUILD_TENSOR, (record, 0, array.shape, strides, False, collections.OrderedDict())

    def persistent_id(self, obj):
        if type(obj) is not _Record:
            return None
        return "storage", _STORAGES[obj.array.dtype], obj.key, "cpu", obj.array.size


def _host_array(obj):
    """obj as a numpy array (any strides) if it is one or a torch tensor; None otherwise."""
    if isinstance(obj, np.ndarray):
        return obj
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    return obj.detach().cpu().numpy()


def _globals_prefix():
    """The opcodes that push each of _GLOBALS and memoise it under its index. They stay on the
    unpickler's stack, under the object, which is what STOP takes."""
    return b"".join(b"c%s\n%s\nq%c" % (name.module.encode(), name.name.encode(), index)
                    for index, name in enumerate(_GLOBALS))


def write_torch_format(obj, path):
    """obj (dicts, lists, tuples, numbers, strings, numpy arrays, tensors) as torch.save would
    write it to path: torch.load(path, weights_only=True) reads it back, arrays as tensors."""
    pickled = io.BytesIO()
    pickler = _TensorPickler(pickled)
    pickler.dump(obj)
    stream = pickled.getvalue()  # PROTO 2, then the object
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", stream[:2] + _globals_prefix() + stream[2:])
        archive.writestr("archive/byteorder", sys.byteorder)
        for record in pickler.records:
            _write_record(archive, f"archive/data/{record.key}", record.array)
        archive.writestr("archive/version", "3\n")


def _write_record(archive, name, array):
    """The array's values in C order as the record name, WRITE_BLOCK_BYTES at a time."""
    with archive.open(name, "w", force_zip64=array.nbytes >= zipfile.ZIP64_LIMIT) as record:
        if array.ndim == 0:
            record.write(array.tobytes())
            return
        rows = max(1, WRITE_BLOCK_BYTES // max(1, array[:1].nbytes))
        for first in range(0, len(array), rows):
            record.write(np.ascontiguousarray(array[first:first + rows]).data)


def bytes_needed(model, optimizer, corpus):
    """About what one checkpoint of this run takes on disk."""
    weights = sum(weight.nbytes for weight in model.state_dict().values())
    moments = 2 * weights if optimizer is not None and optimizer.state_dict().get("param_groups") else 0
    vocabulary = sum(len(w) + 16 for w in corpus.words) + 8 * len(corpus.words)
    return weights + moments + vocabulary + OVERHEAD_BYTES


def read(path):
    """The checkpoint dict in path (a file, or a run folder's checkpoint.pt), checked to be ours."""
    import torch
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    try:
        fileio.check_input_path(path, "checkpoint")
    except (FileNotFoundError, fileio.PathKindError) as err:
        raise CheckpointError(str(err)) from None
    if path.stat().st_size == 0:  # a write that never began, or a truncated copy
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text suggests weights_only=False: the unsafe load we never do
        raise CheckpointError(f"cannot read checkpoint {path}: damaged, or not a checkpoint: it holds something "
                              "other than tensors, numbers and text, refused without loading it") from None
    except Exception as err:  # torch raises many types for damaged, empty or unsafe files
        detail = _first_line(err)
        detail = f" ({err.__class__.__name__}: {detail})" if "weights_only" not in detail else ""
        raise CheckpointError(f"cannot read checkpoint {path}: damaged, or not a checkpoint{detail}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or "words" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this version of sgns")
    return ckpt


def read_for_run(path, corpus, model_name):
    """read(path), refused unless it was trained on this corpus with this model."""
    ckpt = read(path)
    if ckpt.get("corpus_hash") != corpus.hash:
        raise CheckpointError(f"{path} was trained on another corpus or other preprocessing options")
    if ckpt.get("model_name") != model_name:
        raise CheckpointError(f"{path} holds a {ckpt.get('model_name')} model, not {model_name}")
    return ckpt


def load_weights(model, state_dict, path):
    """The checkpoint's weights into model; another size or vocabulary is a user error, not a crash."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit this model: {str(err).splitlines()[-1].strip()}") from err


def _first_line(err):
    return (str(err).strip().splitlines() or [err.__class__.__name__])[0]
