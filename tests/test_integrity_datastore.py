"""Tests that datastore and teacher files which do not match their manifests are rejected.

Each datastore here is written by DatastoreWriter and TeacherWriter from
seeded random data: 64 rows of 8-dim float16 keys, token ids of a 16-word
vocabulary and 4-dim teacher states under a full softmax head. No fairseq
model is loaded, so every test takes well under a second.
"""

import hashlib
import os
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import edit_json
from ppkd_fairseq import manifest as mf
from ppkd_fairseq.cli import datastore as datastore_cli
from ppkd_fairseq.datastore import Datastore
from ppkd_fairseq.dump import DatastoreWriter, TeacherWriter
from ppkd_fairseq.teacher_head import softmax_head

NUM_ROWS = 64
KEY_DIM = 8
VOCAB = 16
TEACHER_DIM = 4
DICTIONARY = {"sha256": "d" * 64, "size": VOCAB}


def write_datastore(folder, seed=0):
    """Write a finished datastore of seeded random keys and values and return it opened."""
    rng = np.random.default_rng(seed)
    metadata = {"dictionary": DICTIONARY, "student": {"fingerprint": "5" * 64}}
    writer = DatastoreWriter(folder, NUM_ROWS, KEY_DIM, "float16", metadata)
    writer.write(np.arange(NUM_ROWS), rng.normal(size=(NUM_ROWS, KEY_DIM)), rng.integers(VOCAB, size=NUM_ROWS))
    assert writer.finish()
    return Datastore.open(folder)


def teacher_data(seed):
    """Return the (V, d_t) output weights and (N, d_t) states of a seeded random teacher."""
    rng = np.random.default_rng(100 + seed)
    weight = rng.normal(size=(VOCAB, TEACHER_DIM)).astype(np.float32)
    states = rng.normal(size=(NUM_ROWS, TEACHER_DIM)).astype(np.float16)
    return weight, states


def write_teacher(store, name="causal", seed=0, overwrite=False):
    weight, states = teacher_data(seed)
    head = softmax_head(torch.from_numpy(weight))
    writer = TeacherWriter(store, name, head, {"kind": "causal"}, DICTIONARY, overwrite=overwrite)
    writer.write(np.arange(NUM_ROWS), states, np.asarray(store.values, dtype=np.int64))
    assert writer.finish()


def file_digests(folder):
    """Return ``{relative path: sha256}`` of every file under ``folder``."""
    digests = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture
def store(tmp_path):
    """A datastore in tmp_path/ds with teacher ``causal`` (seed 0)."""
    store = write_datastore(str(tmp_path / "ds"))
    write_teacher(store)
    return store


# Keys and values of another dump.


def test_open_rejects_keys_of_other_dump(store, tmp_path):
    other = write_datastore(str(tmp_path / "other"), seed=1)
    assert other.keys.shape == store.keys.shape
    shutil.copyfile(os.path.join(other.folder, "keys.npy"), os.path.join(store.folder, "keys.npy"))
    with pytest.raises(mf.DatastoreMismatchError) as error:
        Datastore.open(store.folder)
    message = str(error.value)
    assert f"{store.folder}/keys.npy hashes to key_sample_sha256" in message
    assert "from another dump or was modified" in message
    assert f"--ppkd-mode dump --ppkd-dstore {store.folder} --ppkd-overwrite" in message


def test_open_rejects_shuffled_values(store):
    path = os.path.join(store.folder, "values.npy")
    values = np.load(path, mmap_mode="r+")
    original = np.array(values)
    shuffled = np.random.default_rng(0).permutation(original)
    assert not np.array_equal(shuffled, original)
    values[:] = shuffled
    values.flush()
    del values
    with pytest.raises(mf.DatastoreMismatchError, match=f"{store.folder}/values.npy hashes to value_sample_sha256"):
        Datastore.open(store.folder)


def test_manifest_records_value_hash(store):
    # 64 rows are fewer than the 4,096 sampled, so every value is hashed:
    # sha256 of the shape's repr, then the ids as int64.
    values = np.load(os.path.join(store.folder, "values.npy"))
    assert values.dtype == np.int32
    expected = hashlib.sha256(b"(64,)" + values.astype(np.int64).tobytes()).hexdigest()
    assert store.manifest["value_sample_sha256"] == expected
    assert mf.value_sample_fingerprint(values.astype(np.int16).reshape(-1, 1)) == expected


def test_value_hash_samples_evenly_spaced_rows():
    values = np.arange(10_000, dtype=np.int32)
    fingerprint = mf.value_sample_fingerprint(values, num_samples=5)
    sampled = np.array([0, 2499, 4999, 7499, 9999], dtype=np.int64)
    assert fingerprint == hashlib.sha256(b"(10000,)" + sampled.tobytes()).hexdigest()
    changed = values.copy()
    changed[2499] = -1
    assert mf.value_sample_fingerprint(changed, num_samples=5) != fingerprint


def test_open_accepts_manifest_without_value_hash(store):
    # Datastores dumped before values were hashed have no such field.
    edit_json(os.path.join(store.folder, "manifest.json"), lambda m: m.pop("value_sample_sha256"))
    reopened = Datastore.open(store.folder)
    assert reopened.num_rows == NUM_ROWS
    np.testing.assert_array_equal(reopened.values, store.values)


