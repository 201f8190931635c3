"""Does each PIP loss track embedding quality over training? One trainer run per setting.

Every run logs, every epoch, the PIP losses and WordSim353, SimLex-999, MEN and analogy accuracy
(--eval-similarity / --eval-analogy); the checkpoint's history holds them all. For each loss (and
the train loss) the script prints Spearman's rho over the epochs against each benchmark, the epoch
the loss is lowest at, and how far that epoch's MEN falls below the best epoch's; for the trainer's
best.pt it reads the epoch from best.pt itself. A falling loss that tracks quality has rho near -1.
It also prints each loss's lowest value and its value on the vectors as initialised: a loss that
scores the random start better than every trained epoch does not measure quality.

Trial losses that were measured but not shipped are computed here from the same vectors, by a
wrapper around the trainer's PipMonitor.losses, so one run gives every candidate:

* 'trial: oracle after best scale' min_c ||c E E^T - E* E*^T||_F / ||E* E*^T||_F;
* 'trial: Frobenius-normalised' || E E^T / ||E E^T||_F - E* E*^T / ||E* E*^T||_F ||_F;
* 'trial: RMS cosine difference' ||U U^T - W W^T||_F / V, U and W the unit rows of E and E*;
* 'trial: centred cosines' the same after subtracting each embedding's mean vector.

Usage: NLTK_DATA=../shared/nltk_data nice -n 10 python bench/bench_pip_tracking.py [--settings NAME ...]
       python bench/bench_pip_tracking.py --plot RUN_DIR   (img/pip-tracking.png from a finished run)
"""
import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from paths import EVAL, GUTENBERG, NLTK_DATA, ROOT as REPO
import pip_loss  # noqa: E402
import trainer  # noqa: E402

BENCHMARKS = {"WS353": "Similarity/wordsim353", "SimLex": "Similarity/simlex999", "MEN": "Similarity/men3000",
              "analogy": "Analogy accuracy"}
TRIAL_TAGS = ("trial: oracle after best scale", "trial: Frobenius-normalised", "trial: RMS cosine difference",
              "trial: centred cosines")
METRICS = ("Train loss", "PIP loss", "PIP loss (oracle)", "PIP loss (normalized)") + TRIAL_TAGS
INITIAL = {}  # the PIP losses of the run in progress on its vectors as initialised
SETTINGS = {
    "shared-d100": ["--dataset", str(GUTENBERG), "--embed-size", "100", "--epochs", "10"],
    "shared-d200-neg10": ["--dataset", str(GUTENBERG), "--embed-size", "200",
                          "--neg-sample-size", "10", "--epochs", "10"],
    "nltk-gutenberg-d50": ["--dataset", "gutenberg", "--embed-size", "50", "--epochs", "10"],
    "readme-first-command": ["--dataset", "gutenberg", "--epochs", "5"],
    "lee": ["--dataset", "lee", "--epochs", "10"],
    "rnn-lee-2-epochs": ["--dataset", "lee", "--model-name", "rnn", "--epochs", "2"],
    "rnn-shared-d100": ["--dataset", str(GUTENBERG), "--model-name", "rnn", "--embed-size", "100", "--epochs", "5"],
}


# ---------------------------------------------------------------------------------------------
# Trial losses. The first two depend on the vectors only through the cosine of the two PIP
# matrices, <A, B> / (||A|| ||B||) with A = E E^T, B = E* E*^T, so they rank checkpoints alike.
# The last two compare cosines directly: ||U U^T - W W^T||_F / V for the unit rows U of E and W
# of E*, of the vectors as they are and after subtracting each embedding's mean vector.

def pip_matrix_cosine(E, E_star):
    """<E E^T, E* E*^T>_F / (||E E^T||_F ||E* E*^T||_F), through d x d Gram matrices."""
    E, F = np.asarray(E, dtype=np.float64), np.asarray(E_star, dtype=np.float64)
    cross = E.T @ F
    return float(np.sum(cross * cross) / (np.linalg.norm(E.T @ E) * np.linalg.norm(F.T @ F)))


def rms_cosine_difference(E, E_star):
    """Root mean square over all V^2 word pairs of (cosine in E - cosine in E*)."""
    return pip_loss.pip_loss_oracle(pip_loss._unit_rows(E), pip_loss._unit_rows(E_star)) / len(E)


