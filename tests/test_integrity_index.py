"""Tests of the index build's option checks, its unreadable-file errors and file modes.

The datastore is 64 rows of seeded random 8-dim keys written by
DatastoreWriter. With fewer keys than ``FLAT_BELOW`` the index is an exact
IndexFlatL2, which builds in milliseconds.
"""

import os
import stat

import numpy as np
import pytest

from ppkd_fairseq import index as faiss_index
from ppkd_fairseq.cli import build_index as build_index_cli
from ppkd_fairseq.dump import DatastoreWriter
from ppkd_fairseq.manifest import DatastoreMismatchError

NUM_ROWS = 64
KEY_DIM = 8


@pytest.fixture
def folder(tmp_path):
    """A finished datastore with a flat index in tmp_path/ds."""
    folder = str(tmp_path / "ds")
    rng = np.random.default_rng(0)
    metadata = {"dictionary": {"sha256": "d" * 64, "size": 16}, "student": {"fingerprint": "5" * 64}}
    writer = DatastoreWriter(folder, NUM_ROWS, KEY_DIM, "float16", metadata)
    writer.write(np.arange(NUM_ROWS), rng.normal(size=(NUM_ROWS, KEY_DIM)), rng.integers(16, size=NUM_ROWS))
    assert writer.finish()
    faiss_index.build_index(folder)
    return folder


def file_mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_missing_manifest_names_dump_command(tmp_path):
    folder = str(tmp_path / "missing")
    with pytest.raises(DatastoreMismatchError) as error:
        faiss_index.read_datastore_manifest(folder)
    message = str(error.value)
    assert f"{folder}/manifest.json is missing" in message
    assert "fairseq-eval-lm DATA --user-dir ppkd_fairseq" in message
    assert f"--ppkd-mode dump --ppkd-dstore {folder}" in message
    assert "ppkd-datastore" not in message


def test_load_rejects_truncated_index_file(folder):
    path = os.path.join(folder, "index", "index.faiss")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(DatastoreMismatchError) as error:
        faiss_index.load_index(folder)
    message = str(error.value)
    assert f"FAISS index {os.path.abspath(path)}: faiss cannot read the file" in message
    assert f"python -m ppkd_fairseq.cli.build_index {folder} --overwrite" in message


def test_named_rebuild_command_fixes_truncated_index(folder):
    path = os.path.join(folder, "index", "index.faiss")
    os.truncate(path, os.path.getsize(path) // 2)
    # Without --overwrite the command keeps the index, because index.json
    # still matches the datastore. That is why the error names --overwrite.
    build_index_cli.main([folder])
    with pytest.raises(DatastoreMismatchError):
        faiss_index.load_index(folder)
    build_index_cli.main([folder, "--overwrite"])
    assert faiss_index.load_index(folder).ntotal == NUM_ROWS


@pytest.mark.parametrize("option,name", [("train_size", "--train-size"), ("add_batch", "--add-batch")])
def test_build_rejects_zero_sizes(folder, option, name):
    with pytest.raises(ValueError) as error:
        faiss_index.build_index(folder, **{option: 0})
    assert str(error.value) == f"{option} ({name}) must be an integer of at least 1, got 0"


@pytest.mark.parametrize("name", ["--train-size", "--add-batch"])
def test_cli_rejects_zero_sizes(folder, name):
    # The index in the folder is complete, so the check must come before
    # the up-to-date check, which would report a changed option instead.
    with pytest.raises(SystemExit) as exit_info:
        build_index_cli.main([folder, name, "0"])
    assert f"({name}) must be an integer of at least 1, got 0" in str(exit_info.value.code)
    assert str(exit_info.value.code).startswith("error: ")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_index_file_mode_follows_umask(folder, umask, mode):
    previous = os.umask(umask)
    try:
        faiss_index.build_index(folder)
    finally:
        os.umask(previous)
    assert file_mode(os.path.join(folder, "index", "index.faiss")) == mode
    assert file_mode(os.path.join(folder, "index", "index.json")) == mode
