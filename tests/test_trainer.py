import argparse
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engines
import trainer

ROOT = Path(__file__).resolve().parent.parent


def write_small_corpus(path, n_sentences=600, seed=0):
    """Sentences about two topics, so that there is something to learn."""
    rng = np.random.default_rng(seed)
    topics = [["cat", "dog", "mouse", "horse", "cow", "pig", "sheep", "goat"],
              ["car", "bus", "train", "plane", "ship", "truck", "bike", "tram"]]
    glue = ["the", "a", "and", "with", "near"]
    lines = []
    for _ in range(n_sentences):
        words = topics[rng.integers(2)]
        lines.append(" ".join(rng.choice(words + glue, 8)).capitalize() + ".")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def corpus_file(tmp_path):
    return write_small_corpus(tmp_path / "small.txt")


def base_args(tmp_path, corpus_file, *extra):
    return ["--dataset", str(corpus_file), "--cache-dir", str(tmp_path / "cache"), "--log-dir",
            str(tmp_path / "runs"), "--embed-size", "16", "--remove-th", "1", "--num-threads", "1", "--quiet",
            "--pip-vocab", "30", *extra]


def read_scalar_tags(run_dir):
    """Tags of the scalars in a run's TensorBoard event files (TFRecord of Event protos).

    tensorboardX stores a tag with characters TensorBoard rejects replaced by '_'
    ('PIP loss (oracle)' becomes 'PIP_loss__oracle_'); the tags are returned as logged.
    """
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import _clean_tag
    tags = set()
    for events in Path(run_dir).glob("events.out.tfevents.*"):
        raw = events.read_bytes()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
            tags.update(v.tag for v in event.summary.value if v.HasField("simple_value"))
            offset += 12 + length + 4
    return {tag for tag in LOGGED_TAGS if _clean_tag(tag) in tags} | tags


LOGGED_TAGS = ("Batch loss", "Train loss", "Epoch time", "Words per second", "Learning rate", "PIP loss",
               "PIP loss (oracle)", "PIP loss (normalized)", "Similarity/pairs", "Analogy accuracy")


def test_one_epoch_run_logs_every_scalar_and_exports(tmp_path, corpus_file):
    export = tmp_path / "vectors.txt"
    code = trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--log-interval", "1",
                                  "--run-name", "one", "--export", str(export)))
    assert code == 0
    run_dir = tmp_path / "runs" / "one"
    assert {"Batch loss", "Train loss", "Epoch time", "Words per second", "Learning rate", "PIP loss",
            "PIP loss (oracle)", "PIP loss (normalized)"} <= read_scalar_tags(run_dir)
    assert (run_dir / "args.json").exists() and (run_dir / "checkpoint.pt").exists()
    assert (run_dir / "best.pt").exists()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["words"]) == ckpt["model"]["in_embed.weight"].shape[0]
    # the projector got the embedding with the words as labels
    assert any(p.name == "metadata.tsv" for p in run_dir.rglob("*"))

    from gensim.models import KeyedVectors
    keyed = KeyedVectors.load_word2vec_format(str(export))
    assert keyed.index_to_key == ckpt["words"]
    np.testing.assert_allclose(keyed.vectors, ckpt["model"]["in_embed.weight"].numpy(), rtol=1e-5, atol=1e-6)


def test_normalized_pip_loss_is_logged_every_pip_interval_and_picks_best_pt(tmp_path, corpus_file, capsys):
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "4", "--pip-interval", "2",
                                  "--run-name", "n")) == 0
    run_dir = tmp_path / "runs" / "n"
    history = torch.load(run_dir / "checkpoint.pt", weights_only=True)["history"]
    normalized = history["PIP loss (normalized)"]
    assert [epoch for epoch, _ in normalized] == [2, 4]
    assert all(0.0 < value < 2.0 for _, value in normalized)  # 1 - a correlation
    best_epoch, best_value = min(normalized, key=lambda point: point[1])
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == best_epoch
    assert f"lowest PIP loss (normalized): {best_value:.4g} at epoch {best_epoch}" in capsys.readouterr().out


def scripted_pip_losses(monkeypatch, values):
    """PipMonitor.losses returns these 'PIP loss (normalized)' values, one per evaluation."""
    remaining = list(values)
    monkeypatch.setattr(trainer.PipMonitor, "losses", lambda monitor, vectors: {
        "PIP loss (normalized)": remaining.pop(0)})


