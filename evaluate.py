"""Intrinsic evaluation and inspection of word vectors.

Library functions take a vocabulary (``list[str]``, ordered by descending
frequency, id = index) and a ``V x d`` numpy matrix and return plain numbers,
so the trainer can call them between epochs without touching files:

* :func:`similarity`  - Spearman rho between cosine and human scores;
* :func:`analogy`     - Google analogy accuracy (3CosAdd or 3CosMul);
* :func:`neighbors`   - nearest neighbours by cosine;
* :func:`all_but_the_top` - optional post-processing before any of these;
* :func:`export_projector` - TensorBoard projector ``vectors.tsv``/``metadata.tsv``.

Run as a script it reads a checkpoint (``--checkpoint``) or a word2vec file
(``--vectors``) and prints a table (or one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import mmap
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterable, NoReturn, Sequence

if __name__ == "__main__":  # Ctrl-C while numpy and scipy load: nothing is written yet
    signal.signal(signal.SIGINT, lambda signum, frame: (os.write(2, b"evaluate.py: interrupted\n"),
                                                        os._exit(128 + signum)))

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import fileio  # noqa: E402


EmbedFn = Callable[[list], np.ndarray]

# Normalised-cosine shift and epsilon of 3CosMul (Levy & Goldberg 2014,
# "Linguistic Regularities in Sparse and Explicit Word Representations").
COSMUL_EPS = 1e-3
# Questions scored per step: 3CosMul keeps two batch x V float32 score
# buffers alive, so 512 x 30k x 4 B x 2 is about 120 MB.
ANALOGY_BATCH = 512
# Largest (distinct question words x V) float32 cosine table 3CosMul
# precomputes (256 MB); bigger question sets fall back to per-batch products.
COSMUL_TABLE_MAX_ELEMENTS = 64_000_000
ANALOGY_METHODS = ("3cosadd", "3cosmul")


class EvaluationInputError(ValueError):
    """A user-supplied file or checkpoint cannot be used (reported in one line)."""


# --------------------------------------------------------------------------
# Reading evaluation files
# --------------------------------------------------------------------------

def _check_regular_file(path, what: str) -> None:
    """Refuse a FIFO, a device or a folder before it is opened (a FIFO would block until a writer
    comes); a missing file is left to open(), whose error callers report."""
    try:
        fileio.check_input_path(path, what)
    except fileio.PathKindError as error:
        raise EvaluationInputError(str(error)) from None
    except FileNotFoundError:
        pass


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_pairs(path) -> list[tuple[str, str, float]]:
    """Read a word-pair similarity file: ``word1<TAB>word2<TAB>score`` per line.

    Blank lines and lines starting with ``#`` are skipped. The first data line
    is taken as a header and skipped when its third field is not a number.
    Files separated by spaces instead of tabs are accepted too, because several
    published copies of these sets use spaces.
    """
    pairs: list[tuple[str, str, float]] = []
    seen_first_row = False
    _check_regular_file(path, "similarity file")
    with open(path, encoding="utf-8") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            fields = [field.strip() for field in fields]
            first_row = not seen_first_row
            seen_first_row = True
            if len(fields) < 3:
                raise EvaluationInputError(
                    f"{path}:{line_number}: expected 'word1<TAB>word2<TAB>score', got {line!r}")
            if not _is_number(fields[2]):
                if first_row:
                    continue  # header line such as "word1 word2 score"
                raise EvaluationInputError(
                    f"{path}:{line_number}: score {fields[2]!r} is not a number")
            if not math.isfinite(float(fields[2])):  # NaN has no rank; infinity is no human score
                raise EvaluationInputError(
                    f"{path}:{line_number}: score {fields[2]!r} is not a finite number")
            pairs.append((fields[0], fields[1], float(fields[2])))
    return pairs


def load_analogies(path) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """Read the Google ``questions-words.txt`` format into ``[(section, questions)]``.

    Lines ``: name`` open a section; every other non-blank line is ``a b c d``
    meaning a:b :: c:d. Questions before any section line go to section "default".
    """
    sections: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    _check_regular_file(path, "analogy file")
    with open(path, encoding="utf-8") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(":"):
                sections.append((line[1:].strip(), []))
                continue
            fields = line.split()
            if len(fields) != 4:
                raise EvaluationInputError(
                    f"{path}:{line_number}: expected 4 words 'a b c d', got {line!r}")
            if not sections:
                sections.append(("default", []))
            sections[-1][1].append((fields[0], fields[1], fields[2], fields[3]))
    return sections


# --------------------------------------------------------------------------
# Vector helpers
# --------------------------------------------------------------------------

def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Return float32 rows scaled to unit length (zero rows stay zero)."""
    matrix = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # A zero vector has no direction; dividing by 1 keeps it at cosine 0
    # with everything instead of producing NaNs that poison argmax/spearman.
    norms[norms == 0] = 1.0
    return matrix / norms


