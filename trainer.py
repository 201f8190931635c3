"""Train SGNS word vectors: python trainer.py --help"""
import argparse
import atexit
import functools
import gc
import json
import math
import numbers
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path


def install_stop_handlers(handler=None):
    """SIGINT, SIGTERM and SIGHUP go to handler (default: raise Stopped, which main reports in one
    line with 128 + signum: no silent death, and atomic writes clean up their temporary files).
    Inside the training steps Signals takes them. SIGHUP stays ignored under nohup."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signum == signal.SIGINT or signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, handler or _raise_stopped)


def _stop_while_importing(signum, frame):
    """A stop signal while the imports below load: nothing is written yet, so exit at once (an
    exception raised inside a half-imported library can end in another traceback)."""
    os.write(2, f"error: interrupted by {signal.Signals(signum).name} while starting; nothing was written\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
    install_stop_handlers(_stop_while_importing)
if "--multi-node" in sys.argv:  # c10d logs every failed connection with a C++ stack trace; we report it in
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # one line (read when torch loads: set it first)

gc.disable()  # collections during the imports find almost nothing and take a quarter of their time
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoint  # noqa: E402
import cpu_kernel  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import engines  # noqa: E402
import export  # noqa: E402
import fileio  # noqa: E402
import tables  # noqa: E402
from lazy import torch  # noqa: E402
from tables import RNN_DEFAULTS  # noqa: E402

gc.freeze()  # the imports' 200,000 objects live as long as the process: no full collection (nor the one
gc.enable()  # at exit) walks them again

RNN_BATCH_SIZE = 131072  # see --batch-size
# Flags a resumed run may change; everything else comes from the saved run.
RESUMABLE_OVERRIDES = ("rank", "world_size", "init_method", "backend", "dist_timeout", "epochs", "num_threads",
                       "device", "cuda_graph", "gpu_kernel", "log_interval", "save_interval", "pip_interval", "export",
                       "quiet", "early_stop")
# Attributes parse_args and resolve_options add that describe this process, not the run: never saved.
RUNTIME_ONLY = ("world", "argv")
# Options every rank of a --multi-node run must share: they decide the steps' shapes and order, and
# what the ranks exchange and when (distributed.check_same_settings compares them).
SHARED_BY_RANKS = ("model_name", "embed_size", "window_size", "neg_sample_size", "ns_exponent", "subsample_th",
                   "remove_th", "remove_stopwords", "lemmatize", "epochs", "batch_size", "optimizer", "lr", "seed",
                   "loop", "dist_mode", "sync_interval", "block_momentum", "char_embed_size", "hidden_size",
                   "num_layer", "dropout", "bidirectional", "mlp_size", "rnn_cell", "word_share")
# Without --save-interval, epoch ends write a checkpoint when this long has passed since the last:
# writing one costs about as much as a short epoch's training on a small corpus.
CHECKPOINT_SECONDS = 30.0
SEED_LIMIT = 2 ** 64  # torch.manual_seed takes seeds below this
NS_EXPONENT_RANGE = (-1.0, 1.0)  # 1: negatives by frequency, 0: uniform, below 0: rare words favoured


class UserError(Exception):
    """A problem the user can fix; reported in one line, exit 2."""


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) outside the training steps: the run ends at once with
    128 + signum; note says what is left on disk."""

    def __init__(self, signum=signal.SIGINT, note="nothing was written"):
        super().__init__(signum)
        self.signum, self.note = signum, note


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help says it already, where it is None (those
    flags say in their help what they default to) and for a flag off unless given."""

    def _get_help_string(self, action):
        if action.default is None or (action.default is False and action.nargs == 0) or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# Flags

def get_parser():
    parser = argparse.ArgumentParser(description="Train word vectors with skip-gram negative sampling (SGNS).",
                                     formatter_class=HelpFormatter)
    for add_flags in (add_corpus_flags, add_model_flags, add_rnn_flags, add_optimisation_flags, add_output_flags,
                      add_evaluation_flags, distributed.add_arguments):
        add_flags(parser)
    return parser


def add_corpus_flags(parser):
    g = parser.add_argument_group("corpus")
    g.add_argument("--dataset", default=None,
                   help="corpus: a .txt file or a folder of .txt files (as given or inside --data-dir), "
                        "'gutenberg' (NLTK's selection) or 'lee' (gensim's). Default: data/harry_potter.txt "
                        "if present, else NLTK gutenberg, else lee")
    g.add_argument("--data-dir", default="data", help="folder where --dataset names are looked up")
    g.add_argument("--cache-dir", default="data/cache", help="folder for the encoded corpus and derived matrices")
    g.add_argument("--remove-th", type=int, default=5, help="min count: rarer words are dropped from the vocabulary")
    g.add_argument("--remove-stopwords", action="store_true",
                   help="drop NLTK's English stopwords (as the original sgns_pytorch)")
    g.add_argument("--lemmatize", action="store_true",
                   help="replace words by their WordNet lemma (as the original sgns_pytorch)")


def add_model_flags(parser):
    g = parser.add_argument_group("model and sampling")
    g.add_argument("--model-name", default="sgns", choices=["sgns", "rnn"],
                   help="sgns: a vector per word (embedding tables); rnn: vectors computed from the word's "
                        "characters by an LSTM, so unseen words get vectors too")
    g.add_argument("--is-character", action="store_true",
                   help="same as --model-name rnn (the original sgns_pytorch's flag)")
    g.add_argument("--embed-size", type=int, default=100, help="embedding dimension d")
    g.add_argument("--window-size", type=int, default=5,
                   help="max context words each side (shrunk at random per center)")
    g.add_argument("--neg-sample-size", type=int, default=5, help="negative samples per (center, context) pair")
    g.add_argument("--ns-exponent", type=float, default=0.75, help="negatives are drawn from unigram^this, in [-1, 1] "
                        "(1: by frequency, 0: uniform, below 0: rare words favoured)")
    g.add_argument("--subsample-th", type=float, default=1e-3, help="subsampling threshold t (0 turns it off)")


def add_rnn_flags(parser):
    g = parser.add_argument_group("rnn model (--model-name rnn)")
    g.add_argument("--char-embed-size", type=int, default=RNN_DEFAULTS["char_embed_size"],
                   help="size of the character embeddings fed to the LSTM")
    g.add_argument("--rnn-cell", default=RNN_DEFAULTS["rnn_cell"], choices=["lstm", "gru"],
                   help="the recurrent layer that reads a word's characters")
    g.add_argument("--hidden-size", type=int, default=RNN_DEFAULTS["hidden_size"], help="LSTM hidden state size")
    g.add_argument("--num-layer", type=int, default=RNN_DEFAULTS["num_layer"], help="stacked LSTM layers")
    g.add_argument("--dropout", type=float, default=RNN_DEFAULTS["dropout"],
                   help="dropout between LSTM layers and on the final hidden state, in training only")
    g.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=RNN_DEFAULTS["bidirectional"],
                   help="read words both ways and concatenate the two last states: the backward reading ends on "
                        "the word's start (its stem), the forward one on its end (inflections)")
    g.add_argument("--word-share", type=float, default=0.015,
                   help="on the CPU loop, the part of each step's change of a word's input vector that its "
                        "per-word vector takes, in (0, 1]; its n-gram rows and the spelling encoder learn the "
                        "rest. Lower favours spelling (analogies, unseen words), higher the words' own meaning")
    g.add_argument("--mlp-size", type=int, default=RNN_DEFAULTS["mlp_size"],
                   help="width of the layer after the LSTM (default: --embed-size, i.e. one linear layer to d); "
                        "another width adds a tanh and a second linear layer to d")


def add_optimisation_flags(parser):
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="passes over the corpus")
    g.add_argument("--lr", type=float, default=None,
                   help="starting learning rate, decayed linearly to ~0 (default 0.025 for sgd, 0.001 for "
                        "sparse_adam and adam); rnn on one CPU process: its encoder's, its tables taking 0.05")
    g.add_argument("--optimizer", default=None, choices=["sgd", "sparse_adam", "adam"],
                   help="sgd: plain SGD (on touched rows for sgns, as word2vec); sparse_adam: torch.optim.SparseAdam "
                        "(sgns); adam: torch.optim.Adam (dense). Default: sgd for sgns, adam for rnn")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"(center, context) pairs per step; the CPU kernel trains window by window, and counts its "
                        f"steps in the text a batch holds. Default: 4096 for sgns, {RNN_BATCH_SIZE} for rnn, whose "
                        f"step costs grow with the batch's distinct words, which grow much slower than the batch")
    g.add_argument("--engine", default="auto", choices=["auto", "kernel", "torch"],
                   help="kernel: compiled word2vec-style CPU loop (rnn: it trains the vectors, autograd the "
                        "encoder, on one process); torch: batched PyTorch steps (GPU, sparse_adam, adam, "
                        "--multi-node --sync, rnn on a GPU or several processes); auto picks kernel for sgns by SGD "
                        "on the CPU, --multi-node --async included, and for rnn on one CPU process (README: which "
                        "engine runs on your hardware)")
    g.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    g.add_argument("--seed", type=int, default=1,
                   help="random seed, 0 to 2**64-1 (runs are reproducible with --num-threads 1)")
    g.add_argument("--device", default="cpu", help="torch device for the torch engine: cpu, cuda, cuda:N")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help=f"on a GPU, replay every {data.STEPS_PER_DRAW} sgns SGD steps (one draw of windows) as one "
                        "captured CUDA graph instead of launching their kernels one by one")
    g.add_argument("--gpu-kernel", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, run the sgns SGD step as three Triton kernels (Triton comes with CUDA builds "
                        "of torch on Linux and needs a C compiler; without them, or with --no-gpu-kernel, the "
                        "step runs as tensor ops)")


def add_output_flags(parser):
    g = parser.add_argument_group("monitoring and output")
    g.add_argument("--log-dir", default="saved/runs", help="each run gets its own folder here")
    g.add_argument("--run-name", default=None, help="name of the run folder (default: date and time)")
    g.add_argument("--log-interval", type=int, default=100,
                   help="steps between 'Batch loss' points (a step: the text of one --batch-size batch)")
    g.add_argument("--save-interval", type=int, default=None, metavar="N",
                   help="epochs between checkpoints (default: at the end of the first epoch that ends "
                        f"{CHECKPOINT_SECONDS:.0f} s or more after the last checkpoint; a stopped run and its "
                        "last epoch always write one)")
    g.add_argument("--pip-interval", type=int, default=1, help="epochs between PIP loss evaluations (0: off)")
    g.add_argument("--pip-vocab", type=int, default=10_000, help="most frequent words the PIP loss is computed on")
    g.add_argument("--early-stop", type=int, default=0, metavar="N",
                   help="stop when 'PIP loss (normalized)' has not improved for N evaluations in a row (one "
                        "every --pip-interval epochs); the run then ends as at its last epoch. 0 (the default) "
                        "turns it off")
    g.add_argument("--projector-words", type=int, default=10_000,
                   help="most frequent words sent to TensorBoard's projector")
    g.add_argument("--projector-interval", type=int, default=0,
                   help="epochs between projector snapshots; 0: only at the end of the run")
    g.add_argument("--export", default=None,
                   help="write the vectors in word2vec format at the end: text with six decimals, or binary "
                        "(every bit) if the path ends in .bin")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a stopped run from its checkpoint, with its saved arguments "
                        "(--epochs given too changes the total; flags it cannot change are named in a warning "
                        "and ignored)")
    g.add_argument("--load-model", default=None, metavar="CHECKPOINT",
                   help="start from the weights of a checkpoint trained on the same corpus")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_evaluation_flags(parser):
    g = parser.add_argument_group("evaluation and plots")
    g.add_argument("--eval-similarity", nargs="+", default=[], metavar="FILE",
                   help="word-pair files (word1 TAB word2 TAB score): Spearman rho logged every --eval-interval epochs")
    g.add_argument("--eval-analogy", default=None, metavar="FILE",
                   help="analogy file in the Google questions-words.txt format: accuracy logged every "
                        "--eval-interval epochs")
    g.add_argument("--eval-interval", type=int, default=1, help="epochs between evaluations on the files above")
    g.add_argument("--plot-words", nargs="+", default=[], metavar="WORD",
                   help="words to draw in a 2-D PCA projection, saved as projection.png in the run directory "
                        "(looked up lowercased, as evaluate.py --plot-words does; the rnn model draws words "
                        "outside the vocabulary too, from their spelling)")
    g.add_argument("--export-projector", default=None, metavar="DIR",
                   help="also write TensorBoard projector files vectors.tsv and metadata.tsv into DIR")


# ---------------------------------------------------------------------------------------------
# Options, resolved once

def parse_args(argv=None):
    """The run's options, every default filled and every value checked (argparse's one-line
    error and exit 2 otherwise); a --resume run's come from its folder."""
    parser = get_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.resume:
        given = vars(parser.parse_args(argv, namespace=argparse.Namespace(**{k: None for k in vars(args)})))
        try:
            args = checkpoint.resume_arguments(get_parser(), given, args.resume, RESUMABLE_OVERRIDES)
        except checkpoint.CheckpointError as err:  # the file's content, not the command line: no usage
            parser.exit(2, f"{parser.prog}: error: {err}\n")
    args.argv = argv
    try:
        resolve_options(args)
    except ValueError as err:
        if args.resume:
            parser.exit(2, f"{parser.prog}: error: {err} (in {Path(args.resume) / 'args.json'}, or given with "
                           "--resume)\n")
        parser.error(str(err))
    return args


