"""Hard to break (issue 8): bad input, crashes and interrupted runs lose nothing.

One test per row of the issue's table. Where the process boundary is the point (exit codes,
stderr without a traceback, signals, kill -9) the test runs `python trainer.py` or a small
driver around trainer.main in a subprocess; the rest call trainer.main in-process, where any
uncaught exception fails the test just as a traceback would.
"""
import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import data
import engines
import trainer

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZE = 1800  # 300 centers a step: 16 steps an epoch on the small corpus, without subsampling
KERNEL_CENTERS = 300  # centers per kernel call in these tests: one step a call


# ---------------------------------------------------------------------------------------------
# Helpers

def write_small_corpus(path, n_sentences=600, seed=0):
    """4,800 tokens about two topics, 13 word types."""
    rng = np.random.default_rng(seed)
    topics = [["cat", "dog", "mouse", "horse", "cow"], ["car", "bus", "train", "plane", "ship"]]
    glue = ["the", "a", "and"]
    lines = [" ".join(rng.choice(topics[rng.integers(2)] + glue, 8)).capitalize() + "." for _ in range(n_sentences)]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def corpus_file(tmp_path):
    return write_small_corpus(tmp_path / "small.txt")


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """trainer.main installs signal handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def base_args(tmp_path, dataset, *extra):
    """A small run that checkpoints at every epoch's end (what a kill or a stop leaves is the point here)."""
    return ["--dataset", str(dataset), "--cache-dir", str(tmp_path / "cache"), "--log-dir", str(tmp_path / "runs"),
            "--embed-size", "16", "--remove-th", "1", "--num-threads", "1", "--quiet", "--pip-interval", "0",
            "--subsample-th", "0", "--batch-size", str(BATCH_SIZE), "--save-interval", "1", *extra]


def run_main(capsys, argv):
    """trainer.main in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = trainer.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(tmp_path, *argv, timeout=300, script=ROOT / "trainer.py", **env):
    """`python trainer.py ARGV` (or another script) as a user would run it."""
    return subprocess.run([sys.executable, str(script), *map(str, argv)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout, env=cli_env(**env))


def cli_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a test run under torchrun must not make --multi-node look launched
    return env


def assert_one_line_error(stderr, *needles, prefix="error:"):
    """No traceback; exactly one error line (starting with prefix), holding every needle; anything else is a warning."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1, stderr
    assert all(line.startswith((prefix, "warning:")) for line in lines), stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def snapshot(folder):
    """Every file under folder with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def can_mount_tmpfs(target):
    target.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)],
                                capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs (needs root with mount rights, else the test is skipped); unmounted afterwards."""
    mount_point = tmp_path / "tmpfs"
    if not can_mount_tmpfs(mount_point):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=20)


# A driver around trainer.main for what a plain command line cannot do on cue: pause at a
# given step (so a signal or kill -9 lands mid-epoch) or stall half-way through writing a
# checkpoint (so kill -9 lands mid-write). It touches MARKER when it is in position.
DRIVER = r'''
import io, os, signal, sys, time
import checkpoint
import engines
import trainer

engines.CENTERS_PER_KERNEL_CALL = int(os.environ["KERNEL_CENTERS"])
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, even where the tests run under nohup
marker = os.environ.get("MARKER")
pause_at_step = int(os.environ.get("PAUSE_AT_STEP", 0))
stall_save = int(os.environ.get("STALL_SAVE", 0))


def wait_here():
    """Tell the test we are in position; wait for its signal (handled) or kill -9 (not)."""
    open(marker, "w").close()
    deadline = time.time() + 120
    while time.time() < deadline:
        handler = signal.getsignal(signal.SIGINT)  # trainer.Signals._handle once training runs
        if getattr(getattr(handler, "__self__", None), "received", None) is not None:
            return
        time.sleep(0.01)
    sys.exit("driver: nobody came")


steps = [0]
for name in ("kernel_epoch", "window_epoch", "autograd_epoch"):
    def loop(engine, epoch, _real=getattr(engines, name)):
        report = epoch.report

        def counting_report(*a):
            steps[0] += 1
            if steps[0] == pause_at_step:
                wait_here()
            report(*a)
        epoch.report = counting_report
        return _real(engine, epoch)
    setattr(engines, name, loop)

saves = [0]
real_save = checkpoint.write_torch_format


def stalling_save(obj, f, *args, **kwargs):
    saves[0] += 1
    if saves[0] == stall_save:  # write half the bytes for real, then hang until killed
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        wait_here()
    return real_save(obj, f, *args, **kwargs)


checkpoint.write_torch_format = stalling_save
trainer.install_cli_reporting()
sys.exit(trainer.main(sys.argv[1:]))
'''


def start_driver(tmp_path, argv, driver_code=DRIVER, **env):
    driver = tmp_path / "driver.py"
    driver.write_text(driver_code)
    marker = tmp_path / "in-position"
    marker.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, str(driver), *map(str, argv)], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=cli_env(KERNEL_CENTERS=str(KERNEL_CENTERS), MARKER=str(marker),
                                           **{k: str(v) for k, v in env.items()}))
    deadline = time.time() + 240
    while not marker.exists():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the driver never got in position (exit {process.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    return process


# ---------------------------------------------------------------------------------------------
# Bad input

def test_missing_dataset_or_folder_without_txt_is_one_line_exit_2(tmp_path, capsys):
    result = run_cli(tmp_path, "--dataset", tmp_path / "nope.txt", "--log-dir", tmp_path / "runs", "--quiet")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "nope.txt")

    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "notes.md").write_text("words that are not in a .txt file")
    code, _, err = run_main(capsys, base_args(tmp_path, tmp_path / "books"))
    assert code == 2
    assert_one_line_error(err, str(tmp_path / "books"), ".txt")


@pytest.mark.parametrize("text", ["", "... 123 !!! 4.5 ?? -- 1999, (42) ;;"], ids=["empty", "punctuation-digits"])
def test_file_without_words_is_one_line_exit_2(tmp_path, capsys, text):
    corpus = tmp_path / "nowords.txt"
    corpus.write_text(text)
    code, _, err = run_main(capsys, base_args(tmp_path, corpus))
    assert code == 2
    assert_one_line_error(err, "no words", "nowords.txt")


