"""Manifests: JSON records that tie datastore files to what produced them.

A datastore folder holds ``manifest.json`` for the keys and values, one
``teachers/<name>/teacher.json`` per teacher and ``index/index.json`` for the
FAISS index. Each is written last and atomically, so a missing manifest, or
one whose ``status`` is not ``complete``, marks an interrupted job. Every
loader calls the ``check_*`` functions here, which raise
:class:`DatastoreMismatchError` naming the field, both values and the fix.
"""

import hashlib
import json
import os
import tempfile

import numpy as np

FORMAT = "ppkd-datastore"
FORMAT_VERSION = 1
COMPLETE = "complete"
INCOMPLETE = "incomplete"


class DatastoreMismatchError(ValueError):
    """A datastore file that does not match its model, dictionary or peers."""


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def chmod_default(path):
    """Set the mode of ``path`` to 0666 minus the umask, the mode ``open()`` gives a new file.

    ``tempfile.mkstemp`` creates 0600 files, so files written through it need
    this before the rename, or they stay unreadable to other users.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_json(path, what, fix):
    """Read a manifest, raising a clear error when it is missing or unfinished."""
    if not os.path.exists(path):
        raise DatastoreMismatchError(f"{what}: {path} is missing. {fix}")
    with open(path) as f:
        obj = json.load(f)
    if obj.get("status") != COMPLETE:
        raise DatastoreMismatchError(
            f"{what}: {path} has status {obj.get('status')!r}, not {COMPLETE!r}, so the job "
            f"that writes it was interrupted. {fix}"
        )
    return obj


def dictionary_fingerprint(dictionary):
    """Return ``{"sha256", "size"}`` of a fairseq Dictionary's symbol list."""
    digest = hashlib.sha256("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()
    return {"sha256": digest, "size": len(dictionary)}


def model_fingerprint(model):
    """Return the SHA-256 of a model's parameters, rounded to float16.

    Rounding first makes the value the same for ``--fp16`` and float32
    evaluation of one checkpoint, while any retrained or other checkpoint
    differs.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not hasattr(tensor, "detach"):
            continue
        digest.update(name.encode("utf-8"))
        digest.update(str(tuple(tensor.shape)).encode("utf-8"))
        t = tensor.detach()
        if t.is_floating_point():
            t = t.half()
        digest.update(t.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def array_spec(filename, dtype, shape, offset=0, layout="npy"):
    """Describe an on-disk array: file (relative), dtype, shape, byte offset."""
    return {
        "file": filename,
        "dtype": np.dtype(dtype).name,
        "shape": [int(s) for s in shape],
        "offset": int(offset),
        "layout": layout,
    }


def open_array(folder, spec, mode="r", what="array"):
    """Open the array described by ``spec`` as a NumPy memmap.

    The file's size must equal ``offset + prod(shape) * itemsize``; a
    truncated or oversized file is rejected. For ``layout: npy`` the file's
    own header must also give the manifest's dtype, shape and offset, which
    catches a wrong dtype of the same item size (float16 read as int16).
    """
    path = spec["file"] if os.path.isabs(spec["file"]) else os.path.join(folder, spec["file"])
    if not os.path.exists(path):
        raise DatastoreMismatchError(
            f"{what}: {path} is missing although the manifest lists it; restore the file or "
            f"rebuild this part of the datastore"
        )
    dtype = np.dtype(spec["dtype"])
    shape = tuple(spec["shape"])
    expected = spec["offset"] + int(np.prod(shape)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual != expected:
        raise DatastoreMismatchError(
            f"{what}: {path} has {actual} bytes, but the manifest's shape {list(shape)} of "
            f"{dtype.name} at offset {spec['offset']} needs {expected}; the file is truncated "
            f"or belongs to another datastore, so rebuild it"
        )
    if spec.get("layout") == "npy":
        _check_npy_header(path, dtype, shape, spec["offset"], what)
    return np.memmap(path, dtype=dtype, mode=mode, offset=spec["offset"], shape=shape)


def _check_npy_header(path, dtype, shape, offset, what):
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            header_shape, fortran, header_dtype = np.lib.format.read_array_header_1_0(f)
        else:
            header_shape, fortran, header_dtype = np.lib.format.read_array_header_2_0(f)
        header_offset = f.tell()
    found = (header_dtype.name, list(header_shape), header_offset, fortran)
    listed = (dtype.name, list(shape), offset, False)
    if found != listed:
        raise DatastoreMismatchError(
            f"{what}: the .npy header of {path} gives dtype, shape, offset and Fortran order {found} "
            f"but the manifest lists {listed}; the manifest was edited or the file belongs to "
            f"another datastore, so rebuild it"
        )


def check_fields(what, manifest, fields, fix):
    """Raise :class:`DatastoreMismatchError` naming the ``fields`` missing from ``manifest``."""
    missing = [field for field in fields if field not in manifest]
    if missing:
        raise DatastoreMismatchError(f"{what}: the manifest is missing the fields {', '.join(missing)}. {fix}")


def check_equal(what, field, expected, actual, fix):
    """Raise :class:`DatastoreMismatchError` unless ``expected == actual``."""
    if expected != actual:
        raise DatastoreMismatchError(
            f"{what}: {field} is {actual!r} but the datastore expects {expected!r}. {fix}"
        )


def _sample_rows(num_rows, num_samples):
    """Return up to ``num_samples`` evenly spaced row ids in [0, num_rows), first and last included."""
    return np.unique(np.linspace(0, num_rows - 1, num=min(num_rows, num_samples)).astype(np.int64))


def key_sample_fingerprint(keys, num_samples=4096):
    """Hash an evenly spaced sample of key rows plus the row count.

    Hashing every key of a datastore of hundreds of GB takes too long at each
    load; a strided sample still tells apart keys from another dump.
    """
    rows = _sample_rows(keys.shape[0], num_samples)
    digest = hashlib.sha256(str(tuple(keys.shape)).encode("utf-8"))
    digest.update(np.ascontiguousarray(keys[rows]).tobytes())
    return digest.hexdigest()


def value_sample_fingerprint(values, num_samples=4096):
    """Hash an evenly spaced sample of values (token ids) plus the row count.

    ``values`` is (N,) or (N, 1) of any integer dtype. The sampled ids are
    hashed as int64, so the hash does not depend on the storage dtype. Like
    :func:`key_sample_fingerprint` it reads ``num_samples`` rows at most,
    which is enough to detect shuffled values or another split's values. A
    change confined to rows between the samples goes unnoticed.
    """
    values = values.reshape(-1)
    rows = _sample_rows(values.shape[0], num_samples)
    digest = hashlib.sha256(str(tuple(values.shape)).encode("utf-8"))
    digest.update(np.asarray(values[rows], dtype=np.int64).tobytes())
    return digest.hexdigest()
