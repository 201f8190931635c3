import bz2
import collections
import gzip
import json
import lzma
import subprocess
import sys
import zipfile

import codecs
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import data

TEXT = """<p>The cat sat on the mat.</p> The dog didn't sit!  Did the cat run?

A cat and a dog. The END
"""


def write_corpus(tmp_path, text=TEXT, name="corpus.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path, path, **kw):
    kw.setdefault("min_count", 1)
    return data.load_corpus(str(path), data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), **kw)


def decode(corpus):
    """Sentences of the encoded corpus, as words."""
    bounds = list(corpus.sentence_starts) + [len(corpus.token_ids)]
    return [[corpus.words[i] for i in corpus.token_ids[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def test_normalisation_and_sentences():
    assert data.sentences(TEXT) == [
        ["the", "cat", "sat", "on", "the", "mat"], ["the", "dog", "didn't", "sit"], ["did", "the", "cat", "run"],
        ["a", "cat", "and", "a", "dog"], ["the", "end"]]


@pytest.mark.parametrize("text, words", [
    ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # vowel signs and virama are marks inside the word
    ("שָׁלוֹם עֲלֵיכֶם", ["שָׁלוֹם", "עֲלֵיכֶם"]),  # pointed Hebrew
    ("İstanbul'da İSTANBUL istanbul ılık", ["istanbul'da", "istanbul", "istanbul", "ılık"]),  # Turkish dotted I
    ("I\u0307stanbul", ["istanbul"]),  # the same capital, decomposed
    ("cafe\u0301 Cafe\u0301 café", ["café", "café", "café"]),  # decomposed Latin is the composed word
    ("J\u030c", ["\u01f0"]),  # lowercase then NFC: j + caron composes, J + caron has no precomposed form
    ("x² ½ 3rd \u0301a", ["x²", "rd", "a"]),  # a word starts with a letter; ² goes on it, as before
    ("\U0001d400bc \U00010428\U0001d167x a'\U0001f600b", ["\U0001d400bc", "\U00010428\U0001d167x", "a", "b"]),
])
def test_words_are_a_letter_then_letters_and_marks_in_every_script(text, words):
    import unicodedata
    assert data.sentences(text) == [words]
    assert all(unicodedata.is_normalized("NFC", word) for word in words)


def test_word_classes_match_unicode_categories():
    import unicodedata
    exact = data._word_token_re(sys.maxunicode)
    letter_start = [chr(c) for c in range(0, sys.maxunicode + 1, 7)
                    if exact.fullmatch(chr(c) * 2) and chr(c) not in ".!?"]
    assert letter_start and all(unicodedata.category(char)[0] == "L" for char in letter_start)
    assert sum(unicodedata.category(chr(c))[0] == "L" for c in range(0, sys.maxunicode + 1, 7)) == len(letter_start)
    marks = [chr(c) for c in range(0x300, 0x2000) if unicodedata.category(chr(c))[0] == "M"]
    assert all(exact.fullmatch("a" + mark) and not exact.fullmatch(mark + "a") for mark in marks)


def test_corpus_words_in_other_scripts(tmp_path):
    text = "हिन्दी भाषा। हिन्दी\nשָׁלוֹם cafe\u0301 café İstanbul istanbul\n"
    corpus = load(tmp_path, write_corpus(tmp_path, text))
    assert dict(zip(corpus.words, corpus.counts.tolist())) == {"café": 2, "istanbul": 2, "हिन्दी": 2, "भाषा": 1,
                                                               "שָׁלוֹם": 1}


def test_vocabulary_sorted_by_count_and_encoding_round_trip(tmp_path):
    corpus = load(tmp_path, write_corpus(tmp_path))
    counts = collections.Counter(w for s in data.sentences(TEXT) for w in s)
    assert corpus.words == sorted(counts, key=lambda w: (-counts[w], w))
    assert corpus.counts.tolist() == [counts[w] for w in corpus.words]
    assert corpus.token_ids.dtype == np.uint32
    assert decode(corpus) == data.sentences(TEXT)


def test_min_count_drops_rare_words_but_keeps_sentences(tmp_path):
    corpus = load(tmp_path, write_corpus(tmp_path), min_count=2)
    counts = collections.Counter(w for s in data.sentences(TEXT) for w in s)
    assert set(corpus.words) == {w for w, c in counts.items() if c >= 2}
    expected = [[w for w in s if counts[w] >= 2] for s in data.sentences(TEXT)]
    assert decode(corpus) == [s for s in expected if s]


def test_folder_dataset_reads_every_txt_file_with_a_boundary_between_files(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("one two three")
    (folder / "b.txt").write_text("four five")
    (folder / "skip.md").write_text("six")
    corpus = load(tmp_path, folder)
    assert decode(corpus) == [["one", "two", "three"], ["four", "five"]]


def test_dataset_resolved_in_data_dir_and_errors(tmp_path):
    write_corpus(tmp_path, name="hp.txt")
    assert data.resolve_dataset("hp.txt", tmp_path).files == [tmp_path / "hp.txt"]
    with pytest.raises(data.DatasetError, match="not found"):
        data.resolve_dataset("missing.txt", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="no .txt files"):
        data.resolve_dataset(str(tmp_path / "empty"), tmp_path)


def test_default_dataset_prefers_harry_potter_then_gutenberg(tmp_path, monkeypatch):
    write_corpus(tmp_path, name="harry_potter.txt")
    assert data.resolve_dataset(None, tmp_path).files == [tmp_path / "harry_potter.txt"]
    monkeypatch.setattr(data, "_nltk_gutenberg_files", lambda download=True: None)
    assert "lee" in data.resolve_dataset(None, tmp_path / "nothing").name


def test_stopwords_and_lemmas(tmp_path):
    corpus = load(tmp_path, write_corpus(tmp_path, "The dogs and the cats ran. Dogs bark."),
                  remove_stopwords=True, lemmatize=True)
    assert decode(corpus) == [["dog", "cat", "ran"], ["dog", "bark"]]


def test_cache_reused_rebuilt_on_change_and_on_damage(tmp_path, monkeypatch):
    path = write_corpus(tmp_path)
    first = load(tmp_path, path)
    built = []
    real_build = data.build_arrays
    monkeypatch.setattr(data, "build_arrays", lambda *a, **k: built.append(1) or real_build(*a, **k))
    again = load(tmp_path, path)
    assert built == [] and np.array_equal(again.token_ids, first.token_ids)
    load(tmp_path, path, min_count=2)  # another option: another cache entry
    assert built == [1]
    path.write_text(TEXT + " more words here.")  # changed corpus
    changed = load(tmp_path, path)
    assert built == [1, 1] and changed.hash != first.hash
    # damage the arrays: rebuilt with a warning, never trusted
    arrays = changed.cache_file("arrays.npz")
    arrays.write_bytes(arrays.read_bytes()[:-50])
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = load(tmp_path, path)
    assert built == [1, 1, 1] and np.array_equal(rebuilt.token_ids, changed.token_ids)
    # an older cache format is rebuilt too
    meta = changed.cache_file("meta.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 0}))
    with pytest.warns(UserWarning, match="damaged"):
        load(tmp_path, path)
    assert built == [1, 1, 1, 1]


def test_invalid_utf8_is_replaced_with_a_warning_on_every_load(tmp_path, monkeypatch):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good words \xff\xfe here. good words")
    with pytest.warns(UserWarning, match="bad.txt: 2 byte.* not valid UTF-8"):
        corpus = load(tmp_path, path)
    assert "good" in corpus.words
    monkeypatch.setattr(data, "build_arrays", None)  # the second load must be a cache hit
    with pytest.warns(UserWarning, match="bad.txt: 2 byte.* not valid UTF-8"):
        again = load(tmp_path, path)
    assert again.words == corpus.words


ENCODED = {
    "utf-16 with BOM": lambda text: text.encode("utf-16"),
    "utf-16-be with BOM": lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
    "utf-16-le without BOM": lambda text: text.encode("utf-16-le"),
    "utf-16-be without BOM": lambda text: text.encode("utf-16-be"),
    "utf-32 with BOM": lambda text: text.encode("utf-32"),
    "utf-32-le without BOM": lambda text: text.encode("utf-32-le"),
    "utf-32-be without BOM": lambda text: text.encode("utf-32-be"),
    "utf-8 with BOM": lambda text: text.encode("utf-8-sig"),
    "gzip": lambda text: gzip.compress(text.encode()),
    "bzip2": lambda text: bz2.compress(text.encode()),
    "xz": lambda text: lzma.compress(text.encode()),
    "gzip of utf-16": lambda text: gzip.compress(text.encode("utf-16")),
}


@pytest.mark.parametrize("encode", ENCODED.values(), ids=ENCODED.keys())
def test_utf16_utf32_and_compressed_files_read_as_their_text(tmp_path, monkeypatch, encode):
    text = TEXT + "Le café naïve. Ünïcödé wörds, 日本語 too.\n" * 3
    expected = load(tmp_path, write_corpus(tmp_path, text, name="plain.txt"))
    path = tmp_path / "encoded"
    path.write_bytes(encode(text))
    monkeypatch.setattr(data, "READ_BLOCK_BYTES", 64)  # characters and compressed blocks cut across reads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every byte decoded: no warning
        corpus = load(tmp_path, path)
    assert corpus.words == expected.words and "café" in corpus.words and "日本語" in corpus.words
    assert np.array_equal(corpus.token_ids, expected.token_ids)
    assert np.array_equal(corpus.sentence_starts, expected.sentence_starts)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_a_line_longer_than_a_read_block_is_cut_between_characters(tmp_path, monkeypatch, encoding):
    line = "漢字仮名交じり文ですー" * 40 + "ü" * 30  # no space, no newline; 3- and 2-byte characters
    path = tmp_path / "long.txt"
    path.write_bytes(line.encode(encoding))
    monkeypatch.setattr(data, "READ_BLOCK_BYTES", 64)  # 64 is no multiple of 3: reads end inside characters
    compression, found = data._file_format(path)
    blocks = list(data._read_blocks(path, compression, found))
    assert len(blocks) > 10 and b"".join(blocks).decode("utf-8") == line
    assert all(block.decode("utf-8") for block in blocks)  # each block whole characters: strict decode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "bytes were not valid UTF-8" warning
        corpus = load(tmp_path, path)
    assert corpus.decode_warning is None and "".join(decode(corpus)[0]) == line


def test_undecodable_utf16_bytes_are_counted_and_replaced(tmp_path):
    path = tmp_path / "broken16.txt"
    # a lone high surrogate (2 bytes) mid-text and an odd last byte: 3 bytes that are not UTF-16
    path.write_bytes("good words ".encode("utf-16") + b"\x00\xd8" + " here. good".encode("utf-16-le") + b"x")
    with pytest.warns(UserWarning, match="3 byte.* not valid UTF-16"):
        corpus = load(tmp_path, path)
    assert corpus.words == ["good", "here", "words"]


def test_archives_binary_and_damaged_compressed_files_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "book.zip", "w") as archive:
        archive.writestr("book.txt", TEXT)
    with pytest.raises(data.DatasetError, match="book.zip is a zip archive, not text: extract it"):
        load(tmp_path, tmp_path / "book.zip")
    binary = tmp_path / "image.txt"
    binary.write_bytes(np.random.default_rng(0).integers(0, 4, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(data.DatasetError, match="image.txt does not look like text: .*NUL"):
        load(tmp_path, binary)
    truncated = tmp_path / "cut.gz"
    whole = gzip.compress(TEXT.encode() * 50)
    truncated.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(data.DatasetError, match="cannot decompress .*cut.gz \\(gzip\\)"):
        load(tmp_path, truncated)
    noise = tmp_path / "noise.txt"
    noise.write_bytes(np.random.default_rng(0).integers(1, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(data.DatasetError, match="noise.txt is not UTF-8 text: .*iconv"):
        load(tmp_path, noise)
    russian = tmp_path / "cp1251.txt"
    russian.write_bytes("Кошка сидит на ковре. Собака бежит домой.\n".encode("cp1251") * 20)
    with pytest.raises(data.DatasetError, match="cp1251.txt is not UTF-8 text: .*iconv"):
        load(tmp_path, russian)

    stray_nul = write_corpus(tmp_path, "a cat\x00 and a dog. " * 20, name="stray.txt")  # still UTF-8 text
    assert load(tmp_path, stray_nul).words == ["a", "and", "cat", "dog"]
    latin1 = tmp_path / "latin1.txt"  # a few bad bytes in text: replaced with a warning, as before
    latin1.write_bytes("Le café est très bon. Il fait beau.\n".encode("latin-1") * 20)
    with pytest.warns(UserWarning, match="40 byte.* not valid UTF-8"):
        assert "bon" in load(tmp_path, latin1).words


def test_no_words_is_an_error(tmp_path):
    with pytest.raises(data.DatasetError, match="no words"):
        load(tmp_path, write_corpus(tmp_path, "123 ... !!! 42"))
    with pytest.raises(data.DatasetError, match="lower --remove-th"):
        load(tmp_path, write_corpus(tmp_path, "alpha beta", name="b.txt"), min_count=5)


def test_long_sentences_are_split():
    starts = data.split_long_sentences(np.array([0, 5]), 30, max_len=10)
    assert starts.tolist() == [0, 5, 15, 25]


def test_keep_probability_formula_and_empirical_rate():
    counts = np.array([1000, 100, 10, 1])
    t = 0.01
    freq = counts / counts.sum()
    expected = np.minimum(1, (np.sqrt(freq / t) + 1) * t / freq)
    keep = data.keep_probabilities(counts, t)
    np.testing.assert_allclose(keep, expected, rtol=1e-6)
    assert keep[-1] == 1.0 and keep[0] < 0.2
    token_ids = np.repeat(np.arange(4), counts * 100).astype(np.uint32)
    kept, _ = data.subsample(token_ids, np.array([0]), keep, np.random.default_rng(0), block=1000)
    rates = np.bincount(kept, minlength=4) / (counts * 100)
    np.testing.assert_allclose(rates, expected, atol=0.01)


def test_subsample_keeps_sentence_starts_consistent():
    rng = np.random.default_rng(3)
    token_ids = rng.integers(0, 5, size=5000).astype(np.uint32)
    starts = np.sort(rng.choice(np.arange(1, 5000), 300, replace=False))
    starts = np.concatenate([[0], starts])
    keep = np.array([0.1, 0.5, 1.0, 0.3, 0.9], dtype=np.float32)
    kept, kept_starts = data.subsample(token_ids, starts, keep, np.random.default_rng(1), block=777)
    # reference: the same draws, sentence by sentence
    ref_rng = np.random.default_rng(1)
    draws = np.concatenate([ref_rng.random(min(777, 5000 - lo), dtype=np.float32) for lo in range(0, 5000, 777)])
    mask = draws < keep[token_ids]
    bounds = list(starts) + [5000]
    sentences = [token_ids[a:b][mask[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
    sentences = [s for s in sentences if len(s)]
    assert np.array_equal(kept, np.concatenate(sentences))
    assert kept_starts.tolist() == np.cumsum([0] + [len(s) for s in sentences[:-1]]).tolist()


def test_window_sizes_are_uniform_and_pairs_stay_in_sentence():
    kept = np.arange(100000, dtype=np.uint32)  # id = position, so pairs reveal offsets
    starts = np.arange(0, 100000, 50)
    center, context = data.window_pairs(kept, starts, 0, 100000, 4, np.random.default_rng(0))
    assert np.all(center // 50 == context // 50)  # never across a sentence start
    offsets = context - center
    assert set(np.unique(np.abs(offsets))) == {1, 2, 3, 4}
    # centers far from sentence ends: the reach is max |offset|, uniform on 1..4
    inner = (center % 50 >= 4) & (center % 50 < 46)
    reach = np.zeros(100000, dtype=np.int64)
    np.maximum.at(reach, center[inner], np.abs(offsets[inner]))
    observed = np.bincount(reach[reach > 0], minlength=5)[1:]
    assert stats.chisquare(observed).pvalue > 0.001
    # and each center pairs with every word within its reach on both sides
    pairs_per_center = np.bincount(center[inner], minlength=100000)
    assert np.array_equal(pairs_per_center[reach > 0], 2 * reach[reach > 0])


def test_sentence_blocks_are_shuffled_whole_reproducibly_and_anew_each_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 400)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    kept = rng.integers(0, 1000, lengths.sum()).astype(np.uint32)

    def sentences(ids, bounds):
        ends = np.append(bounds[1:], len(ids))
        return [tuple(ids[a:b]) for a, b in zip(bounds, ends)]
    ids, new_starts = data.shuffle_sentence_blocks(kept, starts, 3, 0)
    assert sorted(sentences(ids, new_starts)) == sorted(sentences(kept, starts))  # every sentence, whole, once
    assert not np.array_equal(ids, kept)
    again, again_starts = data.shuffle_sentence_blocks(kept, starts, 3, 0)
    assert np.array_equal(again, ids) and np.array_equal(again_starts, new_starts)
    assert not np.array_equal(data.shuffle_sentence_blocks(kept, starts, 3, 1)[0], ids)
    empty, empty_starts = data.shuffle_sentence_blocks(kept[:0], starts[:0], 3, 0)
    assert len(empty) == 0 and list(empty_starts) == [0]
    # a last sentence longer than several blocks: no block starts inside it
    long_last = np.append(starts, len(kept))
    tail = np.concatenate([kept, rng.integers(0, 1000, 5 * data.SHUFFLE_BLOCK_TOKENS).astype(np.uint32)])
    ids, new_starts = data.shuffle_sentence_blocks(tail, long_last, 3, 0)
    assert sorted(sentences(ids, new_starts)) == sorted(sentences(tail, long_last))


def test_negatives_follow_unigram_power():
    counts = np.array([500, 200, 100, 50, 20, 10, 5, 1])
    sampler = data.NegativeSampler(counts, 0.75)
    draws = sampler.sample((200000,), np.random.default_rng(42))
    expected = counts ** 0.75 / (counts ** 0.75).sum()
    result = stats.chisquare(np.bincount(draws, minlength=8), expected * len(draws))
    assert result.pvalue > 0.001
    # and the test has power: plain unigram frequencies are rejected
    wrong = stats.chisquare(np.bincount(draws, minlength=8), counts / counts.sum() * len(draws))
    assert wrong.pvalue < 1e-6


def test_parallel_tokenising_equals_serial(tmp_path, monkeypatch):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(TEXT * (i + 1) + f" book{i} café. ")
    monkeypatch.setattr(data, "READ_BLOCK_BYTES", 64)  # many blocks a file
    source = data.resolve_dataset(str(folder))
    serial = data.build_arrays(source, min_count=1, workers=1)
    parallel = data.build_arrays(source, min_count=1, workers=2)
    assert serial[0] == parallel[0]
    for a, b in zip(serial[1:], parallel[1:]):
        assert np.array_equal(a, b)


def window_case(tmp_path, window=3, neg=4):
    corpus = load(tmp_path, write_corpus(tmp_path, TEXT * 5))
    sampler = data.NegativeSampler(corpus.counts)
    keep = data.keep_probabilities(corpus.counts, 0.05)
    return corpus, data.WindowBatches(corpus, keep, sampler, window, neg, "cpu")


def test_window_batches_mask_exactly_the_pairs_of_the_drawn_windows(tmp_path):
    corpus, batches = window_case(tmp_path)
    kept_ids, kept_sentence = batches.subsample(seed=3, epoch=0)
    assert 0 < len(kept_ids) < len(corpus.token_ids)
    context_ids, weight, out_ids = batches.windows(kept_ids, kept_sentence, 0, len(kept_ids), batches.seeded(3, 0, 0))
    assert torch.equal(out_ids[:, 0], kept_ids) and out_ids.shape == (len(kept_ids), 5)  # center, 4 negatives
    valid = weight.bool()
    offsets = [-3, -2, -1, 1, 2, 3]
    for pos in range(len(kept_ids)):
        real = [pos + off for off, ok in zip(offsets, valid[pos].tolist()) if ok]
        # a window is every word within the reach drawn for this center, in its sentence: symmetric, contiguous
        same = [p for p in range(pos - 3, pos + 4) if p != pos and 0 <= p < len(kept_ids)
                and kept_sentence[p] == kept_sentence[pos]]
        reach = max([abs(p - pos) for p in real], default=0)
        assert real == [p for p in same if abs(p - pos) <= reach]
        assert context_ids[pos][valid[pos]].tolist() == kept_ids[real].tolist()
    # and reaches of every size occur
    assert {max([abs(o) for o, ok in zip(offsets, row) if ok], default=0) for row in valid.tolist()} >= {1, 2, 3}


def test_window_batches_are_reproducible_and_kept_tokens_follow_keep_probabilities(tmp_path):
    corpus, batches = window_case(tmp_path)
    first, second = batches.subsample(7, 1), batches.subsample(7, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(batches.subsample(7, 2)[0], first[0]) or len(first[0]) == 0
    keep = data.keep_probabilities(corpus.counts, 0.05)
    kept = sum(len(batches.subsample(seed, 0)[0]) for seed in range(200)) / 200
    assert abs(kept - keep[corpus.token_ids].sum()) < 0.03 * len(corpus.token_ids)


def test_window_batches_negatives_follow_the_unigram_power(tmp_path):
    corpus, batches = window_case(tmp_path)
    draws = batches.negatives((200_000,), batches.seeded(1, 0)).numpy()
    frequencies = np.bincount(draws, minlength=len(corpus.words)) / len(draws)
    weights = corpus.counts.astype(np.float64) ** 0.75
    assert np.abs(frequencies - weights / weights.sum()).max() < 0.005


def test_epoch_shares_cover_the_epoch_once_in_equal_parts_and_change_each_epoch():
    rng = np.random.default_rng(0)
    starts = np.unique(np.concatenate([[0], rng.integers(1, 5000, 600)]))
    kept = rng.integers(0, 1000, 5000).astype(np.uint32)
    for world_size in (1, 2, 3):
        parts = [data.epoch_share(kept, starts, 7, 0, r, world_size, shuffled=True) for r in range(world_size)]
        assert max(len(p[0]) for p in parts) - min(len(p[0]) for p in parts) <= 1
        assert np.array_equal(np.sort(np.concatenate([p[0] for p in parts])), np.sort(kept))
        for ids, local_starts in parts:
            assert local_starts[0] == 0 and np.all(np.diff(local_starts) > 0) and local_starts[-1] < len(ids)
    # sentences stay whole: every sentence of the permuted stream is a sentence of the original
    ids, local_starts = data.epoch_share(kept, starts, 7, 0, 0, 1, shuffled=True)
    originals = {kept[a:b].tobytes() for a, b in zip(starts, np.append(starts[1:], len(kept)))}
    bounds = np.append(local_starts, len(ids))
    assert all(ids[a:b].tobytes() in originals for a, b in zip(bounds[:-1], bounds[1:]))
    assert not np.array_equal(data.epoch_share(kept, starts, 7, 1, 0, 2, shuffled=True)[0],
                              data.epoch_share(kept, starts, 7, 0, 0, 2, shuffled=True)[0])


def test_cached_array_computes_once_and_recomputes_what_has_the_wrong_shape_or_values(tmp_path):
    import scipy.sparse
    sparse = scipy.sparse.random(6, 6, density=0.5, format="csr", dtype=np.float32, random_state=0)
    dense = np.arange(12, dtype=np.float64).reshape(6, 2)
    computed, messages = [], []

    def cached(name, value, shape):
        return data.cached_array(tmp_path / name, lambda: computed.append(name) or value, shape, messages.append)

    assert (cached("m.npz", sparse, (6, 6)) != sparse).nnz == 0 and computed == ["m.npz"]
    assert np.array_equal(cached("e.npy", dense, (6, 2)), dense) and computed == ["m.npz", "e.npy"]
    assert (cached("m.npz", sparse, (6, 6)) != sparse).nnz == 0
    assert np.array_equal(cached("e.npy", dense, (6, 2)), dense)
    assert computed == ["m.npz", "e.npy"] and not messages  # both read back from the cache

    with open(tmp_path / "m.npz", "wb") as f:
        scipy.sparse.save_npz(f, scipy.sparse.eye(5, format="csr"))
    wrong_dense = {"shape": np.zeros((6, 3)), "NaN": np.where(dense == 3, np.nan, dense),
                   "integers": dense.astype(np.int64)}
    assert (cached("m.npz", sparse, (6, 6)) != sparse).nnz == 0
    for name, wrong in wrong_dense.items():
        np.save(tmp_path / "e.npy", wrong)
        assert np.array_equal(cached("e.npy", dense, (6, 2)), dense), name
    assert computed == ["m.npz", "e.npy"] + ["m.npz"] + ["e.npy"] * 3
    assert len(messages) == 4 and all("damaged" in m and "recomputing" in m for m in messages)
    assert "(5, 5), expected (6, 6)" in messages[0] and "(6, 3), expected (6, 2)" in messages[1]
    assert np.array_equal(np.load(tmp_path / "e.npy"), dense)  # the recomputed array replaced the bad one


def test_load_corpus_removes_stale_temp_files_of_the_cache(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    path = write_corpus(tmp_path)
    first = load(tmp_path, path)
    stale = first.cache_file("arrays.npz").with_name(f".{first.cache_file('arrays.npz').name}.tmp{finished.pid}")
    stale.write_bytes(b"half an npz")
    assert load(tmp_path, path).words == first.words
    assert not stale.exists()
