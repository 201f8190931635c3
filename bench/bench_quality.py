"""Vector quality of our trainer's defaults against gensim's Word2Vec on the same corpus.

Trains gensim ``Word2Vec(sg=1, vector_size=100, window=5, min_count=5, sample=1e-3,
negative=5, epochs=5, workers=2, seed=1)`` on the sentences ``data.load_corpus``
produces (so both models see exactly the same tokens), runs ``trainer.py`` with its
defaults as a subprocess, and prints one table: Spearman rho on WordSim353,
SimLex-999, MEN and Stanford Rare Words, and Google analogy accuracy (3CosAdd and
3CosMul).

    python bench/bench_quality.py                 # both models (several minutes on 2 cores)
    python bench/bench_quality.py --skip-ours     # gensim only
    python bench/bench_quality.py --ours-vectors saved/ours.txt   # reuse an export
    python bench/bench_quality.py --seeds 1 2 3   # mean ± sd over three seeds per model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import EVAL, GUTENBERG, ROOT as REPO
import evaluate  # noqa: E402

SIMILARITY_SETS = [  # (column label, file name in the eval folder)
    ("WS353", "wordsim353.tsv"),
    ("SimLex-999", "simlex999.tsv"),
    ("MEN", "men3000.tsv"),
    ("Rare Words", "rw_stanford.tsv"),
]
ANALOGY_FILE = "questions-words.txt"


def fail(message: str):
    print(f"bench_quality.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(GUTENBERG),
                        help="corpus folder or file, as trainer.py --dataset takes it")
    parser.add_argument("--eval-dir", default=str(EVAL),
                        help="folder holding the similarity .tsv files and questions-words.txt")
    parser.add_argument("--epochs", type=int, default=5, help="epochs for both models")
    parser.add_argument("--workers", type=int, default=2, help="gensim worker threads")
    parser.add_argument("--restrict-vocab", type=int, default=30000,
                        help="analogy candidates: this many most frequent words")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], metavar="SEED",
                        help="train each model once per seed and report mean ± sd (default: 1)")
    parser.add_argument("--skip-gensim", action="store_true", help="do not train gensim")
    parser.add_argument("--skip-ours", action="store_true", help="do not run trainer.py")
    parser.add_argument("--ours-vectors", default=None, metavar="FILE",
                        help="evaluate this exported word2vec file instead of running trainer.py")
    parser.add_argument("--trainer-args", default="", metavar="'ARGS'",
                        help="extra arguments appended to the trainer.py command line")
    parser.add_argument("--keep-dir", default=None, metavar="DIR",
                        help="keep exported vectors and the trainer run here (default: a temp dir)")
    parser.add_argument("--cross-check", action="store_true",
                        help="also score the gensim model with gensim's own evaluators "
                             "(evaluate_word_pairs / evaluate_word_analogies) as a check")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return parser.parse_args(argv)


def evaluate_vectors(words, vectors, eval_dir: Path, restrict_vocab: int) -> dict:
    results = {}
    for label, name in SIMILARITY_SETS:
        results[label] = evaluate.similarity(words, vectors, evaluate.load_pairs(eval_dir / name))
    questions = evaluate.load_analogies(eval_dir / ANALOGY_FILE)
    for method in evaluate.ANALOGY_METHODS:
        started = time.perf_counter()
        result = evaluate.analogy(words, vectors, questions, restrict_vocab=restrict_vocab,
                                  method=method)
        result["seconds"] = time.perf_counter() - started
        results[f"analogy {method}"] = result
    return results


def gensim_sentences(args):
    """The corpus as data.load_corpus builds it for trainer.py, as lists of words."""
    import numpy as np

    import data

    started = time.perf_counter()
    corpus = data.load_corpus(dataset=args.dataset, data_dir=str(REPO / "data"),
                              cache_dir=str(REPO / "data" / "cache"), min_count=5)
    # Same sentences as our trainer: token ids cut at sentence starts, as words.
    bounds = np.append(corpus.sentence_starts, len(corpus.token_ids))
    words = corpus.words
    token_words = [words[i] for i in corpus.token_ids.tolist()]
    sentences = [token_words[start:end] for start, end in zip(bounds[:-1].tolist(),
                                                              bounds[1:].tolist()) if end > start]
    info = {"corpus_seconds": time.perf_counter() - started, "tokens": int(len(corpus.token_ids))}
    return sentences, words, info


def train_gensim(args, sentences, corpus_words, seed: int):
    import numpy as np
    from gensim.models import Word2Vec

    started = time.perf_counter()
    model = Word2Vec(sentences=sentences, sg=1, vector_size=100, window=5, min_count=5,
                     sample=1e-3, negative=5, epochs=args.epochs, workers=args.workers, seed=seed)
    keyed = model.wv
    info = {"seed": seed, "train_seconds": time.perf_counter() - started,
            "vocab": len(keyed.index_to_key),
            "same_vocab_as_corpus": set(keyed.index_to_key) == set(corpus_words)}
    return list(keyed.index_to_key), np.asarray(keyed.vectors), keyed, info


def run_ours(args, work_dir: Path, seed: int):
    export = work_dir / f"ours-seed{seed}.txt"
    command = [sys.executable, "trainer.py", "--dataset", args.dataset, "--export", str(export),
               "--pip-interval", "0", "--epochs", str(args.epochs), "--seed", str(seed),
               "--log-dir", str(work_dir / "runs"), "--run-name", f"bench-quality-seed{seed}",
               "--quiet", *args.trainer_args.split()]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
        print(f"trainer.py failed (exit {completed.returncode}):\n{tail}", file=sys.stderr)
        fail("trainer.py did not produce vectors; see above")
    words, vectors = evaluate.load_vectors(export)
    return words, vectors, {"seed": seed, "train_seconds": seconds, "vocab": len(words),
                            "command": " ".join(command[1:])}


def cross_check(keyed, eval_dir: Path, restrict_vocab: int) -> dict:
    """gensim's own evaluators on the gensim vectors (3CosAdd), to validate evaluate.py."""
    pearson, spearman, oov_ratio = keyed.evaluate_word_pairs(str(eval_dir / "wordsim353.tsv"),
                                                            restrict_vocab=len(keyed))
    started = time.perf_counter()
    accuracy, _ = keyed.evaluate_word_analogies(str(eval_dir / ANALOGY_FILE),
                                                restrict_vocab=restrict_vocab)
    return {"WS353 spearman": float(spearman.statistic if hasattr(spearman, "statistic")
                                      else spearman[0]),
            "WS353 oov %": float(oov_ratio), "analogy accuracy": float(accuracy),
            "analogy seconds": time.perf_counter() - started}


