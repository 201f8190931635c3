import numpy as np
import pytest
from gensim.models import KeyedVectors

import export


def vectors_with_edge_values(seed=0):
    rng = np.random.default_rng(seed)
    vectors = (rng.standard_normal((3000, 7)) * [[0.01, 0.1, 1, 10, 1000, 1e-7, 5e9]]).astype(np.float32)
    vectors[0] = [0.0, -0.0, 0.0000005, -0.0000005, 0.9999995, -1.0, 123456.75]  # rounding at the 6th decimal
    return vectors


def test_format_rows_writes_what_percent_f_writes():
    vectors = vectors_with_edge_values()  # more rows than a block
    rows = list(export.formatted_rows(vectors))
    assert len(rows) == len(vectors)
    for row, text in zip(vectors, rows):
        assert text.decode() == "".join(" %f" % value for value in row.astype(np.float64))
    largest = np.array([[3.4028235e38, -1e20, 12345678912.5]], dtype=np.float32)
    values = [float(v) for v in next(export.formatted_rows(largest, "\t")).decode().split("\t")[1:]]
    np.testing.assert_allclose(values, largest[0], rtol=1e-15)


@pytest.mark.parametrize("name", ["v.txt", "v.bin"])
def test_word2vec_files_round_trip_through_gensim(tmp_path, name):
    words = [f"w{i}" for i in range(2999)] + ["naïve"]
    vectors = vectors_with_edge_values(1)
    path = tmp_path / name
    export.write_word2vec(path, words, vectors)
    keyed = KeyedVectors.load_word2vec_format(str(path), binary=name.endswith(".bin"))
    assert keyed.index_to_key == words
    if name.endswith(".bin"):
        assert np.array_equal(keyed.vectors, vectors)
    else:
        np.testing.assert_allclose(keyed.vectors, vectors, rtol=1e-6, atol=5e-7)


def test_projector_snapshot_is_laid_out_as_tensorboardx_lays_it_out(tmp_path):
    words = ["the", "tab\tword", "whale"]
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    for step in (1, 5):
        export.write_projector_snapshot(tmp_path, words, vectors * step, step)
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count("embeddings {") == 2
    assert 'tensor_name: "embeddings:00005"' in config
    assert 'tensor_path: "00005/embeddings/tensors.tsv"' in config
    assert 'metadata_path: "00005/embeddings/metadata.tsv"' in config
    folder = tmp_path / "00005" / "embeddings"
    assert (folder / "metadata.tsv").read_text().splitlines() == ["the", "tab word", "whale"]
    np.testing.assert_allclose(np.loadtxt(folder / "tensors.tsv", delimiter="\t"), vectors * 5, atol=5e-7)


def test_projector_files_hold_every_word_and_vector(tmp_path):
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(40)]
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    vectors_path, metadata_path = export.write_projector_files(words, vectors, tmp_path / "proj")
    assert metadata_path.read_text().splitlines() == words
    loaded = np.loadtxt(vectors_path, delimiter="\t")
    np.testing.assert_allclose(loaded, vectors, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_value_without_digits_is_refused_and_nothing_is_written(tmp_path, bad):
    vectors = np.ones((3, 4), dtype=np.float32)
    vectors[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        export.write_word2vec(tmp_path / "v.txt", ["a", "b", "c"], vectors)
    assert list(tmp_path.iterdir()) == []