def all_but_the_top(vectors: np.ndarray, n_directions: int) -> Callable[[np.ndarray], np.ndarray]:
    """The "all-but-the-top" post-processing of Mu & Viswanath (2018), fitted on ``vectors``.

    Returns a function that subtracts the vocabulary's mean vector from any rows and projects
    out the ``n_directions`` principal directions of the centred vocabulary. Vectors that share
    a large common component (a character model's encoders give every word one) have cosines
    dominated by it; removing it lets the word-specific part decide neighbours. The function
    also maps vectors of words outside the vocabulary, so queries and table stay comparable.
    """
    table = np.asarray(vectors, dtype=np.float32)
    mean = table.mean(axis=0) if len(table) else np.zeros(table.shape[1], dtype=np.float32)
    top = np.zeros((0, table.shape[1]), dtype=np.float32)
    if n_directions > 0 and len(table):
        centred = table - mean
        # eigenvectors of the d x d scatter matrix: the principal directions without a V x d SVD
        _, eigenvectors = np.linalg.eigh((centred.T @ centred).astype(np.float64))
        top = eigenvectors[:, ::-1][:, :n_directions].T.astype(np.float32)

    def transform(rows: np.ndarray) -> np.ndarray:
        centred_rows = np.asarray(rows, dtype=np.float32) - mean
        return centred_rows - (centred_rows @ top.T) @ top
    return transform


def fold_case(word: str) -> str:
    """A query word lowercased as the corpus was (data.fold_case: NFC, Turkish "İ"); data.py, which
    imports torch, is loaded only for a word outside ASCII."""
    if word.isascii():
        return word.lower()
    import data
    return data.fold_case(word)


def _word_index(words: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for word_id, word in enumerate(words):
        # Keep the first (most frequent) id if a file lists a word twice.
        index.setdefault(word, word_id)
    return index


def _cosine(u: np.ndarray, v: np.ndarray) -> float:
    norm = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.dot(u, v) / norm) if norm > 0 else 0.0


def _nan_to_none(value: float):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


# --------------------------------------------------------------------------
# Similarity
# --------------------------------------------------------------------------

def similarity(words: Sequence[str], vectors: np.ndarray, pairs, lowercase: bool = True,
               embed_fn: EmbedFn | None = None) -> dict:
    """Spearman rho between cosine similarity and the human score of each pair.

    ``pairs`` is a list of ``(word1, word2, score)`` (see :func:`load_pairs`) or
    a path to such a file. Words are lowercased first when ``lowercase`` is set
    (i.e. when the vocabulary was built lowercased). Pairs with an
    out-of-vocabulary word are skipped and counted in ``oov``, unless
    ``embed_fn`` (``list[str] -> array``, e.g. an RNN's character/subword
    encoder) is given: then OOV words are embedded with it, ``oov`` counts the
    distinct words embedded that way and ``oov_handling`` says ``"embedded"``.
    """
    if isinstance(pairs, (str, os.PathLike)):
        pairs = load_pairs(pairs)
    index = _word_index(words)
    matrix = np.asarray(vectors)

    def key(word: str) -> str:
        return fold_case(word) if lowercase else word

    oov_words = sorted({key(w) for w1, w2, _ in pairs for w in (w1, w2)} - index.keys())
    extra: dict[str, np.ndarray] = {}
    if embed_fn is not None and oov_words:
        embedded = np.asarray(embed_fn(list(oov_words)), dtype=np.float32)
        extra = dict(zip(oov_words, embedded))

    def lookup(word: str):
        word = key(word)
        if word in index:
            return matrix[index[word]]
        return extra.get(word)

    cosines, gold = [], []
    skipped = 0
    for word1, word2, score in pairs:
        vector1, vector2 = lookup(word1), lookup(word2)
        if vector1 is None or vector2 is None:
            skipped += 1
            continue
        cosines.append(_cosine(vector1, vector2))
        gold.append(score)

    if len(cosines) >= 2:
        rho = float(spearmanr(cosines, gold).statistic)
    else:
        rho = float("nan")  # a rank correlation needs at least two pairs
    if embed_fn is not None:
        return {"spearman": rho, "pairs": len(cosines), "oov": len(oov_words),
                "oov_handling": "embedded"}
    return {"spearman": rho, "pairs": len(cosines), "oov": skipped, "oov_handling": "skipped"}


# --------------------------------------------------------------------------
# Analogy
# --------------------------------------------------------------------------