def fmt(value, digits=3):
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def summarize(values) -> str:
    """'mean' for one run, 'mean ± sd' (sample sd) over several seeds."""
    values = [value for value in values if value is not None and value == value]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt(mean)
    sd = (sum((value - mean) ** 2 for value in values) / (len(values) - 1)) ** 0.5
    return f"{fmt(mean)} ± {fmt(sd)}"


def print_table(results: dict, infos: dict):
    """One row per model; each cell is the mean (± sd) over the seeds run."""
    labels = [label for label, _ in SIMILARITY_SETS]
    methods = ["analogy 3cosadd", "analogy 3cosmul"]
    header = (["model"] + [f"{label} rho" for label in labels]
              + ["analogy 3CosAdd", "analogy 3CosMul"] + ["train s"])
    rows = []
    for model_name, runs in results.items():
        row = [model_name]
        for label in labels:
            row.append(summarize([run[label]["spearman"] for run in runs]))
        for name in methods:
            row.append(summarize([run[name]["accuracy"] for run in runs]))
        seconds = [info["train_seconds"] for info in infos[model_name] if "train_seconds" in info]
        row.append(f"{sum(seconds) / len(seconds):.0f}" if seconds else "-")
        rows.append(row)
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    first = next(iter(results.values()))[0]
    print("in vocabulary: " + ", ".join(
        f"{label} {first[label]['pairs']} pairs ({first[label]['oov']} OOV)" for label in labels)
        + f", analogy {first[methods[0]]['questions']} questions "
          f"({first[methods[0]]['oov']} skipped)")


