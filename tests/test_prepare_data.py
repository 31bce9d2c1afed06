"""Tests for data preparation: fetching, verifying and binarizing corpora.

Every test writes its own tiny corpus. The official SHA-1 table is patched
to the tiny files' values, so the verification code runs unchanged. Each
call of ``main`` that binarizes starts fairseq-preprocess (a few seconds).
"""

import hashlib
import io
import logging
import lzma
import os
import shutil
import urllib.error
import zipfile

import pytest

from ppkd_fairseq.cli import prepare_data
from ppkd_fairseq.data import binarize, corpus, wikitext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")

# WikiText-style lines: space-separated tokens, a title line, a blank line.
TINY_WIKITEXT = {
    "train": [
        " = Tiny Article = ",
        " ",
        " the cat sat on the mat . ",
        " the dog sat on the log . ",
        " a cat and a dog met on the mat . ",
        " ",
    ],
    "valid": [
        " = Valid Article = ",
        " the cat met the dog . ",
        " ",
    ],
    "test": [
        " the log sat on a mat . ",
        " an owl flew by . ",
    ],
}

# Same shape as TINY_WIKITEXT, but other words, so its dictionary differs.
TINY_WIKITEXT_103 = {
    "valid": [" = Other Article = ", " the heron flew over the lake . ", " "],
    "test": [" a heron and a swan sat by the lake . ", " "],
}


def token_count(lines):
    """Return the tokens of ``lines`` as fairseq counts them: words plus one eos per line."""
    return sum(len(line.split()) + 1 for line in lines)


def sha1_of_lines(lines):
    return hashlib.sha1(("\n".join(lines) + "\n").encode("utf-8")).hexdigest()


