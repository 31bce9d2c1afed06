"""Retrieve neighbours of query vectors and recompute their distances.

FAISS's IVFPQ distances are approximations from the compressed codes; by
default the distances are recomputed exactly (squared L2, float32) from the
stored keys of the retrieved rows. FAISS pads results with id -1 when the
probed lists hold fewer than k vectors; such slots are marked invalid and no
-1 is ever used to index the keys, values or teacher states.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Neighbours:
    """The k retrieved neighbours of n queries.

    Attributes:
        ids: (n, k) int64 datastore rows, -1 where invalid.
        distances: (n, k) float32 squared L2 distances, +inf where invalid.
        valid: (n, k) bool.
    """

    ids: np.ndarray
    distances: np.ndarray
    valid: np.ndarray


def as_tensor(array):
    """Return a CPU tensor that shares memory with a NumPy array or memmap.

    A read-only memmap gives a tensor that must not be written to. Nothing
    here writes to one, so torch's warning about it is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(array))


def take_rows(array, ids, dtype=None):
    """Return ``array[ids]`` as a tensor, for (m,) int64 row ids all >= 0.

    ``array`` is a NumPy array, a memmap, or a CPU tensor (such as
    :func:`as_tensor`'s, made once for a loop of calls).

    torch's ``index_select`` copies the rows with torch's threads. On a
    memmap the OS pages them in from disk or from its cache. Rows are cast to ``dtype``
    (a torch dtype) after the copy, so the memmap is read at its stored width.
    """
    table = array if isinstance(array, torch.Tensor) else as_tensor(array)
    rows = table.index_select(0, torch.as_tensor(ids, dtype=torch.int64))
    return rows if dtype is None else rows.to(dtype)


def gather_rows(array, ids, valid, dtype=None):
    """Read ``array[ids]`` for the valid slots only; invalid slots are zero.

    Args:
        array: (N, ...) memmap or array.
        ids: (n, k) int64 row ids.
        valid: (n, k) bool.
        dtype: NumPy dtype of the result (default: ``array``'s).

    Returns:
        (n, k, ...) array of ``dtype``.
    """
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    rows = np.where(valid, ids, 0).reshape(-1)
    out = take_rows(array, rows).numpy().astype(dtype, copy=False).reshape(ids.shape + array.shape[1:])
    if not valid.all():
        out = np.array(out, copy=True) if not out.flags.writeable else out
        out[~valid] = 0
    return out


def exact_distances(queries, keys, ids, valid, chunk_queries=8):
    """Return (n, k) float32 squared L2 distances to the stored keys.

    Args:
        queries: (n, d) float32.
        keys: (N, d) memmap of the datastore keys.
        ids, valid: (n, k) from the search.
        chunk_queries: queries per step; a step holds a few (chunk, k, d)
            float32 temporaries (8 MB each at the default, k = 1024 and
            d = 256). Small steps keep them in the CPU's cache: under
            ``bench/bench_overhead.py --profile`` the exact distances took
            8.9 s with 128 queries per step and 1.1 s with 8 (two runs at
            different machine load).
    """
    out = np.empty(ids.shape, dtype=np.float32)
    for begin in range(0, ids.shape[0], chunk_queries):
        end = begin + chunk_queries
        c = min(end, ids.shape[0]) - begin
        rows = np.where(valid[begin:end], ids[begin:end], 0).reshape(-1)
        neighbour_keys = take_rows(keys, rows, torch.float32).view(c, ids.shape[1], -1)  # (c, k, d)
        q = torch.from_numpy(queries[begin:end]).float().unsqueeze(1)  # (c, 1, d)
        # In place, because neighbour_keys is a fresh array: one (c, k, d)
        # temporary instead of three, and the same arithmetic as (x - q) ** 2.
        diff = neighbour_keys.sub_(q)
        out[begin:end] = diff.mul_(diff).sum(-1).numpy()
    out[~valid] = np.inf
    return out


def search(index, queries, k, keys=None, exclude_rows=None, exact=True):
    """Search ``index`` and return :class:`Neighbours`.

    Args:
        index: a FAISS index over the keys.
        queries: (n, d) float32 query vectors.
        k: neighbours per query.
        keys: (N, d) key memmap, needed when ``exact``.
        exclude_rows: optional (n,) int64 row of each query in the datastore
            (evaluation on the datastore's own split); that row is dropped
            and k is kept by searching k + 1.
        exact: recompute distances from the keys instead of FAISS's.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = queries.shape[0]
    extra = 1 if exclude_rows is not None else 0
    distances, ids = index.search(queries, k + extra)
    ids = ids.astype(np.int64, copy=False)
    valid = ids >= 0
    if exclude_rows is not None:
        valid &= ids != np.asarray(exclude_rows, dtype=np.int64)[:, None]
        # Keep the first k valid slots of each query (FAISS sorts by distance).
        keep = np.cumsum(valid, axis=1) <= k
        valid &= keep
        order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(ids, order, axis=1)
        distances = np.take_along_axis(distances, order, axis=1)
        valid = np.take_along_axis(valid, order, axis=1)
    ids = np.where(valid, ids, -1)
    if exact:
        if keys is None:
            raise ValueError("exact distances need the datastore keys")
        distances = exact_distances(queries, keys, ids, valid)
    else:
        distances = np.where(valid, distances, np.inf).astype(np.float32)
    assert ids.shape == (n, k) and distances.shape == (n, k)
    return Neighbours(ids=ids, distances=distances, valid=valid)