# A finished teacher of the same name.


def test_teacher_writer_rejects_finished_teacher(store):
    before = file_digests(store.folder)
    weight, _ = teacher_data(1)
    with pytest.raises(FileExistsError) as error:
        TeacherWriter(store, "causal", softmax_head(torch.from_numpy(weight)), {}, DICTIONARY)
    message = str(error.value)
    assert f"finished teacher 'causal' already exists in {store.folder}/teachers/causal" in message
    assert "--ppkd-overwrite" in message
    assert f"remove-teacher {store.folder} --name causal" in message
    # Nothing was written: the teacher is unchanged and still opens.
    assert file_digests(store.folder) == before
    assert store.open_teacher("causal").manifest["status"] == mf.COMPLETE


def test_teacher_writer_overwrite_replaces_teacher(store):
    write_teacher(store, seed=1, overwrite=True)
    weight, states = teacher_data(1)
    teacher = Datastore.open(store.folder).open_teacher("causal")
    np.testing.assert_array_equal(teacher.states, states)
    torch.testing.assert_close(teacher.head.weight, torch.from_numpy(weight))


def test_teacher_writer_resumes_interrupted_teacher(store):
    weight, _ = teacher_data(0)
    TeacherWriter(store, "masked", softmax_head(torch.from_numpy(weight)), {}, DICTIONARY)
    # No finish(): teacher.json stays "incomplete", which a new writer may replace.
    write_teacher(store, name="masked", seed=1)
    assert Datastore.open(store.folder).teacher_names() == ["causal", "masked"]


# Messages that name commands.


def test_teacher_fix_names_real_commands(store):
    os.remove(os.path.join(store.folder, "teachers", "causal", "teacher.json"))
    with pytest.raises(mf.DatastoreMismatchError) as error:
        store.open_teacher("causal")
    message = str(error.value)
    assert f"--ppkd-mode dump_teacher --ppkd-dstore {store.folder} --ppkd-teacher-name causal" in message
    assert f"add-masked-teacher {store.folder} --checkpoint" in message
    subcommands = set(datastore_cli.get_parser()._subparsers._group_actions[0].choices)
    named = re.findall(r"python -m ppkd_fairseq\.cli\.datastore (\S+)", message)
    assert named == ["remove-teacher", "add-masked-teacher"]
    assert set(named) <= subcommands


# Unreadable or replaced teacher heads.


def test_open_teacher_rejects_truncated_head(store):
    path = os.path.join(store.folder, "teachers", "causal", "head.pt")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(mf.DatastoreMismatchError) as error:
        store.open_teacher("causal")
    message = str(error.value)
    assert f"{path} hashes to sha256" in message
    assert f"remove-teacher {store.folder} --name causal" in message


def test_open_teacher_rejects_head_of_other_teacher(store):
    write_teacher(store, name="other", seed=1)
    teachers = os.path.join(store.folder, "teachers")
    shutil.copyfile(os.path.join(teachers, "other", "head.pt"), os.path.join(teachers, "causal", "head.pt"))
    with pytest.raises(mf.DatastoreMismatchError, match="causal/head.pt hashes to sha256"):
        store.open_teacher("causal")


def test_open_teacher_wraps_unreadable_head(store):
    # Without a recorded hash the truncated file reaches torch.load.
    folder = os.path.join(store.folder, "teachers", "causal")
    edit_json(os.path.join(folder, "teacher.json"), lambda m: m["head"].pop("sha256"))
    path = os.path.join(folder, "head.pt")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(mf.DatastoreMismatchError) as error:
        store.open_teacher("causal")
    message = str(error.value)
    assert f"{path} is not a readable teacher head" in message
    assert f"remove-teacher {store.folder} --name causal" in message


# The datastore command's errors.


def test_cli_remove_missing_teacher_exits_2(store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        datastore_cli.main(["remove-teacher", store.folder, "--name", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: teacher 'nope' not found in {store.folder}. Available teachers: causal" in err
    assert "Traceback" not in err


def test_cli_info_missing_datastore_exits_2(tmp_path, capsys):
    folder = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        datastore_cli.main(["info", folder])
    assert exit_info.value.code == 2
    assert f"error: datastore {folder}: {folder}/manifest.json is missing" in capsys.readouterr().err


def test_cli_masked_teacher_rejects_finished_teacher(store, tmp_path, capsys):
    before = file_digests(store.folder)
    command = ["add-masked-teacher", store.folder, "--checkpoint", str(tmp_path / "missing.pt"),
               "--data", str(tmp_path), "--name", "causal"]
    with pytest.raises(SystemExit) as exit_info:
        datastore_cli.main(command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "finished teacher 'causal' already exists" in err
    assert "--overwrite to add-masked-teacher" in err
    assert file_digests(store.folder) == before

    # --overwrite passes the check and stops at the missing checkpoint, before writing.
    with pytest.raises(SystemExit) as exit_info:
        datastore_cli.main(command + ["--overwrite"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.pt" in err
    assert "already exists" not in err
    assert file_digests(store.folder) == before
