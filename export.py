"""Writing trained vectors: word2vec text and binary files (what gensim's KeyedVectors reads), and
TensorBoard projector files.

Formatting hundreds of thousands of floats one by one in Python takes seconds; a compiled loop
writes them all into one byte buffer in a fraction of that. Numbers are written as word2vec
writes them, with six decimals; the binary format keeps every bit.
"""
import math
from pathlib import Path

import numpy as np
from numba import njit

import fileio

DECIMALS = 6
MAX_WHOLE_DIGITS = 39  # digits before the point of the largest float32
PROJECTOR_TAG = "embeddings"


@njit(cache=True, nogil=True)
def format_rows(vectors, decimals, separator):
    """Every row of vectors as separator-led fixed-point numbers ('<sep>[-]I.FFFFFF' each, decimals
    digits after the point, rounded to nearest) in one byte buffer; returns (buffer, where each row ends).
    The digits are those of printf's %f below 2**53; above, the last of about 17 significant digits
    drift."""
    n, dim = vectors.shape
    scale = 10.0 ** decimals
    power = np.int64(10) ** decimals
    buffer = np.empty(n * dim * (MAX_WHOLE_DIGITS + 3 + decimals), dtype=np.uint8)
    ends = np.empty(n, dtype=np.int64)
    digits = np.empty(MAX_WHOLE_DIGITS, dtype=np.uint8)
    pos = 0
    for i in range(n):
        for j in range(dim):
            value = np.float64(vectors[i, j])
            buffer[pos] = separator
            pos += 1
            if math.copysign(1.0, value) < 0:  # as printf, -0.0 too
                buffer[pos] = 45  # '-'
                pos += 1
            units = np.rint(abs(value) * scale)  # an integer, held exactly as a float64 below 2**53
            count = 0
            if units < 2.0 ** 53:  # nearly always: integer digits, several times faster than float ones
                whole_units = np.int64(units)
                whole, fraction_units = whole_units // power, whole_units % power
                while count == 0 or whole > 0:
                    digits[count] = 48 + whole % 10
                    whole //= 10
                    count += 1
                for k in range(decimals - 1, -1, -1):
                    buffer[pos + count + 1 + k] = 48 + fraction_units % 10
                    fraction_units //= 10
            else:
                whole = np.floor(units / scale)
                fraction = units - whole * scale
                while count == 0 or whole > 0:
                    digits[count] = 48 + np.int64(whole % 10.0)
                    whole = np.floor(whole / 10.0)
                    count += 1
                for k in range(decimals - 1, -1, -1):
                    buffer[pos + count + 1 + k] = 48 + np.int64(fraction % 10.0)
                    fraction = np.floor(fraction / 10.0)
            for k in range(count - 1, -1, -1):
                buffer[pos] = digits[k]
                pos += 1
            buffer[pos] = 46  # '.'
            pos += 1 + decimals
        ends[i] = pos
    return buffer[:pos], ends


ROWS_PER_BLOCK = 1024  # rows formatted at a time: the buffer stays small whatever the vocabulary


def formatted_rows(vectors, separator=" "):
    """The rows of vectors as bytes, each value led by separator, ROWS_PER_BLOCK rows at a time.
    Raises ValueError on a NaN or infinite value, which format_rows has no digits for."""
    for lo in range(0, len(vectors), ROWS_PER_BLOCK):
        block = np.ascontiguousarray(vectors[lo:lo + ROWS_PER_BLOCK], dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError(f"cannot write NaN or infinite values (rows {lo} to {lo + len(block) - 1})")
        buffer, ends = format_rows(block, DECIMALS, ord(separator))
        body = buffer.tobytes()
        starts = [0, *ends[:-1].tolist()]
        yield from (body[a:b] for a, b in zip(starts, ends.tolist()))


def write_word2vec(path, words, vectors):
    """The vectors in word2vec format, written atomically: a 'count dimension' line, then each
    word and its vector, as text (one line a word), or binary where the path ends in .bin (the
    word, a space, the float32 values)."""
    def write(tmp):
        with open(tmp, "wb") as out:
            out.write(f"{len(words)} {vectors.shape[1]}\n".encode())
            if str(path).endswith(".bin"):
                out.writelines(word.encode() + b" " + row.astype("<f4").tobytes() for word, row in zip(words, vectors))
            else:
                out.writelines(word.encode() + row + b"\n" for word, row in zip(words, formatted_rows(vectors)))
    fileio.atomic_write(path, write)


def write_tsv(path, vectors):
    """One line of tab-separated values a row, as TensorBoard's projector reads them, written atomically."""
    def write(tmp):
        with open(tmp, "wb") as out:
            out.writelines(row[1:] + b"\n" for row in formatted_rows(vectors, "\t"))
    fileio.atomic_write(path, write)


def write_metadata(path, words):
    """One word a line, no header (the projector's form for one column), written atomically; a
    tab or newline inside a word would shift every later row."""
    text = "".join(word.replace("\t", " ").replace("\n", " ") + "\n" for word in words)
    fileio.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


def write_projector_files(words, vectors, out_dir):
    """vectors.tsv and metadata.tsv in out_dir, as TensorBoard's projector reads them (one word a
    line, no header: its form for a single column); returns their paths."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(words):
        raise ValueError(f"{matrix.shape} vectors do not match {len(words)} words")
    vectors_path, metadata_path = Path(out_dir) / "vectors.tsv", Path(out_dir) / "metadata.tsv"
    write_tsv(vectors_path, matrix)
    write_metadata(metadata_path, words)
    return vectors_path, metadata_path


def write_projector_snapshot(log_dir, words, vectors, step):
    """A snapshot of the vectors for TensorBoard's projector, laid out as tensorboardX's
    add_embedding lays it out (tag PROJECTOR_TAG): STEP/TAG/tensors.tsv and metadata.tsv, and an
    entry for them in the log folder's projector_config.pbtxt."""
    subdir = f"{step:05d}/{PROJECTOR_TAG}"
    folder = Path(log_dir) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    write_tsv(folder / "tensors.tsv", vectors)
    write_metadata(folder / "metadata.tsv", words)
    config = Path(log_dir) / "projector_config.pbtxt"
    entry = (f'embeddings {{\ntensor_name: "{PROJECTOR_TAG}:{step:05d}"\ntensor_path: "{subdir}/tensors.tsv"\n'
             f'metadata_path: "{subdir}/metadata.tsv"\n}}\n')
    before = config.read_text() if config.exists() else ""
    fileio.atomic_write(config, lambda tmp: tmp.write_text(before + entry))