def resolve_options(args):
    """The one place where options are decided: defaults that depend on other flags, checks,
    the distributed world and the engine. Everything after reads args (args.loop, args.world)."""
    if args.is_character:
        args.model_name = "rnn"
    if args.optimizer is None:
        args.optimizer = "adam" if args.model_name == "rnn" else "sgd"
    if args.batch_size is None:
        args.batch_size = RNN_BATCH_SIZE if args.model_name == "rnn" else 4096
    if args.lr is None:
        args.lr = 0.025 if args.optimizer == "sgd" else 0.001
    if args.sync_interval is None:
        args.sync_interval = distributed.default_sync_interval(args.batch_size)
    absolute_paths(args)
    check_values(args)
    cuda_devices = visible_gpus() if args.multi_gpu or args.multi_node or args.device != "cpu" else 0
    for problem in distributed.check_flags(args, cuda_devices):
        raise ValueError(problem)
    if args.multi_gpu:
        args.num_gpu = args.num_gpu if args.num_gpu is not None else cuda_devices
        args.device = "cuda:0" if args.device == "cpu" else args.device
    args.world = distributed.resolve_world(args, os.environ, cuda_devices)
    distribution = "multi-gpu" if args.multi_gpu else args.dist_mode if args.world else "one"
    loop, why_not = engines.choose_loop(args.model_name, args.optimizer, device_type(run_device(args)),
                                        distribution, args.engine)
    if why_not:
        raise ValueError(why_not)
    args.loop, args.engine = loop, "kernel" if loop in ("kernel", "spelling") else "torch"
    if args.world and args.world.rank != 0:  # one voice: rank 0 shows progress
        args.quiet = True