def _analogy_predictions(unit: np.ndarray, question_ids: np.ndarray, method: str) -> np.ndarray:
    """Predicted word id for each row ``(a, b, c)`` of ``question_ids``."""
    predictions = np.empty(len(question_ids), dtype=np.int64)
    vocab_size = unit.shape[0]
    batch_size = min(ANALOGY_BATCH, len(question_ids))
    unit_t = unit.T
    # Score buffers are allocated once and filled in place: allocating fresh
    # batch x V arrays per step costs more in page faults than the matmuls.
    scores_buffer = np.empty((batch_size, vocab_size), dtype=np.float32)

    shifted = None
    if method == "3cosmul":
        # 3CosMul needs cos(a|b|c, every word). Question sets reuse few words
        # (about 900 distinct in the Google set), so one product for the
        # distinct words replaces three products per batch when it fits.
        distinct, inverse = np.unique(question_ids, return_inverse=True)
        inverse = inverse.reshape(question_ids.shape)
        if len(distinct) * vocab_size <= COSMUL_TABLE_MAX_ELEMENTS:
            # Shift to [0, 2] (= 2 cos', with cos' = (cos + 1) / 2 in [0, 1]).
            shifted = unit[distinct] @ unit_t
            shifted += 1.0
        other_buffer = np.empty_like(scores_buffer)

    for start in range(0, len(question_ids), batch_size):
        batch = question_ids[start:start + batch_size]
        size = len(batch)
        scores = scores_buffer[:size]
        if method == "3cosadd":
            # With unit vectors, argmax_d cos(d,b) - cos(d,a) + cos(d,c)
            # equals argmax_d d . (b - a + c): one matrix product per batch.
            targets = unit[batch[:, 1]] - unit[batch[:, 0]] + unit[batch[:, 2]]
            np.matmul(targets, unit_t, out=scores)
        else:
            # 3CosMul (Levy & Goldberg): cos'(d,b) cos'(d,c) / (cos'(d,a) + eps)
            # with cosines shifted to [0, 1] so every factor is non-negative.
            # With s = cos + 1 = 2 cos' this is s_b s_c / (2 (s_a + 2 eps)),
            # evaluated in place in two batch x V buffers.
            other = other_buffer[:size]
            if shifted is not None:
                rows = inverse[start:start + size]
                np.take(shifted, rows[:, 1], axis=0, out=scores)
                np.take(shifted, rows[:, 2], axis=0, out=other)
                scores *= other
                np.take(shifted, rows[:, 0], axis=0, out=other)
            else:
                np.matmul(unit[batch[:, 1]], unit_t, out=scores)
                scores += 1.0
                np.matmul(unit[batch[:, 2]], unit_t, out=other)
                other += 1.0
                scores *= other
                np.matmul(unit[batch[:, 0]], unit_t, out=other)
                other += 1.0
            other += 2.0 * COSMUL_EPS
            other *= 2.0
            scores /= other
        # The question words themselves are not allowed as answers (standard
        # protocol of word2vec's compute-accuracy and of gensim).
        scores[np.arange(size)[:, None], batch] = -np.inf
        predictions[start:start + size] = np.argmax(scores, axis=1)
    return predictions


def analogy(words: Sequence[str], vectors: np.ndarray, path, restrict_vocab: int = 30000,
            method: str = "3cosadd", lowercase: bool = True) -> dict:
    """Accuracy on a Google-format analogy file (a:b :: c:d, predict d).

    Only the ``restrict_vocab`` first (most frequent) words are candidates; a
    question with any word outside them is skipped and counted in ``oov``.
    ``path`` may also be the already parsed output of :func:`load_analogies`.
    """
    method = method.lower()
    if method not in ANALOGY_METHODS:
        raise ValueError(f"unknown analogy method {method!r}; use one of {ANALOGY_METHODS}")
    sections = load_analogies(path) if isinstance(path, (str, os.PathLike)) else path
    limit = len(words) if restrict_vocab is None or restrict_vocab <= 0 \
        else min(restrict_vocab, len(words))
    index = {word: word_id for word, word_id in _word_index(words[:limit]).items()}
    unit = normalize_rows(np.asarray(vectors)[:limit])

    all_ids, section_of = [], []
    oov = 0
    for section_number, (_, questions) in enumerate(sections):
        for question in questions:
            ids = [index.get(fold_case(word) if lowercase else word) for word in question]
            if any(word_id is None for word_id in ids):
                oov += 1
                continue
            all_ids.append(ids)
            section_of.append(section_number)

    question_ids = np.asarray(all_ids, dtype=np.int64).reshape(-1, 4)
    section_of = np.asarray(section_of, dtype=np.int64)
    if len(question_ids):
        correct = _analogy_predictions(unit, question_ids[:, :3], method) == question_ids[:, 3]
    else:
        correct = np.zeros(0, dtype=bool)

    per_section = {}
    for section_number, (name, _) in enumerate(sections):
        mask = section_of == section_number
        answered = int(mask.sum())
        per_section[name] = {
            "accuracy": float(correct[mask].mean()) if answered else float("nan"),
            "questions": answered,
        }
    total = len(correct)
    return {
        "accuracy": float(correct.mean()) if total else float("nan"),
        "questions": total,
        "oov": oov,
        "method": method,
        "restrict_vocab": limit,
        "sections": per_section,
    }


