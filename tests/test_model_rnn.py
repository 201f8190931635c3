"""RNN-SGNS: character vocabulary, the spelling encoder, per-word plus spelling vectors, trainer runs."""
import json
import signal

import numpy as np
import pytest
import torch

import trainer
from model import (PAD_CHAR, UNKNOWN_CHAR, CharVocab, RNNSGNS, _sgns_loss, build_model, char_grams,
                   grams_of_words, model_from_checkpoint)
from tables import parameter_count
from reference import reference_loss
from test_trainer import stop_after

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = ["the", "cat", "cats", "dog", "dogs", "walk", "walked", "walking", "don't", "a", "café", "extraordinarily"]


def small_model(seed=0, **sizes):
    torch.manual_seed(seed)
    sizes = {"char_embed_size": 6, "hidden_size": 8, **sizes}
    return RNNSGNS(WORDS, 5, **sizes)


def random_batch(seed, batch=6, neg=3, vocab=len(WORDS)):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch,), generator=gen), torch.randint(0, vocab, (batch,), generator=gen),
            torch.randint(0, vocab, (batch, neg), generator=gen))


def test_char_vocab_reserves_padding_and_unknown():
    vocab = CharVocab(WORDS)
    assert vocab.chars == sorted(set("".join(WORDS)))  # every letter and the apostrophe seen, nothing else
    assert len(vocab) == len(vocab.chars) + 2
    char_ids, lengths = vocab.encode(["cat", "dogs", "", "Cat", "c\u2019t", "cωt"])
    assert lengths.tolist() == [3, 4, 1, 3, 3, 3]
    c, a, t = (vocab.index[ch] for ch in "cat")
    assert char_ids[0].tolist() == [c, a, t, PAD_CHAR]
    assert char_ids[2].tolist() == [UNKNOWN_CHAR, PAD_CHAR, PAD_CHAR, PAD_CHAR]  # empty word: one unknown char
    assert char_ids[3].tolist() == char_ids[0].tolist()  # normalised as the corpus is: lowercase
    assert char_ids[4, 1] == vocab.index["'"]  # curly apostrophe as in the corpus
    assert char_ids[5].tolist() == [c, UNKNOWN_CHAR, t, PAD_CHAR]
    assert min(vocab.index.values()) == 2
    assert CharVocab(list(reversed(WORDS))).index == vocab.index  # same alphabet whatever the word order


def test_char_grams_are_fasttexts_without_the_whole_word():
    assert char_grams("cat") == ["<ca", "cat", "at>", "<cat", "cat>"]  # "<cat>" is the word's own vector
    assert char_grams("Cat") == char_grams("cat")  # normalised as the corpus is
    assert char_grams("banana").count("ana") == 1  # each n-gram once, however often the word has it
    assert max(map(len, char_grams("extraordinarily"))) == 6 and min(map(len, char_grams("extraordinarily"))) == 3
    assert char_grams("a") == [] and char_grams("of") == ["<of", "of>"]


def test_each_vocabulary_word_reads_the_rows_of_its_grams():
    model = small_model()
    rows = {gram: i for i, gram in enumerate(model.grams)}
    assert list(model.grams) == sorted({g for w in WORDS for g in char_grams(w)})  # every n-gram has a row
    ids = torch.tensor([WORDS.index("walked"), WORDS.index("a"), WORDS.index("cats")])
    gram_ids, counts = model.grams_of(ids)
    expected = [rows[g] for w in ("walked", "a", "cats") for g in char_grams(w)]
    assert gram_ids.tolist() == expected and counts.tolist() == [len(char_grams(w)) for w in ("walked", "a", "cats")]
    means = model.gram_mean(gram_ids, counts)
    assert torch.allclose(means[0], model.gram_embed.weight[expected[:counts[0]]].mean(0))
    assert torch.equal(means[1], torch.zeros(5))  # a word without n-grams: its vector and its spelling alone


def test_past_the_row_cap_the_most_shared_grams_keep_their_rows(monkeypatch):
    import model as models
    monkeypatch.setattr(models, "GRAM_ROWS_MAX", 4)
    model = small_model()
    sharers = {g: sum(g in char_grams(w) for w in WORDS) for g in {g for w in WORDS for g in char_grams(w)}}
    assert len(model.grams) == 4 and list(model.grams) == sorted(model.grams)
    assert min(sharers[g] for g in model.grams) >= max(sharers[g] for g in sharers if g not in model.grams)
    gram_ids, counts = model.grams_of(torch.tensor([WORDS.index("cats")]))
    assert [model.grams[i] for i in gram_ids.tolist()] == [g for g in char_grams("cats") if g in model.grams]
    assert counts.item() == len(gram_ids) > 0