def absolute_paths(args):
    """Paths as absolute ones, so that args.json and the printed resume command work from any
    folder. A --dataset found only inside --data-dir stays a name there, as do 'gutenberg' and 'lee'."""
    for name in ("data_dir", "cache_dir", "log_dir", "export", "export_projector", "resume", "load_model",
                 "eval_analogy"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    args.eval_similarity = [os.path.abspath(path) for path in args.eval_similarity]
    if args.dataset not in (None, "gutenberg", "lee") and os.path.lexists(args.dataset):
        args.dataset = os.path.abspath(args.dataset)


def check_values(args):
    """Every flag's value alone (ValueError: one line)."""
    check_counts(args)
    check_numbers(args)
    if args.model_name == "rnn":
        check_rnn_values(args)
    check_device(args.device)
    if args.run_name is not None and (Path(args.run_name).name != args.run_name or args.run_name in ("", ".", "..")):
        raise ValueError(f"--run-name {args.run_name}: give a folder name, without / or .. (the folder goes into "
                         "--log-dir)")


def check_counts(args):
    """The integer flags: sizes and counts positive, intervals and thresholds 0 or more, the seed in torch's range."""
    for name in ("embed_size", "window_size", "neg_sample_size", "epochs", "batch_size", "num_threads",
                 "log_interval", "save_interval", "pip_vocab", "projector_words", "eval_interval"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("remove_th", "pip_interval", "projector_interval", "early_stop"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.pip_vocab < 2:
        raise ValueError(f"--pip-vocab must be 2 or more (the PIP loss compares words in pairs), got {args.pip_vocab}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be in 0..2**64-1, got {args.seed}")


def check_numbers(args):
    """The float flags: each finite and in its range (NaN fails every comparison; the distributed
    ones are distributed.check_flags')."""
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if not (args.subsample_th >= 0 and math.isfinite(args.subsample_th)):
        raise ValueError(f"--subsample-th must be 0 (off) or a positive number, got {args.subsample_th}")
    low, high = NS_EXPONENT_RANGE
    if not low <= args.ns_exponent <= high:
        raise ValueError(f"--ns-exponent must be in [{low:g}, {high:g}], got {args.ns_exponent}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.early_stop and not args.pip_interval:
        raise ValueError("--early-stop watches the PIP loss: it needs --pip-interval above 0")


def check_rnn_values(args):
    for name in ("char_embed_size", "hidden_size", "num_layer"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.mlp_size is not None and args.mlp_size <= 0:
        raise ValueError(f"--mlp-size must be positive, got {args.mlp_size}")
    if args.optimizer == "sparse_adam":
        raise ValueError("--optimizer sparse_adam is for sgns's embedding tables; use adam (or sgd) for rnn")
    if not 0 < args.word_share <= 1:
        raise ValueError(f"--word-share must be in (0, 1], got {args.word_share}")


def check_device(name):
    """--device names a device this trainer runs on, and one that is there."""
    if name == "cpu":  # no torch needed to know it (lazy.py)
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: sgns trains on cpu or cuda (cuda:N)")
    if device.type == "cuda":
        visible = visible_gpus()
        if not visible:
            raise ValueError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= visible:
            raise ValueError(f"--device {name}: {visible} CUDA device(s) visible, cuda:0 to cuda:{visible - 1}")


def visible_gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_device(args):
    """The device this process trains on: --device, or this rank's GPU in a --multi-node run."""
    return args.world.device if args.world else args.device


def device_type(name):
    """cpu or cuda, of a device name check_device has accepted (cuda:1 -> cuda)."""
    return name.split(":")[0]


def trains_without_torch(args):
    """Whether the run trains tables.Tables: the compiled loop on one process, where torch is
    never imported (lazy.py); its import would take longer than training a small corpus."""
    return args.loop == "kernel" and not args.world


def saved_args(args):
    """The run's arguments as args.json and checkpoints keep them."""
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in RUNTIME_ONLY})


# ---------------------------------------------------------------------------------------------
# Setting up a run

def open_run_dir(args):
    """The run folder: the resumed one, or a new one under --log-dir (only rank 0 writes)."""
    if args.resume:
        return Path(args.resume)
    if not distributed.is_main():
        return Path(args.log_dir)
    return checkpoint.make_run_dir(saved_args(args))


def check_outputs_apart(args):
    """Refuse, before anything is written, an output that would overwrite an input of the run: the
    corpus (or land inside its folder), the evaluation files, the checkpoint to load, the run's
    own checkpoints and args.json. Links are followed."""
    if not distributed.is_main():
        return
    source = data.resolve_dataset(args.dataset, args.data_dir)
    folder = Path(source.name)
    corpus = folder if folder.is_dir() else source.files[0] if len(source.files) == 1 else source.files[0].parent
    inputs = {"the corpus": corpus, "the --eval-analogy file": args.eval_analogy,
              "the --load-model checkpoint": args.load_model,
              **{f"the --eval-similarity file {path}": path for path in args.eval_similarity}}
    run_dir = Path(args.resume) if args.resume else Path(args.log_dir) / args.run_name if args.run_name else None
    if run_dir is not None:
        inputs.update({f"the run's {name}": run_dir / name for name in ("checkpoint.pt", "best.pt", "args.json")})
    outputs = {"--resume" if args.resume else "--log-dir": args.resume or args.log_dir, "--export": args.export}
    if args.export_projector:
        outputs.update({"--export-projector": Path(args.export_projector) / "vectors.tsv",
                        "--export-projector's metadata": Path(args.export_projector) / "metadata.tsv"})
    try:
        fileio.check_outputs_apart(outputs, inputs)
    except ValueError as err:
        raise UserError(str(err)) from None


def load_corpus(args):
    corpus = data.load_corpus(args.dataset, args.data_dir, args.cache_dir, args.remove_th, args.remove_stopwords,
                              args.lemmatize)
    print(f"corpus: {corpus.name}: {len(corpus):,} tokens, {len(corpus.words):,} words "
          f"(choose another with --dataset FILE|FOLDER|gutenberg|lee)")
    if len(corpus.words) < 2:
        raise UserError(f"the vocabulary has {len(corpus.words)} word; SGNS needs at least 2 "
                        "(use a larger corpus or lower --remove-th)")
    distributed.check_same_corpus(corpus.hash, len(corpus.words))
    return corpus


def make_model(args, corpus):
    """The model and its torch.optim optimizer (None: the kernel and window loops update the rows themselves)."""
    if trains_without_torch(args):
        return tables.Tables(len(corpus.words), args.embed_size, args.seed), None
    import model as models
    torch.manual_seed(args.seed)
    # DataParallel cannot reduce sparse gradients (pytorch#32444) and Adam needs dense ones
    dense = args.multi_gpu or args.optimizer == "adam"
    model = models.build_model(args.model_name, len(corpus.words), args.embed_size, sparse=not dense,
                               words=corpus.words, args=vars(saved_args(args)))
    optimizer = None
    if args.optimizer == "sparse_adam":
        optimizer = torch.optim.SparseAdam(list(model.parameters()), lr=args.lr)
    elif args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    elif args.loop in ("autograd", "spelling"):
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    return model, optimizer


def start_state(args, run_dir, model, optimizer, corpus):
    """The training state to start from: fresh, a --resume run's checkpoint, or --load-model's weights."""
    state = {"epoch": 0, "position": {}, "global_step": 0, "epoch_loss": 0.0, "epoch_pairs": 0,
             "best_oracle_pip": None, "history": {}}
    if args.resume:
        path = run_dir / "checkpoint.pt"
        if not path.exists():  # killed (kill -9, power cut) before its first checkpoint
            raise UserError(f"{run_dir} has no checkpoint.pt: the run stopped before its first checkpoint; "
                            "start it again")
        ckpt = checkpoint.read_for_run(path, corpus, args.model_name)
        checkpoint.load_weights(model, ckpt["model"], path)
        if optimizer is not None and ckpt["optimizer"]:
            optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt.get(k, state[k]) for k in state}
        if state["epoch"] > args.epochs:
            raise UserError(f"--resume {run_dir}: the run has done {state['epoch']} epochs, more than --epochs "
                            f"{args.epochs}; give --epochs {state['epoch']} or more")
        state["position"] = resumable_position(state)
        fileio.remove_stale_temp_files(run_dir)  # left by a write that a kill -9 or power cut interrupted
        if state["epoch"] == args.epochs:
            print(f"nothing left to train ({state['epoch']} of {args.epochs} epochs done): writing what the run ends "
                  "with (--epochs N trains on)")
        else:
            print(f"resuming at epoch {state['epoch'] + 1}, step {state['global_step']}")
    elif args.load_model:
        weights = checkpoint.read_for_run(args.load_model, corpus, args.model_name)["model"]
        checkpoint.load_weights(model, weights, args.load_model)
    return state


def resumable_position(state):
    """The position to resume from: {"step": steps done in the epoch}. A checkpoint written
    mid-epoch by an earlier version counted in sentences or centers; its epoch starts again."""
    position = state["position"] or {}
    if not position or "step" in position:
        return position
    warnings.warn(f"the checkpoint was written mid-epoch by an earlier version of sgns; epoch {state['epoch'] + 1} "
                  "starts again from its beginning")
    state.update(epoch_loss=0.0, epoch_pairs=0)
    return {}


def set_threads(args):
    """Starting numba's worker pool (the CPU kernel, the PIP loss) sets OpenMP's thread count for
    the whole process, torch's included: start it first, then give torch its own count, so that
    single-thread ranks sharing a machine do not each run torch on every core."""
    cpu_kernel.set_threads(args.num_threads)
    if not trains_without_torch(args):
        torch.set_num_threads(args.num_threads)


def check_output_paths(args):
    """Find out now, not after hours of training, that the vectors cannot be written where asked."""
    if not distributed.is_main():
        return
    if args.export:
        if Path(args.export).is_dir():
            raise UserError(f"--export {args.export} is a folder; give a file name")
        check_writable("--export", args.export, Path(args.export))
    if args.export_projector:
        folder = Path(args.export_projector)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--export-projector {folder} is a file; give a folder")
        check_writable("--export-projector", folder, folder / "vectors.tsv")


def check_writable(flag, shown, path):
    """Create path's folder and the temporary file atomic_write will fill there; a failure names
    the user's path (shown), not the hidden file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_temp_files(path.parent)  # an earlier export killed mid-write
        fileio.check_writable(path)
    except OSError as err:
        raise OSError(f"cannot write {flag} {shown}: {err.strerror or err}") from err


def check_memory(args, words):
    """Refuse, before allocating, a run whose model and step buffers alone exceed the memory
    available: an allocation that size fails with a traceback, or swaps the machine to a halt."""
    device = run_device(args)
    parts = memory_lower_bound(args, words)
    need, available = sum(parts.values()), available_memory(device)
    if available is not None and need > available:
        biggest = max(parts, key=parts.get)
        raise UserError(f"this run needs at least {_size(need)} of {device_type(device)} memory, "
                        f"{_size(parts[biggest])} of it for {biggest}, and {_size(available)} is available")


def _size(n_bytes):
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MiB"


def memory_lower_bound(args, words):
    """Bytes the run cannot do without, by what takes them: the model with its optimizer's state
    (and the rnn model's V x d vectors), on the torch loops one step's whole windows, and the PIP
    loss's arrays."""
    vocab, dim = len(words), args.embed_size
    copies = 1 + {"adam": 3, "sparse_adam": 2}.get(args.optimizer, 0)  # weights, moments, Adam's dense gradient
    model_bytes = 4 * tables.parameter_count(args.model_name, words, dim, vars(args)) * copies
    if args.model_name == "rnn":
        model_bytes += 4 * vocab * dim
    parts = {f"the model (--embed-size {dim}, {vocab:,} words)": model_bytes}
    if args.loop != "kernel":
        world_size = args.world.world_size if args.world else 1
        slots = engines.centers_per_step(args.batch_size, args.window_size, world_size) * 2 * args.window_size
        if args.loop == "window":  # a draw's windows (int64 ids, float32 weights) and a step's gathered rows
            step_bytes = data.STEPS_PER_DRAW * slots * 12 + slots * 4 * dim
        else:  # window_pairs' int64 positions and their masks
            step_bytes = slots * 12
        parts[f"a step's windows (--window-size {args.window_size}, --batch-size {args.batch_size})"] = step_bytes
    if args.pip_interval:  # float64 copies of the vectors and of the oracle, a d x d Gram matrix and its square
        pip_words = min(args.pip_vocab, vocab)
        parts[f"the PIP loss (--embed-size {dim}, --pip-vocab {pip_words:,})"] = 16 * (pip_words * dim + dim * dim)
    return parts


def available_memory(device):
    """Bytes free for the run on device (its name): a GPU's free memory, or the host's MemAvailable;
    None where unknown."""
    if device_type(device) == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_room_for_checkpoints(run_dir, model, optimizer, corpus, files):
    """Fail before training, not hours later, when the disk cannot hold an epoch end's files."""
    need = files * checkpoint.bytes_needed(model, optimizer, corpus)
    free = fileio.free_bytes(run_dir / "checkpoint.pt")
    if free < need:
        raise OSError(f"not enough disk space for checkpoints in {run_dir}: about {need / 2**20:.1f} MiB "
                      f"needed, {free / 2**20:.1f} MiB free")


# ---------------------------------------------------------------------------------------------
# Watching a run: signals, per-step accounting, per-epoch scalars

class Signals:
    """While training: turns SIGINT, SIGTERM and SIGHUP (a closed terminal) into a number the
    loops read between steps (never mid-update); the handlers before it come back on leaving."""
    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.received = None
        self.before = {}

    def __enter__(self):
        for signum in self.HANDLED:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # started under nohup: a closed terminal must not stop the run
            self.before[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum, frame):
        if self.received is not None:  # second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.received = signum

    def pending(self):
        return self.received or 0


class Progress:
    """Each step's accounts: the step count, the epoch's loss and pairs, the progress bar and
    Batch loss every --log-interval steps. The torch loops' sums stay on the device until a
    log point reads them, so a GPU never waits for the host at every step."""

    def __init__(self, args, state, writer, n_corpus):
        self.args, self.state, self.writer = args, state, writer
        self.bar = tqdm(total=n_corpus * args.epochs, unit="word", unit_scale=True, disable=args.quiet,
                        dynamic_ncols=True, initial=n_corpus * state["epoch"], mininterval=0.5)
        self.device_losses, self.device_pairs = [], []
        self.epoch_words = 0.0

    def reset_epoch_words(self):
        self.epoch_words = 0.0

    def __call__(self, steps_done, loss_sum, pairs, words_done, lr):
        state = self.state
        state["global_step"] += 1
        if not isinstance(loss_sum, numbers.Number):  # a torch loop's sum, still on its device
            self.device_losses.append(loss_sum.detach())
        elif math.isfinite(loss_sum):
            state["epoch_loss"] += loss_sum
        else:
            raise FloatingPointError(f"loss became {loss_sum} at epoch {state['epoch'] + 1}, "
                                     f"step {state['global_step']}")
        if not isinstance(pairs, numbers.Number):
            self.device_pairs.append(pairs)
        else:
            state["epoch_pairs"] += pairs
        state["position"] = {"step": steps_done}
        self.epoch_words += words_done
        self.bar.update(min(words_done, self.bar.total - self.bar.n))
        if state["global_step"] % self.args.log_interval == 0 and pairs:
            batch_loss = float(loss_sum) / int(pairs)
            self.collect()
            self.writer.add_scalar("Batch loss", batch_loss, state["global_step"])
            self.bar.set_postfix(loss=f"{batch_loss:.3f}", lr=f"{lr:.2g}", epoch=state["epoch"] + 1)

    def collect(self):
        """Add the device-side sums to the epoch's: one wait for the device per log interval."""
        state = self.state
        if self.device_pairs:
            state["epoch_pairs"] += int(torch.stack(self.device_pairs).sum())
            self.device_pairs.clear()
        if self.device_losses:
            total = float(torch.stack(self.device_losses).sum())
            self.device_losses.clear()
            if not math.isfinite(total):
                raise FloatingPointError(f"loss became {total} at epoch {state['epoch'] + 1}, "
                                         f"by step {state['global_step']}")
            state["epoch_loss"] += total

    def write(self, line):
        self.bar.write(line)

    def close(self):
        self.bar.close()


class PipMonitor:
    """SPPMI matrix of the most frequent words (cached with the corpus) and the three PIP losses."""

    def __init__(self, corpus, args, log=print):
        import pip_loss  # scipy.sparse: only runs that compute the PIP loss pay its import
        self.vocab = min(args.pip_vocab, len(corpus.words))
        tag = f"v{self.vocab}-w{args.window_size}-k{args.neg_sample_size}"
        sppmi_file = corpus.cache_file(f"sppmi-{tag}.npz")
        oracle_file = corpus.cache_file(f"oracle-{tag}-d{args.embed_size}.npy")
        self.sppmi = data.cached_array(sppmi_file, lambda: pip_loss.sppmi(
            corpus.token_ids, self.vocab, args.window_size, args.neg_sample_size, corpus.sentence_starts),
            (self.vocab, self.vocab), log)
        dim = min(args.embed_size, self.vocab - 1)
        self.oracle = data.cached_array(oracle_file, lambda: pip_loss.oracle_embedding(self.sppmi, dim),
                                        (self.vocab, dim), log)

    def losses(self, vectors):
        import pip_loss
        vectors = vectors[:self.vocab]  # float32: pip_loss computes in float64 from it
        losses = {"PIP loss": pip_loss.pip_loss_sppmi(vectors, self.sppmi),
                  "PIP loss (oracle)": pip_loss.pip_loss_oracle(vectors, self.oracle)}
        if self.vocab >= 3:  # a correlation over word pairs needs more than one pair
            losses["PIP loss (normalized)"] = pip_loss.pip_loss_normalized(vectors, self.oracle)
        return losses


def lowest_normalized_pip(history):
    """(epoch, value, evaluations since) of the lowest 'PIP loss (normalized)' in a run's history,
    None before its first evaluation. A later equal value is no improvement."""
    points = history.get("PIP loss (normalized)")
    if not points:
        return None
    best = min(range(len(points)), key=lambda i: points[i][1])
    return int(points[best][0]), points[best][1], len(points) - 1 - best


def epoch_scalars(args, epoch, state, epoch_time, epoch_words, vectors, corpus, pip_monitor, evaluation):
    """The scalars logged at the end of an epoch: loss, time, speed, learning rate, PIP losses
    (every --pip-interval epochs) and the evaluation files' scores (every --eval-interval);
    vectors() gives the word vectors as a numpy array."""
    scalars = {"Train loss": state["epoch_loss"] / max(1, state["epoch_pairs"]), "Epoch time": epoch_time,
               "Words per second": epoch_words / max(epoch_time, 1e-9),
               "Learning rate": engines.lr_at(args, (epoch + 1) / args.epochs)}
    if pip_monitor and (epoch + 1) % args.pip_interval == 0:
        scalars.update(pip_monitor.losses(vectors()))
    if evaluation and (epoch + 1) % args.eval_interval == 0:
        scalars.update(evaluation.scalars(corpus.words, vectors()))
    return scalars


class EvaluationFiles:
    """--eval-similarity and --eval-analogy, read once before training (a bad file stops the run
    before its first epoch, not after it) and scored every --eval-interval epochs."""

    def __init__(self, args):
        import evaluate
        self.pairs = {path: read_evaluation_file("--eval-similarity", path, evaluate.load_pairs, len, "word pairs")
                      for path in args.eval_similarity}
        self.analogies = None
        if args.eval_analogy:
            self.analogies = read_evaluation_file("--eval-analogy", args.eval_analogy, evaluate.load_analogies,
                                                  lambda sections: sum(len(q) for _, q in sections), "questions")

    def scalars(self, words, vectors):
        """Similarity rho per pair file and analogy accuracy, as TensorBoard scalars."""
        import evaluate
        scalars = {f"Similarity/{Path(path).stem}": evaluate.similarity(words, vectors, pairs)["spearman"]
                   for path, pairs in self.pairs.items()}
        if self.analogies is not None:
            scalars["Analogy accuracy"] = evaluate.analogy(words, vectors, self.analogies)["accuracy"]
        return scalars


def read_evaluation_file(flag, path, load, count, what):
    """load(path), refused in one line naming the flag when the file is missing, not UTF-8,
    malformed, or holds nothing to score (count: its items)."""
    import evaluate
    try:
        fileio.check_input_path(path, f"{flag} file")  # a FIFO would block the run before it starts
    except (FileNotFoundError, fileio.PathKindError) as err:
        raise UserError(str(err)) from None
    try:
        parsed = load(path)
    except UnicodeDecodeError as err:
        raise UserError(f"{flag} {path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8")
    except evaluate.EvaluationInputError as err:
        raise UserError(f"{flag} {err}")
    except OSError as err:
        raise UserError(f"{flag} {path}: {err.strerror or err}")
    if not count(parsed):
        raise UserError(f"{flag} {path}: no {what} in it")
    return parsed


def make_writer(run_dir):
    if not distributed.is_main():
        return distributed.NullWriter()
    return summary_writer_class()(str(run_dir))


def summary_writer_class():
    """tensorboardX's SummaryWriter (imported only by the rank that logs), without the S3 support
    it imports boto3 for where boto3 is installed (a longer import than its own): run folders are local.
    Nor does it import torch for a run that does not (lazy.py): it would only learn to accept
    tensors where the trainer gives it numbers."""
    hidden = [name for name in ("boto3", "torch") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError: tensorboardX goes without it
    try:
        from tensorboardX import SummaryWriter
    finally:
        for name in hidden:
            del sys.modules[name]
    return SummaryWriter


# ---------------------------------------------------------------------------------------------
# The run

class Run:
    """What a run's epochs share: its options, folder, corpus, model and engine, and where it logs."""

    def __init__(self, args, run_dir):
        self.args, self.run_dir = args, run_dir
        set_threads(args)
        print(f"run directory: {self.run_dir}")
        check_output_paths(args)
        self.evaluation = None  # only rank 0 evaluates
        if distributed.is_main() and (args.eval_similarity or args.eval_analogy):
            self.evaluation = EvaluationFiles(args)
        self.corpus = load_corpus(args)
        check_memory(args, self.corpus.words)
        self.model, self.optimizer = make_model(args, self.corpus)
        self.state = start_state(args, self.run_dir, self.model, self.optimizer, self.corpus)
        distributed.check_same_settings({"the epoch and step it starts at (--resume)":
                                         [self.state["epoch"], self.state["global_step"]]})
        device = run_device(args)
        if device.startswith("cuda:"):
            torch.cuda.set_device(device)  # CUDA graphs, Triton and NCCL work on the current device
        self.model.to(device)
        distributed.broadcast_parameters(self.model)
        strategy = distributed.make_strategy(args, args.world)
        self.engine = engines.Engine(args, self.model, self.optimizer, self.corpus, strategy, args.loop, device)
        self.pip_monitor = None
        if distributed.is_main():
            saved_files = 2 if args.pip_interval else 1  # checkpoint.pt, and best.pt where the PIP loss picks it
            check_room_for_checkpoints(self.run_dir, self.model, self.optimizer, self.corpus, saved_files)
            self.pip_monitor = PipMonitor(self.corpus, args) if args.pip_interval else None
        self.writer = make_writer(self.run_dir)
        self.checkpoint_step = None  # the step checkpoint.pt was last written at by this process
        self.checkpoint_time = time.monotonic()  # when it was written, or the run started

    def save(self, name):
        """Write checkpoint `name`; a failed write says what is left to resume from."""
        if not distributed.is_main():
            return
        try:
            checkpoint.save(self.run_dir / name, self.model, self.optimizer, self.corpus, saved_args(self.args),
                            self.state)
            if name == "checkpoint.pt":
                self.checkpoint_step, self.checkpoint_time = self.state["global_step"], time.monotonic()
            if self.args.resume and name == "checkpoint.pt":  # the next --resume starts from what this one changed
                checkpoint.write_arguments(self.run_dir, saved_args(self.args))
        except OSError as err:
            raise OSError(f"{err}; {self.what_is_left(name)}") from err

    def what_is_left(self, failed):
        resumable = self.run_dir / "checkpoint.pt"
        if not resumable.exists():
            return f"there is no checkpoint to resume from: start the run again once {self.run_dir} can be written"
        kept = f"the previous {failed} is intact, " if failed == resumable.name else f"{resumable} is intact, "
        return f"{kept}resume with: {resume_command(self.args, self.run_dir)}"

    def vectors(self):
        """The V x d word vectors as a numpy array."""
        vectors = self.model.embeddings()
        return vectors if isinstance(vectors, np.ndarray) else vectors.cpu().numpy()


def train(args):
    """Train a run from its options: set up, run the epochs, write what the run ends with. The run
    holds its folder's lock throughout; a new run that fails or is stopped before its first
    checkpoint leaves no folder behind."""
    check_outputs_apart(args)
    run_dir = open_run_dir(args)
    run = lock = None
    try:
        lock = checkpoint.lock_run_dir(run_dir) if distributed.is_main() else None
        run = Run(args, run_dir)
        with Signals() as signals:
            progress = Progress(args, run.state, run.writer, len(run.corpus))
            distributed.start_together()
            try:
                stopped_by = run_epochs(run, progress, signals)
            finally:
                progress.close()
            if stopped_by:
                return stop_run(run, stopped_by)
        return finish_run(run)
    except BaseException as err:
        if not args.resume and distributed.is_main():
            if run is not None and not (run_dir / "checkpoint.pt").exists():
                run.writer.close()  # its events file goes with the folder (a full disk keeps its checkpoint)
            checkpoint.remove_unused_run_dir(run_dir)
        signum = stop_signal(err)
        if signum:
            raise Stopped(signum, what_is_kept(args, run_dir)) from None
        if isinstance(err, FloatingPointError):  # resuming would meet the same NaN: no resume command
            raise FloatingPointError(f"{err}; {what_is_kept(args, run_dir, resumable=False)}") from None
        raise
    finally:
        if lock is not None:
            os.close(lock)


def stop_signal(err):
    """The signal behind err: a Ctrl-C or another stop signal raised as KeyboardInterrupt, also
    where numba wrapped it in a SystemError; 0 for any other error."""
    while err is not None:
        if isinstance(err, KeyboardInterrupt):
            return getattr(err, "signum", signal.SIGINT)
        if not isinstance(err, SystemError):
            return 0
        err = err.__cause__ or err.__context__
    return 0


def what_is_kept(args, run_dir, resumable=True):
    """What a run that ends on an error leaves to go on from (and how, where resumable)."""
    if not distributed.is_main():
        return "rank 0 keeps its last checkpoint"
    kept = Path(run_dir) / "checkpoint.pt"
    if kept.exists():
        how = f"; resume with: {resume_command(args, run_dir)}" if resumable else ""
        return f"the last good checkpoint is kept ({kept}){how}"
    return "no checkpoint was written" + ("" if Path(run_dir).exists() else ", and the run folder is removed")


def run_epochs(run, progress, signals):
    """The epochs left to train; returns the signal that stopped them, or 0."""
    args, state = run.args, run.state
    while state["epoch"] < args.epochs:
        epoch, started = state["epoch"], time.time()
        progress.reset_epoch_words()
        stop = run.engine.run(epoch, state["position"].get("step", 0), progress, signals.pending)
        progress.collect()
        if stop:
            return stop
        early_stop = on_epoch_end(run, progress, epoch, time.time() - started)
        if signals.pending():  # came while the epoch ended: honoured now that its checkpoint is on disk
            return signals.pending()
        if early_stop:
            progress.write(early_stop)
            break
    return 0


def on_epoch_end(run, progress, epoch, epoch_time):
    """Log the epoch's scalars, then write its checkpoints and projector snapshot; returns why the
    run stops early (--early-stop), or None."""
    args, state = run.args, run.state
    # A NaN can reach the weights in an update after the last loss was computed: never
    # evaluate or checkpoint such weights.
    if not all(all_finite(p) for p in run.model.parameters()):
        raise FloatingPointError(f"the weights became NaN or infinite in epoch {epoch + 1}, "
                                 f"by step {state['global_step']}")
    vectors = functools.cache(run.vectors)  # one copy for the PIP loss, the evaluation and the snapshot
    scalars = epoch_scalars(args, epoch, state, epoch_time, progress.epoch_words, vectors, run.corpus,
                            run.pip_monitor, run.evaluation)
    for tag, value in scalars.items():
        run.writer.add_scalar(tag, value, epoch + 1)
        state["history"].setdefault(tag, []).append([epoch + 1, float(value)])
    progress.write(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k.lower()} {v:.4g}" for k, v in scalars.items()))
    state.update(epoch=epoch + 1, position={}, epoch_loss=0.0, epoch_pairs=0)
    oracle = scalars.get("PIP loss (oracle)")
    if oracle is not None and (state["best_oracle_pip"] is None or oracle < state["best_oracle_pip"]):
        state["best_oracle_pip"] = oracle  # kept for the checkpoint's readers; best.pt follows the normalized loss
    lowest = lowest_normalized_pip(state["history"]) if "PIP loss (normalized)" in scalars else None
    early_stop = distributed.rank_0_says(early_stop_reason(args, epoch, lowest))
    last_epoch = epoch + 1 == args.epochs or early_stop is not None
    if checkpoint_due(args, epoch, last_epoch, time.monotonic() - run.checkpoint_time):
        run.save("checkpoint.pt")  # before best.pt: a resumable state whatever happens to best.pt
    if lowest and lowest[0] == epoch + 1:
        run.save("best.pt")
    snapshot = last_epoch or (args.projector_interval and (epoch + 1) % args.projector_interval == 0)
    if snapshot and distributed.is_main():
        n = min(args.projector_words, len(run.corpus.words))
        export.write_projector_snapshot(run.run_dir, run.corpus.words[:n], vectors()[:n], epoch + 1)
    return early_stop


def checkpoint_due(args, epoch, last_epoch, seconds_since):
    """Whether epoch's end writes checkpoint.pt (seconds_since: since the last one, or the run's start)."""
    if last_epoch:
        return True
    if args.save_interval:
        return (epoch + 1) % args.save_interval == 0
    return seconds_since >= CHECKPOINT_SECONDS


def all_finite(weight):
    """Whether a weight (numpy array or tensor) is all finite: by numpy on the host, where it
    costs a small part of torch's."""
    if isinstance(weight, np.ndarray):
        return bool(np.isfinite(weight).all())
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        return bool(np.isfinite(weight.detach().numpy()).all())
    return bool(torch.isfinite(weight).all())


def early_stop_reason(args, epoch, lowest):
    """Why the run stops after this epoch under --early-stop N, or None: the normalized PIP loss
    (lowest: lowest_normalized_pip) has not improved for N evaluations."""
    if not (lowest and args.early_stop and lowest[2] >= args.early_stop):
        return None
    return (f"early stop after epoch {epoch + 1} of {args.epochs}: PIP loss (normalized) has not improved for "
            f"{lowest[2]} evaluations (lowest {lowest[1]:.4g} at epoch {lowest[0]})")


def stop_run(run, signum):
    """A signal stopped the run: checkpoint exactly where it is (unless the epoch's end just did)
    and say how to go on."""
    state = run.state
    if run.checkpoint_step != state["global_step"]:
        run.save("checkpoint.pt")
    run.writer.close()
    where = (f"at epoch {state['epoch'] + 1}, step {state['global_step']}" if state["position"]
             else f"after epoch {state['epoch']} of {run.args.epochs}")
    print(f"stopped by signal {signum} {where}; checkpoint written. Resume with: "
          f"{resume_command(run.args, run.run_dir)}")
    return 128 + signum


def resume_command(args, run_dir):
    """The command that continues a run. A --multi-node run needs all its ranks back: each rank's
    own launch command (under torchrun, torchrun's) with --resume RUN_DIR added."""
    if not args.world:
        return shlex.join(["python", "trainer.py", "--resume", str(run_dir)])
    argv = [*without_flag(args.argv, "--resume"), "--resume", str(run_dir)]
    if args.world.init_method == "env://" and args.rank is None:
        return f"the same torchrun command with --resume added: torchrun ... trainer.py {shlex.join(argv)}"
    return (f"every rank's launch command with --resume added; rank {args.world.rank}'s: "
            f"python trainer.py {shlex.join(argv)}")


def without_flag(argv, flag):
    """argv without `flag VALUE` (or flag=VALUE)."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == flag:
            skip = True
        elif not word.startswith(flag + "="):
            kept.append(word)
    return kept


def finish_run(run):
    """The end of a run: export, pictures, the closing lines."""
    args, state = run.args, run.state
    vectors = run.vectors() if distributed.is_main() else None
    if args.export and distributed.is_main():
        write_output("--export", args.export, run.run_dir,
                     lambda: export.write_word2vec(args.export, run.corpus.words, vectors))
        print(f"vectors written to {args.export}")
    run.writer.close()
    if distributed.is_main():
        # rnn: words not in the vocabulary get vectors from their spelling
        embed_fn = (lambda ws: run.model.embed_words(ws).cpu().numpy()) if hasattr(run.model, "embed_words") else None
        write_pictures(args, run.run_dir, state["history"], run.corpus.words, vectors, embed_fn)
    lowest = lowest_normalized_pip(state["history"])
    if lowest:
        best = run.run_dir / "best.pt"
        where = f"checkpoint {best}" if best.exists() else f"its checkpoint, best.pt, is no longer in {run.run_dir}"
        print(f"lowest PIP loss (normalized): {lowest[1]:.4g} at epoch {lowest[0]} ({where})")
    print(f"done: {run.run_dir}")
    return 0


def write_pictures(args, run_dir, history, words, vectors, embed_fn=None):
    """Training curves, the chosen words' projection and projector files, at the end of a run.
    embed_fn: a list of words -> their vectors, for a model that embeds unseen words (rnn)."""
    pictures = {}
    if history:  # every epoch logs its train loss
        pictures["curves"] = str(run_dir / "curves.png")
    if args.plot_words:
        import plots
        try:
            chosen, rows, missing = plots.words_to_plot(args.plot_words, words, vectors, embed_fn=embed_fn)
        except plots.PlotError as err:
            print(f"warning: no projection: {err}")
        else:
            if missing:
                print(f"warning: not in the vocabulary, left out of the plot: {' '.join(missing)}")
            pictures.update(projection=str(run_dir / "projection.png"), words=chosen, vectors=rows.tolist())
    if pictures:
        draw_pictures(dict(pictures, history=history))
        for name in ("curves", "projection"):
            if name in pictures:
                print(f"{name}: {pictures[name]}")
    if args.export_projector:
        write_output("--export-projector", args.export_projector, run_dir,
                     lambda: export.write_projector_files(words, vectors, args.export_projector))
        print(f"projector files written to {args.export_projector}")


# Matplotlib's import and the drawing take longer than the rest of a run's end: a child process
# draws the pictures, each written atomically, and the command line exits without waiting for it.
PICTURES_CHILD = """
import json, sys
job = json.load(sys.stdin)
sys.path.insert(0, job["root"])
import plots
if "curves" in job:
    plots.plot_training_curves(job["history"], job["curves"])
if "projection" in job:
    plots.plot_projection(job["words"], job["vectors"], job["projection"])
"""
WAIT_FOR_PICTURES = True  # for callers of main(); the command line does not wait
PICTURE_CHILDREN = []  # held until the process exits: a dropped Popen warns that its child still runs


def draw_pictures(job):
    """Draw the pictures job names (plots.py) in a child process; wait for it unless the command line runs."""
    errors_to = subprocess.PIPE if WAIT_FOR_PICTURES else subprocess.DEVNULL
    child = subprocess.Popen([sys.executable, "-c", PICTURES_CHILD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=errors_to, text=True, start_new_session=True)  # a later Ctrl-C leaves it be
    job = json.dumps(dict(job, root=str(Path(__file__).resolve().parent)))
    if not WAIT_FOR_PICTURES:
        with child.stdin:
            child.stdin.write(job)
        PICTURE_CHILDREN.append(child)
        return
    _, errors = child.communicate(job)
    if child.returncode:
        raise OSError(f"the pictures could not be drawn: {(errors.strip().splitlines() or ['?'])[-1]}")


def write_output(flag, path, run_dir, write):
    """write(); a failure (a full disk) names the user's path, and where the vectors still are."""
    try:
        write()
    except OSError as err:
        raise OSError(f"cannot write {flag} {path}: {err.strerror or err} ({fileio.free_bytes(path) / 2**20:.1f} "
                      f"MiB free on its disk); the vectors are in {Path(run_dir) / 'checkpoint.pt'}") from err


# ---------------------------------------------------------------------------------------------
# The command line

def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def _one_line_background_error(hook_args):
    """TensorBoard's writer thread and exit hook meet the same full disk as the checkpoint: one line each."""
    print(f"warning: a background write failed: {hook_args.exc_value}", file=sys.stderr)


def install_cli_reporting():
    """Process-wide: warnings and errors of background threads as one line, for the command line only."""
    warnings.formatwarning = _one_line_warning  # users get the message, not our source line
    threading.excepthook = sys.unraisablehook = _one_line_background_error


def exit_without_teardown(code):
    """Exit once main is done: its files are written and closed, and the interpreter's teardown
    (collections over torch's objects, torch's operator registry unwound) takes a third of a second."""
    if sys.getprofile() or sys.gettrace():  # a profiler or a debugger writes its report after the script ends
        sys.exit(code)
    atexit._run_exitfuncs()  # the exit hooks still run (tensorboardX's, the standard library's)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def rank_settings(args):
    """What every rank of a --multi-node run must share, by the flag a user would change."""
    labels = {"dist_mode": "--sync/--async", "loop": "the training loop (--engine, --device)"}
    return {labels.get(name, "--" + name.replace("_", "-")): getattr(args, name) for name in SHARED_BY_RANKS}


def main(argv=None):
    try:
        args = parse_args(argv)
        warnings.simplefilter("default")
        with distributed.session(args.world, args.dist_mode, rank_settings(args)):  # joins and leaves a group
            return train(args)
    except distributed.DistributedFailure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (data.DatasetError, checkpoint.CheckpointError, UserError, distributed.SettingsMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}. Try a lower --lr.", file=sys.stderr)
        return 1
    except OSError as err:  # unwritable folder, full disk: atomic writes left earlier files intact
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # during start-up or the closing writes, or a second Ctrl-C
        stop = err if isinstance(err, Stopped) else Stopped()
        print(f"error: interrupted by {signal.Signals(stop.signum).name}; {stop.note}", file=sys.stderr)
        return 128 + stop.signum


if __name__ == "__main__":
    install_stop_handlers()  # from here on main reports a stop signal in one line
    install_cli_reporting()
    WAIT_FOR_PICTURES = False
    exit_without_teardown(main())