def main(argv=None):
    args = parse_args(argv)
    eval_dir = Path(args.eval_dir)
    needed = [eval_dir / name for _, name in SIMILARITY_SETS] + [eval_dir / ANALOGY_FILE]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        fail(f"evaluation files not found: {', '.join(missing)}")
    if args.ours_vectors and not Path(args.ours_vectors).is_file():
        fail(f"--ours-vectors file not found: {args.ours_vectors}")
    if not args.seeds:
        fail("--seeds needs at least one seed")

    work_dir_holder = None
    if args.keep_dir:
        work_dir = Path(args.keep_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
    else:
        work_dir_holder = tempfile.TemporaryDirectory(prefix="bench-quality-")
        work_dir = Path(work_dir_holder.name)

    results, infos, extra = {}, {}, {}
    if not args.skip_gensim:
        sentences, corpus_words, corpus_info = gensim_sentences(args)
        extra["corpus"] = corpus_info
        results["gensim"], infos["gensim"] = [], []
        for seed in args.seeds:
            print(f"training gensim Word2Vec, seed {seed} ...", file=sys.stderr, flush=True)
            words, vectors, keyed, info = train_gensim(args, sentences, corpus_words, seed)
            infos["gensim"].append(info)
            results["gensim"].append(evaluate_vectors(words, vectors, eval_dir,
                                                      args.restrict_vocab))
            if args.keep_dir:
                keyed.save_word2vec_format(str(work_dir / f"gensim-seed{seed}.txt"))
            if args.cross_check and seed == args.seeds[0]:
                extra["gensim cross-check"] = cross_check(keyed, eval_dir, args.restrict_vocab)
        del sentences
    if args.ours_vectors:
        words, vectors = evaluate.load_vectors(args.ours_vectors)
        infos["ours"] = [{"vectors": args.ours_vectors, "vocab": len(words)}]
        results["ours"] = [evaluate_vectors(words, vectors, eval_dir, args.restrict_vocab)]
    elif not args.skip_ours:
        results["ours"], infos["ours"] = [], []
        for seed in args.seeds:
            print(f"training ours (trainer.py), seed {seed} ...", file=sys.stderr, flush=True)
            words, vectors, info = run_ours(args, work_dir, seed)
            infos["ours"].append(info)
            results["ours"].append(evaluate_vectors(words, vectors, eval_dir,
                                                    args.restrict_vocab))
    if not results:
        fail("nothing to compare: both --skip-gensim and --skip-ours given")

    if args.json:
        print(json.dumps(evaluate._json_safe({"results": results, "runs": infos, **extra})))
    else:
        tokens = extra.get("corpus", {}).get("tokens")
        print(f"corpus: {args.dataset}{f' ({tokens} tokens)' if tokens else ''}; "
              f"seeds {' '.join(map(str, args.seeds))}; analogy candidates: top "
              f"{args.restrict_vocab} words")
        for name, runs in infos.items():
            for info in runs:
                details = ", ".join(f"{key} {fmt(value, 1) if isinstance(value, float) else value}"
                                    for key, value in info.items())
                print(f"  {name}: {details}")
        print()
        print_table(results, infos)
        if "gensim cross-check" in extra:
            values, ours = extra["gensim cross-check"], results["gensim"][0]
            print("\ncheck, gensim's own evaluators on the first gensim model: " + ", ".join(
                f"{key} {fmt(value, 4)}" for key, value in values.items()))
            print(f"  evaluate.py on the same vectors: WS353 spearman "
                  f"{fmt(ours['WS353']['spearman'], 4)}, analogy accuracy (3CosAdd) "
                  f"{fmt(ours['analogy 3cosadd']['accuracy'], 4)}, analogy seconds "
                  f"{fmt(ours['analogy 3cosadd']['seconds'], 1)} (3CosMul "
                  f"{fmt(ours['analogy 3cosmul']['seconds'], 1)})")
    if work_dir_holder is not None:
        work_dir_holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
