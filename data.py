"""Corpus building, vocabulary, subsampling, negative sampling and pair batches.

A corpus becomes one compact array of word ids (``np.uint32``) plus the start offset of
each sentence. Everything downstream (the training kernels, the PIP loss) works on those
arrays, so memory stays O(tokens) whatever the window or the number of epochs.
"""
import bz2
import codecs
import functools
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import socket
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import fileio
from lazy import torch  # WindowBatches only: the CPU loops draw with numpy

CACHE_FORMAT = 4  # bump when the cache layout or the tokeniser changes: old caches rebuild
READ_BLOCK_BYTES = 8 << 20  # bytes tokenised at a time, so a large corpus never sits in memory as text
STEPS_PER_DRAW = 32  # WindowBatches users draw this many steps' windows in one go: fewer, larger kernels
SHUFFLE_BLOCK_TOKENS = 1000  # shuffle_sentence_blocks moves sentences in blocks of about this many tokens
MAX_SENTENCE_TOKENS = 10_000  # longer "sentences" (text without punctuation) are cut, as gensim does

# A word is a letter followed by letters and combining marks (Unicode categories L and M), with
# apostrophes allowed inside it ("don't", "o'clock"); _word_token_re builds it for any script.
# Numbers other than digits (², ½, Ⅻ: Nl, No) go on a word as they always did ("x²").
# Sentence ends (. ! ? and blank lines) are matched too, as boundary markers.
_ASCII_TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)*|[.!?]|\n[ \t\r]*\n")  # the same on lowercase ASCII, faster
_BEYOND_BMP_RE = re.compile("[\U00010000-\U0010ffff]")
_MARKUP_RE = re.compile(r"<[^>\n]*>")
_BOUNDARY_TOKENS = (".", "!", "?")

