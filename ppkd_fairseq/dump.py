"""Writers that fill a datastore: keys and values, then teacher states.

Both write rows at global offsets through :class:`ShardedRowWriter`, so
several processes (fairseq shards or distributed ranks) can fill one
datastore; the shard that completes it writes the manifest, last and
atomically.
"""

import hashlib
import json
import logging
import os
import time

import numpy as np
import torch

from . import manifest as mf
from .datastore import (
    MANIFEST,
    TEACHER_MANIFEST,
    Datastore,
    ShardedRowWriter,
    check_float16_range,
    new_datastore_id,
    npy_spec,
)
from .teacher_head import log_normalizers

logger = logging.getLogger(__name__)


def run_key(*parts):
    """Hash the inputs of a dump; equal on every shard of one dump."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DatastoreWriter:
    """Write keys K and values V of one split into ``folder``.

    Args:
        folder: the datastore folder.
        num_rows: N, tokens in the split's token stream.
        key_dim: d.
        key_dtype: ``float16`` (default, half the disk) or ``float32``.
        metadata: manifest fields describing the student, dictionary and
            corpus (``dictionary``, ``student``, ``corpus``, ``dump``).
        shard_id, num_shards: this process's shard.
        overwrite: replace a finished datastore in ``folder``.
    """

    def __init__(self, folder, num_rows, key_dim, key_dtype, metadata, shard_id=0, num_shards=1, overwrite=False):
        path = os.path.join(folder, MANIFEST)
        if not overwrite and manifest_status(path) == mf.COMPLETE:
            raise FileExistsError(
                f"{folder} already holds a finished datastore; pass --ppkd-overwrite to replace it "
                f"(its teachers and index will no longer match and are removed), or choose "
                f"another --ppkd-dstore"
            )
        self.folder = folder
        self.num_rows = num_rows
        self.key_dim = key_dim
        self.key_dtype = np.dtype(key_dtype)
        self.metadata = metadata
        self.key = run_key(metadata, num_rows, key_dim, self.key_dtype.name, num_shards)
        os.makedirs(folder, exist_ok=True)
        if shard_id == 0:
            mf.write_json_atomic(path, {"format": mf.FORMAT, "status": mf.INCOMPLETE, "run_key": self.key})
        self.writer = ShardedRowWriter(
            folder,
            {"keys": ("keys.npy", self.key_dtype, (key_dim,)), "values": ("values.npy", np.int32, ())},
            num_rows,
            self.key,
            shard_id=shard_id,
            num_shards=num_shards,
            marker="datastore",
        )
        self.started = time.time()

    def write(self, rows, keys, values):
        """Write (n, d) keys and (n,) values at rows (n,)."""
        keys = np.asarray(keys, dtype=np.float32)
        if keys.shape != (len(rows), self.key_dim):
            raise ValueError(f"keys have shape {keys.shape}, expected ({len(rows)}, {self.key_dim})")
        if self.key_dtype == np.float16:
            check_float16_range(keys, rows)
        self.writer.write(rows, keys=keys, values=np.asarray(values, dtype=np.int32))

    def finish(self):
        """Record this shard; the shard that completes the dump writes the manifest."""
        if not self.writer.finish():
            logger.info("shard done (%d rows); waiting for the other shards", self.writer.rows_written)
            return False
        keys = self.writer.arrays["keys"]
        manifest = {
            "format": mf.FORMAT,
            "format_version": mf.FORMAT_VERSION,
            "status": mf.COMPLETE,
            "datastore_id": new_datastore_id(),
            "num_rows": self.num_rows,
            "key_dim": self.key_dim,
            "keys": npy_spec(self.folder, "keys.npy"),
            "values": npy_spec(self.folder, "values.npy"),
            "key_sample_sha256": mf.key_sample_fingerprint(keys),
            "value_sample_sha256": mf.value_sample_fingerprint(self.writer.arrays["values"]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dump_seconds": round(time.time() - self.started, 1),
            **self.metadata,
        }
        _remove_dependents(self.folder)
        mf.write_json_atomic(os.path.join(self.folder, MANIFEST), manifest)
        self.writer.clear_markers()
        logger.info("datastore complete: %d rows of %d-dim %s keys in %s", self.num_rows, self.key_dim,
                    self.key_dtype.name, self.folder)
        return True


def _remove_dependents(folder):
    # A new dump invalidates the old teachers and index: their manifests name
    # the old datastore_id, so loaders would reject them anyway; removing the
    # manifests makes the state explicit.
    for sub in ("index/index.json",):
        path = os.path.join(folder, sub)
        if os.path.exists(path):
            os.remove(path)
    teachers = os.path.join(folder, "teachers")
    if os.path.isdir(teachers):
        for name in os.listdir(teachers):
            path = os.path.join(teachers, name, TEACHER_MANIFEST)
            if os.path.exists(path):
                os.remove(path)


def manifest_status(path):
    """Return the ``status`` field of the manifest at ``path``, or None when there is no manifest."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("status")


def check_teacher_absent(datastore, name):
    """Raise ``FileExistsError`` when ``datastore`` already contains a finished teacher ``name``.

    An interrupted dump of that name (status ``incomplete``) may be resumed or
    replaced, like an interrupted datastore dump.
    """
    folder = os.path.join(datastore.folder, "teachers", name)
    if manifest_status(os.path.join(folder, TEACHER_MANIFEST)) == mf.COMPLETE:
        raise FileExistsError(
            f"finished teacher {name!r} already exists in {folder}. To replace it, pass --ppkd-overwrite to "
            f"fairseq-eval-lm --ppkd-mode dump_teacher or --overwrite to add-masked-teacher, or remove it first "
            f"with: python -m ppkd_fairseq.cli.datastore remove-teacher {datastore.folder} --name {name}. "
            f"Otherwise choose another teacher name."
        )