def test_invalid_utf8_is_replaced_with_a_warning_and_training_goes_on(tmp_path):
    corpus = tmp_path / "mixed.txt"
    good = write_small_corpus(tmp_path / "good.txt", n_sentences=50).read_bytes()
    corpus.write_bytes(good + b"\nthe cat \xff\xfe sat \x80 on the mat.\n" + b"\x00\x01binary\x02 dog.\n")
    result = run_cli(tmp_path, *base_args(tmp_path, corpus, "--epochs", "1", "--run-name", "r"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("3 byte(s)" in line and "UTF-8" in line for line in warnings), result.stderr
    words = load_ckpt(tmp_path / "runs" / "r" / "checkpoint.pt")["words"]
    assert {"cat", "sat", "binary"} <= set(words) and not any("\ufffd" in w for w in words)

    # issue 25 #11: the next run reads the cache, and still says what was replaced
    [meta] = (tmp_path / "cache").glob("corpus-*-meta.json")
    written = meta.stat().st_ino
    again = run_cli(tmp_path, *base_args(tmp_path, corpus, "--epochs", "1", "--run-name", "r2"))
    assert again.returncode == 0, again.stderr
    assert meta.stat().st_ino == written  # a cache hit: the cache was not rewritten
    assert [line for line in again.stderr.splitlines() if line.startswith("warning:")] == warnings


def test_empty_vocabulary_after_remove_th_names_the_types_and_suggests_lower(tmp_path, capsys, corpus_file):
    argv = base_args(tmp_path, corpus_file)
    argv[argv.index("--remove-th") + 1] = "100000"
    code, _, err = run_main(capsys, argv)
    assert code == 2
    assert_one_line_error(err, "13 word types", "100000", "lower --remove-th")


@pytest.mark.parametrize("engine", ["kernel", "torch"])
def test_vocabulary_smaller_than_window_and_negatives_trains(tmp_path, capsys, engine):
    """Two word types, a window of 10 and 10 negatives; one corpus is a single sentence."""
    two_words = tmp_path / "two.txt"
    two_words.write_text("alpha beta alpha beta beta alpha\n\nbeta alpha")
    one_sentence = tmp_path / "one_sentence.txt"
    one_sentence.write_text("a single sentence with no end and words repeated words sentence a single")
    for corpus, name in ((two_words, "two"), (one_sentence, "one")):
        argv = base_args(tmp_path, corpus, "--engine", engine, "--window-size", "10", "--neg-sample-size", "10",
                         "--epochs", "2", "--batch-size", "8", "--pip-interval", "1", "--run-name", name)
        code, _, err = run_main(capsys, argv)
        assert code == 0, err
        ckpt = load_ckpt(tmp_path / "runs" / name / "checkpoint.pt")
        assert ckpt["epoch"] == 2 and ckpt["model"]["in_embed.weight"].shape == (len(ckpt["words"]), 16)
        assert torch.isfinite(ckpt["model"]["in_embed.weight"]).all()
        assert ckpt["history"]["PIP loss"]  # the PIP monitor coped with a 2- or 9-word vocabulary

    # a single word type leaves nothing to learn: refused with the reason
    one_word = tmp_path / "one_word.txt"
    one_word.write_text("hello hello hello. hello!")
    code, _, err = run_main(capsys, base_args(tmp_path, one_word, "--engine", engine))
    assert code == 2
    assert_one_line_error(err, "1 word", "at least 2")


BAD_FLAGS = [
    (["--embed-size", "0"], "--embed-size"),
    (["--window-size", "0"], "--window-size"),
    (["--neg-sample-size", "-1"], "--neg-sample-size"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--remove-th", "-1"], "--remove-th"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.5"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--embed-size", "many"], "--embed-size"),
    (["--model-name", "lstm"], "--model-name"),
    (["--optimizer", "adamw"], "--optimizer"),
    (["--multi-node"], "--multi-node"),
    (["--multi-gpu", "--num-gpu", str(torch.cuda.device_count() + 1)], "--multi-gpu"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_an_argparse_error_exit_2(tmp_path, capsys, monkeypatch, flags, named):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # not launched by torchrun
    with pytest.raises(SystemExit) as exit_info:
        trainer.parse_args(["--dataset", "x.txt", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage:")
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and named in last


def test_bad_flag_on_the_command_line_has_no_traceback(tmp_path):
    result = run_cli(tmp_path, "--window-size", "0", "--lr", "1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "trainer.py: error: --window-size must be positive, got 0"


# ---------------------------------------------------------------------------------------------
# Damaged cache and checkpoints

class Payload:
    """Unpickling this creates a file: proof that somebody unpickled cache contents."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        return (open, (self.proof, "w"))


def pickled_array(proof):
    return np.array([Payload(proof)], dtype=object)


def damage_corpus_cache(corpus, kind, proof):
    meta_path, arrays_path = corpus.cache_file("meta.json"), corpus.cache_file("arrays.npz")
    meta = json.loads(meta_path.read_text())
    if kind == "truncated":
        arrays_path.write_bytes(arrays_path.read_bytes()[:100])
    elif kind == "bytes-changed":
        raw = bytearray(arrays_path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        arrays_path.write_bytes(bytes(raw))
    elif kind == "meta-garbage":
        meta_path.write_text('{"format": 2, "hash": ')
    elif kind == "words-changed":
        meta["words"] = meta["words"][:-1]
        meta_path.write_text(json.dumps(meta))
    elif kind == "older-format":
        meta["format"] = data.CACHE_FORMAT - 1
        meta_path.write_text(json.dumps(meta))
    elif kind in ("ids-out-of-range", "counts-changed", "starts-past-the-end"):  # issue 25 #13: arrays that
        with np.load(arrays_path) as arrays:                                     # load, with a matching digest
            saved = dict(arrays)
        if kind == "ids-out-of-range":
            saved["token_ids"][5] = len(meta["words"]) + 3
        elif kind == "counts-changed":
            saved["counts"][0] += 1
        else:
            saved["sentence_starts"][-1] = len(saved["token_ids"]) + 10
        with open(arrays_path, "wb") as f:
            np.savez(f, **saved)
        meta["arrays_digest"] = data._file_digest(arrays_path)
        meta_path.write_text(json.dumps(meta))
    elif kind == "pickle-payload":  # a crafted cache whose digest matches: only allow_pickle=False stops it
        with open(arrays_path, "wb") as f:
            np.savez(f, token_ids=pickled_array(proof), sentence_starts=pickled_array(proof),
                     counts=pickled_array(proof))
        meta["arrays_digest"] = data._file_digest(arrays_path)
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", ["truncated", "bytes-changed", "meta-garbage", "words-changed", "older-format",
                                  "ids-out-of-range", "counts-changed", "starts-past-the-end", "pickle-payload"])
def test_damaged_corpus_cache_is_rebuilt_with_a_warning_never_unpickled(tmp_path, corpus_file, kind):
    def load():
        return data.load_corpus(str(corpus_file), cache_dir=str(tmp_path / "cache"), min_count=1)

    original = load()
    proof = tmp_path / "unpickled"
    damage_corpus_cache(original, kind, proof)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load()
    assert not proof.exists()
    assert rebuilt.words == original.words
    np.testing.assert_array_equal(rebuilt.token_ids, original.token_ids)
    np.testing.assert_array_equal(rebuilt.sentence_starts, original.sentence_starts)
    with warnings.catch_warnings():  # the rebuilt cache was written back and is whole
        warnings.simplefilter("error")
        again = load()
    np.testing.assert_array_equal(again.token_ids, original.token_ids)


def test_damaged_pip_cache_is_recomputed_with_a_warning_never_unpickled(tmp_path, corpus_file):
    corpus = data.load_corpus(str(corpus_file), cache_dir=str(tmp_path / "cache"), min_count=1)
    args = Namespace(pip_vocab=10, window_size=3, neg_sample_size=2, embed_size=4)
    messages = []
    first = trainer.PipMonitor(corpus, args, log=messages.append)
    cached = sorted(Path(tmp_path / "cache").glob("*sppmi*")) + sorted(Path(tmp_path / "cache").glob("*oracle*"))
    assert [p.suffix for p in cached] == [".npz", ".npy"] and not messages  # both cached, under their names

    proof = tmp_path / "unpickled"
    sppmi_file, oracle_file = cached
    with open(sppmi_file, "wb") as f:
        np.savez(f, data=pickled_array(proof), format=pickled_array(proof))
    with open(oracle_file, "wb") as f:
        np.save(f, pickled_array(proof), allow_pickle=True)
    second = trainer.PipMonitor(corpus, args, log=messages.append)
    assert not proof.exists()
    assert len(messages) == 2 and all("damaged" in m and "recomputing" in m for m in messages)
    assert (second.sppmi != first.sppmi).nnz == 0
    np.testing.assert_allclose(np.abs(second.oracle), np.abs(first.oracle))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished one-epoch run to damage; each test works on its own copy."""
    folder = tmp_path_factory.mktemp("trained")
    corpus = write_small_corpus(folder / "small.txt")
    argv = base_args(folder, corpus, "--epochs", "1", "--run-name", "r")
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert trainer.main(argv) == 0
    for s, handler in saved.items():
        signal.signal(s, handler)
    return folder / "runs" / "r"


@pytest.mark.parametrize("damage", ["truncated", "missing", "other-corpus", "other-model"])
def test_bad_checkpoint_is_refused_and_nothing_is_overwritten(tmp_path, capsys, trained_run, damage):
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if damage == "truncated":
        ckpt_path.write_bytes(ckpt_path.read_bytes()[:len(ckpt_path.read_bytes()) // 2])
        needles = ["cannot read checkpoint", str(ckpt_path)]
    elif damage == "missing":  # killed with kill -9 before its first checkpoint
        ckpt_path.unlink()
        needles = ["no checkpoint.pt", "start it again"]
    elif damage == "other-corpus":  # the corpus file changed since the run was saved
        args = json.loads((run_dir / "args.json").read_text())
        other = write_small_corpus(tmp_path / "other.txt", seed=1)
        args["dataset"] = str(other)
        (run_dir / "args.json").write_text(json.dumps(args))
        needles = ["another corpus", str(ckpt_path)]
    else:
        ckpt = load_ckpt(ckpt_path)
        ckpt["model_name"] = "lstm"
        torch.save(ckpt, ckpt_path)
        needles = ["lstm", "not sgns"]
    before = snapshot(run_dir)
    code, _, err = run_main(capsys, ["--resume", str(run_dir), "--quiet"])
    assert code == 2
    assert_one_line_error(err, *needles)
    assert snapshot(run_dir) == before


def test_load_model_of_another_size_is_refused(tmp_path, capsys, trained_run):
    before = snapshot(trained_run)
    corpus = json.loads((trained_run / "args.json").read_text())["dataset"]
    argv = base_args(tmp_path, corpus, "--embed-size", "8", "--load-model", str(trained_run / "checkpoint.pt"))
    code, _, err = run_main(capsys, argv)
    assert code == 2
    assert_one_line_error(err, "does not fit", "checkpoint.pt")
    assert snapshot(trained_run) == before


# ---------------------------------------------------------------------------------------------
# Crashes and interruptions

def test_kill_9_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path, corpus_file, monkeypatch):
    argv = base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "r")
    process = start_driver(tmp_path, argv, STALL_SAVE=2)  # the end-of-epoch-2 checkpoint, half written
    run_dir = tmp_path / "runs" / "r"
    partial = list(run_dir.glob(".checkpoint.pt.tmp*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    epoch_1_bytes = (run_dir / "checkpoint.pt").read_bytes()
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    assert (run_dir / "checkpoint.pt").read_bytes() == epoch_1_bytes
    ckpt = load_ckpt(run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["position"] == {}
    with pytest.raises(Exception):
        load_ckpt(partial[0])  # the half-written file really is damaged, and is not the checkpoint

    monkeypatch.setattr(engines, "CENTERS_PER_KERNEL_CALL", KERNEL_CENTERS)  # as in the killed run
    assert trainer.main(["--resume", str(run_dir), "--quiet"]) == 0
    assert not list(run_dir.glob(".*.tmp*"))  # the resumed run cleared the dead write's leftovers
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "straight")) == 0
    resumed, straight = load_ckpt(run_dir / "checkpoint.pt"), load_ckpt(tmp_path / "runs" / "straight" / "checkpoint.pt")
    assert resumed["epoch"] == 2
    assert torch.equal(resumed["model"]["in_embed.weight"], straight["model"]["in_embed.weight"])


def test_kill_9_mid_epoch_then_resume_completes(tmp_path, capsys, corpus_file, monkeypatch):
    argv = base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "r")
    process = start_driver(tmp_path, argv, PAUSE_AT_STEP=16 + 5)  # 16 steps an epoch: mid-way through epoch 2
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    run_dir = tmp_path / "runs" / "r"
    assert load_ckpt(run_dir / "checkpoint.pt")["epoch"] == 1

    monkeypatch.setattr(engines, "CENTERS_PER_KERNEL_CALL", KERNEL_CENTERS)  # as in the killed run
    code, out, err = run_main(capsys, ["--resume", str(run_dir), "--quiet"])
    assert code == 0, err
    assert "resuming at epoch 2" in out
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "straight")) == 0
    resumed, straight = load_ckpt(run_dir / "checkpoint.pt"), load_ckpt(tmp_path / "runs" / "straight" / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["global_step"] == straight["global_step"] == 32
    assert torch.equal(resumed["model"]["in_embed.weight"], straight["model"]["in_embed.weight"])


@pytest.mark.parametrize("engine_flags", [["--engine", "kernel"], ["--engine", "torch", "--batch-size", "256"]],
                         ids=["kernel", "torch"])
def test_absurd_lr_flag_stops_with_nan(tmp_path, capsys, corpus_file, engine_flags):
    code, _, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "1", "--lr", "1e30", "--run-name", "r",
                                              *engine_flags))
    assert code == 1
    assert_one_line_error(err, "epoch 1", "step", "--lr")
    assert not (tmp_path / "runs" / "r" / "checkpoint.pt").exists()  # nothing non-finite was ever saved


@pytest.mark.parametrize("engine_flags", [["--engine", "kernel"], ["--engine", "torch", "--batch-size", "256"],
                                          ["--optimizer", "sparse_adam", "--batch-size", "256"]],
                         ids=["kernel", "torch-sgd", "torch-sparse-adam"])
def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                 corpus_file, engine_flags):
    real_lr_at = engines.lr_at
    # an absurd learning rate from the second epoch on: the first epoch's checkpoint is good
    monkeypatch.setattr(engines, "lr_at", lambda args, progress: 1e30 if progress > 0.5 else real_lr_at(args, progress))
    saved = []
    real_save = checkpoint.save

    def recording_save(path, *args):
        real_save(path, *args)
        saved.append(Path(path).read_bytes())
    monkeypatch.setattr(checkpoint, "save", recording_save)

    code, _, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "r",
                                              *engine_flags))
    assert code == 1
    line = assert_one_line_error(err, "epoch 2", "step", "checkpoint is kept")
    assert int(line.split("step ")[1].split(";")[0]) > 1  # a real step number, within epoch 2
    ckpt_path = tmp_path / "runs" / "r" / "checkpoint.pt"
    assert len(saved) == 1 and ckpt_path.read_bytes() == saved[0]
    ckpt = load_ckpt(ckpt_path)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_mid_epoch_checkpoints_prints_resume_command_and_resume_finishes(tmp_path, capsys, corpus_file,
                                                                                 signum):
    argv = base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "r")
    process = start_driver(tmp_path, argv, PAUSE_AT_STEP=5)  # mid-way through epoch 1
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    run_dir = tmp_path / "runs" / "r"
    assert f"Resume with: python trainer.py --resume {run_dir}" in out
    ckpt = load_ckpt(run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 5
    assert ckpt["position"] == {"step": 5}  # a mid-epoch checkpoint: 5 of the epoch's 16 steps
    if signum == signal.SIGHUP:  # a closed terminal (issue 25): the same stop; its resume is SIGTERM's
        return

    if signum == signal.SIGINT:  # the printed command, as the user would type it
        result = run_cli(tmp_path, "--resume", run_dir, "--quiet")
        code, out, err = result.returncode, result.stdout, result.stderr
    else:  # the same, in-process (one interpreter start less)
        code, out, err = run_main(capsys, ["--resume", str(run_dir), "--quiet"])
    assert code == 0, err
    assert "resuming at epoch 1, step 5" in out
    ckpt = load_ckpt(run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and torch.isfinite(ckpt["model"]["in_embed.weight"]).all()


def test_ctrl_c_before_training_is_exit_130_without_traceback(tmp_path, capsys, monkeypatch, corpus_file):
    """Ctrl-C while the corpus is read (before the handlers are installed) stops cleanly too."""
    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "load_corpus", interrupted_load)
    code, _, err = run_main(capsys, base_args(tmp_path, corpus_file))
    assert code == 130
    assert_one_line_error(err, "interrupted")
    assert list((tmp_path / "runs").iterdir()) == []  # the new run's folder, holding only args.json, is gone


# ---------------------------------------------------------------------------------------------
# Issue 32: outputs apart from inputs, one run per folder, stop signals at every phase

def make_fifo(path):
    os.mkfifo(path)
    return path


OUTPUT_OVER_INPUT = {  # the flags that make an output land on an input, and what the error names
    "export-is-the-corpus": (lambda t, c, r: ["--export", c], "is the corpus"),
    "export-through-a-link": (lambda t, c, r: ["--export", t / "link.txt"], "is the corpus"),
    "export-into-the-corpus-folder": (lambda t, c, r: ["--dataset", t, "--export", t / "vectors.txt"],
                                      "is inside the corpus"),
    "export-is-an-eval-file": (lambda t, c, r: ["--eval-similarity", t / "pairs.tsv", "--export", t / "pairs.tsv"],
                               "is the --eval-similarity file"),
    "projector-is-the-corpus-folder": (lambda t, c, r: ["--dataset", t, "--export-projector", t],
                                       "is inside the corpus"),
    "log-dir-is-the-corpus": (lambda t, c, r: ["--log-dir", c], "--log-dir"),
    "resume-export-is-its-checkpoint": (lambda t, c, r: ["--resume", r, "--export", r / "checkpoint.pt"],
                                        "is the run's checkpoint.pt"),
    "resume-export-is-its-args": (lambda t, c, r: ["--resume", r, "--export", r / "args.json"],
                                  "is the run's args.json"),
}


@pytest.mark.parametrize("case", list(OUTPUT_OVER_INPUT))
def test_an_output_over_an_input_is_refused_before_anything_is_written(tmp_path, capsys, trained_run, case):
    """#32.1: the corpus, its folder, an evaluation file, the run's checkpoint and args.json, through links too."""
    corpus = write_small_corpus(tmp_path / "small.txt")
    (tmp_path / "link.txt").symlink_to(corpus)
    (tmp_path / "pairs.tsv").write_text("cat\tdog\t7.5\ncar\tbus\t8.0\n")
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    flags, needle = OUTPUT_OVER_INPUT[case]
    flags = [str(f) for f in flags(tmp_path, corpus, run_dir)]
    argv = flags + ["--quiet"] if flags[0] == "--resume" else base_args(tmp_path, corpus, *flags)
    before = snapshot(tmp_path)
    code, out, err = run_main(capsys, argv)
    assert code == 2
    assert_one_line_error(err, needle, "choose another output path")
    assert snapshot(tmp_path) == before and "run directory" not in out


def test_a_second_run_in_a_run_folder_is_refused_naming_the_holder(tmp_path, capsys, corpus_file):
    """#32.2: two --resume of one run: the second exits 2; the lock dies with its holder (kill -9)."""
    argv = base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "r")
    process = start_driver(tmp_path, argv, PAUSE_AT_STEP=16 + 5)  # mid-way through epoch 2
    run_dir = tmp_path / "runs" / "r"
    try:
        before = snapshot(run_dir)
        code, out, err = run_main(capsys, ["--resume", str(run_dir), "--epochs", "3", "--quiet"])
        assert code == 2
        assert_one_line_error(err, f"run folder in use by PID {process.pid}", str(run_dir))
        assert snapshot(run_dir) == before
    finally:
        process.kill()
        process.communicate(timeout=60)
    code, out, err = run_main(capsys, ["--resume", str(run_dir), "--quiet"])
    assert code == 0, err
    assert load_ckpt(run_dir / "checkpoint.pt")["epoch"] == 2


def test_a_signal_while_the_last_checkpoint_is_written_stops_once_it_is_on_disk(tmp_path, capsys, corpus_file):
    """#32.7: the final checkpoint is completed, then the run stops (130): no export, which resuming writes."""
    export = tmp_path / "v.txt"
    argv = base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r", "--export", export)
    process = start_driver(tmp_path, argv, STALL_SAVE=1)  # the end of the last epoch, half written
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    run_dir = tmp_path / "runs" / "r"
    assert f"stopped by signal 2 after epoch 1 of 1; checkpoint written. Resume with: python trainer.py --resume " \
           f"{run_dir}" in out
    assert load_ckpt(run_dir / "checkpoint.pt")["epoch"] == 1
    assert not export.exists() and not list(run_dir.glob(".*.tmp*")) and "vectors written" not in out

    code, out, err = run_main(capsys, ["--resume", str(run_dir), "--quiet"])
    assert code == 0, err
    assert "nothing left to train (1 of 1 epochs done)" in out and export.exists()


# Stalls where the test needs a signal to land outside the training steps: the compiled export
# loop (STALL_AT=export) or the corpus loading of start-up (STALL_AT=corpus).
STALL_DRIVER = r"""
import os, signal, sys, time
import numpy as np
import data, export, trainer

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, even where the tests run under nohup
marker, stall_at = os.environ["MARKER"], os.environ["STALL_AT"]
real_format_rows, real_load_corpus = export.format_rows, data.load_corpus
block = np.random.default_rng(0).random((1024, 256), dtype=np.float32)


def format_rows_forever(vectors, decimals, separator):
    if separator != ord(" "):  # the projector snapshot's tab-separated rows, before the export
        return real_format_rows(vectors, decimals, separator)
    open(marker, "w").close()
    while True:  # the signal lands inside the compiled loop, or between its calls
        real_format_rows(block, decimals, separator)


def load_corpus_slowly(*args, **kwargs):
    open(marker, "w").close()
    time.sleep(120)
    return real_load_corpus(*args, **kwargs)


if stall_at == "export":
    export.format_rows = format_rows_forever
else:
    data.load_corpus = load_corpus_slowly
trainer.install_stop_handlers()
trainer.install_cli_reporting()
sys.exit(trainer.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_during_the_export_stops_in_one_line_without_a_temporary_file(tmp_path, corpus_file, signum):
    """#32.9 and #32.14: no numba SystemError, the README's code, the checkpoint intact, no .v.txt.tmpPID."""
    export = tmp_path / "v.txt"
    argv = base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r", "--export", export)
    process = start_driver(tmp_path, argv, STALL_DRIVER, STALL_AT="export")
    time.sleep(0.2)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    run_dir = tmp_path / "runs" / "r"
    assert_one_line_error(err, f"interrupted by {signal.Signals(signum).name}", "checkpoint is kept",
                          f"resume with: python trainer.py --resume {run_dir}")
    assert not export.exists() and [p.name for p in tmp_path.glob(".v.txt*")] == []
    assert load_ckpt(run_dir / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_before_training_stops_in_one_line_and_leaves_no_run_folder(tmp_path, corpus_file, signum):
    """#32.14: start-up (the corpus is read): the README's code, a message, no folder holding only args.json."""
    process = start_driver(tmp_path, base_args(tmp_path, corpus_file), STALL_DRIVER, STALL_AT="corpus")
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert_one_line_error(err, f"interrupted by {signal.Signals(signum).name}", "no checkpoint was written",
                          "the run folder is removed")
    assert new_run_folders(tmp_path) == []


def test_a_fifo_as_an_input_is_a_one_line_error_not_a_hang(tmp_path, capsys, corpus_file):
    """#32.8: --eval-similarity, --eval-analogy and --dataset naming a FIFO: exit 2 at once, no run folder."""
    fifo = make_fifo(tmp_path / "pairs.tsv")
    for flag in ("--eval-similarity", "--eval-analogy"):
        code, _, err = run_main(capsys, base_args(tmp_path, corpus_file, flag, str(fifo)))
        assert code == 2
        assert_one_line_error(err, f"{flag} file is not a regular file: {fifo}")
        assert new_run_folders(tmp_path) == []
    code, _, err = run_main(capsys, base_args(tmp_path, fifo))
    assert code == 2
    assert_one_line_error(err, f"dataset is not a regular file: {fifo}")
    assert new_run_folders(tmp_path) == []


def test_the_pip_loss_arrays_count_in_the_memory_check(tmp_path, capsys, monkeypatch, corpus_file):
    """#32.10: --embed-size 100000 fits as tables of 13 words, but not its d x d Gram matrices."""
    monkeypatch.setattr(trainer, "available_memory", lambda device: 8 * 2 ** 30)
    code, out, err = run_main(capsys, base_args(tmp_path, corpus_file, "--embed-size", "100000", "--pip-interval", "1"))
    assert code == 2
    assert_one_line_error(err, "this run needs at least 149.0 GiB", "for the PIP loss (--embed-size 100000",
                          "8.0 GiB is available")
    assert "epoch 1/" not in out and new_run_folders(tmp_path) == []


def test_a_nan_before_the_first_checkpoint_claims_no_checkpoint_and_leaves_no_folder(tmp_path, capsys, corpus_file):
    """#32.15: --lr 1000 (the kernel): exit 1; no folder that --resume could only refuse."""
    code, _, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "1", "--lr", "1000"))
    assert code == 1
    line = assert_one_line_error(err, "epoch 1", "no checkpoint was written, and the run folder is removed",
                                 "--lr")
    assert "is kept" not in line and new_run_folders(tmp_path) == []