@pytest.mark.parametrize("pip_interval,stopped_at", [("1", 4), ("2", 8)])
def test_early_stop_ends_the_run_as_a_normal_end(tmp_path, corpus_file, monkeypatch, capsys, pip_interval,
                                                 stopped_at):
    # evaluations 3 and 4 do not improve on evaluation 2 (an equal value is no improvement)
    scripted_pip_losses(monkeypatch, [0.5, 0.4, 0.45, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    export = tmp_path / "v.txt"
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "20", "--pip-interval", pip_interval,
                                  "--early-stop", "2", "--run-name", "s", "--export", str(export))) == 0
    run_dir = tmp_path / "runs" / "s"
    out = capsys.readouterr().out
    assert (f"early stop after epoch {stopped_at} of 20: PIP loss (normalized) has not improved for 2 "
            f"evaluations (lowest 0.4 at epoch {stopped_at // 2})") in out
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == stopped_at
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == stopped_at // 2
    assert export.exists() and (run_dir / "curves.png").exists()
    assert "lowest PIP loss (normalized): 0.4" in out and out.rstrip().endswith(f"done: {run_dir}")


def test_early_stop_off_by_default_and_user_mistakes(tmp_path, corpus_file, monkeypatch, capsys):
    scripted_pip_losses(monkeypatch, [0.5, 0.6, 0.7, 0.8])
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "4", "--run-name", "d")) == 0
    assert torch.load(tmp_path / "runs" / "d" / "checkpoint.pt", weights_only=True)["epoch"] == 4
    assert "early stop" not in capsys.readouterr().out
    for flags in (["--early-stop", "-1"], ["--early-stop", "2", "--pip-interval", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            trainer.parse_args(base_args(tmp_path, corpus_file, *flags))
        assert exit_info.value.code == 2
        assert "--early-stop" in capsys.readouterr().err


def test_binary_export_round_trip(tmp_path, corpus_file):
    export = tmp_path / "vectors.bin"
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--pip-interval", "0",
                                  "--run-name", "b", "--export", str(export))) == 0
    from gensim.models import KeyedVectors
    keyed = KeyedVectors.load_word2vec_format(str(export), binary=True)
    ckpt = torch.load(tmp_path / "runs" / "b" / "checkpoint.pt", weights_only=True)
    assert np.array_equal(keyed.vectors, ckpt["model"]["in_embed.weight"].numpy())


def test_a_two_thread_kernel_run_saves_the_models_rows_alone(tmp_path, corpus_file):
    """The threads' copies of the hot rows live below the model's rows (engines._room_below): the
    checkpoint holds the model's rows only, the same as the export."""
    export = tmp_path / "vectors.bin"
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--pip-interval", "0", "--num-threads",
                                  "2", "--run-name", "t", "--export", str(export))) == 0
    from gensim.models import KeyedVectors
    keyed = KeyedVectors.load_word2vec_format(str(export), binary=True)
    weights = torch.load(tmp_path / "runs" / "t" / "checkpoint.pt", weights_only=True)["model"]
    for weight in weights.values():
        assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    assert np.array_equal(keyed.vectors, weights["in_embed.weight"].numpy())


def test_training_separates_the_topics(tmp_path, corpus_file):
    export = tmp_path / "v.txt"
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "10", "--pip-interval", "0",
                                  "--subsample-th", "0", "--export", str(export))) == 0
    from gensim.models import KeyedVectors
    keyed = KeyedVectors.load_word2vec_format(str(export))
    assert keyed.similarity("cat", "dog") > keyed.similarity("cat", "car") + 0.2
    assert keyed.similarity("bus", "train") > keyed.similarity("bus", "horse") + 0.2


def stop_after(monkeypatch, loop_name, n_steps):
    """Make the loop receive SIGINT after n_steps reported steps, as a user pressing Ctrl-C would."""
    real = getattr(engines, loop_name)
    calls = [0]  # across epochs

    def loop(engine, epoch):
        report = epoch.report

        def counting_report(*a):
            calls[0] += 1
            if calls[0] == n_steps:
                signal.raise_signal(signal.SIGINT)
            report(*a)
        epoch.report = counting_report
        return real(engine, epoch)
    monkeypatch.setattr(engines, loop_name, loop)


def final_vectors(tmp_path, name):
    return torch.load(tmp_path / "runs" / name / "checkpoint.pt", weights_only=True)["model"]["in_embed.weight"]


