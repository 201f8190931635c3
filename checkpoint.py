"""Run folders and checkpoints: where a run writes, what a checkpoint holds, how it is read back.

A checkpoint is one dict saved by torch.save and read with weights_only=True (tensors, numbers,
strings, lists and dicts only: never a pickle). It holds everything a resume needs: the model's
and the optimizer's state, the vocabulary, the run's arguments, and the training state
(epoch, position inside it, step count, the epoch's running loss, the best PIP loss so far and
the history of every logged scalar). The trainer and evaluate.py read it through this module.
"""
import argparse
import fcntl
import json
import os
import pickle
import warnings
from datetime import datetime
from pathlib import Path

import fileio

FORMAT = 1
# Extra bytes a checkpoint holds besides its tensors and words (the state, the args, zip records).
OVERHEAD_BYTES = 1 << 16


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
    import torch
    ckpt = {"format": FORMAT, "model_name": args.model_name, "model": _own_storage(model.state_dict()),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "words": corpus.words, "counts": corpus.counts.tolist(), "corpus_hash": corpus.hash,
            "args": dict(vars(args)), **state}
    try:
        fileio.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else _first_line(err)
        raise OSError(f"cannot write checkpoint {path}: {reason} ({fileio.free_bytes(path) / 2**20:.1f} MiB free "
                      "on its disk)") from err


def _own_storage(state_dict):
    """The tensors, each copied where it views a larger storage (torch.save writes a view's whole
    storage: the CPU kernel's tables hold rows below the model's, engines._room_below)."""
    return {name: tensor.clone() if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()
            else tensor for name, tensor in state_dict.items()}


def bytes_needed(model, optimizer, corpus):
    """About what one checkpoint of this run takes on disk."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
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