# --------------------------------------------------------------------------
# Neighbours
# --------------------------------------------------------------------------

def neighbors(words: Sequence[str], vectors: np.ndarray, query_words: Iterable[str],
              topn: int = 10, embed_fn: EmbedFn | None = None,
              lowercase: bool = False) -> dict[str, list[tuple[str, float]]]:
    """Nearest neighbours of each query word by cosine, best first.

    A query word in the vocabulary is excluded from its own list. An
    out-of-vocabulary query is embedded with ``embed_fn`` when given, else it
    maps to an empty list. ``lowercase`` lowercases the queries first.
    """
    index = _word_index(words)
    unit = normalize_rows(vectors)
    query_words = list(query_words)
    keys = [fold_case(word) if lowercase else word for word in query_words]
    missing = [key for key in keys if key not in index]
    extra = {}
    if embed_fn is not None and missing:
        extra = dict(zip(missing, normalize_rows(np.asarray(embed_fn(missing)))))

    result: dict[str, list[tuple[str, float]]] = {}
    for query, key in zip(query_words, keys):
        if key in index:
            query_vector, self_id = unit[index[key]], index[key]
        elif key in extra:
            query_vector, self_id = extra[key], None
        else:
            result[query] = []
            continue
        scores = unit @ query_vector
        if self_id is not None:
            scores[self_id] = -np.inf
        count = min(topn, len(scores) - (self_id is not None))
        if count <= 0:
            result[query] = []
            continue
        # argpartition then sort only the top: O(V) instead of a full sort.
        top = np.argpartition(-scores, count - 1)[:count]
        top = top[np.argsort(-scores[top], kind="stable")]
        result[query] = [(words[i], float(scores[i])) for i in top]
    return result


# --------------------------------------------------------------------------
# Loading and exporting vectors
# --------------------------------------------------------------------------

def load_vectors(path, warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr)
                 ) -> tuple[list[str], np.ndarray]:
    """Read a word2vec file (text, or binary when the name ends in ``.bin``).

    A word listed twice keeps its first vector, as gensim does (and as a word's most frequent
    occurrence comes first); ``warn`` is told which words were listed more than once.
    """
    from gensim.models import KeyedVectors

    path = Path(path)
    try:
        fileio.check_input_path(path, "vectors file")
    except (FileNotFoundError, fileio.PathKindError) as error:
        raise EvaluationInputError(str(error)) from None
    binary = path.suffix == ".bin"
    duplicates = _GensimDuplicates()
    gensim_logger = logging.getLogger("gensim.models.keyedvectors")
    gensim_logger.addHandler(duplicates)
    try:
        keyed = KeyedVectors.load_word2vec_format(str(path), binary=binary)
    except Exception as error:  # gensim raises assorted errors on malformed files
        raise EvaluationInputError(
            f"cannot read word2vec file {path}: {type(error).__name__}: {error}") from error
    finally:
        gensim_logger.removeHandler(duplicates)
    if not keyed.index_to_key or not keyed.vector_size:
        raise EvaluationInputError(f"{path} holds no vectors: its header announces "
                                   f"{len(keyed.index_to_key)} words of {keyed.vector_size} dimensions")
    if _holds_more_words(path, binary, len(keyed.index_to_key), keyed.vector_size):
        raise EvaluationInputError(
            f"{path} holds more than the {len(keyed.index_to_key)} words its header announces; "
            f"correct the word count on its first line")
    # gensim leaves None and a zero vector in the slot of each duplicate it skipped
    listed = [row for row, word in enumerate(keyed.index_to_key) if word is not None]
    words, vectors = [keyed.index_to_key[row] for row in listed], np.asarray(keyed.vectors[listed], dtype=np.float32)
    if len(listed) < len(keyed.index_to_key):
        names = ", ".join(repr(word) for word in dict.fromkeys(duplicates.words)) or "(unnamed)"
        warn(f"warning: {path} lists words more than once ({names}): the first vector of each is used, "
             f"{len(keyed.index_to_key) - len(listed)} later one(s) ignored")
    _check_finite(words, vectors, path)
    return words, vectors


class _GensimDuplicates(logging.Handler):
    """Collects the words gensim reports as duplicates while it reads a word2vec file."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.words: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("duplicate word") and record.args:
            self.words.append(str(record.args[0]))


def _holds_more_words(path: Path, binary: bool, n_words: int, dim: int) -> bool:
    """Whether vectors follow the header's word count (gensim stops reading there, silently)."""
    with open(path, "rb") as handle:
        header_length = len(handle.readline())
        if not binary:
            return sum(1 for line in handle if line.strip()) > n_words
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            end = header_length
            for _ in range(n_words):  # a record is "word " then dim float32s, as gensim reads it
                end = mapped.find(b" ", end) + 1 + 4 * dim
            return bool(mapped[end:end + 4096].strip())