@pytest.mark.parametrize("loop,stop_step,extra", [
    ("kernel_epoch", 12, []),  # 8 steps an epoch, 2 a kernel call
    ("autograd_epoch", 150, ["--optimizer", "sparse_adam", "--batch-size", "256"]),  # 115 steps an epoch
    ("window_epoch", 140, ["--engine", "torch", "--batch-size", "256"]),  # in the middle of a draw of steps
])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, corpus_file, monkeypatch, loop, stop_step, extra):
    monkeypatch.setattr(engines, "CENTERS_PER_KERNEL_CALL", 1400)
    args = base_args(tmp_path, corpus_file, "--epochs", "3", "--pip-interval", "0", "--subsample-th", "0", *extra)
    assert trainer.main(args + ["--run-name", "straight"]) == 0
    with monkeypatch.context() as patch:
        stop_after(patch, loop, stop_step)  # mid-way through the second epoch
        assert trainer.main(args + ["--run-name", "stopped"]) == 128 + signal.SIGINT
    ckpt = torch.load(tmp_path / "runs" / "stopped" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["position"]["step"] > 0  # a mid-epoch checkpoint
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert trainer.main(["--resume", str(tmp_path / "runs" / "stopped"), "--quiet"]) == 0
    assert torch.equal(final_vectors(tmp_path, "stopped"), final_vectors(tmp_path, "straight"))


def test_resume_with_more_epochs_extends_the_run(tmp_path, corpus_file):
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--pip-interval", "0",
                                  "--run-name", "r")) == 0
    assert trainer.main(["--resume", str(tmp_path / "runs" / "r"), "--epochs", "2", "--quiet"]) == 0
    ckpt = torch.load(tmp_path / "runs" / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["epochs"] == 2


def test_a_second_resume_keeps_what_the_first_changed(tmp_path, corpus_file):
    """--epochs given to --resume lands in args.json, which the next --resume reads."""
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--pip-interval", "0",
                                  "--run-name", "r")) == 0
    run_dir = tmp_path / "runs" / "r"
    assert trainer.main(["--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run_dir / "args.json").read_text())["epochs"] == 2
    assert trainer.main(["--resume", str(run_dir), "--quiet"]) == 0  # nothing left: ends at once, as done
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["epochs"] == 2


def test_the_printed_resume_command_is_shell_quoted_and_works_from_another_folder(tmp_path, monkeypatch, capsys):
    """Issue 32 #13 and #18: a run name with a space and shell syntax; args.json holds absolute paths, so
    the printed command, pasted into a shell elsewhere, resumes the run (and runs nothing else)."""
    monkeypatch.chdir(tmp_path)
    write_small_corpus(tmp_path / "small.txt")
    name = "my run;$(touch PWN)"
    with monkeypatch.context() as patch:
        stop_after(patch, "kernel_epoch", 1)
        assert trainer.main(["--dataset", "small.txt", "--cache-dir", "cache", "--log-dir", "runs", "--embed-size",
                             "16", "--remove-th", "1", "--num-threads", "1", "--quiet", "--pip-interval", "0",
                             "--epochs", "2", "--run-name", name]) == 128 + signal.SIGINT
    run_dir = tmp_path / "runs" / name
    command = capsys.readouterr().out.split("Resume with: ")[1].strip()
    assert shlex.split(command) == ["python", "trainer.py", "--resume", str(run_dir)]
    saved = json.loads((run_dir / "args.json").read_text())
    assert (saved["dataset"], saved["cache_dir"], saved["log_dir"]) == tuple(
        str(tmp_path / p) for p in ("small.txt", "cache", "runs"))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ours = shlex.join([sys.executable, str(ROOT / "trainer.py")])
    result = subprocess.run(command.replace("python trainer.py", ours, 1), shell=True, cwd=elsewhere,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not list(tmp_path.rglob("PWN"))


def test_a_resumed_run_without_its_best_pt_does_not_point_at_it(tmp_path, corpus_file, monkeypatch, capsys):
    """Issue 32 #16: best.pt deleted, the resumed epochs do not improve: the closing line says it is gone."""
    scripted_pip_losses(monkeypatch, [0.4, 0.5])
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "b")) == 0
    run_dir = tmp_path / "runs" / "b"
    (run_dir / "best.pt").unlink()
    capsys.readouterr()
    assert trainer.main(["--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"lowest PIP loss (normalized): 0.4 at epoch 1 (its checkpoint, best.pt, is no longer in {run_dir})" in out
    assert not (run_dir / "best.pt").exists()


def test_torch_engine_sgd_learns(tmp_path, corpus_file):
    export = tmp_path / "t.txt"
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "10", "--pip-interval", "0", "--engine", "torch",
                                  "--batch-size", "64", "--subsample-th", "0", "--export", str(export))) == 0
    from gensim.models import KeyedVectors
    keyed = KeyedVectors.load_word2vec_format(str(export))
    assert keyed.similarity("cat", "dog") > keyed.similarity("cat", "car") + 0.2


def test_help_has_a_string_for_every_flag():
    parser = trainer.get_parser()
    for action in parser._actions:
        assert action.help, action.option_strings


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "trainer.py"), "--dataset", str(tmp_path / "nope.txt"),
                             "--log-dir", str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope.txt" in result.stderr


