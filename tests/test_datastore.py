"""Tests for datastore dumps: row alignment, keys, manifests and rejections.

The dumps run stock fairseq-eval-lm with the plugin on the ``tiny_data``
corpus (4,382 train tokens, 549 valid tokens). The expected values are read
independently: V is the binarized split read with fairseq's
``load_indexed_dataset``, and K is the input of the last layer's ``fc1``
captured by a forward pre-hook of the test's own (tests/capture.py).
Each fairseq-eval-lm run takes a few seconds, so the dumps are shared.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary

import capture
from conftest import edit_json, eval_lm, file_snapshot
from ppkd_fairseq import manifest as mf
from ppkd_fairseq.datastore import Datastore, check_float16_range
from ppkd_fairseq.dump import DatastoreWriter, TeacherWriter
from ppkd_fairseq.index import build_index, load_index
from ppkd_fairseq.teacher_head import softmax_head

# Dumps of the train split with the pre-norm student, compared with the shared
# datastore (eval_lm's defaults: --max-tokens 256 --tokens-per-sample 32).
VARIANTS = {
    # Same 32-token blocks in other batches: the keys must not change.
    "batching": ("--max-tokens", "96", "--batch-size", "2"),
    # Other blocks, so other left contexts and other keys.
    "short_blocks": ("--tokens-per-sample", "20"),
    "context_window": ("--tokens-per-sample", "24", "--context-window", "8"),
}


@pytest.fixture(scope="module")
def train_stream(tiny_data):
    return capture.read_stream(tiny_data, "train")


@pytest.fixture(scope="module")
def variant_dumps(tiny_data, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("variant_dumps")
    folders = {}
    for name, options in VARIANTS.items():
        folders[name] = str(root / name)
        eval_lm(tiny_data, tiny_models["student"], "--ppkd-mode", "dump", "--ppkd-dstore", folders[name], *options)
    return folders


@pytest.fixture(scope="module")
def postnorm_dumps(tiny_data, tiny_models, tmp_path_factory):
    """Valid-split dumps of the post-norm student: whole, and in two shards.

    ``after_first_shard`` is a copy of the sharded folder taken between the
    two shard runs, which is what an interrupted sharded dump leaves.
    """
    root = tmp_path_factory.mktemp("postnorm_dumps")
    student = tiny_models["student_postnorm"]
    whole, sharded, after_first = str(root / "whole"), str(root / "sharded"), str(root / "after_first_shard")
    eval_lm(tiny_data, student, "--ppkd-mode", "dump", "--ppkd-dstore", whole, split="valid")
    eval_lm(tiny_data, student, "--ppkd-mode", "dump", "--ppkd-dstore", sharded,
            "--num-shards", "2", "--shard-id", "0", split="valid")
    shutil.copytree(sharded, after_first)
    eval_lm(tiny_data, student, "--ppkd-mode", "dump", "--ppkd-dstore", sharded,
            "--num-shards", "2", "--shard-id", "1", split="valid")
    return {"whole": whole, "sharded": sharded, "after_first_shard": after_first}


def load_arrays(folder):
    store = Datastore.open(folder)
    return np.asarray(store.keys), np.asarray(store.values)


def copy_datastore(tiny_datastore, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(tiny_datastore["folder"], folder)
    return folder


def assert_keys_match_capture(stored, captured):
    """Stored float16 keys equal the captured float32 inputs up to rounding."""
    assert stored.shape == captured.shape
    # float16 keeps 11 significant bits, so rounding moves a value by at most
    # 2**-11 of it. The bound doubles that for float32 differences between
    # the two forward passes.
    np.testing.assert_allclose(stored.astype(np.float32), captured, rtol=2**-10, atol=1e-4)


# Row alignment.


def test_values_equal_train_stream(tiny_datastore, train_stream):
    keys, values = load_arrays(tiny_datastore["folder"])
    assert values.shape == train_stream.shape == (4382,)
    np.testing.assert_array_equal(values, train_stream)
    assert keys.shape == (4382, 32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_values_equal_stream(variant_dumps, train_stream, variant):
    _, values = load_arrays(variant_dumps[variant])
    np.testing.assert_array_equal(values, train_stream)


def test_batching_keeps_keys(tiny_datastore, variant_dumps):
    base_keys, _ = load_arrays(tiny_datastore["folder"])
    keys, _ = load_arrays(variant_dumps["batching"])
    np.testing.assert_array_equal(keys, base_keys)


@pytest.mark.parametrize("variant", ["short_blocks", "context_window"])
def test_other_context_changes_keys(tiny_datastore, variant_dumps, variant):
    # A sanity check that the comparison above can fail: other blocks give
    # other left contexts, hence other keys for most rows.
    base_keys, _ = load_arrays(tiny_datastore["folder"])
    keys, _ = load_arrays(variant_dumps[variant])
    changed = np.any(keys != base_keys, axis=1).mean()
    assert changed > 0.5, f"only {changed:.0%} of the rows changed"


def test_manifest_records_dump_settings(variant_dumps):
    store = Datastore.open(variant_dumps["context_window"])
    # fairseq-eval-lm subtracts the context window from --tokens-per-sample,
    # so the 24 tokens per sample are 16-token blocks after 8 context tokens.
    assert store.manifest["dump"]["tokens_per_sample"] == 16
    assert store.manifest["dump"]["context_window"] == 8
    assert store.manifest["corpus"]["split"] == "train"


# Keys against an independent capture.


def test_keys_equal_fc1_input_prenorm(tiny_datastore, tiny_data, tiny_models, train_stream):
    captured = capture.capture_student(tiny_models["student"], tiny_data, "train")
    np.testing.assert_array_equal(captured["targets"], train_stream)
    keys, _ = load_arrays(tiny_datastore["folder"])
    assert_keys_match_capture(keys, captured["keys"])


def test_keys_equal_fc1_input_short_blocks(variant_dumps, tiny_data, tiny_models):
    captured = capture.capture_student(tiny_models["student"], tiny_data, "train", tokens_per_sample=20)
    keys, _ = load_arrays(variant_dumps["short_blocks"])
    assert_keys_match_capture(keys, captured["keys"])


def test_keys_equal_fc1_input_postnorm(postnorm_dumps, tiny_data, tiny_models):
    captured = capture.capture_student(tiny_models["student_postnorm"], tiny_data, "valid")
    keys, values = load_arrays(postnorm_dumps["whole"])
    np.testing.assert_array_equal(values, capture.read_stream(tiny_data, "valid"))
    assert Datastore.open(postnorm_dumps["whole"]).manifest["student"]["normalize_before"] is False
    assert_keys_match_capture(keys, captured["keys"])


# Sharded and interrupted dumps.


def test_sharded_dump_equals_whole(postnorm_dumps):
    whole_keys, whole_values = load_arrays(postnorm_dumps["whole"])
    keys, values = load_arrays(postnorm_dumps["sharded"])
    np.testing.assert_array_equal(values, whole_values)
    np.testing.assert_array_equal(keys, whole_keys)
    assert Datastore.open(postnorm_dumps["sharded"]).manifest["dump"]["num_shards"] == 2


def test_open_rejects_interrupted_sharded_dump(postnorm_dumps):
    with pytest.raises(mf.DatastoreMismatchError, match="'incomplete'.*interrupted"):
        Datastore.open(postnorm_dumps["after_first_shard"])


def test_open_rejects_interrupted_writer(tmp_path):
    folder = str(tmp_path / "interrupted")
    writer = DatastoreWriter(folder, num_rows=4, key_dim=2, key_dtype="float16", metadata={})
    writer.write(np.array([0, 1]), np.ones((2, 2)), np.array([5, 6]))
    # No finish(): the manifest keeps its "incomplete" status.
    with pytest.raises(mf.DatastoreMismatchError, match="interrupted"):
        Datastore.open(folder)


# float16 range.


def test_check_float16_range_names_row():
    keys = np.zeros((3, 4), dtype=np.float32)
    check_float16_range(keys, np.array([10, 11, 12]))
    keys[1, 2] = 70000.0
    with pytest.raises(OverflowError, match="key of row 11 .* dimension 2"):
        check_float16_range(keys, np.array([10, 11, 12]))


def test_check_float16_range_edges():
    check_float16_range(np.array([[65504.0, -65504.0]], dtype=np.float32), np.array([0]))
    with pytest.raises(OverflowError, match="row 7"):
        check_float16_range(np.array([[-65600.0, 0.0]], dtype=np.float32), np.array([7]))


def test_writer_rejects_float16_overflow(tmp_path):
    writer = DatastoreWriter(str(tmp_path / "ds"), num_rows=8, key_dim=3, key_dtype="float16", metadata={})
    keys = np.ones((2, 3), dtype=np.float32)
    keys[1, 0] = 1e6
    with pytest.raises(OverflowError, match="row 5 .*--ppkd-key-dtype float32"):
        writer.write(np.array([4, 5]), keys, np.array([1, 2]))


def test_writer_float32_keys_hold_large_values(tmp_path):
    metadata = {"dictionary": {"sha256": "0" * 64, "size": 1}, "student": {"fingerprint": "0" * 64}}
    writer = DatastoreWriter(str(tmp_path / "ds"), num_rows=2, key_dim=1, key_dtype="float32", metadata=metadata)
    writer.write(np.array([0, 1]), np.array([[1e6], [-1e6]]), np.array([0, 0]))
    assert writer.finish()
    keys, _ = load_arrays(str(tmp_path / "ds"))
    np.testing.assert_array_equal(keys[:, 0], [1e6, -1e6])


# Rejections of a datastore that does not match.


def test_open_rejects_other_dictionary(tiny_datastore, tiny_data):
    other = Dictionary.load(os.path.join(tiny_data, "dict.txt"))
    other.add_symbol("w_unknown")
    with pytest.raises(mf.DatastoreMismatchError, match="dictionary"):
        Datastore.open(tiny_datastore["folder"], dictionary=other)


def test_open_accepts_same_dictionary(tiny_datastore, tiny_data):
    same = Dictionary.load(os.path.join(tiny_data, "dict.txt"))
    assert Datastore.open(tiny_datastore["folder"], dictionary=same).num_rows == 4382


def test_open_rejects_other_student_fingerprint(tiny_datastore):
    with pytest.raises(mf.DatastoreMismatchError, match="student checkpoint fingerprint"):
        Datastore.open(tiny_datastore["folder"], student_fingerprint="0" * 64)


def test_eval_rejects_other_student(tiny_datastore, tiny_data, tiny_models):
    # The post-norm student has the same dictionary and key size as the
    # pre-norm one, so only the checkpoint fingerprint distinguishes them.
    with pytest.raises(RuntimeError) as failure:
        eval_lm(tiny_data, tiny_models["student_postnorm"], "--ppkd-dstore", tiny_datastore["folder"],
                "--ppkd-k", "4", "--ppkd-mu", "1", split="valid")
    assert "DatastoreMismatchError" in str(failure.value)
    assert "fingerprint" in str(failure.value)


def test_index_rejects_other_keys(tiny_datastore, variant_dumps, tmp_path):
    # An index over the keys of another dump with the same N and d.
    other = str(tmp_path / "other")
    shutil.copytree(variant_dumps["short_blocks"], other)
    build_index(other)
    folder = copy_datastore(tiny_datastore, tmp_path)
    shutil.rmtree(os.path.join(folder, "index"))
    shutil.copytree(os.path.join(other, "index"), os.path.join(folder, "index"))
    with pytest.raises(mf.DatastoreMismatchError, match="datastore_id"):
        load_index(folder)


def test_index_loads_after_teachers_added(tiny_datastore):
    index = load_index(tiny_datastore["folder"])
    assert index.ntotal == 4382


def test_open_rejects_missing_values_file(tiny_datastore, tmp_path):
    folder = copy_datastore(tiny_datastore, tmp_path)
    os.remove(os.path.join(folder, "values.npy"))
    with pytest.raises(mf.DatastoreMismatchError, match="values.npy is missing"):
        Datastore.open(folder)


def test_open_rejects_missing_manifest(tiny_datastore, tmp_path):
    folder = copy_datastore(tiny_datastore, tmp_path)
    os.remove(os.path.join(folder, "manifest.json"))
    with pytest.raises(mf.DatastoreMismatchError, match="manifest.json is missing"):
        Datastore.open(folder)


def test_open_rejects_truncated_keys(tiny_datastore, tmp_path):
    folder = copy_datastore(tiny_datastore, tmp_path)
    path = os.path.join(folder, "keys.npy")
    os.truncate(path, os.path.getsize(path) - 64)
    with pytest.raises(mf.DatastoreMismatchError, match="truncated"):
        Datastore.open(folder)


@pytest.mark.parametrize("array,dtype", [("keys", "float32"), ("keys", "int16"), ("values", "int64"),
                                         ("values", "float32")])
def test_open_rejects_wrong_dtype(tiny_datastore, tmp_path, array, dtype):
    # int16 keys and float32 values have the stored files' sizes, so only
    # the .npy header distinguishes them.
    folder = copy_datastore(tiny_datastore, tmp_path)
    edit_json(os.path.join(folder, "manifest.json"), lambda m: m[array].update(dtype=dtype))
    with pytest.raises(mf.DatastoreMismatchError, match=array):
        Datastore.open(folder)


@pytest.mark.parametrize("field", ["keys", "values", "num_rows", "key_dim", "dictionary", "datastore_id", "student"])
def test_open_rejects_incomplete_manifest(tiny_datastore, tmp_path, field):
    folder = copy_datastore(tiny_datastore, tmp_path)
    edit_json(os.path.join(folder, "manifest.json"), lambda m: m.pop(field))
    with pytest.raises(mf.DatastoreMismatchError, match=field):
        Datastore.open(folder)


# Teachers.


def test_open_teacher_checks_pass(tiny_datastore):
    store = Datastore.open(tiny_datastore["folder"])
    assert store.teacher_names() == ["causal", "postnorm"]
    teacher = store.open_teacher("causal")
    assert teacher.states.shape == (4382, 512)
    assert teacher.lognorm.shape == (4382, 3)


def test_open_teacher_rejects_other_vocabulary(tiny_datastore, tmp_path):
    folder = copy_datastore(tiny_datastore, tmp_path)
    edit_json(os.path.join(folder, "teachers", "causal", "teacher.json"),
              lambda m: m.update(dictionary={"sha256": "f" * 64, "size": 72}))
    with pytest.raises(mf.DatastoreMismatchError, match="another vocabulary"):
        Datastore.open(folder).open_teacher("causal")


def test_open_teacher_rejects_other_datastore(tiny_datastore, tmp_path):
    folder = copy_datastore(tiny_datastore, tmp_path)
    edit_json(os.path.join(folder, "teachers", "causal", "teacher.json"), lambda m: m.update(datastore_id="0" * 32))
    with pytest.raises(mf.DatastoreMismatchError, match="datastore_id"):
        Datastore.open(folder).open_teacher("causal")


@pytest.mark.parametrize("field", ["datastore_id", "states", "head"])
def test_open_teacher_rejects_incomplete_manifest(tiny_datastore, tmp_path, field):
    folder = copy_datastore(tiny_datastore, tmp_path)
    edit_json(os.path.join(folder, "teachers", "causal", "teacher.json"), lambda m: m.pop(field))
    with pytest.raises(mf.DatastoreMismatchError, match=f"missing the fields {field}"):
        Datastore.open(folder).open_teacher("causal")


def test_open_teacher_rejects_missing_teacher(tiny_datastore):
    with pytest.raises(mf.DatastoreMismatchError, match="not found. Available teachers: causal, postnorm"):
        Datastore.open(tiny_datastore["folder"]).open_teacher("mlm")


def test_teacher_writer_rejects_other_dictionary(tiny_datastore, tmp_path):
    store = Datastore.open(copy_datastore(tiny_datastore, tmp_path))
    with pytest.raises(mf.DatastoreMismatchError, match="dictionary"):
        TeacherWriter(store, "other", softmax_head(torch.zeros(64, 8)), {}, {"sha256": "f" * 64, "size": 64})


def test_teacher_writer_rejects_other_head_size(tiny_datastore, tmp_path):
    store = Datastore.open(copy_datastore(tiny_datastore, tmp_path))
    with pytest.raises(mf.DatastoreMismatchError, match="covers 65 words"):
        TeacherWriter(store, "other", softmax_head(torch.zeros(65, 8)), {}, store.manifest["dictionary"])


def test_teacher_writer_checks_values(tiny_datastore, tmp_path):
    store = Datastore.open(copy_datastore(tiny_datastore, tmp_path))
    writer = TeacherWriter(store, "check", softmax_head(torch.zeros(64, 8)), {}, store.manifest["dictionary"])
    rows = np.array([5, 6, 7])
    targets = np.asarray(store.values[rows], dtype=np.int64)
    writer.write(rows, np.zeros((3, 8)), targets)
    targets[1] = (targets[1] + 1) % 64
    with pytest.raises(mf.DatastoreMismatchError, match="row 6 holds token"):
        writer.write(rows, np.zeros((3, 8)), targets)


def test_teachers_leave_keys_untouched(tiny_datastore):
    folder = tiny_datastore["folder"]
    # The fixture added both teachers after this snapshot.
    assert file_snapshot(folder) == tiny_datastore["before_teachers"]
    # Removing a teacher deletes its folder only; a copy keeps the shared
    # datastore's own teachers for the other tests.
    shutil.copytree(os.path.join(folder, "teachers", "postnorm"), os.path.join(folder, "teachers", "spare"))
    store = Datastore.open(folder)
    assert "spare" in store.teacher_names()
    store.remove_teacher("spare")
    assert store.teacher_names() == ["causal", "postnorm"]
    assert file_snapshot(folder) == tiny_datastore["before_teachers"]


def test_dump_teacher_overwrite_flag(tiny_datastore, tiny_data, tiny_models, tmp_path):
    folder = copy_datastore(tiny_datastore, tmp_path)
    teacher = os.path.join(folder, "teachers", "causal")
    before = file_snapshot(teacher, names=("states.npy",))
    dump = ("--ppkd-mode", "dump_teacher", "--ppkd-dstore", folder, "--ppkd-teacher-name", "causal")

    with pytest.raises(RuntimeError, match="--ppkd-overwrite"):
        eval_lm(tiny_data, tiny_models["student_postnorm"], *dump)
    assert file_snapshot(teacher, names=("states.npy",)) == before

    eval_lm(tiny_data, tiny_models["student_postnorm"], *dump, "--ppkd-overwrite")
    assert file_snapshot(teacher, names=("states.npy",))["states.npy"][0] != before["states.npy"][0]
    Datastore.open(folder).open_teacher("causal")  # the replacement passes every check