def _check_finite(words: Sequence[str], vectors: np.ndarray, source) -> None:
    """Refuse vectors holding NaN or infinity: every cosine with them, and every score, would be NaN."""
    bad_rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad_rows):
        others = f" and {len(bad_rows) - 1} more" if len(bad_rows) > 1 else ""
        raise EvaluationInputError(
            f"{source}: the vector of {words[bad_rows[0]]!r} (word {bad_rows[0] + 1}){others} holds NaN "
            f"or infinite values; these vectors cannot be evaluated")


def resolve_checkpoint_path(path) -> Path:
    """A run directory means its ``checkpoint.pt``; a file is used as is."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def read_checkpoint(path) -> dict:
    """The checkpoint dict of a run directory or checkpoint file (weights only, no pickle)."""
    import checkpoint
    try:
        fileio.check_input_path(resolve_checkpoint_path(path), "checkpoint")
        return checkpoint.read(path)
    except (FileNotFoundError, fileio.PathKindError) as error:
        raise EvaluationInputError(str(error)) from None
    except checkpoint.CheckpointError as error:
        raise EvaluationInputError(str(error)) from error


def load_checkpoint(path) -> tuple[list[str], np.ndarray, EmbedFn | None, bool]:
    """Load ``(words, vectors, embed_fn or None, lowercase)`` from a checkpoint.

    ``path`` is a run directory, a checkpoint file, or an already loaded
    checkpoint dict. The model is rebuilt with ``model.model_from_checkpoint``
    when available; for SGNS checkpoints the center vectors ``in_embed.weight``
    are read directly otherwise. ``embed_fn`` is the model's ``embed_words``
    (models that can embed unseen words, e.g. RNNs), else None.
    """
    import torch

    if isinstance(path, dict):
        checkpoint, file_path = path, Path("<checkpoint>")
    else:
        checkpoint, file_path = read_checkpoint(path), resolve_checkpoint_path(path)
    words = list(checkpoint["words"])
    args = checkpoint.get("args") or {}
    lowercase = bool(args.get("lowercase", True))

    model = None
    try:
        from model import model_from_checkpoint
    except ImportError:
        model_from_checkpoint = None
    if model_from_checkpoint is not None:
        try:
            model = model_from_checkpoint(checkpoint)
        except Exception as error:
            raise EvaluationInputError(
                f"cannot rebuild the model from {file_path}: {type(error).__name__}: {error}"
            ) from error
    embed_fn = None
    if model is not None:
        model.eval()
        with torch.no_grad():
            vectors = model.embeddings().detach().float().cpu().numpy()
        if hasattr(model, "embed_words"):
            def embed_fn(batch_words, _model=model):
                with torch.no_grad():
                    return _model.embed_words(list(batch_words)).detach().float().cpu().numpy()
    else:
        state = checkpoint["model"]
        if "in_embed.weight" not in state:
            raise EvaluationInputError(
                f"{file_path}: no 'in_embed.weight' in the model state and model.py is unavailable")
        vectors = state["in_embed.weight"].detach().float().cpu().numpy()
    if vectors.shape[0] != len(words):
        raise EvaluationInputError(
            f"{file_path}: {vectors.shape[0]} vectors for {len(words)} words")
    _check_finite(words, vectors, file_path)
    return words, np.asarray(vectors, dtype=np.float32), embed_fn, lowercase


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def default_eval_files() -> tuple[list[str], str | None]:
    """WordSim353, SimLex-999 and questions-words shipped with gensim, if present."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        return [], None
    similarity_files = [datapath(name) for name in ("wordsim353.tsv", "simlex999.txt")]
    analogy_file = datapath("questions-words.txt")
    return ([path for path in similarity_files if os.path.isfile(path)],
            analogy_file if os.path.isfile(analogy_file) else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate word vectors: word-pair similarity (Spearman rho), analogies, "
                    "nearest neighbours, 2-D plots and TensorBoard projector export.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_DIR_OR_FILE",
                        help="run directory (uses its checkpoint.pt) or a checkpoint file")
    source.add_argument("--vectors", metavar="FILE",
                        help="word2vec file to evaluate (text, or binary if it ends in .bin)")
    parser.add_argument("--similarity", nargs="+", metavar="FILE", default=None,
                        help="word-pair files 'word1<TAB>word2<TAB>score'; default: WordSim353 and "
                             "SimLex-999 from gensim when no evaluation file is given")
    parser.add_argument("--analogy", metavar="FILE", default=None,
                        help="analogy file in Google questions-words.txt format; default: gensim's "
                             "questions-words.txt when no evaluation file is given")
    parser.add_argument("--analogy-method", choices=ANALOGY_METHODS, default="3cosadd",
                        help="analogy scoring: 3cosadd (b - a + c) or 3cosmul (Levy & Goldberg)")
    parser.add_argument("--restrict-vocab", type=int, default=30000, metavar="N",
                        help="analogy candidates and questions limited to the N most frequent "
                             "words (0 = whole vocabulary; default 30000)")
    parser.add_argument("--neighbors", nargs="+", metavar="WORD", default=None,
                        help="print the nearest neighbours of these words")
    parser.add_argument("--topn", type=int, default=10, metavar="N",
                        help="number of neighbours per word (default 10)")
    parser.add_argument("--remove-top", type=int, default=0, metavar="N",
                        help="post-process the vectors before everything else: subtract their mean "
                             "and project out their N top principal directions (all-but-the-top, "
                             "Mu & Viswanath 2018; helps character-model vectors, see README); "
                             "0 = off (default)")
    parser.add_argument("--no-default-eval", action="store_true",
                        help="do not fall back to gensim's evaluation sets when none are given")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of tables")
    parser.add_argument("--plot-words", nargs="+", metavar="WORD", default=None,
                        help="draw a labelled 2-D projection of these words into a PNG")
    parser.add_argument("--plot-method", choices=("pca", "tsne"), default="pca",
                        help="projection for --plot-words: pca (numpy) or tsne (needs scikit-learn)")
    parser.add_argument("--plot-out", metavar="PATH", default=None,
                        help="PNG path for --plot-words (default: projection-<method>.png next to "
                             "the checkpoint or vectors file)")
    parser.add_argument("--plot-curves", nargs="?", const="", default=None, metavar="PATH",
                        help="with --checkpoint: plot the run's train and PIP losses per epoch "
                             "into PATH (default: training-curves.png in the run directory)")
    parser.add_argument("--export-projector", metavar="DIR", default=None,
                        help="write TensorBoard projector vectors.tsv and metadata.tsv into DIR")
    parser.add_argument("--embed", metavar="WORDS_FILE", default=None,
                        help="with --export: vectors for the words of this UTF-8 file (one a line, in its "
                             "order), seen in training or not where the model spells words (rnn); no "
                             "evaluation is run")
    parser.add_argument("--export", metavar="OUT", default=None,
                        help="with --embed: the word2vec file to write (text, or binary if it ends in .bin)")
    return parser


