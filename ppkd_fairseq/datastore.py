"""Datastore files: keys K, values V and teacher states U, row-aligned.

Layout of a datastore folder::

    manifest.json              what the rows are and what produced them
    keys.npy                   K, (N, d) float16 or float32
    values.npy                 V, (N,) int32 next-token ids
    teachers/NAME/teacher.json one manifest per teacher
    teachers/NAME/states.npy   U, (N, d_t) float16 final hidden states
    teachers/NAME/lognorm.npy  (N, C) float32 log-normalizers of each state
    teachers/NAME/head.pt      the teacher's output layer (a TeacherHead)
    index/                     the FAISS index over K (see index.py)

Row i of every table is the i-th token of the split's token stream (the
binarized split, one end-of-sentence token after each line). Teachers attach
and detach without rewriting K or V. Writers of several shards write their
rows at global offsets into shared memmaps; the last shard to finish writes
the manifest.
"""

import fcntl
import glob
import hashlib
import json
import logging
import os
import pickle
import shutil
import uuid

import numpy as np
import torch

from . import manifest as mf
from .retrieval import as_tensor, take_rows
from .teacher_head import TeacherHead

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TEACHER_MANIFEST = "teacher.json"
SHARDS_DIR = ".shards"
FLOAT16_MAX = float(np.finfo(np.float16).max)

# Fields that loaders read from manifest.json and teacher.json.
DATASTORE_FIELDS = ("format_version", "datastore_id", "num_rows", "key_dim", "keys", "values", "dictionary",
                    "key_sample_sha256", "student")
TEACHER_FIELDS = ("datastore_id", "num_rows", "dictionary", "states", "lognorm", "head")


class _FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.lock`` (shards of one dump share files)."""

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, ".lock")

    def __enter__(self):
        self.handle = open(self.path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _open_or_create_npy(path, dtype, shape):
    """Open ``path`` as a writable .npy memmap, creating it with this shape."""
    if os.path.exists(path):
        try:
            array = np.load(path, mmap_mode="r+")
            if array.dtype == np.dtype(dtype) and array.shape == tuple(shape):
                return array
        except ValueError:
            pass
        os.remove(path)
    tmp = path + ".tmp"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
    del array
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r+")


def npy_spec(folder, filename):
    """Return the manifest array spec of an .npy file (header offset included)."""
    path = os.path.join(folder, filename)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if fortran:
        raise ValueError(f"{path} is in Fortran order; datastore arrays must be C-ordered")
    return mf.array_spec(filename, dtype, shape, offset=offset, layout="npy")


class ShardedRowWriter:
    """Write row-aligned arrays from one of several shards at global rows.

    Args:
        folder: output folder.
        arrays: dict ``name -> (filename, dtype, tail_shape)``; each file is
            an .npy of shape ``(num_rows, *tail_shape)``.
        num_rows: N, rows of every array.
        run_key: a string equal across the shards of one dump (it hashes the
            model, data and settings); markers of other runs are ignored.
        shard_id, num_shards: this shard and the total (fairseq's
            ``--shard-id/--num-shards`` or distributed rank/world size).
        marker: name of this kind of dump (``datastore`` or ``teacher-NAME``).
    """

    def __init__(self, folder, arrays, num_rows, run_key, shard_id=0, num_shards=1, marker="datastore"):
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} is outside [0, {num_shards})")
        self.folder = folder
        self.num_rows = int(num_rows)
        self.run_key = run_key
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.marker = marker
        self.rows_written = 0
        self.files = {name: spec[0] for name, spec in arrays.items()}
        os.makedirs(folder, exist_ok=True)
        with _FolderLock(folder):
            self.arrays = {
                name: _open_or_create_npy(os.path.join(folder, filename), dtype, (self.num_rows,) + tuple(tail))
                for name, (filename, dtype, tail) in arrays.items()
            }
            marker_path = self._marker_path(shard_id)
            if os.path.exists(marker_path):
                os.remove(marker_path)

    def _marker_path(self, shard_id):
        return os.path.join(
            self.folder, SHARDS_DIR, f"{self.marker}-{shard_id:05d}-of-{self.num_shards:05d}.json"
        )

    def write(self, rows, **columns):
        """Write ``columns[name][i]`` at row ``rows[i]`` of each array.

        Args:
            rows: (n,) int64 global row ids.
            columns: one (n, ...) array per array name, cast on write.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if rows.min() < 0 or rows.max() >= self.num_rows:
            raise IndexError(
                f"row ids span [{rows.min()}, {rows.max()}] but the datastore has {self.num_rows} rows"
            )
        for name, array in self.arrays.items():
            column = columns[name]
            if len(column) != len(rows):
                raise ValueError(f"{name}: {len(column)} entries for {len(rows)} rows")
            array[rows] = column
        self.rows_written += len(rows)

    def finish(self):
        """Flush, record this shard, and return True when every shard is done."""
        for array in self.arrays.values():
            array.flush()
        with _FolderLock(self.folder):
            mf.write_json_atomic(
                self._marker_path(self.shard_id),
                {"run_key": self.run_key, "rows_written": self.rows_written},
            )
            done = 0
            for shard in range(self.num_shards):
                path = self._marker_path(shard)
                if not os.path.exists(path):
                    return False
                with open(path) as f:
                    record = json.load(f)
                if record["run_key"] != self.run_key:
                    return False
                done += record["rows_written"]
        if done != self.num_rows:
            raise RuntimeError(
                f"{self.folder}: the shards wrote {done} rows but the split has {self.num_rows} "
                f"tokens. Some blocks were skipped, usually because a sample exceeded "
                f"--max-tokens or the model's max positions; raise --max-tokens and rerun the dump."
            )
        return True

    def clear_markers(self):
        for path in glob.glob(os.path.join(self.folder, SHARDS_DIR, f"{self.marker}-*.json")):
            os.remove(path)