def write_token_files(folder, texts, compress=False):
    """Write ``wiki.{split}.tokens`` (or ``.tokens.xz``) files into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for split, lines in texts.items():
        data = ("\n".join(lines) + "\n").encode("utf-8")
        path = os.path.join(folder, f"wiki.{split}.tokens")
        if compress:
            with lzma.open(path + ".xz", "wb") as f:
                f.write(data)
        else:
            with open(path, "wb") as f:
                f.write(data)


def patch_tiny_sha1(monkeypatch):
    monkeypatch.setitem(
        wikitext.TOKEN_SHA1, "wikitext-2", {s: sha1_of_lines(l) for s, l in TINY_WIKITEXT.items()}
    )
    monkeypatch.setitem(
        wikitext.TOKEN_SHA1,
        "wikitext-103",
        {"train": "0" * 40, **{s: sha1_of_lines(l) for s, l in TINY_WIKITEXT_103.items()}},
    )


@pytest.fixture
def tiny_sha1(monkeypatch):
    """Make the tiny corpora the official WikiText-2 and WikiText-103 files."""
    patch_tiny_sha1(monkeypatch)


@pytest.fixture(scope="module")
def prepared_wikitext2(tmp_path_factory):
    """Prepare the tiny WikiText-2 once; return ``(source, destdir)``, not to be modified."""
    tmp_path = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_tiny_sha1(monkeypatch)
        return prepare_wikitext2(tmp_path)


def copy_prepared(prepared, tmp_path):
    """Copy a prepared ``(source, destdir)`` into ``tmp_path``, keeping mtimes."""
    source, destdir = tmp_path / "source", tmp_path / "data-bin"
    shutil.copytree(prepared[0], source)
    shutil.copytree(prepared[1], destdir)
    return source, destdir


@pytest.fixture
def binarize_calls(monkeypatch):
    """Record the return value of every ``binarize.binarize`` call made by the CLI."""
    calls = []
    real = binarize.binarize

    def recording_binarize(*args, **kwargs):
        ran = real(*args, **kwargs)
        calls.append(ran)
        return ran

    monkeypatch.setattr(binarize, "binarize", recording_binarize)
    return calls


def load_split(destdir, split):
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(os.path.join(destdir, "dict.txt"))
    dataset = data_utils.load_indexed_dataset(os.path.join(destdir, split), dictionary)
    assert dataset is not None, f"{destdir}/{split}.bin/.idx could not be loaded"
    return dictionary, dataset


def mtimes(folder):
    """Return ``relative path -> mtime_ns`` of every file under ``folder``."""
    result = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            result[os.path.relpath(path, folder)] = os.stat(path).st_mtime_ns
    return result


def prepare_wikitext2(tmp_path, compress=False, nested=False):
    source = tmp_path / "source"
    write_token_files(str(source / "wikitext-2" if nested else source), TINY_WIKITEXT, compress)
    destdir = tmp_path / "data-bin"
    prepare_data.main(["wikitext-2", "--source", str(source), "--destdir", str(destdir)])
    return source, destdir


def test_prepare_wikitext_plain_folder(prepared_wikitext2):
    check_prepared_wikitext2(prepared_wikitext2[1])


def test_prepare_wikitext_xz_in_corpus_folder(tmp_path, tiny_sha1):
    _, destdir = prepare_wikitext2(tmp_path, compress=True, nested=True)
    check_prepared_wikitext2(destdir)


def check_prepared_wikitext2(destdir):
    assert (destdir / "dict.txt").exists()
    assert (destdir / binarize.STAMP).exists()
    for split, lines in TINY_WIKITEXT.items():
        assert (destdir / f"{split}.bin").exists()
        assert (destdir / f"{split}.idx").exists()
        dictionary, dataset = load_split(str(destdir), split)
        assert len(dataset) == len(lines)
        assert int(dataset.sizes.sum()) == token_count(lines)
        # The raw copy is the decompressed file, byte for byte.
        raw = destdir / "raw" / f"wiki.{split}.tokens"
        assert wikitext.sha1_of_file(str(raw)) == sha1_of_lines(lines)

    dictionary, dataset = load_split(str(destdir), "train")
    words = {w for line in TINY_WIKITEXT["train"] for w in line.split()}
    for word in words:
        assert dictionary.index(word) != dictionary.unk()
    first_line = TINY_WIKITEXT["train"][0].split()
    assert dictionary.string(dataset[0][:-1]) == " ".join(first_line)
    assert dataset[0][-1].item() == dictionary.eos()
    # "owl" occurs only in the test split, so it maps to <unk> there.
    assert dictionary.index("owl") == dictionary.unk()


def test_rerun_does_nothing(tmp_path, tiny_sha1, binarize_calls, prepared_wikitext2):
    source, destdir = copy_prepared(prepared_wikitext2, tmp_path)
    before = mtimes(str(destdir))

    prepare_data.main(["wikitext-2", "--source", str(source), "--destdir", str(destdir)])

    assert binarize_calls == [False]
    assert mtimes(str(destdir)) == before


@pytest.mark.parametrize("remove", [binarize.STAMP, "valid.bin"], ids=["stamp-deleted", "bin-removed"])
def test_partial_run_redone(tmp_path, tiny_sha1, binarize_calls, prepared_wikitext2, remove):
    source, destdir = copy_prepared(prepared_wikitext2, tmp_path)
    os.remove(destdir / remove)

    prepare_data.main(["wikitext-2", "--source", str(source), "--destdir", str(destdir)])

    assert binarize_calls == [True]
    assert (destdir / remove).exists()
    _, dataset = load_split(str(destdir), "valid")
    assert int(dataset.sizes.sum()) == token_count(TINY_WIKITEXT["valid"])


def test_corrupted_token_file_rejected(tmp_path, tiny_sha1):
    source = tmp_path / "source"
    write_token_files(str(source), TINY_WIKITEXT)
    corrupted = source / "wiki.valid.tokens"
    with open(corrupted, "a") as f:
        f.write(" an extra line . \n")
    expected = wikitext.TOKEN_SHA1["wikitext-2"]["valid"]
    actual = wikitext.sha1_of_file(str(corrupted))
    destdir = tmp_path / "data-bin"

    with pytest.raises(SystemExit) as excinfo:
        prepare_data.main(["wikitext-2", "--source", str(source), "--destdir", str(destdir)])

    message = str(excinfo.value.code)
    assert str(corrupted) in message
    assert expected in message
    assert actual in message
    # The bad copy is not left behind to be trusted by a later run.
    assert not (destdir / "raw" / "wiki.valid.tokens").exists()
    assert not (destdir / "dict.txt").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_xz_rejected_cleanly(tmp_path, tiny_sha1, damage):
    source = tmp_path / "source"
    write_token_files(str(source), TINY_WIKITEXT, compress=True)
    damaged = source / "wiki.valid.tokens.xz"
    data = bytearray(damaged.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    destdir = tmp_path / "data-bin"

    with pytest.raises(SystemExit) as excinfo:
        prepare_data.main(["wikitext-2", "--source", str(source), "--destdir", str(destdir)])

    message = str(excinfo.value.code)
    assert str(damaged) in message
    assert "truncated or corrupted" in message
    assert not (destdir / "raw" / "wiki.valid.tokens.tmp").exists()
    assert not (destdir / "raw" / "wiki.valid.tokens").exists()


def test_non_archive_source_rejected(tmp_path, tiny_sha1):
    source = tmp_path / "notes.txt"
    source.write_text("not an archive\n")

    with pytest.raises(SystemExit) as excinfo:
        prepare_data.main(["wikitext-2", "--source", str(source), "--destdir", str(tmp_path / "data-bin")])

    assert "not a zip or tar archive" in str(excinfo.value.code)


def test_corrupted_raw_copy_fetched_again(tmp_path, tiny_sha1):
    source = tmp_path / "source"
    write_token_files(str(source), TINY_WIKITEXT)
    rawdir = tmp_path / "raw"
    wikitext.fetch_token_files("wikitext-2", str(rawdir), source=str(source))
    with open(rawdir / "wiki.train.tokens", "a") as f:
        f.write("garbage\n")

    placed = wikitext.fetch_token_files("wikitext-2", str(rawdir), source=str(source))

    assert sorted(placed) == ["test", "train", "valid"]
    assert wikitext.sha1_of_file(placed["train"]) == wikitext.TOKEN_SHA1["wikitext-2"]["train"]


def test_srcdict_reused_byte_for_byte(tmp_path, tiny_sha1, caplog, prepared_wikitext2):
    first = prepared_wikitext2[1]
    source_103 = tmp_path / "source-103"
    write_token_files(str(source_103), TINY_WIKITEXT_103)
    second = tmp_path / "data-bin-103"

    with caplog.at_level(logging.WARNING):
        prepare_data.main(
            [
                "wikitext-103",
                "--source", str(source_103),
                "--destdir", str(second),
                "--srcdict", str(first / "dict.txt"),
            ]
        )

    assert (second / "dict.txt").read_bytes() == (first / "dict.txt").read_bytes()
    assert "no training split" not in caplog.text
    dictionary, dataset = load_split(str(second), "valid")
    assert int(dataset.sizes.sum()) == token_count(TINY_WIKITEXT_103["valid"])
    # "heron" is not in the WikiText-2 dictionary, so it is <unk> here.
    tokens = dataset[1].tolist()
    assert tokens[1] == dictionary.unk()


def test_wikitext103_valid_test_only(tmp_path, tiny_sha1, caplog, binarize_calls):
    source = tmp_path / "source"
    write_token_files(str(source / "wikitext-103"), TINY_WIKITEXT_103, compress=True)
    destdir = tmp_path / "data-bin"
    argv = ["wikitext-103", "--source", str(source), "--destdir", str(destdir)]

    with caplog.at_level(logging.WARNING):
        prepare_data.main(argv)

    assert "train split not found" in caplog.text
    assert "no training split: building the dictionary from test,valid" in caplog.text
    assert not (destdir / "train.bin").exists()
    for split, lines in TINY_WIKITEXT_103.items():
        dictionary, dataset = load_split(str(destdir), split)
        assert int(dataset.sizes.sum()) == token_count(lines)
        for word in {w for line in lines for w in line.split()}:
            assert dictionary.index(word) != dictionary.unk(), word
    assert (destdir / "dict.txt").read_bytes() == (destdir / "dict.from-eval-splits.txt").read_bytes()

    before = mtimes(str(destdir))
    prepare_data.main(argv)
    assert binarize_calls == [True, False]
    assert mtimes(str(destdir)) == before


def write_documents(folder, n):
    """Write ``n`` one-line documents ``book{i}.txt`` that Moses splits into 8 tokens."""
    folder.mkdir()
    for i in range(n):
        (folder / f"book{i:02d}.txt").write_text(f"Document {i} says: don't stop.\n")


def moses_tokens(i):
    return f"Document {i} says : don 't stop ."


def document_ids(path):
    """Return the document index of each non-empty line of a tokenized split."""
    with open(path) as f:
        return [int(line.split()[1]) for line in f if line.strip()]


def test_split_documents_90_5_5_deterministic():
    documents = [[f"doc {i}"] for i in range(40)]

    parts = corpus.split_documents(documents, seed=1)
    again = corpus.split_documents(documents, seed=1)
    other = corpus.split_documents(documents, seed=2)

    assert {s: len(d) for s, d in parts.items()} == {"train": 36, "valid": 2, "test": 2}
    assert parts == again
    assert parts != other
    flattened = sorted(doc[0] for split in parts.values() for doc in split)
    assert flattened == sorted(doc[0] for doc in documents)


def test_split_documents_needs_three():
    with pytest.raises(ValueError, match="2 documents cannot be split"):
        corpus.split_documents([["a"], ["b"]])


def test_read_documents_from_single_file(tmp_path):
    path = tmp_path / "books.txt"
    path.write_text("first line\nsecond line\n\n\nother book\n\nthird book\n")

    documents = corpus.read_documents(str(path))

    assert documents == [["first line", "second line"], ["other book"], ["third book"]]


def test_prepare_text_corpus(tmp_path, binarize_calls):
    source = tmp_path / "books"
    write_documents(source, 40)
    (source / "notes.md").write_text("not a document\n")
    destdir = tmp_path / "data-bin"
    argv = ["text", "--source", str(source), "--destdir", str(destdir)]

    prepare_data.main(argv)

    raw = destdir / "raw"
    ids = {split: document_ids(raw / f"{split}.tokens") for split in wikitext.SPLITS}
    assert {split: len(i) for split, i in ids.items()} == {"train": 36, "valid": 2, "test": 2}
    assert sorted(ids["train"] + ids["valid"] + ids["test"]) == list(range(40))
    expected = corpus.split_documents(corpus.read_documents(str(source)), seed=1)
    for split in wikitext.SPLITS:
        assert [f"Document {i} says: don't stop." for i in ids[split]] == [d[0] for d in expected[split]]
    valid_lines = (raw / "valid.tokens").read_text().split("\n")
    assert valid_lines == [moses_tokens(ids["valid"][0]), "", moses_tokens(ids["valid"][1]), "", ""]

    _, dataset = load_split(str(destdir), "valid")
    # Two documents of 8 Moses tokens plus eos, each followed by an empty line (eos only).
    assert list(dataset.sizes) == [9, 1, 9, 1]

    before = mtimes(str(destdir))
    prepare_data.main(argv)
    assert binarize_calls == [True, False]
    assert mtimes(str(destdir)) == before


def test_prepare_text_new_seed_resplits(tmp_path):
    source = tmp_path / "books"
    write_documents(source, 40)
    rawdir = tmp_path / "raw"

    first = prepare_data._prepare_text(str(source), str(rawdir), seed=1)
    valid_seed1 = document_ids(first["valid"])
    second = prepare_data._prepare_text(str(source), str(rawdir), seed=2)
    valid_seed2 = document_ids(second["valid"])

    expected = corpus.split_documents(corpus.read_documents(str(source)), seed=2)["valid"]
    assert valid_seed1 != valid_seed2
    assert [f"Document {i} says: don't stop." for i in valid_seed2] == [d[0] for d in expected]


def zip_of(texts, folder="wikitext-2"):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for split, lines in texts.items():
            zf.writestr(f"{folder}/wiki.{split}.tokens", "\n".join(lines) + "\n")
    return buffer.getvalue()


def test_download_tries_second_mirror(tmp_path, tiny_sha1, monkeypatch):
    mirrors = ["https://mirror-a.invalid/wikitext-2-v1.zip", "https://mirror-b.invalid/wikitext-2-v1.zip"]
    monkeypatch.setitem(wikitext.ARCHIVE_URLS, "wikitext-2", mirrors)
    archive = zip_of(TINY_WIKITEXT)
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        if url == mirrors[0]:
            raise urllib.error.URLError("connection refused")
        return io.BytesIO(archive)

    monkeypatch.setattr(wikitext.urllib.request, "urlopen", fake_urlopen)
    rawdir = tmp_path / "raw"

    placed = wikitext.fetch_token_files("wikitext-2", str(rawdir))

    assert requested == mirrors
    assert sorted(placed) == ["test", "train", "valid"]
    for split, path in placed.items():
        assert wikitext.sha1_of_file(path) == sha1_of_lines(TINY_WIKITEXT[split])
    assert (rawdir / "wikitext-2-v1.zip").read_bytes() == archive
    assert not [name for name in os.listdir(rawdir) if name.endswith(".part")]


def test_download_all_mirrors_fail(tmp_path, monkeypatch):
    mirrors = ["https://mirror-a.invalid/wikitext-2-v1.zip", "https://mirror-b.invalid/wikitext-2-v1.zip"]
    monkeypatch.setitem(wikitext.ARCHIVE_URLS, "wikitext-2", mirrors)

    def fake_urlopen(url, timeout=None):
        raise urllib.error.URLError(f"no route to {url}")

    monkeypatch.setattr(wikitext.urllib.request, "urlopen", fake_urlopen)

    with pytest.raises(SystemExit) as excinfo:
        prepare_data.main(["wikitext-2", "--destdir", str(tmp_path / "data-bin")])

    message = str(excinfo.value.code)
    for url in mirrors:
        assert url in message
    assert "--source" in message
    assert not [n for n in os.listdir(tmp_path / "data-bin" / "raw") if n.endswith(".part")]


def test_no_download_without_source(tmp_path, monkeypatch):
    monkeypatch.delenv("WIKITEXT_DIR", raising=False)

    with pytest.raises(SystemExit, match="--no-download"):
        prepare_data.main(["wikitext-2", "--no-download", "--destdir", str(tmp_path / "data-bin")])


@pytest.mark.skipif(
    not os.path.exists(os.path.join(SHARED_DATA, "wikitext-2", "wiki.valid.tokens.xz")),
    reason="shared WikiText copies not present",
)
def test_shared_wikitext2_valid_verifies(tmp_path):
    path = tmp_path / "wiki.valid.tokens"
    with lzma.open(os.path.join(SHARED_DATA, "wikitext-2", "wiki.valid.tokens.xz"), "rb") as fin:
        path.write_bytes(fin.read())

    actual = wikitext.verify_token_file(str(path), "wikitext-2", "valid")

    assert actual == "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422"