def _format_number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _json_safe(value):
    """NaN is not JSON; map it to null recursively."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float):
        return _nan_to_none(value)
    return value


def _fail(message: str) -> NoReturn:
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _has_uppercase(words: Sequence[str]) -> bool:
    return any(word != word.lower() for word in words)


def _exit_130_on_ctrl_c(main: Callable[..., int]) -> Callable[..., int]:
    """Ctrl-C ends main with one line and exit 130, not a traceback; every file is written
    atomically, so what was written before it is whole."""
    @functools.wraps(main)
    def interruptible(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("evaluate.py: interrupted; files already written are complete", file=sys.stderr)
            return 128 + signal.SIGINT
    return interruptible


def _check_paths(args, source_path: Path, similarity_files, analogy_file) -> None:
    """Every input a regular file and no output over one of them (through links), before any work."""
    inputs = {f"the {'--checkpoint' if args.checkpoint else '--vectors'} file": source_path}
    if args.checkpoint:  # a picture written over the run's files would end the run
        inputs.update({f"the run's {name}": source_path.parent / name
                       for name in ("checkpoint.pt", "best.pt", "args.json")})
    fileio.check_input_path(source_path, next(iter(inputs)))
    for number, path in enumerate(similarity_files, start=1):
        inputs[f"similarity file {number}"] = fileio.check_input_path(path, "similarity file")
    if analogy_file:
        inputs["the analogy file"] = fileio.check_input_path(analogy_file, "analogy file")
    if args.embed:
        inputs["the --embed word list"] = fileio.check_input_path(args.embed, "--embed word list")
    outputs = {"--export": args.export}
    if args.plot_words:
        outputs["--plot-out"] = _plot_path(args, source_path)
    if args.plot_curves is not None:
        outputs["--plot-curves"] = _curves_path(args.plot_curves, source_path)
    if args.export_projector:
        outputs.update({f"--export-projector ({name})": Path(args.export_projector) / name
                        for name in ("vectors.tsv", "metadata.tsv")})
    fileio.check_outputs_apart(outputs, inputs)


def _check_flags(args) -> None:
    """Flag values and combinations, before any file is read."""
    if args.plot_curves is not None and not args.checkpoint:
        _fail("--plot-curves needs --checkpoint (a word2vec file has no training history)")
    if args.topn < 1:
        _fail("--topn must be at least 1")
    if args.restrict_vocab < 0:
        _fail("--restrict-vocab must be >= 0")
    if (args.embed is None) != (args.export is None):
        _fail("--embed WORDS_FILE and --export OUT go together")


def _scores(args, words, vectors, embed_fn, lowercase, similarity_files, analogy_file) -> dict:
    """Similarity file stem -> its result, and "analogy" -> the analogy result."""
    report: dict = {}
    try:
        for path in similarity_files:
            pairs = load_pairs(path)
            if not pairs:  # as the trainer's --eval-similarity: a score of nothing is no score
                _fail(f"{path}: no word pairs in it")
            report[Path(path).stem] = similarity(words, vectors, pairs,
                                                 lowercase=lowercase, embed_fn=embed_fn)
        if analogy_file:
            sections = load_analogies(analogy_file)
            if not any(questions for _, questions in sections):
                _fail(f"{analogy_file}: no questions in it")
            report["analogy"] = analogy(words, vectors, sections,
                                        restrict_vocab=args.restrict_vocab,
                                        method=args.analogy_method, lowercase=lowercase)
    except (EvaluationInputError, UnicodeDecodeError) as error:
        _fail(str(error))
    return report


@_exit_130_on_ctrl_c
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_flags(args)
    similarity_files = args.similarity or []
    analogy_file = args.analogy
    if not similarity_files and not analogy_file and not args.no_default_eval:
        similarity_files, analogy_file = default_eval_files()
    source_path = resolve_checkpoint_path(args.checkpoint) if args.checkpoint else Path(args.vectors)
    try:
        _check_paths(args, source_path, similarity_files, analogy_file)
    except (OSError, ValueError) as error:  # missing, a FIFO or a folder; an output over an input
        _fail(str(error))

    try:
        checkpoint = None
        if args.checkpoint:
            checkpoint = read_checkpoint(args.checkpoint)
            words, vectors, embed_fn, lowercase = load_checkpoint(checkpoint)
        else:
            words, vectors = load_vectors(args.vectors)
            embed_fn = None
            # A word2vec file does not record how it was tokenised: lowercase
            # the evaluation words only when the vocabulary has no capitals.
            lowercase = not _has_uppercase(words)
    except EvaluationInputError as error:
        _fail(str(error))
    if args.embed:
        return _embed_and_export(args, words, vectors, embed_fn, lowercase)

    if not 0 <= args.remove_top < vectors.shape[1]:
        _fail(f"--remove-top must be between 0 and {vectors.shape[1] - 1} (the vectors have "
              f"{vectors.shape[1]} dimensions)")
    if args.remove_top:
        vectors, embed_fn = _post_processed(vectors, embed_fn, args.remove_top)

    report = _scores(args, words, vectors, embed_fn, lowercase, similarity_files, analogy_file)
    if args.neighbors:
        found = neighbors(words, vectors, args.neighbors, topn=args.topn, embed_fn=embed_fn,
                          lowercase=lowercase)
        report["neighbors"] = {word: [[neighbor, cosine] for neighbor, cosine in items]
                               for word, items in found.items()}
    try:
        if args.plot_words:
            report["plot"] = _plot_words(args, words, vectors, embed_fn, lowercase, source_path)
        if args.plot_curves is not None:
            report["curves"] = _plot_curves(args.plot_curves, checkpoint, source_path)
        if args.export_projector:
            import export
            vectors_path, metadata_path = export.write_projector_files(words, vectors, args.export_projector)
            report["projector"] = {"vectors": str(vectors_path), "metadata": str(metadata_path)}
    except OSError as error:  # unwritable output folder, disk full, path is a directory...
        _fail(f"cannot write {error.filename or 'output'}: {error.strerror or error}")

    if args.json:
        print(json.dumps(_json_safe(report), allow_nan=False))
    else:
        _print_report(report, len(words), vectors.shape[1], embed_fn is not None)
    return 0


def read_word_list(path) -> list[str]:
    """The words of a file, one a line (surrounding spaces and blank lines ignored), in order."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise EvaluationInputError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from error
    except OSError as error:
        raise EvaluationInputError(f"{path}: {error.strerror or error}") from error
    words = [line.strip() for line in lines if line.strip()]
    for number, word in enumerate(words, start=1):
        if any(ch.isspace() for ch in word):
            raise EvaluationInputError(f"{path}: word {number} {word!r} holds a space; give one word a line")
    if not words:
        raise EvaluationInputError(f"{path}: no words in it")
    return words