def test_an_unseen_word_reads_the_rows_of_the_grams_the_vocabulary_has():
    model = small_model(seed=1)
    rows = {gram: i for i, gram in enumerate(model.grams)}
    known = [rows[g] for g in char_grams("catwalking") if g in rows]  # "<cat", "walk", "king>"... not "twal"
    assert 0 < len(known) < len(char_grams("catwalking"))
    spelled = model._spell_all(*model.char_vocab.encode(["catwalking"]), 8)[0]
    expected = spelled + model.gram_embed.weight[known].mean(0)
    assert torch.allclose(model.embed_words(["catwalking"])[0], expected, atol=1e-6)


@pytest.mark.parametrize("sizes", [{}, {"bidirectional": True, "num_layers": 2}])
def test_vector_is_the_same_alone_or_batched_with_longer_and_shorter_words(sizes):
    model = small_model(**sizes).eval()
    alone = model.embed_words(["cats"])[0]
    batched = model.embed_words(["a", "extraordinarily", "cats", "", "dog"])
    assert torch.allclose(batched[2], alone, atol=1e-6)
    assert not torch.allclose(batched[1], alone, atol=1e-3)  # different words do get different vectors
    # both ways of running the LSTM (one packed call for CUDA, one call per length on the CPU) agree
    packed = model.encoder(model.word_chars, model.word_lengths, packed=True)
    by_length = model.encoder(model.word_chars, model.word_lengths, packed=False)
    assert torch.allclose(packed, by_length, atol=1e-6)
    # the vocabulary's vectors are each word encoded alone
    table = model.embeddings()
    for i, word in enumerate(WORDS):
        assert torch.allclose(table[i], model.embed_words([word])[0], atol=1e-6)


def test_unseen_words_and_characters_get_finite_vectors():
    model = small_model()
    queries = ["catwalks", "ωμέγα", "", "x" * 60, "Dogs", "naïveté"]
    vectors = model.embed_words(queries)
    assert vectors.shape == (len(queries), 5) and torch.isfinite(vectors).all()
    assert not torch.allclose(vectors[0], vectors[1])
    assert model.embed_words([]).shape == (0, 5)
    assert model.training  # embedding in eval mode leaves the training mode as it was


def test_dropout_only_in_training():
    model = small_model(dropout=0.5, num_layers=2)
    with torch.no_grad():
        model.out_embed.weight.normal_()  # outputs start at zero: every loss would be log 2 per term
    center, context, negs = random_batch(1)
    assert model(center, context, negs).item() != model(center, context, negs).item()
    first, second = model.embeddings(), model.embeddings()
    assert torch.equal(first, second)


def test_unseen_word_gets_its_spelling_alone_deterministically():
    model = small_model(seed=2)
    with torch.no_grad():
        model.word_embed.weight.normal_()  # a per-word part far from zero, as after training
    spelled = model._spell_all(*model.char_vocab.encode(["cats", "catz"]), 8)
    spelled += model.gram_mean(*model._gram_rows(*grams_of_words(["cats", "catz"]))).detach()
    vectors = model.embed_words(["catz", "cats", "Catz", "catz"])
    assert torch.equal(vectors[0], spelled[1]) and torch.equal(vectors[0], vectors[3])
    assert torch.equal(vectors[2], vectors[0])  # normalised as the corpus is
    # a word of the vocabulary: its per-word part plus its spelling, as embeddings() gives it
    cats = WORDS.index("cats")
    assert torch.allclose(vectors[1], spelled[0] + model.word_embed.weight[cats], atol=1e-6)
    assert torch.allclose(vectors[1], model.embeddings()[cats], atol=1e-6)
    # another model with the same weights (a checkpoint rebuilt) gives the same bits
    twin = small_model(seed=9)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin.embed_words(["catz", "cats"]), model.embed_words(["catz", "cats"]))