@pytest.mark.parametrize("content", ["crafted", "junk"])
def test_a_crafted_or_damaged_checkpoint_is_refused_in_our_words(tmp_path, capsys, trained_run, content):
    """#32.17: never torch's text inviting weights_only=False; nothing runs, nothing is overwritten."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    proof = tmp_path / "PWNED"
    if content == "crafted":
        torch.save({**load_ckpt(run_dir / "checkpoint.pt"), "payload": Payload(proof)}, run_dir / "checkpoint.pt")
        needle = "other than tensors, numbers and text, refused without loading it"
    else:
        (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint\n" * 50)
        needle = "damaged, or not a checkpoint"
    before = snapshot(run_dir)
    code, _, err = run_main(capsys, ["--resume", str(run_dir), "--quiet"])
    assert code == 2
    line = assert_one_line_error(err, "cannot read checkpoint", needle)
    assert "weights_only" not in err and not proof.exists() and snapshot(run_dir) == before


def test_a_port_in_use_is_reported_as_such(tmp_path, capsys, corpus_file):
    """#32.18: rank 0 cannot listen at --init-method: not 'another rank died'."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        code, _, err = run_main(capsys, base_args(tmp_path, corpus_file, "--multi-node", "--init-method", address,
                                                  "--rank", "0", "--world-size", "2", "--dist-timeout", "20"))
    assert code == 1
    line = assert_one_line_error(err, f"the port of {address} is already in use", "choose another port")
    assert "another rank died" not in line and new_run_folders(tmp_path) == []


