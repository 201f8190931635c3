"""Train SGNS word vectors: python trainer.py --help"""
import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import pip_loss
from model import build_model

CHECKPOINT_FORMAT = 1
TOKENS_PER_KERNEL_CALL = 200_000  # work between two looks at signals, progress and the loss
# Flags a resumed run may change; everything else comes from the saved run.
RESUMABLE_OVERRIDES = ("epochs", "num_threads", "device", "log_interval", "save_interval", "pip_interval",
                       "export", "quiet")


def get_parser():
    p = argparse.ArgumentParser(description="Train word vectors with skip-gram negative sampling (SGNS).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    g.add_argument("--model-name", default="sgns", choices=["sgns"], help="model to train")
    g.add_argument("--embed-size", type=int, default=100, help="embedding dimension d")
    g.add_argument("--window-size", type=int, default=5, help="max context words each side (shrunk at random per center)")
    g.add_argument("--neg-sample-size", type=int, default=5, help="negative samples per (center, context) pair")
    g.add_argument("--ns-exponent", type=float, default=0.75, help="negatives are drawn from unigram^this")
    g.add_argument("--subsample-th", type=float, default=1e-3, help="subsampling threshold t (0 turns it off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=5, help="passes over the corpus")
    g.add_argument("--lr", type=float, default=None,
                   help="starting learning rate, decayed linearly to ~0 (default 0.025 for sgd, 0.001 for sparse_adam)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "sparse_adam"],
                   help="sgd: plain SGD on touched rows, as word2vec; sparse_adam: torch.optim.SparseAdam")
    g.add_argument("--batch-size", type=int, default=4096,
                   help="(center, context) pairs per step of the torch engine (the CPU kernel steps pair by pair)")
    g.add_argument("--engine", default="auto", choices=["auto", "kernel", "torch"],
                   help="kernel: compiled word2vec-style CPU loop; torch: batched PyTorch steps (GPU, "
                        "sparse_adam); auto picks kernel for SGD on CPU")
    g.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    g.add_argument("--seed", type=int, default=1, help="random seed (runs are reproducible with --num-threads 1)")
    g.add_argument("--device", default="cpu", help="torch device for the torch engine: cpu, cuda, cuda:N")
    g = p.add_argument_group("monitoring and output")
    g.add_argument("--log-dir", default="saved/runs", help="each run gets its own folder here")
    g.add_argument("--run-name", default=None, help="name of the run folder (default: date and time)")
    g.add_argument("--log-interval", type=int, default=100, help="steps between 'Batch loss' points")
    g.add_argument("--save-interval", type=int, default=1,
                   help="epochs between checkpoints and TensorBoard projector snapshots")
    g.add_argument("--pip-interval", type=int, default=1, help="epochs between PIP loss evaluations (0: off)")
    g.add_argument("--pip-vocab", type=int, default=10_000, help="most frequent words the PIP loss is computed on")
    g.add_argument("--projector-words", type=int, default=10_000,
                   help="most frequent words sent to TensorBoard's projector")
    g.add_argument("--export", default=None,
                   help="write the vectors in word2vec format at the end (binary if the path ends in .bin)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a stopped run from its checkpoint, with its saved arguments "
                        "(--epochs given too changes the total)")
    g.add_argument("--load-model", default=None, metavar="CHECKPOINT",
                   help="start from the weights of a checkpoint trained on the same corpus")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume:
        args = _args_for_resume(parser, args, argv)
    for name in ("embed_size", "window_size", "neg_sample_size", "epochs", "batch_size", "num_threads",
                 "log_interval", "save_interval", "pip_vocab", "projector_words"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("remove_th", "pip_interval"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.lr is None:
        args.lr = 0.025 if args.optimizer == "sgd" else 0.001
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.subsample_th < 0:
        parser.error("--subsample-th must be 0 (off) or positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if args.engine == "auto":
        args.engine = "kernel" if args.optimizer == "sgd" and args.device == "cpu" else "torch"
    if args.engine == "kernel" and (args.optimizer != "sgd" or args.device != "cpu"):
        parser.error("--engine kernel runs plain SGD on the CPU; use --engine torch for other optimizers or devices")
    return args


def _args_for_resume(parser, args, argv):
    """The saved run's arguments, with the few flags a resume may change taken from the command line."""
    run_dir = Path(args.resume)
    args_file = run_dir / "args.json"
    if not args_file.is_file():
        parser.error(f"--resume {run_dir}: no args.json there (is it a run directory?)")
    saved = json.loads(args_file.read_text())
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
    ckpt = {"format": CHECKPOINT_FORMAT, "model_name": args.model_name, "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "words": corpus.words, "counts": corpus.counts.tolist(), "corpus_hash": corpus.hash,
            "args": {k: v for k, v in vars(args).items()}, **state}
    data.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path, corpus, model_name):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {err.__class__.__name__}: {str(err).splitlines()[0]}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this version of sgns")
    if ckpt["corpus_hash"] != corpus.hash:
        raise UserError(f"{path} was trained on another corpus or other preprocessing options")
    if ckpt["model_name"] != model_name:
        raise UserError(f"{path} holds a {ckpt['model_name']} model, not {model_name}")
    return ckpt


class UserError(Exception):
    """A problem the user can fix; reported in one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# PIP loss monitor

class PipMonitor:
    """SPPMI matrix of the most frequent words (cached with the corpus) and both PIP losses."""

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
        vectors = vectors[:self.vocab].double().numpy()
        return {"PIP loss": pip_loss.pip_loss_sppmi(vectors, self.sppmi),
                "PIP loss (oracle)": pip_loss.pip_loss_oracle(vectors, self.oracle)}


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
        data.atomic_write(path, lambda tmp: (scipy.sparse.save_npz(tmp, value) if sparse
                                             else np.save(tmp, value, allow_pickle=False)))
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
    """One epoch with the compiled CPU kernel, from sentence `position` of the subsampled stream."""
    import cpu_kernel
    kept_ids, starts = data.subsample(corpus.token_ids, corpus.sentence_starts, keep_prob, data.epoch_rng(args.seed, epoch))
    bounds = np.append(starts, len(kept_ids)).astype(np.int64)
    in_w = model.in_embed.weight.data.numpy()
    out_w = model.out_embed.weight.data.numpy()
    n_sentences, n_kept = len(starts), max(1, len(kept_ids))
    threads = cpu_kernel.set_threads(args.num_threads)
    call = 0
    sentence = position.get("sentence", 0)
    while sentence < n_sentences:
        # A fixed amount of tokens per call, so a resumed epoch makes the same calls.
        end = int(np.searchsorted(bounds, bounds[sentence] + TOKENS_PER_KERNEL_CALL))
        end = min(n_sentences, max(sentence + 1, end))
        targets = np.linspace(bounds[sentence], bounds[end], 4 * threads + 1)
        chunk_sentences = np.unique(np.concatenate([[sentence], np.searchsorted(bounds, targets[1:-1]), [end]]))
        chunk_sentences = chunk_sentences[(chunk_sentences >= sentence) & (chunk_sentences <= end)].astype(np.int64)
        loss_out = np.zeros(len(chunk_sentences) - 1)
        pairs_out = np.zeros(len(chunk_sentences) - 1, dtype=np.int64)
        lr_first = lr_at(args, (epoch + bounds[sentence] / n_kept) / args.epochs)
        lr_last = lr_at(args, (epoch + bounds[end] / n_kept) / args.epochs)
        seed = int(data.epoch_rng(args.seed, epoch, sentence).integers(1, 2**63))
        cpu_kernel.train_chunks(in_w, out_w, kept_ids, bounds, chunk_sentences, args.window_size,
                                args.neg_sample_size, sampler.accept, sampler.alias, lr_first, lr_last, seed,
                                loss_out, pairs_out)
        sentence = end
        call += 1
        words_done = (bounds[end] - bounds[chunk_sentences[0]]) / n_kept * len(corpus)
        step(float(loss_out.sum()), int(pairs_out.sum()), words_done, lr_last, {"sentence": sentence})


def torch_epoch(model, optimizer, corpus, args, epoch, position, sampler, keep_prob, step):
    """One epoch of batched PyTorch steps (GPU, SparseAdam), from center `position`."""
    rng = data.epoch_rng(args.seed, epoch)
    kept_ids, starts = data.subsample(corpus.token_ids, corpus.sentence_starts, keep_prob, rng)
    if "rng" in position:  # mid-epoch resume: continue the same random stream
        rng.bit_generator.state = json.loads(position["rng"])
    n_kept = max(1, len(kept_ids))
    device = torch.device(args.device)
    done = position.get("center", 0)
    for center_ids, context_ids, next_center in data.iter_pair_batches(kept_ids, starts, args.window_size,
                                                                       args.batch_size, rng, done):
        neg_ids = sampler.sample((len(center_ids), args.neg_sample_size), rng)
        center_ids, context_ids, neg_ids = (torch.from_numpy(a).to(device, non_blocking=True)
                                            for a in (center_ids, context_ids, neg_ids))
        lr = lr_at(args, (epoch + done / n_kept) / args.epochs)
        if args.optimizer == "sgd":
            loss_sum, *grads = model.sparse_grads(center_ids, context_ids, neg_ids)
            model.apply_sparse_grads(*grads, lr=lr)
            loss_sum = float(loss_sum)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = model(center_ids, context_ids, neg_ids)
            loss.backward()
            optimizer.step()
            loss_sum = float(loss.detach()) * len(center_ids)
        words_done = (next_center - done) / n_kept * len(corpus)
        done = next_center
        step(loss_sum, len(center_ids), words_done, lr, {"center": done, "rng": json.dumps(rng.bit_generator.state)})


# ---------------------------------------------------------------------------------------------

def export_vectors(path, words, vectors):
    """word2vec text format, or binary when the path ends in .bin (gensim reads both)."""
    from gensim.models import KeyedVectors
    keyed = KeyedVectors(vectors.shape[1])
    keyed.add_vectors(words, vectors)
    binary = str(path).endswith(".bin")
    data.atomic_write(path, lambda tmp: keyed.save_word2vec_format(str(tmp), binary=binary))


def train(args):
    run_dir = make_run_dir(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.num_threads)
    print(f"run directory: {run_dir}")
    corpus = data.load_corpus(args.dataset, args.data_dir, args.cache_dir, args.remove_th,
                              args.remove_stopwords, args.lemmatize)
    print(f"corpus: {corpus.name}: {len(corpus):,} tokens, {len(corpus.words):,} words "
          f"(choose another with --dataset FILE|FOLDER|gutenberg|lee)")

    model = build_model(args.model_name, len(corpus.words), args.embed_size, sparse=True)
    optimizer = None
    if args.optimizer == "sparse_adam":
        optimizer = torch.optim.SparseAdam(list(model.parameters()), lr=args.lr)
    state = {"epoch": 0, "position": {}, "global_step": 0, "epoch_loss": 0.0, "epoch_pairs": 0,
             "best_oracle_pip": None, "history": {}}
    if args.resume:
        ckpt = load_checkpoint(run_dir / "checkpoint.pt", corpus, args.model_name)
        model.load_state_dict(ckpt["model"])
        if optimizer is not None and ckpt["optimizer"]:
            optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt[k] for k in state}
        print(f"resuming at epoch {state['epoch'] + 1}, step {state['global_step']}")
    elif args.load_model:
        model.load_state_dict(load_checkpoint(args.load_model, corpus, args.model_name)["model"])
    model.to(args.device)

    from tensorboardX import SummaryWriter
    writer = SummaryWriter(str(run_dir))
    pip_monitor = PipMonitor(corpus, args) if args.pip_interval else None
    sampler = data.NegativeSampler(corpus.counts, args.ns_exponent)
    keep_prob = data.keep_probabilities(corpus.counts, args.subsample_th)
    signals = Signals()
    ckpt_path = run_dir / "checkpoint.pt"

    total_words = len(corpus) * args.epochs
    bar = tqdm(total=total_words, unit="word", unit_scale=True, disable=args.quiet, dynamic_ncols=True,
               initial=int(len(corpus) * (state["epoch"] + 0.0)), mininterval=0.5)
    interrupted = None
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        epoch_start = time.time()
        epoch_words = 0.0

        def step(loss_sum, pairs, words_done, lr, position):
            nonlocal epoch_words
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss became {loss_sum} at epoch {epoch + 1}, step {state['global_step']}")
            state["global_step"] += 1
            state["epoch_loss"] += loss_sum
            state["epoch_pairs"] += pairs
            state["position"] = position
            epoch_words += words_done
            bar.update(words_done)
            if state["global_step"] % args.log_interval == 0 and pairs:
                writer.add_scalar("Batch loss", loss_sum / pairs, state["global_step"])
                bar.set_postfix(loss=f"{loss_sum / pairs:.3f}", lr=f"{lr:.2g}", epoch=epoch + 1)
            signals.check()

        try:
            if args.engine == "kernel":
                kernel_epoch(model, corpus, args, epoch, state["position"], sampler, keep_prob, step)
            else:
                torch_epoch(model, optimizer, corpus, args, epoch, state["position"], sampler, keep_prob, step)
        except StopRequested as stop:
            interrupted = stop.signum
            break
        epoch_time = time.time() - epoch_start
        train_loss = state["epoch_loss"] / max(1, state["epoch_pairs"])
        scalars = {"Train loss": train_loss, "Epoch time": epoch_time,
                   "Words per second": epoch_words / max(epoch_time, 1e-9),
                   "Learning rate": lr_at(args, (epoch + 1) / args.epochs)}
        if pip_monitor and (epoch + 1) % args.pip_interval == 0:
            scalars.update(pip_monitor.losses(model.embeddings().cpu()))
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, epoch + 1)
            state["history"].setdefault(tag, []).append([epoch + 1, float(value)])
        bar.write(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k.lower()} {v:.4g}" for k, v in scalars.items()))
        state.update(epoch=epoch + 1, position={}, epoch_loss=0.0, epoch_pairs=0)

        oracle = scalars.get("PIP loss (oracle)")
        if oracle is not None and (state["best_oracle_pip"] is None or oracle < state["best_oracle_pip"]):
            state["best_oracle_pip"] = oracle
            save_checkpoint(run_dir / "best.pt", model, optimizer, corpus, args, state)
        if (epoch + 1) % args.save_interval == 0 or epoch + 1 == args.epochs:
            save_checkpoint(ckpt_path, model, optimizer, corpus, args, state)
            n = min(args.projector_words, len(corpus.words))
            writer.add_embedding(model.embeddings()[:n].cpu(), metadata=corpus.words[:n], global_step=epoch + 1,
                                 tag="embeddings")
    bar.close()

    if interrupted is not None:
        save_checkpoint(ckpt_path, model, optimizer, corpus, args, state)
        writer.close()
        print(f"stopped by signal {interrupted} at epoch {state['epoch'] + 1}, step {state['global_step']}; "
              f"checkpoint written. Resume with: python trainer.py --resume {run_dir}")
        return 128 + interrupted
    if args.export:
        export_vectors(args.export, corpus.words, model.embeddings().cpu().numpy())
        print(f"vectors written to {args.export}")
    writer.close()
    if state["best_oracle_pip"] is not None:
        print(f"lowest PIP loss (oracle): {state['best_oracle_pip']:.4g} (checkpoint {run_dir / 'best.pt'})")
    print(f"done: {run_dir}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    warnings.simplefilter("default")
    try:
        return train(args)
    except (data.DatasetError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}; the last good checkpoint is kept. Try a lower --lr.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