@pytest.mark.parametrize("sizes", [{}, {"bidirectional": True, "num_layers": 2, "mlp_size": 7, "cell": "gru"}])
def test_loss_and_gradients_equal_the_per_occurrence_reference(sizes):
    """Each distinct word encoded once gives the loss and gradients of encoding every occurrence."""
    model = small_model(seed=3, **sizes).double()
    with torch.no_grad():
        model.out_embed.weight.normal_()  # outputs start at zero, which would leave the inputs no gradient
    center, context, negs = random_batch(4, batch=10, neg=4)
    center[1] = center[0]
    loss, grads = loss_and_grads(model, lambda: model(center, context, negs))

    def per_occurrence():
        grams = [[model.grams.tolist().index(g) for g in char_grams(WORDS[i])] for i in center.tolist()]
        gram_means = torch.stack([model.gram_embed.weight[rows].mean(0) if rows else model.gram_embed.weight[0] * 0
                                  for rows in grams])
        each = model.word_embed(center) + model.encoder(model.word_chars[center], model.word_lengths[center]) + gram_means
        return _sgns_loss(each, model.out_embed(context), model.out_embed(negs))
    each_loss, each_grads = loss_and_grads(model, per_occurrence)
    assert torch.allclose(loss, each_loss, rtol=1e-12)
    for name, grad in each_grads.items():
        assert grad.abs().sum() > 0 or name.endswith("char_embed.weight"), name
        assert torch.allclose(grads[name], grad, rtol=1e-9, atol=1e-12), name
    # and the loss is SGNS's on the vectors embeddings() gives
    expected = reference_loss(model.embeddings(), model.out_embed.weight.detach(), center, context, negs)
    assert abs(loss.item() - expected) < 1e-9 * abs(expected)


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_short_run_lowers_the_loss():
    """Words of two topics co-occur within their topic only: a few Adam steps must fit that."""
    model = small_model(seed=5)
    topic = torch.tensor([0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1])  # per word of WORDS
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)

    def batch():
        center = torch.randint(0, len(WORDS), (64,), generator=gen)
        same_topic = [torch.nonzero(topic == topic[c]).squeeze(1) for c in center]
        context = torch.stack([ids[torch.randint(0, len(ids), (1,), generator=gen)][0] for ids in same_topic])
        return center, context, torch.randint(0, len(WORDS), (64, 3), generator=gen)

    fixed = batch()
    with torch.no_grad():
        before = model(*fixed).item()
    for _ in range(40):
        optimizer.zero_grad()
        model(*batch()).backward()
        optimizer.step()
    with torch.no_grad():
        after = model(*fixed).item()
    print(before, after)
    assert after < before - 0.5, (before, after)


def test_build_model_reads_the_run_flags():
    model = build_model("rnn", len(WORDS), 5, words=WORDS,
                        args={"char_embed_size": 4, "hidden_size": 6, "num_layer": 2, "dropout": 0.0,
                              "bidirectional": True, "mlp_size": None, "batch_size": 10})
    assert isinstance(model, RNNSGNS)
    assert model.encoder.rnn.num_layers == 2 and model.encoder.rnn.bidirectional
    assert isinstance(model.encoder.rnn, torch.nn.LSTM) and model.encoder.head.in_features == 24  # last states and means
    gru = build_model("rnn", len(WORDS), 5, words=WORDS, args={"rnn_cell": "gru"})
    assert isinstance(gru.encoder.rnn, torch.nn.GRU)
    with pytest.raises(ValueError):
        build_model("rnn", len(WORDS), 5)  # no words to spell


# ---------------------------------------------------------------------------------------------
# Through the trainer

def write_corpus(path, n_sentences=300, seed=0):
    rng = np.random.default_rng(seed)
    topics = [["cat", "cats", "dog", "dogs", "horse", "horses"], ["car", "cars", "bus", "buses", "train", "trains"]]
    lines = [" ".join(rng.choice(topics[rng.integers(2)] + ["the", "a"], 8)).capitalize() + "."
             for _ in range(n_sentences)]
    path.write_text("\n".join(lines))
    return path


def rnn_args(tmp_path, *extra):
    corpus = write_corpus(tmp_path / "small.txt")
    return ["--dataset", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--log-dir", str(tmp_path / "runs"),
            "--model-name", "rnn", "--embed-size", "8", "--char-embed-size", "6", "--hidden-size", "12",
            "--batch-size", "256", "--remove-th", "1", "--num-threads", "1", "--quiet", "--pip-vocab", "12", *extra]


def test_is_character_is_an_alias_with_rnn_defaults():
    args = trainer.parse_args(["--is-character"])
    assert (args.model_name, args.optimizer, args.loop) == ("rnn", "adam", "spelling")
    sgns = trainer.parse_args([])
    assert (sgns.model_name, sgns.optimizer, sgns.lr, sgns.batch_size) == ("sgns", "sgd", 0.025, 4096)


@pytest.mark.parametrize("argv", [["--model-name", "rnn", "--rnn-cell", "rnn"],
                                  ["--model-name", "rnn", "--optimizer", "sparse_adam"],
                                  ["--model-name", "rnn", "--hidden-size", "0"],
                                  ["--model-name", "rnn", "--dropout", "1.5"],
                                  ["--model-name", "rnn", "--word-share", "0"]])