def test_resume_with_fewer_epochs_than_done_is_refused_and_a_finished_run_says_so(tmp_path, capsys, trained_run):
    """#32.18: --epochs below what a resumed run has done is an error, not 'resuming at epoch 2'."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    code, out, err = run_main(capsys, ["--resume", str(run_dir), "--quiet", "--epochs", "2"])
    assert code == 0, err
    before = snapshot(run_dir)
    code, out, err = run_main(capsys, ["--resume", str(run_dir), "--quiet", "--epochs", "1"])
    assert code == 2
    assert_one_line_error(err, "has done 2 epochs, more than --epochs 1", "give --epochs 2 or more")
    assert snapshot(run_dir) == before and "resuming at" not in out
    code, out, err = run_main(capsys, ["--resume", str(run_dir), "--quiet"])
    assert code == 0 and "nothing left to train (2 of 2 epochs done)" in out and "resuming at" not in out


# ---------------------------------------------------------------------------------------------
# Unwritable folders and full disks

def test_log_dir_not_writable_is_an_error_before_training(tmp_path, capsys, corpus_file):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    argv = base_args(tmp_path, corpus_file)
    argv[argv.index("--log-dir") + 1] = str(blocker / "runs")  # inside a regular file: never writable
    code, out, err = run_main(capsys, argv)
    assert code == 1
    assert_one_line_error(err, str(blocker))
    assert "corpus:" not in out  # found out before the corpus was even read


def test_cache_dir_not_writable_trains_with_a_warning(tmp_path, capsys, corpus_file):
    """The cache only saves time: without it the corpus is rebuilt each run, and training goes on."""
    argv = base_args(tmp_path, corpus_file, "--epochs", "1", "--pip-interval", "1", "--run-name", "r")
    argv[argv.index("--cache-dir") + 1] = str(corpus_file / "cache")  # inside a regular file
    code, out, err = run_main(capsys, argv)
    assert code == 0, err
    assert "could not write the corpus cache" in out + err and "could not cache" in out + err
    assert load_ckpt(tmp_path / "runs" / "r" / "checkpoint.pt")["epoch"] == 1


def test_read_only_run_dir_on_resume_is_an_error_before_training(tmp_path, capsys, corpus_file, tmpfs):
    argv = base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r")
    argv[argv.index("--log-dir") + 1] = str(tmpfs)
    assert trainer.main(argv) == 0
    before = snapshot(tmpfs / "r")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True, timeout=20)
    code, out, err = run_main(capsys, ["--resume", str(tmpfs / "r"), "--epochs", "2", "--quiet"])
    assert code == 1
    assert_one_line_error(err, "Read-only")
    assert "epoch 2/2" not in out and snapshot(tmpfs / "r") == before


def test_full_disk_is_an_error_before_training_and_keeps_the_checkpoint(tmp_path, capsys, corpus_file, tmpfs):
    argv = base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r")
    argv[argv.index("--log-dir") + 1] = str(tmpfs)
    assert trainer.main(argv) == 0
    filler = tmpfs / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    before = snapshot(tmpfs / "r")
    code, out, err = run_main(capsys, ["--resume", str(tmpfs / "r"), "--epochs", "2", "--quiet"])
    assert code == 1
    assert_one_line_error(err, "disk space", str(tmpfs / "r"))
    assert "epoch 2/2" not in out
    assert snapshot(tmpfs / "r") == before
    assert load_ckpt(tmpfs / "r" / "checkpoint.pt")["epoch"] == 1


def test_disk_full_at_the_checkpoint_write_is_exit_1_and_keeps_the_previous(tmp_path, capsys, monkeypatch,
                                                                            corpus_file):
    """The space ran out during training: the write fails."""
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r")) == 0
    run_dir = tmp_path / "runs" / "r"
    before = (run_dir / "checkpoint.pt").read_bytes()
    real_save = checkpoint.write_torch_format

    def save_on_full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    monkeypatch.setattr(checkpoint, "write_torch_format", save_on_full_disk)
    code, out, err = run_main(capsys, ["--resume", str(run_dir), "--epochs", "2", "--quiet"])
    monkeypatch.setattr(checkpoint, "write_torch_format", real_save)
    assert code == 1
    assert_one_line_error(err, "cannot write checkpoint", str(run_dir / "checkpoint.pt"),
                          "the previous checkpoint.pt is intact", f"resume with: python trainer.py --resume {run_dir}")
    assert "epoch 2/2" in out  # it got as far as the write
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert not list(run_dir.glob(".*.tmp*"))


def test_export_into_a_missing_folder_is_created_or_a_clear_error(tmp_path, capsys, corpus_file):
    export = tmp_path / "new" / "deeper" / "vectors.txt"
    code, _, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "1", "--export", str(export)))
    assert code == 0, err
    from gensim.models import KeyedVectors
    assert len(KeyedVectors.load_word2vec_format(str(export)).index_to_key) == 13

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code, out, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "1",
                                                "--export", str(blocker / "vectors.txt")))
    assert code == 1
    assert_one_line_error(err, str(blocker))
    assert "corpus:" not in out  # before training, not after it


# ---------------------------------------------------------------------------------------------
# Issue 25: the cases outside the trainer's own code

def test_select_dim_writes_only_into_its_out_dir(tmp_path):
    """#1: pip_loss.py --select-dim writes its curve into --out-dir, never next to its code (img/)."""
    source = tmp_path / "src"  # a copy of the code: a regression writes into it, not into this checkout
    source.mkdir()
    for name in ("pip_loss.py", "data.py"):
        shutil.copy(ROOT / name, source / name)
    corpus = write_small_corpus(tmp_path / "small.txt")
    before = snapshot(source)
    result = run_cli(tmp_path, "--dataset", corpus, "--select-dim", "--vocab-size", "10", "--max-dim", "5",
                     "--neg", "1", "--trials", "1", "--min-count", "1", "--cache-dir", tmp_path / "cache",
                     "--out-dir", tmp_path / "out", script=source / "pip_loss.py", PYTHONDONTWRITEBYTECODE="1")
    assert result.returncode == 0, result.stderr
    code_files = {path: raw for path, raw in snapshot(source).items() if "__pycache__" not in path.parts}
    assert code_files == before and not (source / "img").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pip_select_dim.json", "pip_select_dim.png"]
    assert (tmp_path / "out" / "pip_select_dim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_on_an_empty_checkpoint_is_one_line_exit_2(tmp_path):
    """#2, evaluate.py's side: an empty checkpoint file (a write cut short) is refused, and kept."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").touch()
    result = run_cli(tmp_path, "--checkpoint", run_dir, "--no-default-eval", script=ROOT / "evaluate.py")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(run_dir / "checkpoint.pt"), "empty", prefix="evaluate.py: error:")
    assert [p.name for p in run_dir.iterdir()] == ["checkpoint.pt"] and (run_dir / "checkpoint.pt").stat().st_size == 0


@pytest.mark.parametrize("kind", ["utf-16", "gzip"])
def test_utf16_or_gzip_corpus_trains_on_its_words(tmp_path, corpus_file, kind):
    """#11: a UTF-16 file with a BOM, or a gzip file, trains on the words of its text."""
    text = corpus_file.read_text()
    encoded = tmp_path / ("small16.txt" if kind == "utf-16" else "small.txt.gz")
    encoded.write_bytes(text.encode("utf-16") if kind == "utf-16" else gzip.compress(text.encode()))
    result = run_cli(tmp_path, *base_args(tmp_path, encoded, "--epochs", "1", "--run-name", "r"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "warning" not in result.stderr
    plain = data.load_corpus(str(corpus_file), cache_dir=str(tmp_path / "plain-cache"), min_count=1)
    assert load_ckpt(tmp_path / "runs" / "r" / "checkpoint.pt")["words"] == plain.words
    assert len(plain.words) == 13


@pytest.mark.parametrize("kind", ["zip", "binary"])
def test_archive_or_binary_corpus_is_one_line_exit_2(tmp_path, capsys, corpus_file, kind):
    """#11: what is not text, or cannot be decompressed here, is refused before anything is built."""
    if kind == "zip":
        refused = tmp_path / "small.zip"
        with zipfile.ZipFile(refused, "w") as archive:
            archive.write(corpus_file, "small.txt")
        needles = ["small.zip is a zip archive", "extract it"]
    else:
        refused = tmp_path / "vectors.txt"
        refused.write_bytes(np.arange(-50, 50, dtype=np.float32).tobytes() * 10)
        needles = ["vectors.txt does not look like text", "NUL"]
    before = refused.read_bytes()
    code, out, err = run_main(capsys, base_args(tmp_path, refused, "--epochs", "1", "--run-name", "r"))
    assert code == 2
    assert_one_line_error(err, *needles)
    assert "corpus:" not in out and refused.read_bytes() == before
    assert not list((tmp_path / "cache").glob("corpus-*")) and not (tmp_path / "runs" / "r" / "checkpoint.pt").exists()


def write_vectors(path, words, vectors, count=None):
    lines = [f"{len(words) if count is None else count} {vectors.shape[1]}"]
    lines += [f"{word} " + " ".join(f"{value:.4f}" for value in row) for word, row in zip(words, vectors)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("damage", ["nan-row", "header-short"])
def test_evaluate_refuses_nan_vectors_and_a_short_header(tmp_path, damage):
    """#12: NaN vectors, or a header that announces fewer words than follow, are one line, exit 2."""
    words = [f"w{i}" for i in range(30)]
    vectors = np.random.default_rng(0).normal(size=(30, 4))
    if damage == "nan-row":
        vectors[7, 2] = np.nan
        path = write_vectors(tmp_path / "vectors.txt", words, vectors)
        needles = ["'w7'", "NaN"]
    else:
        path = write_vectors(tmp_path / "vectors.txt", words, vectors, count=20)
        needles = ["more than the 20 words its header announces"]
    before = path.read_bytes()
    result = run_cli(tmp_path, "--vectors", path, "--neighbors", "w1", "--no-default-eval", "--json",
                     script=ROOT / "evaluate.py")
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line_error(result.stderr, str(path), *needles, prefix="evaluate.py: error:")
    assert path.read_bytes() == before


def test_pip_cache_of_the_wrong_shape_is_recomputed_with_a_warning(tmp_path, capsys, corpus_file):
    """#13: cached SPPMI and oracle arrays that load but do not fit are rebuilt, not used after epoch 1."""
    import scipy.sparse
    argv = base_args(tmp_path, corpus_file, "--epochs", "1", "--pip-interval", "1", "--pip-vocab", "10")
    code, _, err = run_main(capsys, [*argv, "--run-name", "first"])
    assert code == 0, err
    [sppmi_file] = (tmp_path / "cache").glob("*sppmi*.npz")
    [oracle_file] = (tmp_path / "cache").glob("*oracle*.npy")
    right_sppmi, right_oracle = scipy.sparse.load_npz(sppmi_file), np.load(oracle_file)
    with open(sppmi_file, "wb") as f:
        scipy.sparse.save_npz(f, scipy.sparse.eye(4, format="csr", dtype=np.float32))
    np.save(oracle_file, np.ones((10, 3)))
    code, out, err = run_main(capsys, [*argv, "--run-name", "second"])
    assert code == 0, err
    assert "Traceback" not in err
    assert f"warning: cached {sppmi_file.name} is damaged (shape (4, 4), expected (10, 10)); recomputing it" in out
    assert f"warning: cached {oracle_file.name} is damaged (shape (10, 3), expected (10, 9)); recomputing it" in out
    assert (scipy.sparse.load_npz(sppmi_file) != right_sppmi).nnz == 0
    np.testing.assert_allclose(np.abs(np.load(oracle_file)), np.abs(right_oracle))
    first, second = (load_ckpt(tmp_path / "runs" / r / "checkpoint.pt")["history"] for r in ("first", "second"))
    assert second["PIP loss"] == first["PIP loss"] and second["PIP loss (oracle)"] == first["PIP loss (oracle)"]


def test_stale_temp_files_in_the_cache_are_removed_by_the_next_run(tmp_path, capsys, corpus_file):
    """Temp files a kill -9 left in the cache folder go; those of a process still writing stay."""
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    writing = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        cache = tmp_path / "cache"
        cache.mkdir()
        stale = [cache / f".corpus-0123-arrays.npz.tmp{killed.pid}", cache / f".corpus-0123-meta.json.tmp{killed.pid}"]
        live = cache / f".corpus-4567-arrays.npz.tmp{writing.pid}"
        for path in [*stale, live]:
            path.write_bytes(b"PK\x03\x04 half an npz")
        code, _, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r"))
        assert code == 0, err
        assert not any(path.exists() for path in stale) and live.exists()
    finally:
        writing.kill()
        writing.wait()


# ---------------------------------------------------------------------------------------------
# Issue 25: the trainer's cases

def new_run_folders(tmp_path):
    runs = tmp_path / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


def test_empty_checkpoint_to_resume_or_load_is_one_line_exit_2(tmp_path, capsys, trained_run):
    """#2: an empty checkpoint.pt (a write that never began) is refused, and nothing changes on disk."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    before = snapshot(run_dir)
    code, _, err = run_main(capsys, ["--resume", str(run_dir), "--quiet"])
    assert code == 2
    assert_one_line_error(err, str(run_dir / "checkpoint.pt"), "the file is empty")
    assert snapshot(run_dir) == before

    corpus = json.loads((trained_run / "args.json").read_text())["dataset"]
    code, out, err = run_main(capsys, base_args(tmp_path, corpus, "--load-model", str(run_dir / "checkpoint.pt")))
    assert code == 2
    assert_one_line_error(err, str(run_dir / "checkpoint.pt"), "the file is empty")
    assert "epoch 1/" not in out and new_run_folders(tmp_path) == []  # the new run's folder did not stay


EDITED_ARGS = {
    "list": (lambda args: list(args.items()), "holds a JSON list"),
    "null": (lambda args: None, "holds null"),
    "epochs-abc": (lambda args: {**args, "epochs": "abc"}, "--epochs: invalid int value: 'abc'"),
    "lr-nan": (lambda args: {**args, "lr": "nan"}, "--lr must be a positive number, got nan"),
    "dataset-123": (lambda args: {**args, "dataset": 123}, "dataset = 123: --dataset takes text"),
    "threads-many": (lambda args: {**args, "num_threads": "many"}, "--num-threads: invalid int value: 'many'"),
    "engine-warp": (lambda args: {**args, "engine": "warp"}, "--engine: invalid choice: 'warp'"),
}


@pytest.mark.parametrize("edit", list(EDITED_ARGS))
def test_edited_args_json_is_one_line_exit_2_before_training(tmp_path, capsys, trained_run, edit):
    """#3: the saved arguments are checked as a command line is, before anything is read or trained."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    change, needle = EDITED_ARGS[edit]
    (run_dir / "args.json").write_text(json.dumps(change(json.loads((run_dir / "args.json").read_text()))))
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(["--resume", str(run_dir), "--epochs", "2", "--quiet"] if edit != "epochs-abc" else
                     ["--resume", str(run_dir), "--quiet"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert_one_line_error(err, needle, "args.json", prefix=f"{trainer.get_parser().prog}: error:")  # no usage
    assert "run directory" not in out and snapshot(run_dir) == before


def test_flags_given_with_resume_that_it_cannot_change_are_named_in_a_warning(tmp_path, capsys, trained_run):
    """--resume keeps the run's settings: --lr or --load-model given with it are ignored, and said so;
    the values the run was started with (a --multi-node launch command) pass silently."""
    run_dir = tmp_path / "r"
    shutil.copytree(trained_run, run_dir)
    saved = json.loads((run_dir / "args.json").read_text())
    with pytest.warns(UserWarning, match=r"ignored: --embed-size 50 \(the run's: 16\), --load-model x.pt "
                                         r"\(the run's: none\), --lr 0.5 \(the run's: 0.025\)$"):
        args = trainer.parse_args(["--resume", str(run_dir), "--lr", "0.5", "--embed-size", "50", "--load-model",
                                   "x.pt", "--epochs", "2"])
    assert (args.lr, args.embed_size, args.load_model, args.epochs) == (0.025, 16, None, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launch = base_args(trained_run.parent.parent, saved["dataset"], "--epochs", "1", "--run-name", "r")
        trainer.parse_args([*launch, "--resume", str(run_dir), "--epochs", "2"])


@pytest.mark.parametrize("damage", ["missing", "malformed", "latin-1", "analogy-malformed", "nan", "inf", "fifo",
                                    "analogy-fifo"])
def test_evaluation_files_are_read_before_training(tmp_path, capsys, corpus_file, damage):
    """#4: a missing, malformed or non-UTF-8 evaluation file stops the run before its corpus is read;
    issue 32 #6 and #8: so does a score that is not finite, or a FIFO (which would block forever)."""
    eval_file = tmp_path / "pairs.tsv"
    flag = "--eval-analogy" if damage.startswith("analogy") else "--eval-similarity"
    if damage in ("nan", "inf"):
        eval_file.write_text(f"cat\tdog\t3\ncat\tmouse\t{damage}\n")
        needles = [f"{eval_file}:2", "not a finite number"]
    elif damage.endswith("fifo"):
        os.mkfifo(eval_file)
        needles = [str(eval_file), "not a regular file"]
    elif damage == "malformed":
        eval_file.write_text("cat\tdog\t3\ncat\tdog\n")
        needles = [f"{eval_file}:2", "expected 'word1<TAB>word2<TAB>score'"]
    elif damage == "latin-1":
        eval_file.write_bytes("caf\u00e9\tdog\t3\n".encode("latin-1"))
        needles = [str(eval_file), "not UTF-8"]
    elif damage == "analogy-malformed":
        eval_file.write_text(": family\nboy girl brother\n")
        needles = [f"{eval_file}:2", "expected 4 words"]
    else:
        needles = [str(eval_file), "not found"]
    code, out, err = run_main(capsys, base_args(tmp_path, corpus_file, flag, str(eval_file)))
    assert code == 2
    assert_one_line_error(err, flag, *needles)
    assert "corpus:" not in out and new_run_folders(tmp_path) == []


def test_evaluation_files_are_parsed_once_and_scored_every_epoch(tmp_path, capsys, monkeypatch, corpus_file):
    import evaluate
    pairs, analogies = tmp_path / "pairs.tsv", tmp_path / "analogies.txt"
    pairs.write_text("cat\tdog\t9\ncat\tcar\t1\nbus\ttrain\t8\nmouse\tplane\t2\n")
    analogies.write_text(": animals\ncat dog car bus\n")
    reads = []

    def counted(load):
        return lambda path: reads.append(path) or load(path)
    for name in ("load_pairs", "load_analogies"):
        monkeypatch.setattr(evaluate, name, counted(getattr(evaluate, name)))
    code, _, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "r",
                                              "--eval-similarity", str(pairs), "--eval-analogy", str(analogies)))
    assert code == 0, err
    assert reads == [str(pairs), str(analogies)]
    history = load_ckpt(tmp_path / "runs" / "r" / "checkpoint.pt")["history"]
    assert [e for e, _ in history["Similarity/pairs"]] == [1, 2] and len(history["Analogy accuracy"]) == 2


@pytest.mark.parametrize("flag", ["--export", "--export-projector"])
def test_unwritable_export_is_an_error_before_training_naming_the_path(tmp_path, capsys, corpus_file, flag):
    """#5: /proc takes no new files, even from root."""
    target = "/proc/sgns-vectors.txt" if flag == "--export" else "/proc/sgns-projector"
    code, out, err = run_main(capsys, base_args(tmp_path, corpus_file, flag, target))
    assert code == 1
    line = assert_one_line_error(err, f"cannot write {flag} {target}:")
    assert ".tmp" not in line and "corpus:" not in out and new_run_folders(tmp_path) == []


def test_export_into_a_read_only_folder_or_a_full_disk_names_the_path(tmp_path, capsys, monkeypatch, corpus_file,
                                                                      tmpfs):
    """#5: a read-only folder is found before training; a disk that fills up during training, at
    the export, is named with the user's path, and the vectors stay in the checkpoint."""
    export = tmpfs / "out" / "vectors.txt"
    export.parent.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True, timeout=20)
    code, out, err = run_main(capsys, base_args(tmp_path, corpus_file, "--export", str(export)))
    assert code == 1
    assert ".tmp" not in assert_one_line_error(err, f"cannot write --export {export}: Read-only file system")
    assert "corpus:" not in out and new_run_folders(tmp_path) == []

    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True, timeout=20)
    real_finish = trainer.finish_run

    def finish_on_a_full_disk(run):
        fill_disk(tmpfs / "filler")
        return real_finish(run)
    monkeypatch.setattr(trainer, "finish_run", finish_on_a_full_disk)
    code, out, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r",
                                                "--export", str(export)))
    assert code == 1
    checkpoint_file = tmp_path / "runs" / "r" / "checkpoint.pt"
    line = assert_one_line_error(err, f"cannot write --export {export}: No space left on device",
                                 f"the vectors are in {checkpoint_file}")
    assert ".tmp" not in line and load_ckpt(checkpoint_file)["epoch"] == 1
    assert sorted(p.name for p in export.parent.iterdir()) == []  # nothing half-written


def fill_disk(filler):
    """Write zeros into filler until the disk is full, to the last byte."""
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC


@pytest.mark.parametrize("failing", ["best.pt", "first checkpoint.pt"])
def test_a_failed_checkpoint_write_says_what_is_left_to_resume_from(tmp_path, capsys, monkeypatch, corpus_file,
                                                                     failing):
    """#6: checkpoint.pt is written before best.pt, so a failed best.pt leaves a resumable run; and
    a message never claims an earlier checkpoint that does not exist."""
    real_save = checkpoint.write_torch_format
    name = failing.split()[-1]

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if Path(f).name.startswith(f".{name}.tmp"):
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "write_torch_format", save_on_a_full_disk)
    code, out, err = run_main(capsys, base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r",
                                                "--pip-interval", "1"))
    monkeypatch.setattr(checkpoint, "write_torch_format", real_save)
    run_dir = tmp_path / "runs" / "r"
    assert code == 1 and "epoch 1/1" in out
    line = assert_one_line_error(err, f"cannot write checkpoint {run_dir / name}")
    assert "previous" not in line and not list(run_dir.glob(".*.tmp*")) and not (run_dir / "best.pt").exists()
    if name == "checkpoint.pt":
        assert "there is no checkpoint to resume from" in line and not (run_dir / "checkpoint.pt").exists()
        return
    assert f"{run_dir / 'checkpoint.pt'} is intact, resume with: python trainer.py --resume {run_dir}" in line
    assert load_ckpt(run_dir / "checkpoint.pt")["epoch"] == 1
    code, out, err = run_main(capsys, ["--resume", str(run_dir), "--epochs", "2", "--quiet"])
    assert code == 0 and "epoch 2/2" in out, err