def test_cli_exits_before_the_pictures_and_a_child_still_writes_them_whole(tmp_path, corpus_file):
    argv = base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "c", "--plot-words", "cat", "dog", "car")
    result = subprocess.run([sys.executable, str(ROOT / "trainer.py"), *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "c"
    assert f"curves: {run_dir / 'curves.png'}" in result.stdout and f"done: {run_dir}" in result.stdout
    deadline = time.time() + 120
    pictures = [run_dir / "curves.png", run_dir / "projection.png"]
    while not all(p.exists() for p in pictures) and time.time() < deadline:
        time.sleep(0.2)
    for picture in pictures:  # renamed into place only once whole
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    time.sleep(0.5)  # the child's last rename is done; nothing of its temporary files is left
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_all_finite_finds_nan_and_inf_on_every_path():
    for dtype in (torch.float32, torch.float64):  # numpy's check, torch's
        weights = torch.zeros(50, 8, dtype=dtype)
        assert trainer.all_finite(weights)
        for bad in (float("nan"), float("inf"), -float("inf")):
            weights[49, 7] = bad
            assert not trainer.all_finite(weights)
            weights[49, 7] = 0.0


def test_evaluation_scalars_and_pictures(tmp_path, corpus_file):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("word1\tword2\tscore\ncat\tdog\t9\ncat\tcar\t1\nbus\ttrain\t8\nbus\tcow\t2\n")
    questions = tmp_path / "questions.txt"
    questions.write_text(": animals\ncat dog cow pig\ncar bus train plane\n")
    projector = tmp_path / "projector"
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "2", "--run-name", "e", "--eval-similarity",
                                  str(pairs), "--eval-analogy", str(questions), "--plot-words", "cat", "dog", "car",
                                  "bus", "--export-projector", str(projector))) == 0
    run_dir = tmp_path / "runs" / "e"
    assert {"Similarity/pairs", "Analogy accuracy"} <= read_scalar_tags(run_dir)
    for picture in ("curves.png", "projection.png"):
        assert (run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (projector / "vectors.tsv").exists() and (projector / "metadata.tsv").exists()


def test_plot_words_of_an_rnn_run_draws_unseen_words_from_their_spelling(tmp_path, corpus_file, capsys):
    """The trainer plots words as evaluate.py does (plots.plot_words): case folded, and an rnn model's
    words outside the vocabulary drawn from their spelling, not left out."""
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--run-name", "r", "--model-name", "rnn",
                                  "--char-embed-size", "4", "--hidden-size", "8", "--pip-interval", "0",
                                  "--plot-words", "CAT", "dog", "dogz")) == 0
    out = capsys.readouterr().out
    assert "left out" not in out and "no projection" not in out
    assert (tmp_path / "runs" / "r" / "projection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class EagerGraphs:
    """Stands in for engines.WindowGraphs on the CPU: the same calls, each step run eagerly (lr as a tensor,
    as a graph reads it)."""

    def __init__(self, model):
        self.model, self.calls = model, {"draw": 0, "step": 0}

    def draw(self, context_ids, weight, out_ids, lrs):
        self.calls["draw"] += 1
        per_step = len(context_ids) // len(lrs)
        return torch.stack([self.step(context_ids[lo:lo + per_step], weight[lo:lo + per_step],
                                      out_ids[lo:lo + per_step], lr, count=False)
                            for lo, lr in zip(range(0, len(context_ids), per_step), lrs)])

    def step(self, context_ids, weight, out_ids, lr, count=True):
        self.calls["step"] += count
        return self.model.window_step(context_ids, weight, out_ids, torch.tensor(lr))


def test_whole_draw_replays_train_as_step_by_step_and_stop_at_the_end_of_a_draw(tmp_path, corpus_file, monkeypatch):
    """window_epoch hands a GPU run's whole draws to one graph replay: the weights, and a stop's position, must
    come out as if the steps had run one by one (a stop asked for mid-draw takes effect at the draw's end)."""
    stand_ins = []
    monkeypatch.setattr(engines, "window_graphs", lambda step, model, args, device:
                        stand_ins.append(EagerGraphs(model)) or stand_ins[-1])
    args = base_args(tmp_path, corpus_file, "--epochs", "2", "--pip-interval", "0", "--engine", "torch",
                     "--batch-size", "70", "--subsample-th", "0")
    assert trainer.main(args + ["--run-name", "draws"]) == 0
    monkeypatch.setattr(engines, "window_graphs", lambda step, model, args, device: None)
    assert trainer.main(args + ["--run-name", "steps"]) == 0
    assert stand_ins[0].calls["draw"] > 2 and stand_ins[0].calls["step"] > 0  # whole draws, and one cut short
    assert torch.allclose(final_vectors(tmp_path, "draws"), final_vectors(tmp_path, "steps"), atol=1e-5)
    monkeypatch.setattr(engines, "window_graphs", lambda step, model, args, device: EagerGraphs(model))
    with monkeypatch.context() as patch:
        stop_after(patch, "window_epoch", 40)  # the 8th step of the second draw (32 steps a draw)
        assert trainer.main(args + ["--run-name", "stopped"]) == 128 + signal.SIGINT
    ckpt = torch.load(tmp_path / "runs" / "stopped" / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 64 and ckpt["position"] == {"step": 64}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert trainer.main(["--resume", str(tmp_path / "runs" / "stopped"), "--quiet"]) == 0
    assert torch.allclose(final_vectors(tmp_path, "stopped"), final_vectors(tmp_path, "draws"), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gpu_kernel", [True, False])
def test_cuda_graph_steps_equal_eager_steps(gpu_kernel):
    """The captured steps replay window_step: the same windows give the same weights and sums, for a whole draw
    and for one step, with the Triton step and with tensor ops."""
    from model import SGNS
    torch.manual_seed(0)
    eager = SGNS(500, 32).cuda()
    with torch.no_grad():
        eager.out_embed.weight.normal_(0, 0.1)
    captured = SGNS(500, 32).cuda()
    captured.load_state_dict(eager.state_dict())
    start = {key: value.clone() for key, value in eager.state_dict().items()}
    device = torch.device("cuda")
    eager_step = engines.choose_window_step(eager, device, gpu_kernel)
    graphs = engines.WindowGraphs(engines.choose_window_step(captured, device, gpu_kernel), captured, per_step=64,
                                  window=3, neg_count=4)
    steps = engines.data.STEPS_PER_DRAW
    for i in range(3):
        context_ids = torch.randint(0, 500, (64 * steps, 6), device="cuda")
        weight = (torch.rand(64 * steps, 6, device="cuda") < 0.7).float()
        out_ids = torch.randint(0, 500, (64 * steps, 5), device="cuda")
        lrs = [0.05 / (i + 1 + s / steps) for s in range(steps)]
        expected = torch.stack([eager_step(context_ids[lo:lo + 64], weight[lo:lo + 64], out_ids[lo:lo + 64], lr)
                                for lo, lr in zip(range(0, 64 * steps, 64), lrs)])
        torch.testing.assert_close(graphs.draw(context_ids, weight, out_ids, lrs), expected, rtol=1e-5, atol=1e-4)
        expected = eager_step(context_ids[:64], weight[:64], out_ids[:64], lrs[0])
        torch.testing.assert_close(graphs.step(context_ids[:64], weight[:64], out_ids[:64], lrs[0]), expected,
                                   rtol=1e-5, atol=1e-4)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(captured.state_dict()[key], value, atol=1e-5, rtol=1e-4)
        assert not torch.equal(value, start[key])

def scalar_points(run_dir, tag):
    """How many points of a scalar tag the run's TensorBoard event files hold."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import _clean_tag
    count = 0
    for events in Path(run_dir).glob("events.out.tfevents.*"):
        raw, offset = events.read_bytes(), 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
            count += sum(v.tag == _clean_tag(tag) for v in event.summary.value)
            offset += 12 + length + 4
    return count


@pytest.mark.parametrize("extra", [[], ["--engine", "torch"], ["--optimizer", "sparse_adam"]],
                         ids=["kernel", "window", "autograd"])
def test_batch_loss_comes_every_log_interval_steps_on_every_engine(tmp_path, corpus_file, extra):
    """A step is the text of one --batch-size batch on every engine, the kernel included (it
    trains many steps a call and reports each), so Batch loss comes at the same rate in words."""
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "2", "--pip-interval", "0", "--subsample-th", "0",
                                  "--batch-size", "240", "--log-interval", "10", "--run-name", "b", *extra)) == 0
    ckpt = torch.load(tmp_path / "runs" / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["global_step"] == 2 * 120  # 4,800 tokens an epoch, 40 centers a step
    assert scalar_points(tmp_path / "runs" / "b", "Batch loss") == 24


def test_a_checkpoint_written_mid_epoch_by_an_earlier_version_restarts_its_epoch(tmp_path, corpus_file):
    """Earlier versions kept a mid-epoch position in sentences or centers: such a run still
    resumes, from the start of that epoch, and says so."""
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "1", "--pip-interval", "0",
                                  "--run-name", "old")) == 0
    path = tmp_path / "runs" / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(epoch=0, position={"sentence": 300}, global_step=3, epoch_loss=1e9, epoch_pairs=1)
    torch.save(ckpt, path)
    with pytest.warns(UserWarning, match="starts again from its beginning"):
        assert trainer.main(["--resume", str(path.parent), "--quiet"]) == 0
    resumed = torch.load(path, weights_only=True)
    assert resumed["epoch"] == 1 and resumed["position"] == {}
    assert resumed["history"]["Train loss"][-1][1] < 10  # the stale partial sums were dropped


def test_epoch_ends_checkpoint_by_time_unless_an_interval_is_given():
    by_time = argparse.Namespace(save_interval=None)
    assert not trainer.checkpoint_due(by_time, 0, False, trainer.CHECKPOINT_SECONDS - 1)
    assert trainer.checkpoint_due(by_time, 0, False, trainer.CHECKPOINT_SECONDS)
    assert trainer.checkpoint_due(by_time, 3, True, 0.0)  # the last epoch always writes one
    every_two = argparse.Namespace(save_interval=2)
    assert [trainer.checkpoint_due(every_two, epoch, False, 0.0) for epoch in range(4)] == [False, True, False, True]


def test_a_one_process_kernel_run_takes_sentence_blocks_in_a_new_order_each_epoch(tmp_path, corpus_file, monkeypatch):
    shuffled = []
    real = engines.data.shuffle_sentence_blocks

    def recording(kept_ids, starts, seed, epoch):
        shuffled.append(epoch)
        return real(kept_ids, starts, seed, epoch)
    monkeypatch.setattr(engines.data, "shuffle_sentence_blocks", recording)
    assert trainer.main(base_args(tmp_path, corpus_file, "--epochs", "2", "--pip-interval", "0")) == 0
    assert shuffled == [0, 1]


NO_TORCH_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import trainer
code = trainer.main(sys.argv[2:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


def test_the_compiled_loop_on_one_process_trains_and_checkpoints_without_importing_torch(tmp_path, corpus_file):
    """lazy.py: the kernel loop trains tables.Tables and writes torch's checkpoint format itself,
    never importing torch; the checkpoint is what torch.load(weights_only=True) reads, and it
    holds the exported vectors. A run that needs torch (the window loop) imports it."""
    export = tmp_path / "v.txt"
    argv = base_args(tmp_path, corpus_file, "--epochs", "2", "--pip-interval", "0", "--run-name", "k",
                     "--export", str(export))
    result = subprocess.run([sys.executable, "-c", NO_TORCH_CHILD, str(ROOT), *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout
    from gensim.models import KeyedVectors
    keyed = KeyedVectors.load_word2vec_format(str(export))
    ckpt = torch.load(tmp_path / "runs" / "k" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["optimizer"] is None
    vectors = ckpt["model"]["in_embed.weight"].numpy()
    assert np.allclose(keyed.vectors, vectors[[ckpt["words"].index(w) for w in keyed.index_to_key]], atol=1e-5)
    result = subprocess.run([sys.executable, "-c", NO_TORCH_CHILD, str(ROOT),
                             *base_args(tmp_path, corpus_file, "--epochs", "1", "--pip-interval", "0",
                                        "--engine", "torch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch imported: True" in result.stdout