def test_bad_rnn_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainer.parse_args(argv)
    assert exit_info.value.code == 2


def test_trainer_run_checkpoint_rebuilds_the_model(tmp_path, capsys):
    export = tmp_path / "vectors.txt"
    flags = ["--bidirectional", "--num-layer", "2", "--mlp-size", "10", "--dropout", "0.1"]
    assert trainer.main(rnn_args(tmp_path, "--epochs", "2", "--run-name", "r", "--export", str(export), *flags)) == 0
    run_dir = tmp_path / "runs" / "r"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["model_name"] == "rnn" and ckpt["epoch"] == 2
    # both PIP losses were computed on the encoded vocabulary; training lowered the loss
    assert {"PIP loss", "PIP loss (oracle)"} <= set(ckpt["history"])
    losses = [value for _, value in ckpt["history"]["Train loss"]]
    assert losses[1] < losses[0]
    assert any(p.name == "metadata.tsv" for p in run_dir.rglob("*"))  # TensorBoard projector

    model = model_from_checkpoint(ckpt)
    assert isinstance(model, RNNSGNS) and model.encoder.rnn.bidirectional
    from gensim.models import KeyedVectors
    keyed = KeyedVectors.load_word2vec_format(str(export))
    assert keyed.index_to_key == ckpt["words"]
    np.testing.assert_allclose(keyed.vectors, model.embeddings().numpy(), rtol=1e-5, atol=1e-6)
    vectors = model.embed_words(["buss", "horsey"])
    assert torch.isfinite(vectors).all()

    # evaluate.py --embed: the vocabulary's words as --export wrote them, unseen ones from their spelling
    import evaluate
    listed = tmp_path / "words.txt"
    listed.write_text("buss\ncats\nhorsey\nthe\n")
    embedded = tmp_path / "embedded.txt"
    assert evaluate.main(["--checkpoint", str(run_dir), "--embed", str(listed), "--export", str(embedded)]) == 0
    got_words, got = evaluate.load_vectors(embedded)
    assert got_words == ["buss", "cats", "horsey", "the"]
    np.testing.assert_allclose(got[[1, 3]], keyed[["cats", "the"]], rtol=0, atol=2e-6)
    np.testing.assert_allclose(got[[0, 2]], vectors.numpy(), rtol=0, atol=1e-6)

    # evaluate.py rebuilds it too and embeds words the vocabulary lacks
    words, table, embed_fn, _ = evaluate.load_checkpoint(run_dir)
    assert words == ckpt["words"] and embed_fn is not None
    np.testing.assert_allclose(embed_fn(["buss", "horsey"]), vectors.numpy(), rtol=1e-5, atol=1e-6)
    found = evaluate.neighbors(words, table, ["buss"], topn=3, embed_fn=embed_fn)
    assert len(found["buss"]) == 3
    # the documented inspection: all-but-the-top applied to the table and the unseen query alike
    transform = evaluate.all_but_the_top(table, 2)
    expected = evaluate.neighbors(words, transform(table), ["buss"], topn=3,
                                  embed_fn=lambda batch: transform(embed_fn(batch)))
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(run_dir), "--remove-top", "2", "--neighbors", "buss", "--topn", "3",
                          "--no-default-eval", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [w for w, _ in report["neighbors"]["buss"]] == [w for w, _ in expected["buss"]]


