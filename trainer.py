"""Train SGNS word vectors: python trainer.py --help"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

if "--multi-node" in sys.argv:  # c10d logs every failed connection with a C++ stack trace; we report it in
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # one line (read when torch loads: set it first)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm

import cpu_kernel
import data
import distributed
import pip_loss
from model import RNN_DEFAULTS, build_model

CHECKPOINT_FORMAT = 1
RNN_BATCH_SIZE = 65536  # see --batch-size and bench/bench_rnn.py
TOKENS_PER_KERNEL_CALL = 200_000  # work between two looks at signals, progress and the loss
# Flags a resumed run may change; everything else comes from the saved run.
RESUMABLE_OVERRIDES = ("rank", "world_size", "init_method", "backend", "dist_timeout", "epochs", "num_threads",
                       "device", "cuda_graph", "gpu_kernel", "log_interval", "save_interval", "pip_interval", "export",
                       "quiet", "early_stop")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help says it already, where it is None (those
    flags say in their help what they default to) and for a flag off unless given."""

    def _get_help_string(self, action):
        if action.default is None or (action.default is False and action.nargs == 0) or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(description="Train word vectors with skip-gram negative sampling (SGNS).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("corpus")
    g.add_argument("--dataset", default=None,
                   help="corpus: a .txt file or a folder of .txt files (as given or inside --data-dir), "
                        "'gutenberg' (NLTK's selection) or 'lee' (gensim's). Default: data/harry_potter.txt "
                        "if present, else NLTK gutenberg, else lee")
    g.add_argument("--data-dir", default="data", help="folder where --dataset names are looked up")
    g.add_argument("--cache-dir", default="data/cache", help="folder for the encoded corpus and derived matrices")
    g.add_argument("--remove-th", type=int, default=5, help="min count: rarer words are dropped from the vocabulary")
    g.add_argument("--remove-stopwords", action="store_true", help="drop NLTK's English stopwords (as the seed)")
    g.add_argument("--lemmatize", action="store_true", help="replace words by their WordNet lemma (as the seed)")
    g = p.add_argument_group("model and sampling")
    g.add_argument("--model-name", default="sgns", choices=["sgns", "rnn"],
                   help="sgns: a vector per word (embedding tables); rnn: vectors computed from the word's "
                        "characters by an LSTM, so unseen words get vectors too")
    g.add_argument("--is-character", action="store_true", help="same as --model-name rnn (the seed's flag)")
    g.add_argument("--embed-size", type=int, default=100, help="embedding dimension d")
    g.add_argument("--window-size", type=int, default=5,
                   help="max context words each side (shrunk at random per center)")
    g.add_argument("--neg-sample-size", type=int, default=5, help="negative samples per (center, context) pair")
    g.add_argument("--ns-exponent", type=float, default=0.75, help="negatives are drawn from unigram^this")
    g.add_argument("--subsample-th", type=float, default=1e-3, help="subsampling threshold t (0 turns it off)")
    g = p.add_argument_group("rnn model (--model-name rnn)")
    g.add_argument("--char-embed-size", type=int, default=RNN_DEFAULTS["char_embed_size"],
                   help="size of the character embeddings fed to the LSTM")
    g.add_argument("--hidden-size", type=int, default=RNN_DEFAULTS["hidden_size"], help="LSTM hidden state size")
    g.add_argument("--num-layer", type=int, default=RNN_DEFAULTS["num_layer"], help="stacked LSTM layers")
    g.add_argument("--dropout", type=float, default=RNN_DEFAULTS["dropout"],
                   help="dropout between LSTM layers and on the final hidden state, in training only")
    g.add_argument("--bidirectional", action="store_true",
                   help="also read words right to left; the two last states are concatenated")
    g.add_argument("--mlp-size", type=int, default=RNN_DEFAULTS["mlp_size"],
                   help="width of the layer after the LSTM (default: --embed-size, i.e. one linear layer to d); "
                        "another width adds a tanh and a second linear layer to d")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="passes over the corpus")
    g.add_argument("--lr", type=float, default=None,
                   help="starting learning rate, decayed linearly to ~0 (default 0.025 for sgd, 0.001 for "
                        "sparse_adam and adam)")
    g.add_argument("--optimizer", default=None, choices=["sgd", "sparse_adam", "adam"],
                   help="sgd: plain SGD (on touched rows for sgns, as word2vec); sparse_adam: torch.optim.SparseAdam "
                        "(sgns); adam: torch.optim.Adam (dense). Default: sgd for sgns, adam for rnn")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"(center, context) pairs per step of the torch engine (the CPU kernel steps pair by pair). "
                        f"Default: 4096 for sgns, {RNN_BATCH_SIZE} for rnn, whose step costs grow with the batch's "
                        f"distinct words, which grow much slower than the batch")
    g.add_argument("--engine", default="auto", choices=["auto", "kernel", "torch"],
                   help="kernel: compiled word2vec-style CPU loop; torch: batched PyTorch steps (GPU, "
                        "sparse_adam, --multi-node --sync); auto picks kernel for SGD on CPU, "
                        "--multi-node --async included")
    g.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    g.add_argument("--seed", type=int, default=1, help="random seed (runs are reproducible with --num-threads 1)")
    g.add_argument("--device", default="cpu", help="torch device for the torch engine: cpu, cuda, cuda:N")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help=f"on a GPU, replay every {data.STEPS_PER_DRAW} sgns SGD steps (one draw of windows) as one "
                        "captured CUDA graph instead of launching their kernels one by one")
    g.add_argument("--gpu-kernel", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, run the sgns SGD step as three Triton kernels (Triton comes with CUDA builds "
                        "of torch on Linux and needs a C compiler; without them, or with --no-gpu-kernel, the "
                        "step runs as tensor ops)")
    g = p.add_argument_group("monitoring and output")
    g.add_argument("--log-dir", default="saved/runs", help="each run gets its own folder here")
    g.add_argument("--run-name", default=None, help="name of the run folder (default: date and time)")
    g.add_argument("--log-interval", type=int, default=100, help="steps between 'Batch loss' points")
    g.add_argument("--save-interval", type=int, default=1,
                   help="epochs between checkpoints and TensorBoard projector snapshots")
    g.add_argument("--pip-interval", type=int, default=1, help="epochs between PIP loss evaluations (0: off)")
    g.add_argument("--pip-vocab", type=int, default=10_000, help="most frequent words the PIP loss is computed on")
    g.add_argument("--early-stop", type=int, default=0, metavar="N",
                   help="stop when 'PIP loss (normalized)' has not improved for N evaluations in a row (one "
                        "every --pip-interval epochs); the run then ends as at its last epoch. 0 (the default) "
                        "turns it off")
    g.add_argument("--projector-words", type=int, default=10_000,
                   help="most frequent words sent to TensorBoard's projector")
    g.add_argument("--projector-interval", type=int, default=0,
                   help="epochs between projector snapshots; 0: only at the end of the run "
                        "(a snapshot of 10,000 words takes tensorboardX about 2.5 s)")
    g.add_argument("--export", default=None,
                   help="write the vectors in word2vec format at the end (binary if the path ends in .bin)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a stopped run from its checkpoint, with its saved arguments "
                        "(--epochs given too changes the total)")
    g.add_argument("--load-model", default=None, metavar="CHECKPOINT",
                   help="start from the weights of a checkpoint trained on the same corpus")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("evaluation and plots")
    g.add_argument("--eval-similarity", nargs="+", default=[], metavar="FILE",
                   help="word-pair files (word1 TAB word2 TAB score): Spearman rho logged every --eval-interval epochs")
    g.add_argument("--eval-analogy", default=None, metavar="FILE",
                   help="analogy file in the Google questions-words.txt format: accuracy logged every "
                        "--eval-interval epochs")
    g.add_argument("--eval-interval", type=int, default=1, help="epochs between evaluations on the files above")
    g.add_argument("--plot-words", nargs="+", default=[], metavar="WORD",
                   help="words to draw in a 2-D PCA projection, saved as projection.png in the run directory")
    g.add_argument("--export-projector", default=None, metavar="DIR",
                   help="also write TensorBoard projector files vectors.tsv and metadata.tsv into DIR")
    distributed.add_arguments(p)
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume:
        args = _args_for_resume(parser, args, argv)
    if args.is_character:
        args.model_name = "rnn"
    if args.optimizer is None:
        args.optimizer = "adam" if args.model_name == "rnn" else "sgd"
    if args.batch_size is None:
        args.batch_size = RNN_BATCH_SIZE if args.model_name == "rnn" else 4096
    if args.model_name == "rnn":
        _check_rnn_args(parser, args)
    distributed.check_arguments(parser, args)
    for name in ("embed_size", "window_size", "neg_sample_size", "epochs", "batch_size", "num_threads",
                 "log_interval", "save_interval", "pip_vocab", "projector_words", "eval_interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("remove_th", "pip_interval", "projector_interval", "early_stop"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.early_stop and not args.pip_interval:
        parser.error("--early-stop watches the PIP loss: it needs --pip-interval above 0")
    if args.early_stop and args.multi_node:
        parser.error("--early-stop is not available with --multi-node (only rank 0 computes the PIP loss)")
    if args.lr is None:
        args.lr = 0.025 if args.optimizer == "sgd" else 0.001
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.subsample_th < 0:
        parser.error("--subsample-th must be 0 (off) or positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if args.engine == "auto":
        args.engine = ("kernel" if args.optimizer == "sgd" and args.device == "cpu" and args.model_name == "sgns"
                       else "torch")
    if args.engine == "kernel" and args.model_name != "sgns":
        parser.error("--engine kernel trains sgns only; the rnn model runs on --engine torch")
    if args.engine == "kernel" and (args.optimizer != "sgd" or args.device != "cpu"):
        parser.error("--engine kernel runs plain SGD on the CPU; use --engine torch for other optimizers or devices")
    return args


def _check_rnn_args(parser, args):
    for name in ("char_embed_size", "hidden_size", "num_layer"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.mlp_size is not None and args.mlp_size <= 0:
        parser.error(f"--mlp-size must be positive, got {args.mlp_size}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.optimizer == "sparse_adam":
        parser.error("--optimizer sparse_adam is for sgns's embedding tables; use adam (or sgd) for rnn")


def _args_for_resume(parser, args, argv):
    """The saved run's arguments, with the few flags a resume may change taken from the command line."""
    run_dir = Path(args.resume)
    args_file = run_dir / "args.json"
    if not args_file.is_file():
        parser.error(f"--resume {run_dir}: no args.json there (is it a run directory?)")
    try:
        saved = json.loads(args_file.read_text())
    except (OSError, ValueError) as err:
        parser.error(f"--resume {run_dir}: cannot read args.json ({err})")
    # Flags added since the run was saved take their defaults.
    saved = {**vars(get_parser().parse_args([])), **saved}
    given = vars(get_parser().parse_args(argv, namespace=argparse.Namespace(**{
        k: None for k in vars(args)})))
    merged = dict(saved)
    for name in RESUMABLE_OVERRIDES:
        if given.get(name) is not None:
            merged[name] = getattr(args, name)
    merged["resume"] = str(run_dir)
    return argparse.Namespace(**merged)


# ---------------------------------------------------------------------------------------------
# Run directory and checkpoints

def make_run_dir(args):
    if args.resume:
        return Path(args.resume)
    name = args.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.log_dir) / name
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(args.log_dir) / f"{name}-{suffix}"
    run_dir.mkdir(parents=True)
    data.atomic_write(run_dir / "args.json", lambda tmp: tmp.write_text(json.dumps(vars(args), indent=2)))
    return run_dir


def save_checkpoint(path, model, optimizer, corpus, args, state):
    """Everything a resume needs, written atomically (temp file + rename)."""
    if not distributed.is_main():
        return
    ckpt = {"format": CHECKPOINT_FORMAT, "model_name": args.model_name, "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "words": corpus.words, "counts": corpus.counts.tolist(), "corpus_hash": corpus.hash,
            "args": {k: v for k, v in vars(args).items()}, **state}
    try:
        data.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise OSError(f"cannot write checkpoint {path}: {reason} ({_free_bytes(path) / 2**20:.1f} MiB free "
                      "on its disk); the previous checkpoint is intact") from err


def _free_bytes(path):
    try:
        return shutil.disk_usage(Path(path).parent).free
    except OSError:
        return float("nan")


def check_room_for_checkpoints(run_dir, model, optimizer, corpus):
    """Fail before training, not hours later, when the disk cannot hold one more checkpoint."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * weights if optimizer is not None else 0  # Adam's two moment estimates
    vocabulary = sum(len(w) + 16 for w in corpus.words) + 8 * len(corpus.words)
    need = weights + moments + vocabulary + (1 << 16)
    free = _free_bytes(run_dir / "checkpoint.pt")
    if free < need:
        raise OSError(f"not enough disk space for checkpoints in {run_dir}: about {need / 2**20:.1f} MiB "
                      f"needed, {free / 2**20:.1f} MiB free")


def load_checkpoint(path, corpus, model_name):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {err.__class__.__name__}: {str(err).splitlines()[0]}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this version of sgns")
    if ckpt.get("corpus_hash") != corpus.hash:
        raise UserError(f"{path} was trained on another corpus or other preprocessing options")
    if ckpt.get("model_name") != model_name:
        raise UserError(f"{path} holds a {ckpt['model_name']} model, not {model_name}")
    return ckpt


def load_weights(model, state_dict, path):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:  # another embedding size or vocabulary: a mismatch, not a crash
        raise UserError(f"{path} does not fit this model: {str(err).splitlines()[-1].strip()}")


class UserError(Exception):
    """A problem the user can fix; reported in one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# PIP loss monitor

class PipMonitor:
    """SPPMI matrix of the most frequent words (cached with the corpus) and the three PIP losses."""

    def __init__(self, corpus, args, log=print):
        self.vocab = min(args.pip_vocab, len(corpus.words))
        tag = f"v{self.vocab}-w{args.window_size}-k{args.neg_sample_size}"
        sppmi_file = corpus.cache_file(f"sppmi-{tag}.npz")
        oracle_file = corpus.cache_file(f"oracle-{tag}-d{args.embed_size}.npy")
        self.sppmi = _cached(sppmi_file, lambda: pip_loss.sppmi(
            corpus.token_ids, self.vocab, args.window_size, args.neg_sample_size, corpus.sentence_starts), log)
        dim = min(args.embed_size, self.vocab - 1)
        self.oracle = _cached(oracle_file, lambda: pip_loss.oracle_embedding(self.sppmi, dim), log)

    def losses(self, vectors):
        vectors = vectors[:self.vocab].numpy()  # float32: pip_loss computes in float64 from it
        return {"PIP loss": pip_loss.pip_loss_sppmi(vectors, self.sppmi),
                "PIP loss (oracle)": pip_loss.pip_loss_oracle(vectors, self.oracle),
                "PIP loss (normalized)": pip_loss.pip_loss_normalized(vectors, self.oracle)}


def lowest_normalized_pip(history):
    """(epoch, value, evaluations since) of the lowest 'PIP loss (normalized)' in a run's history,
    None before its first evaluation. A later equal value is no improvement."""
    points = history.get("PIP loss (normalized)")
    if not points:
        return None
    best = min(range(len(points)), key=lambda i: points[i][1])
    return int(points[best][0]), points[best][1], len(points) - 1 - best


def _cached(path, compute, log):
    """Load a derived array from the corpus cache (never unpickled), else compute and store it."""
    import scipy.sparse
    sparse = path.suffix == ".npz"
    if path.exists():
        try:
            return scipy.sparse.load_npz(path) if sparse else np.load(path, allow_pickle=False)
        except Exception as err:
            log(f"warning: cached {path.name} is damaged ({err}); recomputing it")
    value = compute()
    try:
        def write(tmp):  # an open file: given a name, numpy and scipy would append .npy/.npz to it
            with open(tmp, "wb") as f:
                scipy.sparse.save_npz(f, value) if sparse else np.save(f, value, allow_pickle=False)
        data.atomic_write(path, write)
    except OSError as err:
        log(f"warning: could not cache {path.name}: {err}")
    return value


# ---------------------------------------------------------------------------------------------
# Training engines: each runs one epoch from a position and reports progress through `step`

class StopRequested(Exception):
    """SIGINT or SIGTERM arrived: checkpoint where we are and exit."""

    def __init__(self, signum):
        self.signum = signum


class Signals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (never mid-update)."""

    def __init__(self):
        self.received = None
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.received = signum

    def check(self):
        if self.received is not None:
            raise StopRequested(self.received)


def lr_at(args, progress):
    """Linear decay from --lr to 0.01% of it over the whole run; progress in [0, 1]."""
    return args.lr * max(1e-4, 1.0 - progress)


def kernel_epoch(model, corpus, args, epoch, position, sampler, keep_prob, step):
    """One epoch with the compiled CPU kernel, from sentence position["sentence"] on.

    The epoch goes in calls of about TOKENS_PER_KERNEL_CALL corpus tokens. Each call
    subsamples its own sentences with a generator seeded by (seed, epoch, first sentence),
    so memory stays O(call) and a resumed epoch redraws exactly what it would have drawn.
    """
    in_w = model.in_embed.weight.data.numpy()
    out_w = model.out_embed.weight.data.numpy()
    starts = corpus.sentence_starts
    bounds = np.append(starts, len(corpus)).astype(np.int64)
    n_sentences, n_tokens = len(starts), max(1, len(corpus))
    threads = cpu_kernel.set_threads(args.num_threads)
    sentence = position.get("sentence", 0)
    while sentence < n_sentences:
        end = int(np.searchsorted(bounds, bounds[sentence] + TOKENS_PER_KERNEL_CALL))
        end = min(n_sentences, max(sentence + 1, end))
        rng = data.epoch_rng(args.seed, epoch, sentence)
        kept_ids, kept_starts = data.subsample(corpus.token_ids[bounds[sentence]:bounds[end]],
                                               starts[sentence:end] - bounds[sentence], keep_prob, rng)
        lr_first = lr_at(args, (epoch + bounds[sentence] / n_tokens) / args.epochs)
        lr_last = lr_at(args, (epoch + bounds[end] / n_tokens) / args.epochs)
        loss_sum, pairs = cpu_kernel.train_sentences(in_w, out_w, kept_ids, kept_starts, args.window_size,
                                                     args.neg_sample_size, sampler, lr_first, lr_last,
                                                     int(rng.integers(1, 2**63)), threads)
        words_done = bounds[end] - bounds[sentence]
        sentence = end
        step(loss_sum, pairs, words_done, lr_last, {"sentence": sentence})


def corpus_words(corpus, kept_done, n_kept):
    """Corpus words an epoch has covered once kept_done of its n_kept kept tokens are done
    (integers, so an epoch's steps add up to exactly the corpus)."""
    return round(kept_done / n_kept * len(corpus))


def window_epoch(model, corpus, args, epoch, position, batches, graphs, step):
    """One epoch of batched SGD on whole windows (sgns), built on the model's device, from center `position`.

    No step waits for the host: windows and negatives are drawn on the device (data.WindowBatches)
    data.STEPS_PER_DRAW steps at a time, and the loss and pair count stay there until step() reads
    them once per log interval. graphs (a WindowGraphs, or None) replay a whole draw, or one
    full-size step of a draw cut short or resumed, on a GPU.
    """
    kept_ids, kept_sentence = batches.subsample(args.seed, epoch)
    n_kept = max(1, len(kept_ids))
    per_step = distributed.centers_per_step(args.batch_size, args.window_size)
    per_draw = per_step * data.STEPS_PER_DRAW
    done = position.get("center", 0)
    for draw_lo in range(done - done % per_draw, len(kept_ids), per_draw):
        n_drawn = min(per_draw, len(kept_ids) - draw_lo)
        drawn = batches.windows(kept_ids, kept_sentence, draw_lo, n_drawn, batches.seeded(args.seed, epoch, draw_lo))
        starts = range(done - draw_lo, n_drawn, per_step)
        lrs = [lr_at(args, (epoch + (draw_lo + lo) / n_kept) / args.epochs) for lo in starts]
        if graphs is not None and n_drawn == per_draw and done == draw_lo:
            all_stats = graphs.draw(*drawn, lrs)  # the whole draw in one replay
        else:  # step by step: the epoch's last draw, a resumed one, or no graphs
            all_stats = []
            for lo, lr in zip(starts, lrs):
                window = [t[lo:lo + per_step] for t in drawn]
                full_size = graphs is not None and len(window[0]) == per_step
                all_stats.append(graphs.step(*window, lr) if full_size else model.window_step(*window, lr))
        stop = None
        for lo, lr, stats in zip(starts, lrs, all_stats):
            next_center = draw_lo + min(lo + per_step, n_drawn)
            try:  # a stop asked for mid-draw waits for the draw's accounts: its steps are all applied already
                step(stats[0], stats[1], corpus_words(corpus, next_center, n_kept) - corpus_words(corpus, done, n_kept),
                     lr, {"center": next_center})
            except StopRequested as err:
                stop = stop or err
            done = next_center
        if stop is not None:
            raise stop


class WindowStepGraph:
    """model.window_step over `steps` consecutive windows of per_step centers, captured once as a CUDA graph.

    An eager step launches a few (Triton) to a few dozen (tensor ops) small kernels, and at batch
    sizes of thousands of pairs a GPU finishes them faster than the host can launch them; a replay
    of a whole draw is one launch for data.STEPS_PER_DRAW steps.
    """

    def __init__(self, model, per_step, window, neg_count, steps=1):
        device = model.in_embed.weight.device
        n_windows = per_step * steps
        self.context_ids = torch.zeros((n_windows, 2 * window), dtype=torch.int64, device=device)
        self.weight = torch.zeros((n_windows, 2 * window), device=device)  # all padding: warm-up steps change nothing
        self.out_ids = torch.zeros((n_windows, neg_count + 1), dtype=torch.int64, device=device)
        self.lrs = torch.zeros(steps, device=device)

        def run():
            return torch.stack([model.window_step(self.context_ids[lo:lo + per_step], self.weight[lo:lo + per_step],
                                                  self.out_ids[lo:lo + per_step], self.lrs[i])
                                for i, lo in enumerate(range(0, n_windows, per_step))])
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up (cuBLAS handles, Triton's compiler, allocator) outside the capture
            for _ in range(3):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.stats = run()

    def __call__(self, context_ids, weight, out_ids, lrs):
        """Replays the steps on these windows (steps x per_step of them), step i at lrs[i]; returns
        their [loss sum, real pairs], steps x 2, on the device."""
        self.context_ids.copy_(context_ids)
        self.weight.copy_(weight)
        self.out_ids.copy_(out_ids)
        # pinned, so the copy waits for nothing (a pageable one would wait for the GPU to catch up)
        self.lrs.copy_(torch.tensor(lrs, dtype=torch.float32, pin_memory=True), non_blocking=True)
        self.graph.replay()
        return self.stats.clone()  # the next replay overwrites self.stats


class WindowGraphs:
    """The two captured shapes an epoch needs: a whole draw, and one step (for a draw cut short)."""

    def __init__(self, model, per_step, window, neg_count):
        self.whole_draw = WindowStepGraph(model, per_step, window, neg_count, data.STEPS_PER_DRAW)
        self.one_step = WindowStepGraph(model, per_step, window, neg_count)

    def draw(self, context_ids, weight, out_ids, lrs):
        return self.whole_draw(context_ids, weight, out_ids, lrs)

    def step(self, context_ids, weight, out_ids, lr):
        return self.one_step(context_ids, weight, out_ids, [lr])[0]


def window_graphs(model, args):
    """WindowGraphs when the run can use them (sgns SGD on a GPU, --cuda-graph), else None."""
    if not (args.cuda_graph and torch.device(args.device).type == "cuda"):
        return None
    try:
        return WindowGraphs(model, distributed.centers_per_step(args.batch_size, args.window_size), args.window_size,
                            args.neg_sample_size)
    except RuntimeError as err:  # a driver or build without graph support: eager steps do the same work
        print(f"warning: CUDA graph capture failed ({str(err).splitlines()[0]}); training with eager steps")
        return None


def torch_epoch(model, optimizer, corpus, args, epoch, position, sampler, keep_prob, step):
    """One epoch of batched autograd steps (SparseAdam, Adam, rnn, --multi-gpu), from center `position`,
    over sentence blocks in a new order each epoch (adaptive optimizers drift with the corpus's order)."""
    rng = data.epoch_rng(args.seed, epoch)
    kept_ids, starts = data.subsample(corpus.token_ids, corpus.sentence_starts, keep_prob, rng)
    kept_ids, starts = data.shuffle_sentence_blocks(kept_ids, starts, args.seed, epoch)
    if "rng" in position:  # mid-epoch resume: continue the same random stream
        rng.bit_generator.state = json.loads(position["rng"])
    n_kept = max(1, len(kept_ids))
    device = torch.device(args.device)
    done = position.get("center", 0)
    # sgns under --multi-gpu trains by plain SGD on the summed loss, as word2vec (its lr is
    # per pair); every other model steps on the mean loss
    summed = args.multi_gpu and args.model_name == "sgns"
    for center_ids, context_ids, next_center in data.iter_pair_batches(kept_ids, starts, args.window_size,
                                                                       args.batch_size, rng, done):
        neg_ids = sampler.sample((len(center_ids), args.neg_sample_size), rng)
        batch = [torch.from_numpy(a) for a in (center_ids, context_ids, neg_ids)]
        if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step
            batch = [t.pin_memory() for t in batch]
        center_ids, context_ids, neg_ids = (t.to(device, non_blocking=True) for t in batch)
        lr = lr_at(args, (epoch + done / n_kept) / args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr * len(center_ids) if summed else lr
        optimizer.zero_grad(set_to_none=True)
        loss = model(center_ids, context_ids, neg_ids)
        if loss.dim():  # DataParallel (distributed.data_parallel): the loss summed on each GPU
            loss = loss.sum() / len(center_ids)
        loss.backward()
        optimizer.step()
        words_done = corpus_words(corpus, next_center, n_kept) - corpus_words(corpus, done, n_kept)
        done = next_center
        step(loss.detach() * len(center_ids), len(center_ids), words_done, lr,
             {"center": done, "rng": json.dumps(rng.bit_generator.state)})


# ---------------------------------------------------------------------------------------------

def evaluation_scalars(args, words, vectors):
    """Similarity rho per pair file and analogy accuracy, as TensorBoard scalars."""
    import evaluate
    scalars = {}
    for path in args.eval_similarity:
        pairs = evaluate.load_pairs(path)
        scalars[f"Similarity/{Path(path).stem}"] = evaluate.similarity(words, vectors, pairs)["spearman"]
    if args.eval_analogy:
        scalars["Analogy accuracy"] = evaluate.analogy(words, vectors, args.eval_analogy)["accuracy"]
    return scalars


def write_pictures(args, run_dir, history, words, vectors):
    """Training curves, the chosen words' projection and projector files, at the end of a run."""
    import evaluate
    import plots
    if any(history.get(tag) for tag in plots.CURVE_ORDER):
        print(f"curves: {plots.plot_training_curves(history, run_dir / 'curves.png')}")
    if args.plot_words:
        index = {w: i for i, w in enumerate(words)}
        chosen = [w for w in args.plot_words if w in index]
        missing = sorted(set(args.plot_words) - set(chosen))
        if missing:
            print(f"warning: not in the vocabulary, left out of the plot: {' '.join(missing)}")
        if len(chosen) >= 2:
            picture = plots.plot_projection(chosen, vectors[[index[w] for w in chosen]], run_dir / "projection.png")
            print(f"projection: {picture}")
    if args.export_projector:
        evaluate.export_projector(words, vectors, args.export_projector)
        print(f"projector files written to {args.export_projector}")


def make_writer(run_dir):
    from tensorboardX import SummaryWriter  # 0.3 s of imports that only the rank that logs pays
    return SummaryWriter(str(run_dir))


def export_vectors(path, words, vectors):
    """word2vec text format, or binary when the path ends in .bin (gensim reads both)."""
    from gensim.models import KeyedVectors
    keyed = KeyedVectors(vectors.shape[1])
    keyed.add_vectors(words, vectors)
    binary = str(path).endswith(".bin")
    data.atomic_write(path, lambda tmp: keyed.save_word2vec_format(str(tmp), binary=binary))


def train(args):
    # Only rank 0 of a --multi-node run writes (run folder, TensorBoard, checkpoints, export).
    run_dir = make_run_dir(args) if distributed.is_main() else Path(args.resume or args.log_dir)
    torch.manual_seed(args.seed)
    # Starting numba's worker pool (the CPU kernel, the PIP loss) sets OpenMP's thread count for
    # the whole process, torch's included: start it first, then give torch its own count. Two
    # single-thread ranks on two cores otherwise ran torch on two threads each (an async epoch
    # took 0.8 s instead of 0.55 s).
    cpu_kernel.set_threads(args.num_threads)
    torch.set_num_threads(args.num_threads)
    print(f"run directory: {run_dir}")
    if args.export:  # find out now, not after hours of training, that the vectors cannot be written there
        if Path(args.export).is_dir():
            raise UserError(f"--export {args.export} is a folder; give a file name")
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
    corpus = data.load_corpus(args.dataset, args.data_dir, args.cache_dir, args.remove_th,
                              args.remove_stopwords, args.lemmatize)
    print(f"corpus: {corpus.name}: {len(corpus):,} tokens, {len(corpus.words):,} words "
          f"(choose another with --dataset FILE|FOLDER|gutenberg|lee)")
    if len(corpus.words) < 2:
        raise UserError(f"the vocabulary has {len(corpus.words)} word; SGNS needs at least 2 "
                        "(use a larger corpus or lower --remove-th)")
    distributed.check_same_corpus(corpus.hash, len(corpus.words))

    # DataParallel cannot reduce sparse gradients (pytorch#32444): --multi-gpu trains dense tables with autograd.
    # Dense Adam needs dense gradients too.
    model = build_model(args.model_name, len(corpus.words), args.embed_size,
                        sparse=not args.multi_gpu and args.optimizer != "adam", words=corpus.words, args=vars(args))
    if hasattr(model, "gpu_kernel"):
        model.gpu_kernel = args.gpu_kernel
    optimizer = None
    if args.optimizer == "sparse_adam":
        optimizer = torch.optim.SparseAdam(list(model.parameters()), lr=args.lr)
    elif args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    elif args.multi_gpu or not hasattr(model, "window_step"):  # SGD through autograd (rnn has no window_step)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    state = {"epoch": 0, "position": {}, "global_step": 0, "epoch_loss": 0.0, "epoch_pairs": 0,
             "best_oracle_pip": None, "history": {}}
    if args.resume:
        if not (run_dir / "checkpoint.pt").exists():  # killed (kill -9, power cut) before its first checkpoint
            raise UserError(f"{run_dir} has no checkpoint.pt: the run stopped before its first checkpoint; "
                            "start it again")
        ckpt = load_checkpoint(run_dir / "checkpoint.pt", corpus, args.model_name)
        load_weights(model, ckpt["model"], run_dir / "checkpoint.pt")
        if optimizer is not None and ckpt["optimizer"]:
            optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt.get(k, state[k]) for k in state}
        for stale in run_dir.glob(".*.tmp*"):  # left by a write that a kill -9 or power cut interrupted
            stale.unlink()
        print(f"resuming at epoch {state['epoch'] + 1}, step {state['global_step']}")
    elif args.load_model:
        load_weights(model, load_checkpoint(args.load_model, corpus, args.model_name)["model"], args.load_model)
    if torch.device(args.device).type == "cuda" and torch.device(args.device).index is not None:
        torch.cuda.set_device(torch.device(args.device))  # CUDA graphs, Triton and NCCL work on the current device
    model.to(args.device)
    distributed.broadcast_parameters(model)
    engine_model = distributed.data_parallel(model, args.num_gpu) if args.multi_gpu else model

    if distributed.is_main():
        check_room_for_checkpoints(run_dir, model, optimizer, corpus)
    writer = make_writer(run_dir) if distributed.is_main() else distributed.NullWriter()
    pip_monitor = PipMonitor(corpus, args) if args.pip_interval and distributed.is_main() else None
    sampler = data.NegativeSampler(corpus.counts, args.ns_exponent)
    keep_prob = data.keep_probabilities(corpus.counts, args.subsample_th)
    if args.engine == "kernel":
        cpu_kernel.warm_up(model.in_embed.weight.data.numpy(), model.out_embed.weight.data.numpy(), sampler,
                           args.window_size, args.neg_sample_size, cpu_kernel.set_threads(args.num_threads))
    if args.engine == "torch" and args.device == "cpu" and optimizer is None and hasattr(model, "window_step"):
        cpu_kernel.warm_up_rows()
    if args.multi_node and args.dist_mode == "async" and args.device == "cpu":
        cpu_kernel.warm_up_exchange()
    # batches built on the model's device: sgns by plain SGD on the torch engine, and every --multi-node run
    window_batches = graphs = None
    if args.engine == "torch" and (optimizer is None or args.multi_node):
        window_batches = data.WindowBatches(corpus, keep_prob, sampler, args.window_size, args.neg_sample_size,
                                            args.device)
        if not args.multi_node:
            graphs = window_graphs(model, args)
    signals = Signals()
    if args.multi_node:  # ranks stop together, at a step they agree on (distributed.dist_epoch)
        signals.check = lambda: None
    ckpt_path = run_dir / "checkpoint.pt"

    distributed.start_together()
    total_words = len(corpus) * args.epochs
    bar = tqdm(total=total_words, unit="word", unit_scale=True, disable=args.quiet, dynamic_ncols=True,
               initial=int(len(corpus) * (state["epoch"] + 0.0)), mininterval=0.5)
    interrupted = early_stop = None
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        epoch_start = time.time()
        epoch_words = 0.0

        device_losses, device_pairs = [], []  # the torch engines' sums, still on the device

        def collect_device_losses():
            """Add the device-side sums to the epoch's: one wait for the device per log interval."""
            if device_pairs:
                state["epoch_pairs"] += int(torch.stack(device_pairs).sum())
                device_pairs.clear()
            if device_losses:
                total = float(torch.stack(device_losses).sum())
                device_losses.clear()
                if not math.isfinite(total):
                    raise FloatingPointError(
                        f"loss became {total} at epoch {epoch + 1}, by step {state['global_step']}")
                state["epoch_loss"] += total

        def step(loss_sum, pairs, words_done, lr, position):
            """Account for one step. loss_sum and pairs are numbers, or tensors that stay on the
            device (a GPU is not made to wait for the host at every step)."""
            nonlocal epoch_words
            state["global_step"] += 1
            if torch.is_tensor(loss_sum):
                device_losses.append(loss_sum.detach())
            elif math.isfinite(loss_sum):
                state["epoch_loss"] += loss_sum
            else:
                raise FloatingPointError(f"loss became {loss_sum} at epoch {epoch + 1}, step {state['global_step']}")
            if torch.is_tensor(pairs):
                device_pairs.append(pairs)
            else:
                state["epoch_pairs"] += pairs
            state["position"] = position
            epoch_words += words_done
            bar.update(min(words_done, bar.total - bar.n))  # float shares of the corpus can sum past the total
            if state["global_step"] % args.log_interval == 0 and pairs:
                batch_loss = float(loss_sum) / int(pairs)
                collect_device_losses()
                writer.add_scalar("Batch loss", batch_loss, state["global_step"])
                bar.set_postfix(loss=f"{batch_loss:.3f}", lr=f"{lr:.2g}", epoch=epoch + 1)
            signals.check()

        try:
            if args.multi_node:
                stop_signal = lambda: signals.received or 0  # noqa: E731
                if args.engine == "kernel":
                    stop = distributed.dist_kernel_epoch(model, corpus, args, epoch, state["position"], sampler,
                                                         keep_prob, step, lr_at, stop_signal)
                else:
                    stop = distributed.dist_epoch(model, optimizer, corpus, args, epoch, state["position"],
                                                  window_batches, step, lr_at, stop_signal)
                if stop:
                    raise StopRequested(stop)
            elif args.engine == "kernel":
                kernel_epoch(model, corpus, args, epoch, state["position"], sampler, keep_prob, step)
            elif optimizer is None:
                window_epoch(model, corpus, args, epoch, state["position"], window_batches, graphs, step)
            else:
                torch_epoch(engine_model, optimizer, corpus, args, epoch, state["position"], sampler, keep_prob, step)
        except StopRequested as stop:
            collect_device_losses()
            interrupted = stop.signum
            break
        collect_device_losses()
        # A NaN can reach the weights in an update after the last loss was computed: never
        # evaluate or checkpoint such weights.
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError(f"the weights became NaN or infinite in epoch {epoch + 1}, "
                                     f"by step {state['global_step']}")
        epoch_time = time.time() - epoch_start
        train_loss = state["epoch_loss"] / max(1, state["epoch_pairs"])
        scalars = {"Train loss": train_loss, "Epoch time": epoch_time,
                   "Words per second": epoch_words / max(epoch_time, 1e-9),
                   "Learning rate": lr_at(args, (epoch + 1) / args.epochs)}
        if pip_monitor and (epoch + 1) % args.pip_interval == 0:
            scalars.update(pip_monitor.losses(model.embeddings().cpu()))
        if (args.eval_similarity or args.eval_analogy) and (epoch + 1) % args.eval_interval == 0:
            scalars.update(evaluation_scalars(args, corpus.words, model.embeddings().cpu().numpy()))
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, epoch + 1)
            state["history"].setdefault(tag, []).append([epoch + 1, float(value)])
        bar.write(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k.lower()} {v:.4g}" for k, v in scalars.items()))
        state.update(epoch=epoch + 1, position={}, epoch_loss=0.0, epoch_pairs=0)

        oracle = scalars.get("PIP loss (oracle)")
        if oracle is not None and (state["best_oracle_pip"] is None or oracle < state["best_oracle_pip"]):
            state["best_oracle_pip"] = oracle  # kept for the checkpoint's readers; best.pt follows the normalized loss
        lowest = lowest_normalized_pip(state["history"]) if "PIP loss (normalized)" in scalars else None
        if lowest and lowest[0] == epoch + 1:
            save_checkpoint(run_dir / "best.pt", model, optimizer, corpus, args, state)
        if lowest and args.early_stop and lowest[2] >= args.early_stop:
            early_stop = (f"early stop after epoch {epoch + 1} of {args.epochs}: PIP loss (normalized) has not "
                          f"improved for {lowest[2]} evaluations (lowest {lowest[1]:.4g} at epoch {lowest[0]})")
        last_epoch = epoch + 1 == args.epochs or early_stop is not None
        if (epoch + 1) % args.save_interval == 0 or last_epoch:
            save_checkpoint(ckpt_path, model, optimizer, corpus, args, state)
        if last_epoch or (args.projector_interval and (epoch + 1) % args.projector_interval == 0):
            n = min(args.projector_words, len(corpus.words))
            writer.add_embedding(model.embeddings()[:n].cpu(), metadata=corpus.words[:n], global_step=epoch + 1,
                                 tag="embeddings")
        if early_stop:
            break
    bar.close()
    if early_stop:
        print(early_stop)

    if interrupted is not None:
        save_checkpoint(ckpt_path, model, optimizer, corpus, args, state)
        writer.close()
        print(f"stopped by signal {interrupted} at epoch {state['epoch'] + 1}, step {state['global_step']}; "
              f"checkpoint written. Resume with: python trainer.py --resume {run_dir}")
        return 128 + interrupted
    if args.export and distributed.is_main():
        export_vectors(args.export, corpus.words, model.embeddings().cpu().numpy())
        print(f"vectors written to {args.export}")
    writer.close()
    if distributed.is_main():
        write_pictures(args, run_dir, state["history"], corpus.words, model.embeddings().cpu().numpy())
    lowest = lowest_normalized_pip(state["history"])
    if lowest:
        print(f"lowest PIP loss (normalized): {lowest[1]:.4g} at epoch {lowest[0]} (checkpoint {run_dir / 'best.pt'})")
    print(f"done: {run_dir}")
    return 0


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def _one_line_background_error(hook_args):
    """TensorBoard's writer thread and exit hook meet the same full disk as the checkpoint: one line each."""
    print(f"warning: a background write failed: {hook_args.exc_value}", file=sys.stderr)


def install_cli_reporting():
    """Process-wide: warnings and errors of background threads as one line, for the command line only."""
    warnings.formatwarning = _one_line_warning  # users get the message, not our source line
    threading.excepthook = sys.unraisablehook = _one_line_background_error


def main(argv=None):
    args = parse_args(argv)
    warnings.simplefilter("default")
    try:
        with distributed.session(args):  # joins and always leaves the process group of --multi-node runs
            return train(args)
    except distributed.DistributedFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (data.DatasetError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}; the last good checkpoint is kept. Try a lower --lr.", file=sys.stderr)
        return 1
    except OSError as err:  # unwritable folder, full disk: atomic writes left earlier files intact
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the handlers were installed, or a second Ctrl-C
        print("error: interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    install_cli_reporting()
    sys.exit(main())