def trial_losses(E, E_star):
    cosine = min(pip_matrix_cosine(E, E_star), 1.0)
    return dict(zip(TRIAL_TAGS, (math.sqrt(1.0 - cosine * cosine), math.sqrt(2.0 - 2.0 * cosine),
                                 rms_cosine_difference(E, E_star),
                                 rms_cosine_difference(E - E.mean(axis=0), E_star - E_star.mean(axis=0)))))


def add_trial_losses():
    """Make PipMonitor.losses also return the trial losses (so the trainer logs and keeps them)."""
    shipped = trainer.PipMonitor.losses

    def losses(monitor, vectors):
        result = shipped(monitor, vectors)
        result.update(trial_losses(vectors[:monitor.vocab].numpy(), monitor.oracle))
        return result
    trainer.PipMonitor.losses = losses


def record_initial_losses(into):
    """Also evaluate the PIP losses on the vectors as initialised (into[tag] = value): a loss that
    ranks the random start above the trained vectors does not measure their quality."""
    build_model, monitor_init = trainer.build_model, trainer.PipMonitor.__init__
    models = []

    def build(*args, **kwargs):
        models.append(build_model(*args, **kwargs))
        return models[-1]

    def init(monitor, *args, **kwargs):  # the trainer makes its monitor after the model, before training
        monitor_init(monitor, *args, **kwargs)
        into.update(monitor.losses(models[-1].embeddings().detach().cpu()))
    trainer.build_model, trainer.PipMonitor.__init__ = build, init


# ---------------------------------------------------------------------------------------------
# Runs and the table

def run_setting(name, extra, args):
    """Train one setting (unless its finished run is there and --rerun is not given); returns its
    history, the epoch best.pt holds and the losses at initialisation, or None if the run failed."""
    run_dir = Path(args.log_dir) / name
    if not (run_dir / "checkpoint.pt").exists() or args.rerun:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        eval_flags = ["--eval-similarity", *(str(EVAL / f) for f in ("wordsim353.tsv", "simlex999.tsv",
                                                                     "men3000.tsv")),
                      "--eval-analogy", str(EVAL / "questions-words.txt")]
        argv = [*extra, "--num-threads", str(args.num_threads), "--seed", str(args.seed), "--quiet",
                "--log-dir", args.log_dir, "--run-name", name, "--cache-dir", args.cache_dir, *eval_flags]
        print(f"== {name}: python trainer.py {' '.join(argv)}", flush=True)
        started = time.time()
        INITIAL.clear()
        code = trainer.main(argv)
        print(f"   exit {code}, {time.time() - started:.0f} s", flush=True)
        if code != 0:
            return None
        (run_dir / "initial.json").write_text(json.dumps(INITIAL))
    history = torch.load(run_dir / "checkpoint.pt", weights_only=True)["history"]
    best_epoch = None
    if (run_dir / "best.pt").exists():
        best_epoch = torch.load(run_dir / "best.pt", weights_only=True)["epoch"]
    initial = json.loads((run_dir / "initial.json").read_text()) if (run_dir / "initial.json").exists() else {}
    return {"history": history, "best_epoch": best_epoch, "initial": initial}


def series(history, tag):
    return dict((int(epoch), value) for epoch, value in history.get(tag, []))


def summarise(name, result):
    """Rows of the table for one setting: Spearman of each metric with each benchmark, and MEN gaps."""
    history = result["history"]
    scores = {bench: series(history, tag) for bench, tag in BENCHMARKS.items()}
    men = scores["MEN"]
    best_men = max(men.values())
    rows = []
    for metric in METRICS:
        values = series(history, metric)
        if not values:
            continue
        epochs = sorted(values)
        row = {"setting": name, "metric": metric, "epochs": len(epochs)}
        for bench, by_epoch in scores.items():
            common = [e for e in epochs if e in by_epoch]
            rho = spearmanr([values[e] for e in common], [by_epoch[e] for e in common])[0] if len(common) > 2 \
                else float("nan")
            row[bench] = float(rho)
        lowest = min(epochs, key=lambda e: values[e])
        row["lowest at epoch"] = lowest
        row["MEN below best"] = best_men - men[lowest]
        row["lowest"] = values[lowest]
        row["at init"] = result["initial"].get(metric, float("nan"))
        rows.append(row)
    return rows