def test_disk_full_at_best_pt_keeps_a_resumable_checkpoint(tmp_path, capsys, monkeypatch, corpus_file, tmpfs):
    """#6 on a real full disk (a tmpfs): space that runs out after checkpoint.pt fails best.pt alone."""
    real_save = checkpoint.save

    def save_then_fill(path, *args):
        real_save(path, *args)
        if Path(path).name == "checkpoint.pt":
            fill_disk(tmpfs / "filler")
    monkeypatch.setattr(checkpoint, "save", save_then_fill)
    argv = base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r", "--pip-interval", "1")
    argv[argv.index("--log-dir") + 1] = str(tmpfs)
    code, out, err = run_main(capsys, argv)
    run_dir = tmpfs / "r"
    assert code == 1 and "epoch 1/1" in out
    assert_one_line_error(err, f"cannot write checkpoint {run_dir / 'best.pt'}",
                          f"{run_dir / 'checkpoint.pt'} is intact, resume with")
    assert not (run_dir / "best.pt").exists() and not list(run_dir.glob(".*.tmp*"))
    assert load_ckpt(run_dir / "checkpoint.pt")["epoch"] == 1
    (tmpfs / "filler").unlink()  # room again for the TensorBoard writer's next flush


BAD_VALUES = [
    (["--pip-vocab", "1"], "--pip-vocab must be 2 or more"),
    (["--device", "foo"], "--device foo: not a torch device"),
    (["--device", "mps"], "--device mps: sgns trains on cpu or cuda"),
    (["--seed", "-1"], "--seed must be in 0..2**64-1"),
    (["--seed", "99999999999999999999"], "--seed must be in 0..2**64-1"),
    (["--subsample-th", "nan"], "--subsample-th must be 0 (off) or a positive number, got nan"),
    (["--subsample-th", "inf"], "--subsample-th must be 0 (off) or a positive number, got inf"),
    (["--ns-exponent", "nan"], "--ns-exponent must be in [-1, 1], got nan"),
    (["--ns-exponent", "inf"], "--ns-exponent must be in [-1, 1], got inf"),
    (["--ns-exponent", "1000"], "--ns-exponent must be in [-1, 1], got 1000"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--dropout", "nan"], "--dropout must be in [0, 1)"),
    (["--multi-node", "--init-method", "tcp://127.0.0.1:1", "--rank", "0", "--world-size", "2", "--async",
      "--block-momentum", "nan"], "--block-momentum nan: must be in [0, 1)"),
    (["--multi-node", "--init-method", "tcp://127.0.0.1:1", "--rank", "0", "--world-size", "2",
      "--dist-timeout", "inf"], "--dist-timeout must be a number of seconds in (0, 604800], got inf"),
    (["--run-name", "../../x"], "--run-name ../../x: give a folder name"),
]


@pytest.mark.parametrize("flags,needle", BAD_VALUES, ids=[" ".join(f[-2:]) for f, _ in BAD_VALUES])
def test_flag_values_that_gave_tracebacks_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                 corpus_file, flags, needle):
    """#7, #8 and --run-name: each value alone is refused in argparse's one line, exit 2."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(base_args(tmp_path, corpus_file, *flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path.parent / "x").exists()  # where --run-name ../../x pointed


@pytest.mark.parametrize("flags,needle", [(["--embed-size", str(10 ** 5)], "for the model (--embed-size 100000"),
                                          (["--window-size", str(10 ** 4), "--engine", "torch"],
                                           "for a step's windows (--window-size 10000")],
                         ids=["embed-size", "window-size"])
def test_sizes_beyond_memory_are_refused_before_allocating(tmp_path, capsys, monkeypatch, corpus_file, flags, needle):
    """#7: the model's tables and a step's windows are weighed against the memory available first.
    Here 1 MiB is available, so that a regression allocates megabytes, not the machine's memory."""
    monkeypatch.setattr(trainer, "available_memory", lambda device: 2 ** 20)
    code, out, err = run_main(capsys, base_args(tmp_path, corpus_file, *flags))
    assert code == 2
    assert_one_line_error(err, "this run needs at least", needle, "1.0 MiB is available")
    assert "corpus:" in out and "epoch 1/" not in out and new_run_folders(tmp_path) == []