class TeacherWriter:
    """Write one teacher's states U and log-normalizers for a datastore.

    Args:
        datastore: the finished :class:`Datastore` (K, V) to attach to.
        name: teacher name (a folder under ``teachers/``).
        head: the teacher's :class:`TeacherHead` over the shared vocabulary.
        metadata: manifest fields (``kind``, ``teacher`` fingerprint, settings).
        state_dtype: storage dtype of the states (float16 by default).
        dictionary: the teacher's dictionary fingerprint, which must equal
            the datastore's.
        overwrite: replace a finished teacher of the same name. Without it,
            such a teacher raises ``FileExistsError`` and stays as it is.
    """

    def __init__(self, datastore, name, head, metadata, dictionary, state_dtype="float16",
                 shard_id=0, num_shards=1, overwrite=False):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid teacher name {name!r}; use a plain folder name like 'causal'")
        if not overwrite:
            check_teacher_absent(datastore, name)
        mf.check_equal(
            f"teacher {name!r}", "dictionary", datastore.manifest["dictionary"], dictionary,
            "Teachers must use the student's dictionary: train or binarize the teacher with "
            "fairseq-preprocess --srcdict pointing at the datastore's dict.txt.",
        )
        if head.vocab_size != datastore.manifest["dictionary"]["size"]:
            raise mf.DatastoreMismatchError(
                f"teacher {name!r}: its output layer covers {head.vocab_size} words but the datastore's "
                f"dictionary has {datastore.manifest['dictionary']['size']}"
            )
        self.datastore = datastore
        self.name = name
        self.head = head
        self.metadata = metadata
        self.dictionary = dictionary
        self.state_dtype = np.dtype(state_dtype)
        self.folder = os.path.join(datastore.folder, "teachers", name)
        os.makedirs(self.folder, exist_ok=True)
        self.key = run_key(datastore.manifest["datastore_id"], metadata, self.state_dtype.name, num_shards)
        if shard_id == 0:
            mf.write_json_atomic(os.path.join(self.folder, TEACHER_MANIFEST),
                                 {"name": name, "status": mf.INCOMPLETE, "run_key": self.key})
        self.writer = ShardedRowWriter(
            self.folder,
            {
                "states": ("states.npy", self.state_dtype, (head.dim,)),
                "lognorm": ("lognorm.npy", np.float32, (head.num_clusters,)),
            },
            datastore.num_rows,
            self.key,
            shard_id=shard_id,
            num_shards=num_shards,
            marker="teacher",
        )
        self.started = time.time()

    def write(self, rows, states, targets):
        """Write (n, d_t) states for rows (n,) whose tokens are targets (n,).

        Raises ``DatastoreMismatchError`` at the first row whose token differs
        from the datastore's value, because then the teacher saw another text.
        """
        rows = np.asarray(rows, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        values = np.asarray(self.datastore.values[rows], dtype=np.int64)
        bad = np.nonzero(values != targets)[0]
        if bad.size:
            i = bad[0]
            raise mf.DatastoreMismatchError(
                f"teacher {self.name!r}: row {int(rows[i])} holds token {int(targets[i])} in the teacher's "
                f"data but the datastore's value is {int(values[i])}. The teacher must read the same split "
                f"of the same data-bin as the datastore dump."
            )
        states = torch.as_tensor(np.asarray(states)).float()
        if self.state_dtype == np.float16:
            check_float16_range(states.numpy(), rows, what="teacher state")
        stored = states.to(torch.float16 if self.state_dtype == np.float16 else torch.float32)
        # Normalizers from the stored (rounded) states, so the stored tables
        # define exactly the teacher distribution used at evaluation.
        lognorm = log_normalizers(self.head, stored)
        self.writer.write(rows, states=stored.numpy(), lognorm=lognorm.numpy())

    def finish(self):
        """Record this shard; the shard that completes the pass writes the manifest."""
        if not self.writer.finish():
            return False
        head_file = "head.pt"
        head_path = os.path.join(self.folder, head_file)
        tmp = head_path + ".tmp"
        torch.save(self.head.state_dict(), tmp)
        os.replace(tmp, head_path)
        with open(head_path, "rb") as f:
            head_sha = hashlib.sha256(f.read()).hexdigest()
        manifest = {
            "name": self.name,
            "status": mf.COMPLETE,
            "datastore_id": self.datastore.manifest["datastore_id"],
            "num_rows": self.datastore.num_rows,
            "dictionary": self.dictionary,
            "states": npy_spec(self.folder, "states.npy"),
            "lognorm": npy_spec(self.folder, "lognorm.npy"),
            "head": {
                "file": head_file,
                "sha256": head_sha,
                "type": "adaptive_softmax" if self.head.tail_ranges else "softmax",
                "vocab_size": self.head.vocab_size,
                "dim": self.head.dim,
                "num_clusters": self.head.num_clusters,
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dump_seconds": round(time.time() - self.started, 1),
            **self.metadata,
        }
        mf.write_json_atomic(os.path.join(self.folder, TEACHER_MANIFEST), manifest)
        self.writer.clear_markers()
        logger.info("teacher %r complete: %d rows of %d-dim states", self.name, self.datastore.num_rows,
                    self.head.dim)
        return True