def print_table(rows, results):
    header = ["setting", "metric", *BENCHMARKS, "lowest at epoch", "MEN below best", "lowest", "at init"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        cells = [row["setting"], row["metric"], *(f"{row[b]:+.2f}" if math.isfinite(row[b]) else "n/a"
                                                  for b in BENCHMARKS),
                 str(row["lowest at epoch"]), f"{row['MEN below best']:.3f}", f"{row['lowest']:.4g}",
                 f"{row['at init']:.4g}" if math.isfinite(row["at init"]) else "n/a"]
        print("| " + " | ".join(cells) + " |")
    print()
    for name, result in results.items():
        history = result["history"]
        men = series(history, BENCHMARKS["MEN"])
        best = max(men, key=men.get)
        line = f"{name}: best MEN {men[best]:.3f} at epoch {best}"
        if result["best_epoch"] is not None:
            line += (f"; best.pt = epoch {result['best_epoch']}, MEN {men[result['best_epoch']]:.3f} "
                     f"({men[best] - men[result['best_epoch']]:.3f} below)")
        print(line)
        for bench, tag in BENCHMARKS.items():
            values = series(history, tag)
            print(f"  {bench:8s} " + " ".join(f"{values[e]:.3f}" for e in sorted(values)))
        for metric in METRICS:
            values = series(history, metric)
            if values:
                print(f"  {metric:32s} " + " ".join(f"{values[e]:.4g}" for e in sorted(values)))


def plot_loss_and_scores(history, loss_tag, score_tags, path, title=None):
    """One panel: the loss_tag curve (tag -> [(epoch, value)] in history) on the left axis and the
    score_tags curves (benchmark scores) on a shared right axis, so one sees whether the loss falls
    as the scores rise. Raises plots.PlotError naming the tags without points."""
    import plots
    plt = plots.pyplot()  # matplotlib on its headless backend
    missing = [tag for tag in (loss_tag, *score_tags) if not history.get(tag)]
    if missing:
        raise plots.PlotError("no points for: " + ", ".join(missing))
    figure, loss_axis = plt.subplots(figsize=(6.4, 3.8))
    score_axis = loss_axis.twinx()
    lines = []
    for axis, tag, color, style in [(loss_axis, loss_tag, "black", "-"),
                                    *((score_axis, tag, f"C{i}", "--") for i, tag in enumerate(score_tags))]:
        epochs, values = zip(*sorted((float(e), float(v)) for e, v in history[tag]))
        lines += axis.plot(epochs, values, style, color=color, marker="o", markersize=3, label=tag)
    loss_axis.set(xlabel="epoch", ylabel=loss_tag, title=title or "")
    score_axis.set_ylabel("benchmark score")
    loss_axis.grid(True, alpha=0.3)
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def plot_run(run_dir, path):
    """The README's picture: a run's normalized PIP loss beside its MEN rho and analogy accuracy."""
    ckpt = torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)
    run = ckpt["args"]
    title = (f"{Path(str(run['dataset'])).name}, d={run['embed_size']}, {run['neg_sample_size']} negatives, "
             f"{ckpt['epoch']} epochs")
    history = ckpt["history"]
    return plot_loss_and_scores(history, "PIP loss (normalized)", [BENCHMARKS["MEN"], BENCHMARKS["analogy"]],
                                      path, title)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="which settings to run (default all)")
    parser.add_argument("--log-dir", default=str(REPO / "saved" / "pip-tracking"), help="run folders go here")
    parser.add_argument("--cache-dir", default=str(REPO / "data" / "cache"), help="corpus cache")
    parser.add_argument("--num-threads", type=int, default=1, help="trainer threads (default 1: reproducible)")
    parser.add_argument("--seed", type=int, default=1, help="trainer seed (default 1)")
    parser.add_argument("--rerun", action="store_true", help="train again even where a finished run is there")
    parser.add_argument("--plot", metavar="RUN_DIR", help="only draw img/pip-tracking.png from this run")
    args = parser.parse_args()
    if args.plot:
        print(f"picture: {plot_run(args.plot, REPO / 'img' / 'pip-tracking.png')}")
        return
    os.environ.setdefault("NLTK_DATA", str(NLTK_DATA))
    add_trial_losses()
    record_initial_losses(INITIAL)
    results, rows = {}, []
    for name in args.settings:
        result = run_setting(name, SETTINGS[name], args)
        if result is None:
            print(f"{name}: the run failed; left out")
            continue
        results[name] = result
        rows += summarise(name, result)
    print_table(rows, results)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.log_dir) / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