def test_memory_lower_bound_counts_tables_optimizer_state_and_window_buffers():
    args = Namespace(model_name="sgns", embed_size=10, optimizer="sparse_adam", loop="window", world=None,
                     batch_size=60, window_size=5, pip_interval=0)
    parts = trainer.memory_lower_bound(args, ["a", "b", "c"])
    per_step = engines.centers_per_step(60, 5)  # 10 centers of 10 slots each
    assert list(parts.values()) == [4 * 2 * 3 * 10 * 3, data.STEPS_PER_DRAW * per_step * 10 * 12 + per_step * 10 * 40]
    args.loop = "kernel"
    assert len(trainer.memory_lower_bound(args, ["a", "b", "c"])) == 1  # the kernel holds no windows
    # the cases: far beyond any machine's memory
    huge = Namespace(model_name="sgns", embed_size=10 ** 8, optimizer="sgd", loop="window", world=None,
                     batch_size=4096, window_size=10 ** 9, pip_interval=0)
    model_bytes, window_bytes = trainer.memory_lower_bound(huge, [str(i) for i in range(13)]).values()
    assert model_bytes == 2 * 13 * 10 ** 8 * 4 and window_bytes > 2 ** 40
    assert trainer.available_memory("cpu") < 2 ** 40


def _settings_worker(rank, world_size, out_dir):
    import distributed
    outcomes = []
    for settings in ({"--embed-size": 100 if rank == 0 else 50, "--epochs": 2},
                     {"--embed-size": 100, "--epochs": 2 + rank},
                     {"--embed-size": 100, "--epochs": 2}):
        try:
            distributed.check_same_settings(settings)
            outcomes.append("agreed")
        except distributed.SettingsMismatch as err:
            outcomes.append(str(err))
    try:  # another corpus on one rank: a user mistake too (exit 2), not a failed peer
        distributed.check_same_corpus("ab" * 16 if rank == 0 else "cd" * 16, 13)
    except distributed.SettingsMismatch as err:
        outcomes.append(str(err))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(outcomes))