def test_interrupted_and_resumed_rnn_run_equals_uninterrupted(tmp_path, monkeypatch):
    args = rnn_args(tmp_path, "--epochs", "2", "--pip-interval", "0", "--subsample-th", "0")
    assert trainer.main(args + ["--run-name", "straight"]) == 0
    with monkeypatch.context() as patch:
        stop_after(patch, "spelling_epoch", 80)  # 58 steps an epoch: mid-way through the second
        assert trainer.main(args + ["--run-name", "stopped"]) == 128 + signal.SIGINT
    ckpt = torch.load(tmp_path / "runs" / "stopped" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["position"] and ckpt["optimizer"]["state"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert trainer.main(["--resume", str(tmp_path / "runs" / "stopped"), "--quiet"]) == 0
    straight, resumed = (model_from_checkpoint(torch.load(tmp_path / "runs" / name / "checkpoint.pt",
                                                          weights_only=True)).embeddings()
                         for name in ("straight", "stopped"))
    assert torch.allclose(straight, resumed, atol=1e-6)


@pytest.mark.parametrize("sizes", [{}, {"hidden_size": 8, "num_layer": 2, "bidirectional": True, "mlp_size": 5}])
def test_parameter_count_is_the_built_models_without_building_it(sizes):
    words = ["cat", "dogs", "o'clock", "zebra"]
    for name in ("sgns", "rnn"):
        built = build_model(name, len(words), 12, words=words, args=sizes)
        assert parameter_count(name, words, 12, sizes) == sum(p.numel() for p in built.parameters())


def test_pip_loss_normalized_falls_over_the_epochs(tmp_path):
    rng = np.random.default_rng(1)
    stems = ["cat", "dog", "horse", "cow", "car", "bus", "train", "truck", "red", "blue", "green", "pink"]
    topics = [[stem + end for stem in stems[i:i + 4] for end in ("", "s", "ish")] for i in (0, 4, 8)]
    lines = [" ".join(rng.choice(topics[rng.integers(3)], 10)) + "." for _ in range(1500)]
    (tmp_path / "topics.txt").write_text("\n".join(lines))
    # one negative: with five, PMI's shift by log 5 leaves three topics' SPPMI matrix all zero
    args = rnn_args(tmp_path, "--epochs", "3", "--run-name", "pip", "--pip-vocab", "36", "--subsample-th", "0",
                    "--neg-sample-size", "1")
    args[args.index("--dataset") + 1] = str(tmp_path / "topics.txt")
    assert trainer.main(args) == 0
    ckpt = torch.load(tmp_path / "runs" / "pip" / "checkpoint.pt", weights_only=True)
    pip = [value for _, value in ckpt["history"]["PIP loss (normalized)"]]
    assert pip[0] < 0.9 and pip[2] < pip[0], pip


def test_rnn_run_with_sgd_trains_the_encoder_too(tmp_path):
    args = rnn_args(tmp_path, "--epochs", "1", "--run-name", "sgd", "--optimizer", "sgd", "--lr", "0.001",
                    "--pip-interval", "0")
    assert trainer.main(args) == 0
    ckpt = torch.load(tmp_path / "runs" / "sgd" / "checkpoint.pt", weights_only=True)
    trained = model_from_checkpoint(ckpt)
    torch.manual_seed(ckpt["args"]["seed"])  # the run's initial weights, as the trainer drew them
    start = build_model("rnn", len(ckpt["words"]), 8, words=ckpt["words"], args=ckpt["args"])
    for name, weight in start.encoder.state_dict().items():
        assert not torch.equal(weight, trained.encoder.state_dict()[name]) or name.endswith("char_embed.weight"), name


def test_encoder_gradient_in_parts_on_threads_equals_one_backward():
    import concurrent.futures
    from types import SimpleNamespace

    import engines
    model = small_model(seed=4, bidirectional=True).double()
    ids = torch.arange(len(WORDS))
    grad = torch.randn(len(WORDS), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model.encode(ids).backward(grad)
    expected = {name: p.grad.clone() for name, p in model.encoder.named_parameters()}
    model.zero_grad()
    parts = torch.tensor_split(ids, 3)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        engine = SimpleNamespace(model=model, pool=pool)
        engines._encoder_gradient(engine, list(pool.map(model.encode, parts)),
                                  torch.split(grad, [len(p) for p in parts]))
    for name, param in model.encoder.named_parameters():
        assert torch.allclose(param.grad, expected[name], rtol=1e-10, atol=1e-12), name


def test_a_steps_change_moves_each_gram_row_as_the_written_out_rule():
    """cpu_kernel.add_gram_changes against the rule written out row by row, with the rnn loop's
    constants: an n-gram row moves by GRAM_SHARE times the sum of the changes of the step's words
    that have it, over their number to the power GRAM_POW."""
    import cpu_kernel
    import engines
    model = small_model(seed=5).double()
    ids = torch.tensor([WORDS.index(w) for w in ("cat", "cats", "walked", "walking", "a")])
    change = torch.randn(len(ids), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = model.gram_embed.weight.detach().clone()
    with torch.no_grad():
        gram_ids, gram_counts = model.grams_of(ids)
        cpu_kernel.add_gram_changes(model.gram_embed.weight.detach().numpy(), gram_ids.numpy(), gram_counts.numpy(),
                                    change.numpy(), engines.GRAM_SHARE, engines.GRAM_POW)
    expected = before.clone()
    for row, gram in enumerate(model.grams.tolist()):
        sharers = [i for i, word_id in enumerate(ids.tolist()) if gram in char_grams(WORDS[word_id])]
        if sharers:
            expected[row] += engines.GRAM_SHARE * change[sharers].sum(0) / len(sharers) ** engines.GRAM_POW
    assert torch.allclose(model.gram_embed.weight.detach(), expected, rtol=1e-12, atol=1e-15)
    assert not torch.equal(expected, before)