def embed_word_list(query, words, vectors, embed_fn, lowercase) -> np.ndarray:
    """Vectors for the query words in order: the model's own (embed_fn) where it spells words,
    else rows of the vocabulary, every query word having to be in it."""
    if embed_fn is not None:
        return np.asarray(embed_fn(query), dtype=np.float32)
    index = _word_index(words)
    keys = [fold_case(word) if lowercase else word for word in query]
    unseen = list(dict.fromkeys(key for key in keys if key not in index))
    if unseen:
        shown = " ".join(unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise EvaluationInputError(f"{len(unseen)} word(s) not in the vocabulary, which has no vectors for "
                                   f"unseen words (train with --model-name rnn for those): {shown}")
    return vectors[[index[key] for key in keys]]


def _embed_and_export(args, words, vectors, embed_fn, lowercase) -> int:
    """--embed WORDS_FILE --export OUT: write the words' vectors, or fail with nothing written."""
    import export
    try:
        query = read_word_list(args.embed)
        found = embed_word_list(query, words, vectors, embed_fn, lowercase)
    except EvaluationInputError as error:
        _fail(f"--embed {error}")
    if Path(args.export).is_dir():
        _fail(f"--export {args.export} is a folder; give a file name")
    try:
        export.write_word2vec(args.export, query, found)
    except OSError as error:
        _fail(f"cannot write --export {args.export}: {error.strerror or error}")
    print(f"{len(query)} vectors written to {args.export}")
    return 0


def _post_processed(vectors, embed_fn, n_directions):
    """Vectors and embed_fn (or None) after all_but_the_top, fitted on the vocabulary."""
    transform = all_but_the_top(vectors, n_directions)
    if embed_fn is None:
        return transform(vectors), None
    return transform(vectors), lambda batch_words: transform(embed_fn(batch_words))


def _plot_words(args, words, vectors, embed_fn, lowercase, source_path: Path) -> dict:
    import plots

    out = _plot_path(args, source_path)
    try:
        _, chosen, missing = plots.plot_words(args.plot_words, words, vectors, out, args.plot_method, lowercase,
                                              embed_fn)
    except plots.PlotError as error:
        _fail(str(error))
    return {"path": str(out), "words": len(chosen), "skipped": missing}


def _plot_path(args, source_path: Path) -> Path:
    """--plot-out, by default projection-<method>.png beside the vectors."""
    return Path(args.plot_out) if args.plot_out else source_path.parent / f"projection-{args.plot_method}.png"


def _curves_path(out, source_path: Path) -> Path:
    """--plot-curves' PATH, by default training-curves.png in the run folder."""
    return Path(out) if out else source_path.parent / "training-curves.png"


def _plot_curves(out, checkpoint: dict, source_path: Path) -> dict:
    import plots

    out = _curves_path(out, source_path)
    history = checkpoint.get("history") or {}
    try:
        plots.plot_training_curves(history, out)
    except plots.PlotError as error:
        _fail(f"{source_path}: {error}")
    return {"path": str(out), "tags": [tag for tag in plots.CURVE_ORDER if history.get(tag)]}


def _print_report(report: dict, vocab_size: int, dim: int, can_embed: bool) -> None:
    print(f"vocabulary {vocab_size} words, dimension {dim}")
    similarity_rows = [(name, result) for name, result in report.items()
                       if isinstance(result, dict) and "spearman" in result]
    if similarity_rows:
        oov_header = "OOV embedded" if can_embed else "OOV pairs"
        width = max(12, max(len(name) for name, _ in similarity_rows))
        print()
        print(f"{'similarity':<{width}}  {'rho':>7}  {'pairs':>6}  {oov_header:>12}")
        for name, result in similarity_rows:
            print(f"{name:<{width}}  {_format_number(result['spearman']):>7}  "
                  f"{result['pairs']:>6}  {result['oov']:>12}")
    if "analogy" in report:
        result = report["analogy"]
        print()
        print(f"analogy ({result['method']}, top {result['restrict_vocab']} words): "
              f"accuracy {_format_number(result['accuracy'])} on {result['questions']} "
              f"questions, {result['oov']} skipped as OOV")
        width = max([len(name) for name in result["sections"]] + [8])
        for name, section in result["sections"].items():
            print(f"  {name:<{width}}  {_format_number(section['accuracy']):>7}  "
                  f"{section['questions']:>6}")
    if "neighbors" in report:
        print()
        for word, items in report["neighbors"].items():
            if not items:
                print(f"{word}: not in the vocabulary")
                continue
            listed = ", ".join(f"{neighbor} {cosine:.3f}" for neighbor, cosine in items)
            print(f"{word}: {listed}")
    if "plot" in report:
        plot = report["plot"]
        skipped = f" (not in vocabulary: {' '.join(plot['skipped'])})" if plot["skipped"] else ""
        print(f"\nprojection of {plot['words']} words written to {plot['path']}{skipped}")
    if "curves" in report:
        print(f"\ntraining curves ({', '.join(report['curves']['tags'])}) written to "
              f"{report['curves']['path']}")
    if "projector" in report:
        print(f"\nprojector files: {report['projector']['vectors']}, "
              f"{report['projector']['metadata']}")


if __name__ == "__main__":
    sys.exit(main())