def test_ranks_with_different_settings_each_say_which_in_one_line(tmp_path):
    """#9: every rank finds the difference (so none waits for the other), and names the setting."""
    from test_distributed import run_ranks
    run_ranks(_settings_worker, tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == ["rank 0: --embed-size is 100 here but 50 on rank 1; every rank needs the same settings",
                     "rank 0: --epochs is 2 here but 3 on rank 1; every rank needs the same settings", "agreed",
                     "rank 1 built another corpus than rank 0: every rank needs the same corpus files and "
                     "preprocessing options"]
    assert rank1[0] == "rank 1: --embed-size is 50 here but 100 on rank 0; every rank needs the same settings"
    assert rank1[2] == "agreed" and rank1[3].startswith("rank 0 built another corpus than rank 1")


def test_sync_and_async_ranks_stop_before_training_in_one_line_each(tmp_path):
    """#9 through the command line: --sync against --async used to hang for the whole --dist-timeout."""
    from test_distributed import clean_env, free_port, trainer_cmd
    corpus_file = write_small_corpus(tmp_path / "small.txt")
    init = f"tcp://127.0.0.1:{free_port()}"
    started = time.time()
    procs = [subprocess.Popen(trainer_cmd(tmp_path, corpus_file, "--multi-node", "--init-method", init, "--rank",
                                          str(r), "--world-size", "2", "--dist-timeout", "60", mode),
                              env=clean_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, mode in enumerate(["--sync", "--async"])]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert time.time() - started < 60  # not the timeout
    assert [p.returncode for p in procs] == [2, 2], outputs
    assert_one_line_error(outputs[0][1], "rank 0: --sync/--async is sync here but async on rank 1")
    assert_one_line_error(outputs[1][1], "rank 1: --sync/--async is async here but sync on rank 0")
    assert "run directory" not in outputs[0][0] and not (tmp_path / "runs").exists()


LONE_RANK = r"""
import sys, time
import torch._dynamo  # what join_group imports first, loaded before the clock starts
import distributed
print(time.time(), flush=True)
distributed.join_group("gloo", sys.argv[1], 1, 2, float(sys.argv[2]))
"""


def test_a_lone_rank_1_gives_up_joining_within_the_timeout(tmp_path):
    """#10: rank 1 alone used to retry its connection for up to twice --dist-timeout."""
    from test_distributed import clean_env, free_port
    script = tmp_path / "lone.py"
    script.write_text(LONE_RANK)
    timeout = 4
    result = subprocess.run([sys.executable, str(script), f"tcp://127.0.0.1:{free_port()}", str(timeout)],
                            env=dict(clean_env(), TORCH_CPP_LOG_LEVEL="FATAL"), cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    waited = time.time() - float(result.stdout.split()[0])
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result.stderr, "rank 1 of 2", f"within --dist-timeout {timeout} s")
    assert waited < timeout + 3  # the grace, and the process's exit


def test_resume_hint_of_a_multi_node_run_is_its_launch_command_with_resume():
    """A --multi-node run resumes only with all its ranks: the hint is each rank's own command."""
    world = distributed_world(rank=0, init_method="tcp://10.0.0.1:23456")
    argv = ["--multi-node", "--init-method", "tcp://10.0.0.1:23456", "--rank", "0", "--world-size", "2",
            "--resume", "old/run", "--epochs", "3"]
    hint = trainer.resume_command(Namespace(world=world, argv=argv, rank=0), Path("runs/r"))
    assert hint == ("every rank's launch command with --resume added; rank 0's: python trainer.py --multi-node "
                    "--init-method tcp://10.0.0.1:23456 --rank 0 --world-size 2 --epochs 3 --resume runs/r")
    torchrun = trainer.resume_command(Namespace(world=distributed_world(rank=0, init_method="env://"),
                                                argv=["--multi-node", "--async"], rank=None), Path("runs/r"))
    assert torchrun == ("the same torchrun command with --resume added: torchrun ... trainer.py --multi-node --async "
                        "--resume runs/r")
    assert trainer.resume_command(Namespace(world=None), Path("runs/r")) == "python trainer.py --resume runs/r"


def distributed_world(rank, init_method):
    import distributed
    return distributed.World(rank, 2, rank, "gloo", init_method, 30.0, "cpu")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_while_the_trainer_starts_exits_in_one_line_without_a_traceback(tmp_path, corpus_file, signum):
    """A stop signal during the imports (seconds before main runs): exit 128 + signum, one line, no folder."""
    process = subprocess.Popen([sys.executable, str(ROOT / "trainer.py"), *base_args(tmp_path, corpus_file)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: interrupted by SIG")
    assert new_run_folders(tmp_path) == []


def test_sighup_is_left_ignored_under_nohup_and_handlers_come_back_after_training():
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
    before = signal.getsignal(signal.SIGINT)
    with trainer.Signals() as signals:
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signals._handle
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


PAUSED_IMPORT = """
import runpy, sys, time
class PauseAtNumpy:  # a slow import, made certain: the script's imports are under way when Ctrl-C comes
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            print("importing numpy", flush=True)
            time.sleep(60)
sys.meta_path.insert(0, PauseAtNumpy())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script, args", [("evaluate.py", ["--vectors", "absent.txt"]),
                                          ("pip_loss.py", ["--dataset", "absent.txt", "--select-dim"])])
def test_ctrl_c_while_evaluate_or_pip_loss_import_is_exit_130_in_one_line(tmp_path, script, args):
    """Issue 32 #12: Ctrl-C while numpy, scipy (and numba) load is a quiet exit 130, not a traceback."""
    process = subprocess.Popen([sys.executable, "-c", PAUSED_IMPORT, str(ROOT / script), *args], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    assert process.stdout.readline() == "importing numpy\n"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == f"{script}: interrupted\n"
    assert list(tmp_path.iterdir()) == []