def check_float16_range(keys, rows, what="key"):
    """Raise ``OverflowError`` naming the first row whose value overflows float16."""
    too_big = np.abs(keys) > FLOAT16_MAX
    if too_big.any():
        i, j = np.argwhere(too_big)[0]
        raise OverflowError(
            f"{what} of row {int(rows[i])} has value {float(keys[i, j])} at dimension {int(j)}, "
            f"beyond float16's range (+-{FLOAT16_MAX}). Dump with float32 keys instead "
            f"(--ppkd-key-dtype float32)."
        )


class TeacherStore:
    """One teacher's states, normalizers and output head, opened lazily.

    ``states`` and ``lognorm`` are read-only memmaps: only the rows a query
    retrieves are read from disk.
    """

    def __init__(self, folder, manifest, states, lognorm, head):
        self.folder = folder
        self.manifest = manifest
        self.name = manifest["name"]
        self.states = states
        self.lognorm = lognorm
        self.head = head

    def target_log_probs(self, rows, targets, chunk_rows=1024):
        """Return (n, k) float32 ``log p_teacher(target_i | U[rows[i, j]])``.

        Args:
            rows: (n, k) int64 row ids, all valid (>= 0).
            targets: (n,) int64 target word ids.
            chunk_rows: states read and scored per step, rounded down to
                whole queries (at least one). A step's float32 temporaries
                take ``chunk_rows * d_t * 4`` bytes (1.5 MB at the default
                and d_t = 384), which stays in the CPU's cache. On 2 cores
                ``python bench/bench_teacher_step.py`` measured 266 us per
                query with one query per step against 416 us with 16 (k =
                1024, d_t = 384), and 512 against 1,785 us at d_t = 1024.
        """
        from .teacher_head import target_log_probs

        n, k = rows.shape
        targets = torch.as_tensor(targets).view(n, 1)
        out = torch.empty(n, k, dtype=torch.float32)
        states, lognorm = as_tensor(self.states), as_tensor(self.lognorm)  # views of the memmaps
        step = max(1, chunk_rows // k)  # whole queries per step, so each has one target vector
        for begin in range(0, n, step):
            end = min(n, begin + step)
            flat = rows[begin:end].reshape(-1)
            shape = (end - begin, k, -1)
            u = take_rows(states, flat, torch.float32).view(shape)  # (c, k, d_t)
            z = take_rows(lognorm, flat, torch.float32).view(shape)  # (c, k, C)
            out[begin:end] = target_log_probs(self.head, u, z, targets[begin:end])
        return out


    def neighbour_log_probs(self, ids, valid, targets):
        """Return (n, k) float32 ``log p_teacher(target_i | U[ids[i, j]])``, -inf where invalid.

        Args:
            ids: (n, k) int64 retrieved rows, any value where invalid.
            valid: (n, k) bool.
            targets: (n,) int64 target word ids.
        """
        # Invalid slots read row 0 and are masked afterwards, so that whole
        # (n, k) blocks are scored against one target vector per query.
        log_probs = self.target_log_probs(np.where(valid, ids, 0), torch.as_tensor(targets))
        return log_probs.masked_fill_(torch.from_numpy(~valid), float("-inf"))


class Datastore:
    """Keys, values and teachers of a finished datastore, checked on open."""

    def __init__(self, folder, manifest, keys, values):
        self.folder = folder
        self.manifest = manifest
        self.keys = keys
        self.values = values
        self.num_rows = manifest["num_rows"]
        self.key_dim = manifest["key_dim"]

    @classmethod
    def open(cls, folder, dictionary=None, student_fingerprint=None):
        """Open and check a datastore.

        Args:
            folder: the datastore folder.
            dictionary: the evaluation dictionary; its symbols must equal
                the datastore's.
            student_fingerprint: :func:`manifest.model_fingerprint` of the
                evaluated student; must equal the one the keys came from.
        """
        fix = f"Dump the datastore again with: {_dump_command(folder)}"
        manifest = mf.read_json(os.path.join(folder, MANIFEST), f"datastore {folder}", fix)
        if manifest.get("format") != mf.FORMAT:
            raise mf.DatastoreMismatchError(
                f"datastore {folder}: format is {manifest.get('format')!r}, expected {mf.FORMAT!r}"
            )
        mf.check_fields(f"datastore {folder}", manifest, DATASTORE_FIELDS, fix)
        keys = mf.open_array(folder, manifest["keys"], what="keys")
        values = mf.open_array(folder, manifest["values"], what="values")
        values = values.reshape(-1) if values.ndim == 2 else values
        store = cls(folder, manifest, keys, values)
        mf.check_equal(f"datastore {folder}", "keys shape", [manifest["num_rows"], manifest["key_dim"]],
                       list(keys.shape), fix)
        mf.check_equal(f"datastore {folder}", "values rows", manifest["num_rows"], int(values.shape[0]), fix)
        store.check_samples()
        if dictionary is not None:
            store.check_dictionary(dictionary)
        if student_fingerprint is not None:
            store.check_student(student_fingerprint)
        return store

    def check_samples(self):
        """Compare sampled rows of K and V with the hashes the dump recorded.

        Raises :class:`manifest.DatastoreMismatchError` when keys.npy or
        values.npy was replaced by a file of the same shape (another dump's,
        or a reordered one). Datastores dumped before values were hashed have
        no ``value_sample_sha256`` and skip that check.
        """
        checks = [("keys", "key_sample_sha256", mf.key_sample_fingerprint(self.keys))]
        if "value_sample_sha256" in self.manifest:
            checks.append(("values", "value_sample_sha256", mf.value_sample_fingerprint(self.values)))
        for array, field, actual in checks:
            if actual == self.manifest[field]:
                continue
            spec = self.manifest[array]
            path = spec["file"] if os.path.isabs(spec["file"]) else os.path.join(self.folder, spec["file"])
            raise mf.DatastoreMismatchError(
                f"datastore {self.folder}: {path} hashes to {field} {actual} but the manifest lists "
                f"{self.manifest[field]}, so the file comes from another dump or was modified. Restore "
                f"the file that this dump wrote, or dump the datastore again with: {_dump_command(self.folder)}"
            )

    def check_dictionary(self, dictionary):
        expected = self.manifest["dictionary"]
        actual = mf.dictionary_fingerprint(dictionary)
        mf.check_equal(
            f"datastore {self.folder}", "dictionary", expected, actual,
            "Evaluate with the data-bin whose dict.txt the datastore was dumped with, or dump a "
            "new datastore with this dictionary.",
        )

    def check_student(self, fingerprint):
        expected = self.manifest.get("student", {}).get("fingerprint")
        mf.check_equal(
            f"datastore {self.folder}", "student checkpoint fingerprint", expected, fingerprint,
            f"The keys were computed by another checkpoint "
            f"({self.manifest.get('student', {}).get('path')}). Evaluate with that checkpoint, or "
            f"dump a new datastore with this one.",
        )

    def teacher_names(self):
        """Return the names of the finished teachers, sorted."""
        names = []
        for path in sorted(glob.glob(os.path.join(self.folder, "teachers", "*", TEACHER_MANIFEST))):
            with open(path) as f:
                if json.load(f).get("status") == mf.COMPLETE:
                    names.append(os.path.basename(os.path.dirname(path)))
        return names

    def open_teacher(self, name):
        """Open teacher ``name`` and check that it belongs to these rows."""
        folder = os.path.join(self.folder, "teachers", name)
        what = f"teacher {name!r} of datastore {self.folder}"
        fix = _teacher_fix(self.folder, name)
        if not os.path.isdir(folder):
            raise mf.DatastoreMismatchError(
                f"{what}: not found. Available teachers: {', '.join(self.teacher_names()) or 'none'}"
            )
        manifest = mf.read_json(os.path.join(folder, TEACHER_MANIFEST), what, fix)
        mf.check_fields(what, manifest, TEACHER_FIELDS, fix)
        mf.check_equal(what, "datastore_id", self.manifest["datastore_id"], manifest["datastore_id"], fix)
        mf.check_equal(what, "num_rows", self.num_rows, manifest["num_rows"], fix)
        mf.check_equal(what, "dictionary", self.manifest["dictionary"], manifest["dictionary"],
                       "The teacher was dumped with another vocabulary; teachers must share the "
                       "student's dictionary. " + fix)
        states = mf.open_array(folder, manifest["states"], what=f"{what} states")
        lognorm = mf.open_array(folder, manifest["lognorm"], what=f"{what} log-normalizers")
        head_path = os.path.join(folder, manifest["head"]["file"])
        if not os.path.exists(head_path):
            raise mf.DatastoreMismatchError(f"{what}: {head_path} is missing. {fix}")
        head = _load_head(head_path, manifest["head"].get("sha256"), what, fix)
        mf.check_equal(what, "head vocabulary size", self.manifest["dictionary"]["size"], head.vocab_size, fix)
        mf.check_equal(what, "head dimension", int(states.shape[1]), head.dim, fix)
        mf.check_equal(what, "normalizer columns", head.num_clusters, int(lognorm.shape[1]), fix)
        return TeacherStore(folder, manifest, states, lognorm, head)

    def remove_teacher(self, name):
        """Delete teacher ``name``; K and V are untouched."""
        folder = os.path.join(self.folder, "teachers", name)
        if not os.path.isdir(folder):
            teachers = os.path.join(self.folder, "teachers")
            available = sorted(os.listdir(teachers)) if os.path.isdir(teachers) else []
            raise FileNotFoundError(
                f"teacher {name!r} not found in {self.folder}. Available teachers: {', '.join(available) or 'none'}"
            )
        shutil.rmtree(folder)


def new_datastore_id():
    return uuid.uuid4().hex


def _dump_command(folder):
    """Return the command that dumps keys and values into ``folder`` again."""
    return (f"fairseq-eval-lm DATA --user-dir ppkd_fairseq --task ppkd_language_modeling "
            f"--path STUDENT_CHECKPOINT --gen-subset SPLIT ... --ppkd-mode dump --ppkd-dstore {folder} "
            f"--ppkd-overwrite")


def _teacher_fix(datastore_folder, name):
    """Return how to replace teacher ``name``: remove it, then dump it with the command of its kind."""
    return (
        f"Remove the teacher with: python -m ppkd_fairseq.cli.datastore remove-teacher {datastore_folder} "
        f"--name {name}, then dump it again. For a causal LM: fairseq-eval-lm DATA --user-dir ppkd_fairseq "
        f"--task ppkd_language_modeling --path TEACHER_CHECKPOINT --gen-subset SPLIT ... --ppkd-mode "
        f"dump_teacher --ppkd-dstore {datastore_folder} --ppkd-teacher-name {name}. For a masked LM: "
        f"python -m ppkd_fairseq.cli.datastore add-masked-teacher {datastore_folder} --checkpoint "
        f"TEACHER_CHECKPOINT --data DATA --split SPLIT --name {name}"
    )


def _load_head(path, sha256, what, fix):
    """Load the :class:`TeacherHead` in ``path`` after checking its SHA-256 when ``sha256`` is given."""
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            raise mf.DatastoreMismatchError(
                f"{what}: {path} hashes to sha256 {digest.hexdigest()} but teacher.json lists {sha256}, "
                f"so the file is truncated, modified or another teacher's. {fix}"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return TeacherHead.from_state_dict(state)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError) as err:
        raise mf.DatastoreMismatchError(
            f"{what}: {path} is not a readable teacher head ({type(err).__name__}: {err}). {fix}"
        ) from err