SNIFF_BYTES = 1 << 16  # a corpus file's first (uncompressed) bytes tell its text encoding
# Magic bytes of formats read through Python's decompressors, and of archives we refuse
_COMPRESSED = ((re.compile(rb"\x1f\x8b"), "gzip", gzip.open), (re.compile(rb"\xfd7zXZ\x00"), "xz", lzma.open),
               (re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"), "bzip2", bz2.open))
_DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError)  # what a damaged or truncated compressed file raises
_ARCHIVES = ((b"PK\x03\x04", "zip archive"), (b"PK\x05\x06", "zip archive"), (b"7z\xbc\xaf\x27\x1c", "7z archive"),
             (b"\x28\xb5\x2f\xfd", "zstd-compressed file"), (b"Rar!\x1a\x07", "rar archive"))
# Byte order marks, longest first (UTF-32-LE's starts with UTF-16-LE's); these codecs consume the mark
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_MARK_BAD_BYTES = "sgns-mark-bad-bytes"
# A byte that is not valid UTF-16/32 becomes U+DCFF, which encodes (surrogateescape) as the byte 0xFF:
# invalid UTF-8, so _encode_block counts and replaces it as it does a bad byte of a UTF-8 file.
codecs.register_error(_MARK_BAD_BYTES, lambda err: ("\udcff" * (err.end - err.start), err.end))


class DatasetError(Exception):
    """A user-facing problem with the corpus (missing path, no words...): trainer exits 2."""


@dataclass
class Source:
    """Where a corpus comes from: a list of files on disk and a name to print."""
    name: str
    files: list


# ---------------------------------------------------------------------------------------------
# Finding the corpus

def _nltk_gutenberg_files(download=True):
    """Files of NLTK's Gutenberg selection, fetched by nltk if missing; None if unavailable."""
    import nltk
    try:
        from nltk.corpus import gutenberg
        return [Path(gutenberg.abspath(fid)) for fid in gutenberg.fileids()]
    except LookupError:
        if not download:
            return None
    # Give up within seconds when the download server is unreachable (no network, firewall).
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    try:
        ok = nltk.download("gutenberg", quiet=True, raise_on_error=False)
    except Exception:
        ok = False
    finally:
        socket.setdefaulttimeout(old_timeout)
    if not ok:
        return None
    try:
        from nltk.corpus import gutenberg
        return [Path(gutenberg.abspath(fid)) for fid in gutenberg.fileids()]
    except LookupError:
        return None


def _lee_corpus_file():
    from gensim.test.utils import datapath
    return Path(datapath("lee_background.cor"))


def resolve_dataset(dataset, data_dir="data"):
    """Turn the --dataset value into a Source.

    None picks the default: data/harry_potter.txt if the user put it there, else NLTK's
    Gutenberg selection, else (no NLTK data and no network) the Lee corpus gensim ships.
    """
    data_dir = Path(data_dir)
    if dataset is None:
        own = data_dir / "harry_potter.txt"
        if own.is_file():
            return Source(str(own), [own])
        files = _nltk_gutenberg_files()
        if files:
            return Source("nltk gutenberg", files)
        return Source("gensim lee_background.cor", [_lee_corpus_file()])
    if dataset == "gutenberg":
        files = _nltk_gutenberg_files()
        if not files:
            raise DatasetError("NLTK's gutenberg corpus is not installed and could not be downloaded; "
                               "set NLTK_DATA or run: python -m nltk.downloader gutenberg")
        return Source("nltk gutenberg", files)
    if dataset == "lee":
        return Source("gensim lee_background.cor", [_lee_corpus_file()])
    for path in (Path(dataset), data_dir / dataset):
        if path.exists():  # a FIFO or a device would block or stream forever: one line instead
            try:
                fileio.check_input_path(path, "dataset", allow_dir=True)
            except fileio.PathKindError as err:
                raise DatasetError(str(err)) from None
        if path.is_file():
            return Source(str(path), [path])
        if path.is_dir():
            files = sorted(p for p in path.glob("*.txt") if p.is_file())
            if not files:
                raise DatasetError(f"no .txt files in folder {path}")
            return Source(str(path), files)
    raise DatasetError(f"dataset not found: {dataset} (looked for it as given and in {data_dir}/)")


# ---------------------------------------------------------------------------------------------
# Tokenising

def _decompressor(path):
    """(name, open function) of the compression of a corpus file, or (None, open); refuses archives."""
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, kind in _ARCHIVES:
        if head.startswith(magic):
            raise DatasetError(f"{path} is a {kind}, not text: extract it and pass the text file or its folder")
    for magic, name, opener in _COMPRESSED:
        if magic.match(head):
            return name, opener
    return None, open


def _guess_encoding(head, path):
    """The text encoding of a file starting with `head`: its byte order mark, else its NUL bytes tell.

    Text in UTF-16 or UTF-32 without a mark has NUL bytes at fixed places (the high bytes of
    ASCII characters); a UTF-8 file with the odd stray NUL byte stays UTF-8. What decodes to
    no text in any of them (a binary file, text in another encoding) is refused.
    """
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if head.count(0) * 10 <= len(head):
        bad = head.decode("utf-8", errors=_MARK_BAD_BYTES).count("\udcff")
        if bad * 5 > len(head):
            raise DatasetError(f"{path} is not UTF-8 text: {bad * 100 // len(head)}% of its first bytes are not "
                               "valid UTF-8 (convert it with iconv -f ENCODING -t UTF-8, or pass a text file)")
        return "utf-8"
    zero = np.frombuffer(head[:len(head) // 4 * 4], dtype=np.uint8).reshape(-1, 4) == 0
    share = zero.mean(axis=0) if len(zero) else np.zeros(4)
    patterns = (("utf-32-le", share[2:].min() > 0.9 and share[0] < 0.1),
                ("utf-32-be", share[:2].min() > 0.9 and share[3] < 0.1),
                ("utf-16-le", share[1::2].mean() > 0.5 and share[0::2].mean() < 0.1),
                ("utf-16-be", share[0::2].mean() > 0.5 and share[1::2].mean() < 0.1))
    for encoding, fits in patterns:
        if fits and _looks_like_text(head[:len(head) // 4 * 4].decode(encoding, errors=_MARK_BAD_BYTES)):
            return encoding
    raise DatasetError(f"{path} does not look like text: {head.count(0) * 100 // len(head)}% of its first "
                       "bytes are NUL (a binary file?)")


def _looks_like_text(text):
    """Printable characters, mostly Latin: what UTF-16/32 text with NUL bytes in every other place decodes to."""
    printable = sum(char.isprintable() or char in "\t\n\r\f" for char in text)
    latin = sum(char < "\u0100" for char in text)
    return len(text) > 0 and printable >= 0.98 * len(text) and latin * 2 >= len(text)


def _file_format(path):
    """(compression or None, text encoding) of a corpus file, from its first bytes."""
    compression, opener = _decompressor(path)
    try:
        with opener(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except _DECOMPRESSION_ERRORS as err:
        if compression is None:
            raise
        raise DatasetError(f"cannot decompress {path} ({compression}): {err}") from err
    return compression, _guess_encoding(head, path)


def _utf8_blocks(path, compression, encoding):
    """The file's text in blocks of UTF-8 bytes, bad bytes kept as they are (invalid UTF-8)."""
    opener = {name: opener for _, name, opener in _COMPRESSED}.get(compression, open)
    decoder = None if encoding == "utf-8" else codecs.getincrementaldecoder(encoding)(errors=_MARK_BAD_BYTES)
    try:
        with opener(path, "rb") as f:
            while block := f.read(READ_BLOCK_BYTES):
                yield block if decoder is None else decoder.decode(block).encode("utf-8", "surrogateescape")
    except _DECOMPRESSION_ERRORS as err:
        if compression is None:
            raise
        raise DatasetError(f"cannot decompress {path} ({compression}): {err}") from err
    if decoder is not None and (rest := decoder.decode(b"", final=True)):  # a truncated last character
        yield rest.encode("utf-8", "surrogateescape")


def _last_character_start(block):
    """Where the last UTF-8 character of block starts: a cut there leaves every character whole,
    the bytes of a character cut by the read going on with the next block, as a decoder keeps them."""
    for back in range(1, min(4, len(block)) + 1):
        if block[-back] & 0xC0 != 0x80:  # not a continuation byte 10xxxxxx
            return len(block) - back
    return len(block)  # no character start in the last 4 bytes: not UTF-8 there, cut anywhere


def _read_blocks(path, compression=None, encoding="utf-8"):
    """Yield the file's text as UTF-8 bytes in blocks cut after a newline, so no word or character is split."""
    tail = b""
    for block in _utf8_blocks(path, compression, encoding):
        block = tail + block
        cut = block.rfind(b"\n") + 1
        if cut == 0:  # no newline in 8 MB: cut at a space, else between two characters
            cut = block.rfind(b" ") + 1 or _last_character_start(block)
        tail = block[cut:]
        yield block[:cut]
    if tail:
        yield tail


def fold_case(text):
    """Lowercase as the corpus is read (evaluate.py folds query words with it too).

    Other scripts are lowercased then put in NFC, so a decomposed "café" is the composed one and
    a capital with a mark lowercases to one character where one exists. The dot of a capital
    "İ" is its case, not a mark: "İstanbul" becomes "istanbul", as Turkish lowercases it.
    """
    text = text.lower()
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
        if "\u0307" in text:  # "İ".lower() is "i" + COMBINING DOT ABOVE
            text = text.replace("i\u0307", "i")
    return text


def normalize(text):
    """fold_case, drop <markup>, unify apostrophes: the original sgns_pytorch's normalisation."""
    return _MARKUP_RE.sub(" ", fold_case(text).replace("\u2019", "'"))


def _category_ranges(categories, top):
    """Regex class ranges of the code points up to top whose Unicode category starts with one of categories."""
    ranges, start = [], None
    for code in range(top + 2):
        inside = code <= top and unicodedata.category(chr(code)).startswith(categories)
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{code - 1:08x}")
            start = None
    return "".join(ranges)


@functools.cache
def _word_token_re(top):
    """The token regex with its character classes listed up to code point top, and every code
    point above top taken as a letter. Built on first use (enumerating categories takes a while).

    re scans the ranges above the Basic Multilingual Plane one by one for every character that
    is not a word character, where those below it are one table lookup: tokenize splits text with
    top = U+FFFF and re-splits the rare tokens that hold a character above it with the exact one.
    """
    beyond = f"\\U{top + 1:08x}-\\U{sys.maxunicode:08x}" if top < sys.maxunicode else ""
    letter = f"[{_category_ranges(('L',), top)}{beyond}]"
    letter_or_mark = f"[{_category_ranges(('L', 'M', 'Nl', 'No'), top)}{beyond}]"
    word = f"{letter}{letter_or_mark}*"
    return re.compile(f"{word}(?:'{word})*|[.!?]|\\n[ \\t\\r]*\\n")


def tokenize(text):
    """Word tokens and sentence-boundary markers ('.', '!', '?' or a blank line) of raw text."""
    text = normalize(text)
    if text.isascii():
        return _ASCII_TOKEN_RE.findall(text)
    tokens = _word_token_re(0xFFFF).findall(text)
    if _BEYOND_BMP_RE.search(text):
        exact = _word_token_re(sys.maxunicode)
        tokens = [piece for token in tokens
                  for piece in (exact.findall(token) if _BEYOND_BMP_RE.search(token) else (token,))]
    return tokens


def sentences(text):
    """Split raw text into sentences of normalised word tokens (for small inputs and tests)."""
    out, current = [], []
    for tok in tokenize(text):
        if tok in _BOUNDARY_TOKENS or tok[0] == "\n":
            if current:
                out.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        out.append(current)
    return out


def hash_source(source, options):
    """Digest of the corpus bytes and of every option that changes what is built from them."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps({"format": CACHE_FORMAT, **options}, sort_keys=True).encode())
    for path in source.files:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        digest.update(b"\x00file-end\x00")
    return digest.hexdigest()


def _word_mapper(remove_stopwords, lemmatize):
    """Map a word type to what the vocabulary keeps (its lemma), or None to drop it."""
    stop = set()
    if remove_stopwords:
        from nltk.corpus import stopwords
        try:
            stop = set(stopwords.words("english"))
        except LookupError as err:
            raise DatasetError("--remove-stopwords needs NLTK's stopwords: "
                               "python -m nltk.downloader stopwords") from err
    lemmatizer = None
    if lemmatize:
        from nltk.stem import WordNetLemmatizer
        lemmatizer = WordNetLemmatizer()
        try:
            lemmatizer.lemmatize("dogs")
        except LookupError as err:
            raise DatasetError("--lemmatize needs NLTK's wordnet: python -m nltk.downloader wordnet") from err

    def mapper(word):
        if word in stop:
            return None
        return lemmatizer.lemmatize(word) if lemmatizer else word
    return mapper


def _encode_block(raw):
    """Tokenise one block of bytes; returns (bad byte count, its word types, its token ids).

    Ids are local to the block: 0 marks a sentence boundary, i > 0 is types[i - 1]. Blocks
    are independent, so several processes can tokenise at once.
    """
    text = raw.decode("utf-8", errors="replace")
    bad = max(0, text.count("\ufffd") - raw.count("\ufffd".encode()))
    tokens = tokenize(text)
    local_ids = {tok: 0 for tok in _BOUNDARY_TOKENS}
    types = []
    for tok in set(tokens).difference(local_ids):
        if tok[0] == "\n":
            local_ids[tok] = 0
        else:
            types.append(tok)
            local_ids[tok] = len(types)
    return bad, types, np.fromiter(map(local_ids.__getitem__, tokens), dtype=np.int32, count=len(tokens))


def _encoded_blocks(formats, workers):
    """(bad, types, ids) for every block of every file in order, with None after each file.

    formats maps each file to its (compression, encoding), as _file_format finds them.
    """
    blocks = ((path, raw) for path, (compression, encoding) in formats.items()
              for raw in itertools.chain(_read_blocks(path, compression, encoding), [None]))
    if workers <= 1:
        for _, raw in blocks:
            yield None if raw is None else _encode_block(raw)
        return
    import multiprocessing
    # fork: the children need only this module's functions, already in memory (spawn or forkserver
    # would re-run a caller's unguarded script). Python 3.12+ warns about fork() in a process with
    # threads (numba's pool, Gloo's); the children only tokenise (regexes, numpy) and take no lock
    # those threads hold.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                                category=DeprecationWarning)
        pool = multiprocessing.get_context("fork").Pool(workers)
    with pool:
        pending = []
        for _, raw in blocks:
            pending.append(None if raw is None else pool.apply_async(_encode_block, (raw,)))
            while len(pending) > 2 * workers:  # bounded read-ahead: memory stays O(workers x block)
                head = pending.pop(0)
                yield None if head is None else head.get()
        for head in pending:
            yield None if head is None else head.get()


def build_arrays(source, min_count=5, remove_stopwords=False, lemmatize=False, workers=None):
    """Tokenise every file once and encode it; returns (words, counts, token_ids, sentence_starts, warning).

    One pass: each new word type gets a provisional id in order of first sight, the text
    becomes an int32 array of provisional ids (id 0 marks a sentence boundary), and at the
    end the types are counted, filtered and renumbered by descending frequency. Blocks are
    tokenised by `workers` processes (default: one per core) when there are several.
    Compressed files (gzip, bzip2, xz) are read through their decompressor and UTF-16/32
    text is decoded, as _file_format finds them. warning says how many bytes could not be
    decoded and were replaced (None when every byte could).
    """
    workers = workers or os.cpu_count() or 1
    formats = {path: _file_format(path) for path in source.files}
    n_blocks = sum(1 + os.path.getsize(p) // READ_BLOCK_BYTES for p in source.files)
    type_ids = {}
    type_words = ["<boundary>"]
    pieces, bad_bytes = [], 0
    for block in _encoded_blocks(formats, workers if n_blocks > 1 else 1):
        if block is None:
            pieces.append(np.zeros(1, dtype=np.int32))  # a file ends a sentence
            continue
        bad, types, local = block
        bad_bytes += bad
        for tok in types:
            if tok not in type_ids:
                type_ids[tok] = len(type_words)
                type_words.append(tok)
        to_provisional = np.array([0] + [type_ids[tok] for tok in types], dtype=np.int32)
        pieces.append(to_provisional[local])
    provisional = np.concatenate(pieces)
    del pieces
    type_counts = np.bincount(provisional, minlength=len(type_words))

    # Stopwords and lemmas act on word types, not on each token: a few thousand calls.
    mapper = _word_mapper(remove_stopwords, lemmatize)
    kept_word_of_type = [None] + [mapper(w) for w in type_words[1:]]
    word_counts = {}
    for word, count in zip(kept_word_of_type[1:], type_counts[1:].tolist()):
        if word is not None:
            word_counts[word] = word_counts.get(word, 0) + count
    n_types = len(word_counts)
    if n_types == 0:
        raise DatasetError(f"no words found in {source.name}")
    vocab = sorted((w for w, c in word_counts.items() if c >= min_count), key=lambda w: (-word_counts[w], w))
    if not vocab:
        raise DatasetError(f"the vocabulary is empty: none of the {n_types} word types occurs "
                           f"{min_count} times; lower --remove-th")
    word_id = {w: i for i, w in enumerate(vocab)}
    # provisional id -> final id; -1 drops the token (rare word, stopword), -2 ends a sentence
    final_of_type = np.array([-2] + [word_id.get(w, -1) if w is not None else -1
                                     for w in kept_word_of_type[1:]], dtype=np.int32)
    final = final_of_type[provisional]
    del provisional
    # int32 halves the peak memory of building; sentence counts beyond 2^31 need int64
    sentence_index = np.cumsum(final == -2, dtype=np.int32 if len(final) < 2**31 else np.int64)
    keep = final >= 0
    token_ids = final[keep].astype(np.uint32)
    sentence_index = sentence_index[keep]
    del final, keep
    starts = np.flatnonzero(np.diff(sentence_index, prepend=-1) != 0)
    counts = np.bincount(token_ids, minlength=len(vocab)).astype(np.int64)
    warning = _decode_warning(bad_bytes, {encoding for _, encoding in formats.values()})
    return vocab, counts, token_ids, split_long_sentences(starts, len(token_ids)), warning


def _decode_warning(bad_bytes, encodings):
    if not bad_bytes:
        return None
    names = " or ".join(sorted({encoding[:6].upper() for encoding in encodings}))  # utf-16-le: UTF-16
    return f"{bad_bytes} byte(s) were not valid {names} and were replaced"


def split_long_sentences(starts, n_tokens, max_len=MAX_SENTENCE_TOKENS):
    """Add starts so that no sentence is longer than max_len tokens."""
    bounds = np.append(starts, n_tokens)
    lengths = np.diff(bounds)
    if lengths.size == 0 or lengths.max() <= max_len:
        return starts.astype(np.int64)
    extra = [np.arange(s + max_len, e, max_len) for s, e in zip(bounds[:-1], bounds[1:]) if e - s > max_len]
    return np.sort(np.concatenate([starts] + extra)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The corpus and its cache

@dataclass
class Corpus:
    name: str
    words: list
    counts: np.ndarray
    token_ids: np.ndarray
    sentence_starts: np.ndarray
    hash: str
    cache_dir: Path
    decode_warning: str = None  # how many bytes could not be decoded, said on every load

    def cache_file(self, suffix):
        """Path for an artefact derived from this corpus (SPPMI matrix, oracle embedding...)."""
        return Path(self.cache_dir) / f"corpus-{self.hash[:20]}-{suffix}"

    def __len__(self):
        return len(self.token_ids)


def _file_digest(path):
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def cached_array(path, compute, expected_shape, log=print):
    """A derived array from the corpus cache (never unpickled), else compute() stored there.

    A .npz path holds a scipy sparse matrix, any other a dense .npy array. A cached file that
    does not load, or holds an array of another shape or with values that are not finite
    floats, is recomputed with a warning.
    """
    import scipy.sparse
    path = Path(path)
    sparse = path.suffix == ".npz"
    if path.exists():
        try:
            value = scipy.sparse.load_npz(path) if sparse else np.load(path, allow_pickle=False)
            _check_array(value.data if sparse else value, value.shape, tuple(expected_shape))
            return value
        except Exception as err:  # any damage at all means: recompute
            log(f"warning: cached {path.name} is damaged ({err}); recomputing it")
    value = compute()
    try:
        def write(tmp):  # an open file: given a name, numpy and scipy would append .npy/.npz to it
            with open(tmp, "wb") as f:
                scipy.sparse.save_npz(f, value) if sparse else np.save(f, value, allow_pickle=False)
        fileio.atomic_write(path, write)
    except OSError as err:
        log(f"warning: could not cache {path.name}: {err}")
    return value


def _check_array(values, shape, expected_shape):
    if shape != expected_shape:
        raise ValueError(f"shape {shape}, expected {expected_shape}")
    if values.dtype.kind != "f" or not np.isfinite(values).all():
        raise ValueError(f"values of type {values.dtype} that are not all finite floats")


def _save_cache(corpus, options):
    arrays_path = corpus.cache_file("arrays.npz")
    meta_path = corpus.cache_file("meta.json")

    def write_arrays(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, token_ids=corpus.token_ids, sentence_starts=corpus.sentence_starts, counts=corpus.counts)
    fileio.atomic_write(arrays_path, write_arrays)
    meta = {"format": CACHE_FORMAT, "hash": corpus.hash, "name": corpus.name, "options": options,
            "words": corpus.words, "n_tokens": int(len(corpus.token_ids)),
            "arrays_digest": _file_digest(arrays_path), "decode_warning": corpus.decode_warning}
    fileio.atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))


def _load_cache(corpus_hash, cache_dir, name):
    """The cached corpus, or None when absent; a damaged cache warns and returns None."""
    probe = Corpus(name, [], None, None, None, corpus_hash, Path(cache_dir))
    meta_path, arrays_path = probe.cache_file("meta.json"), probe.cache_file("arrays.npz")
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("hash") != corpus_hash:
            raise ValueError("written by another version")
        if _file_digest(arrays_path) != meta["arrays_digest"]:
            raise ValueError("arrays do not match their digest")
        with np.load(arrays_path, allow_pickle=False) as arrays:
            token_ids, starts, counts = arrays["token_ids"], arrays["sentence_starts"], arrays["counts"]
        _check_corpus_arrays(token_ids, starts, counts, meta["n_tokens"], len(meta["words"]))
        decode_warning = meta["decode_warning"]
    except Exception as err:  # any damage at all means: rebuild
        warnings.warn(f"corpus cache {meta_path} is damaged ({err}); rebuilding it")
        return None
    probe.words, probe.counts, probe.token_ids, probe.sentence_starts = meta["words"], counts, token_ids, starts
    probe.decode_warning = decode_warning
    return probe


def _check_corpus_arrays(token_ids, starts, counts, n_tokens, n_words):
    """Raise ValueError unless the arrays are what build_arrays makes for n_tokens tokens of n_words words."""
    if token_ids.shape != (n_tokens,) or token_ids.dtype != np.uint32 or counts.shape != (n_words,):
        raise ValueError("sizes or types do not match")
    if n_tokens and token_ids.max() >= n_words:
        raise ValueError(f"word ids up to {token_ids.max()} for {n_words} words")
    if counts.sum() != n_tokens:  # the sum, not a full np.bincount: a cache hit stays cheap
        raise ValueError("word counts do not add up to the tokens")
    if starts.ndim != 1 or starts.dtype.kind not in "iu":
        raise ValueError("sentence starts of the wrong shape or type")
    if len(starts) == 0 or starts[0] != 0 or starts[-1] >= n_tokens or np.any(np.diff(starts) <= 0):
        raise ValueError("sentence starts are not increasing offsets into the tokens")


def load_corpus(dataset=None, data_dir="data", cache_dir="data/cache", min_count=5,
                remove_stopwords=False, lemmatize=False, use_cache=True, log=print):
    """Find, tokenise, count and encode a corpus, through the on-disk cache."""
    source = resolve_dataset(dataset, data_dir)
    options = {"min_count": int(min_count), "remove_stopwords": bool(remove_stopwords),
               "lemmatize": bool(lemmatize)}
    corpus_hash = hash_source(source, options)
    corpus = None
    if use_cache:
        fileio.remove_stale_temp_files(cache_dir)  # left by a run killed while it wrote the cache
        corpus = _load_cache(corpus_hash, cache_dir, source.name)
    if corpus is None:
        words, counts, token_ids, starts, decode_warning = build_arrays(source, **options)
        corpus = Corpus(source.name, words, counts, token_ids, starts, corpus_hash, Path(cache_dir), decode_warning)
        if use_cache:
            try:
                _save_cache(corpus, options)
            except OSError as err:
                log(f"warning: could not write the corpus cache in {cache_dir}: {err}")
    if corpus.decode_warning:  # on a cache hit too: the vocabulary still lacks what was replaced
        warnings.warn(f"{corpus.name}: {corpus.decode_warning}")
    return corpus


# ---------------------------------------------------------------------------------------------
# Sampling

def keep_probabilities(counts, threshold):
    """word2vec's per-occurrence keep probability (sqrt(f/t) + 1) * t / f, capped at 1."""
    counts = np.asarray(counts, dtype=np.float64)
    if threshold <= 0:
        return np.ones(len(counts), dtype=np.float32)
    freq = counts / counts.sum()
    with np.errstate(divide="ignore"):
        keep = (np.sqrt(freq / threshold) + 1.0) * threshold / freq
    return np.minimum(keep, 1.0).astype(np.float32)


def subsample(token_ids, sentence_starts, keep_prob, rng, block=1 << 20):
    """Drop occurrences at random; returns the kept ids and the sentence starts in that array.

    Works block by block so the extra memory is O(block), not O(tokens).
    """
    import cpu_kernel  # the compiled pass: imported here, where a run trains, not where a corpus is read
    kept = np.empty(len(token_ids), dtype=np.uint32)
    kept_starts = np.empty(len(sentence_starts), dtype=np.int64)
    n_kept = 0
    for lo in range(0, len(token_ids), block):
        ids = token_ids[lo:lo + block]
        first, last = np.searchsorted(sentence_starts, [lo, lo + len(ids)])
        block_kept = cpu_kernel.keep_tokens(ids, keep_prob, rng.random(len(ids), dtype=np.float32),
                                            sentence_starts[first:last] - lo, kept[n_kept:], kept_starts[first:last])
        kept_starts[first:last] += n_kept
        n_kept += block_kept
    # kept_starts never decreases: a sentence emptied by subsampling repeats the next one's start
    starts = kept_starts[np.diff(kept_starts, prepend=-1) > 0]
    starts = starts[starts < n_kept]  # sentences emptied at the end vanish too
    return kept[:n_kept], starts


class NegativeSampler:
    """Draws negatives from unigram^exponent in O(1) per draw (Walker's alias method)."""

    def __init__(self, counts, exponent=0.75):
        weights = np.asarray(counts, dtype=np.float64) ** exponent
        self.probs = weights / weights.sum()
        self.accept, self.alias = alias_table(self.probs)

    def sample(self, shape, rng):
        n = int(np.prod(shape))
        slot = rng.integers(0, len(self.accept), size=n)
        take_slot = rng.random(n, dtype=np.float32) < self.accept[slot]
        return np.where(take_slot, slot, self.alias[slot]).reshape(shape)


def alias_table(probs):
    """Vose's alias table: slot i keeps itself with accept[i], else yields alias[i]."""
    n = len(probs)
    scaled = np.asarray(probs, dtype=np.float64) * n
    accept = np.ones(n, dtype=np.float32)
    alias = np.arange(n, dtype=np.int64)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        accept[s] = scaled[s]
        alias[s] = g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return accept, alias


def window_pairs(kept_ids, starts, lo, hi, window, rng):
    """All (center, context) pairs for centers kept_ids[lo:hi], dynamic window, sentence-bound.

    Each center draws its window b uniformly in 1..window (word2vec's shrunk window) and
    pairs with the words at most b away on either side within its sentence.
    """
    n = len(kept_ids)
    pos = np.arange(lo, hi)
    sentence = np.searchsorted(starts, pos, side="right") - 1
    sent_lo = starts[sentence]
    sent_hi = np.append(starts, n)[sentence + 1]
    reach = rng.integers(1, window + 1, size=len(pos))
    offsets = np.concatenate([np.arange(-window, 0), np.arange(1, window + 1)])
    ctx_pos = pos[:, None] + offsets[None, :]
    valid = (np.abs(offsets)[None, :] <= reach[:, None]) & (ctx_pos >= sent_lo[:, None]) & (ctx_pos < sent_hi[:, None])
    center_pos = np.broadcast_to(pos[:, None], ctx_pos.shape)[valid]
    return kept_ids[center_pos].astype(np.int64), kept_ids[ctx_pos[valid]].astype(np.int64)


def shuffle_sentence_blocks(kept_ids, starts, seed, epoch):
    """The epoch's tokens with blocks of whole sentences in a random order drawn from (seed, epoch).

    Blocks hold about SHUFFLE_BLOCK_TOKENS tokens (whole sentences, so windows never straddle
    two places of the text). A corpus of books otherwise runs book by book, and an optimizer
    with moment estimates (Adam) follows whichever book it read last. Returns (token ids,
    sentence starts within them).
    """
    n = len(kept_ids)
    if n == 0:
        return kept_ids, np.zeros(1, dtype=np.int64)
    block_first = np.unique(np.searchsorted(starts, np.arange(0, n, SHUFFLE_BLOCK_TOKENS)))  # first sentence
    block_lo = starts[block_first[block_first < len(starts)]]  # none starts inside a long last sentence
    block_hi = np.append(block_lo[1:], n)
    order = epoch_rng(seed, epoch, 0x5A4D).permutation(len(block_lo))
    stream = np.concatenate([kept_ids[block_lo[b]:block_hi[b]] for b in order])
    new_lo = np.concatenate([[0], np.cumsum((block_hi - block_lo)[order])[:-1]])
    new_block_lo = np.empty_like(new_lo)
    new_block_lo[order] = new_lo  # where each original block lands in the stream
    block_of_sentence = np.searchsorted(block_lo, starts, side="right") - 1
    return stream, np.sort(starts - block_lo[block_of_sentence] + new_block_lo[block_of_sentence])


def epoch_share(kept_ids, starts, seed, epoch, rank, world_size, shuffled):
    """This rank's part of an epoch's kept tokens: (token ids, sentence starts within them).

    shuffled: blocks of whole sentences first go in the epoch's random order, the same on all
    ranks (shuffle_sentence_blocks). The stream is then cut into world_size slices of equal
    token count (+-1), so every rank makes the same number of steps.
    """
    if shuffled:
        kept_ids, starts = shuffle_sentence_blocks(kept_ids, starts, seed, epoch)
    if world_size == 1:
        return kept_ids, starts
    n = len(kept_ids)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    mine = starts[(starts >= lo) & (starts < hi)] - lo
    return kept_ids[lo:hi], np.unique(np.concatenate([[0], mine])).astype(np.int64)


def epoch_rng(seed, epoch, *stream):
    """The generator for one epoch (and stream): a stopped run regenerates the same draws when resumed.

    An epoch's subsampling draws from epoch_rng(seed, epoch), step i of rank r from
    epoch_rng(seed, epoch, 1 + r, i)."""
    return np.random.default_rng([seed, epoch, *stream])


def step_seed(seed, epoch, rank):
    """A 64-bit seed from which the compiled kernel derives each step's generator (cpu_kernel)."""
    return int(np.random.SeedSequence([seed, epoch, 1 + rank]).generate_state(1, np.uint64)[0])


def _torch_seed(seed, *stream):
    """A 63-bit torch seed derived from (seed, *stream), as epoch_rng derives numpy's."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class WindowBatches:
    """Training batches built where the model lives (a GPU), with no host round trip per step.

    A batch is a run of consecutive kept centers with their whole (dynamic) window as a fixed
    C x 2W block, plus a mask of the real pairs, and K negatives per center shared by its
    window (Ji et al. 2016). Fixed shapes mean no step waits for the host to learn a size.
    Callers draw each chunk of steps from seeded(seed, epoch, where the chunk starts), so a
    resumed epoch redraws exactly what it would have drawn.
    """

    def __init__(self, corpus, keep_prob, sampler, window, neg_count, device):
        self.device = torch.device(device)
        self.window, self.neg_count = window, neg_count
        as_tensor = lambda a, dtype: torch.as_tensor(np.asarray(a), dtype=dtype).to(self.device)  # noqa: E731
        self.token_ids = as_tensor(corpus.token_ids, torch.int32)  # int64 only for an epoch's kept ids
        sentence_lengths = np.diff(np.append(corpus.sentence_starts, len(corpus.token_ids)))
        sentence_of_token = np.repeat(np.arange(len(sentence_lengths), dtype=np.int32), sentence_lengths)
        self.sentence_of_token = as_tensor(sentence_of_token, torch.int32)
        self.keep_prob = as_tensor(keep_prob, torch.float32)
        self.accept = as_tensor(sampler.accept, torch.float32)
        self.alias = as_tensor(sampler.alias, torch.int64)
        self.offsets = as_tensor(np.r_[-window:0, 1:window + 1], torch.int64)
        self.generator = torch.Generator(device=self.device)

    def seeded(self, seed, *stream):
        self.generator.manual_seed(_torch_seed(seed, *stream))
        return self.generator

    def to_device(self, kept_ids, starts):
        """Kept ids made on the host, and the sentence of each (from its sentence starts), on the device."""
        sentence_lengths = np.diff(np.append(starts, len(kept_ids)))
        kept_sentence = np.repeat(np.arange(len(starts), dtype=np.int32), sentence_lengths)
        return (torch.from_numpy(kept_ids.astype(np.int64)).to(self.device),
                torch.from_numpy(kept_sentence).to(self.device))

    def subsample(self, seed, epoch):
        """This epoch's kept ids and the sentence of each; reading their count is one host sync an epoch."""
        draw = torch.rand(len(self.token_ids), generator=self.seeded(seed, epoch), device=self.device)
        kept = draw < self.keep_prob[self.token_ids.long()]
        return self.token_ids[kept].long(), self.sentence_of_token[kept]

    def windows(self, kept_ids, kept_sentence, lo, n_centers, generator):
        """Windows of the centers kept_ids[lo:lo+n]: (context_ids C x 2W, weight C x 2W, out_ids C x (K+1)).

        out_ids holds each center then its K negatives. Each center draws its reach b in 1..W
        (word2vec's shrunk window); a context is real (weight 1, else 0) when it is at most b
        away, inside the array and in the center's sentence. Other slots hold the center's own
        id, so every id is valid and their zero-weighted updates add nothing.
        """
        pos = torch.arange(lo, lo + n_centers, device=self.device)
        reach = torch.randint(1, self.window + 1, (n_centers, 1), generator=generator, device=self.device)
        ctx_pos = pos[:, None] + self.offsets
        inside = (ctx_pos >= 0) & (ctx_pos < len(kept_ids))
        ctx_pos = torch.where(inside, ctx_pos, pos[:, None])
        real = inside & (self.offsets.abs() <= reach) & (kept_sentence[ctx_pos] == kept_sentence[pos][:, None])
        neg_ids = self.negatives((n_centers, self.neg_count), generator)
        out_ids = torch.cat([kept_ids[pos][:, None], neg_ids], dim=1)
        return kept_ids[ctx_pos], real.float(), out_ids

    def negatives(self, shape, generator):
        """Draws from the alias table, as NegativeSampler.sample does on the host."""
        slot = torch.randint(0, len(self.accept), shape, generator=generator, device=self.device)
        take_slot = torch.rand(shape, generator=generator, device=self.device) < self.accept[slot]
        return torch.where(take_slot, slot, self.alias[slot])
