"""Retrieve neighbours of query vectors and recompute their distances.

FAISS's IVFPQ distances are approximations from the compressed codes; by
default the distances are recomputed exactly (squared L2, float32) from the
stored keys of the retrieved rows. FAISS pads results with id -1 when the
probed lists hold fewer than k vectors; such slots are marked invalid and no
-1 is ever used to index the keys, values or teacher states.
"""

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


def gather_rows(array, ids, valid):
    """Read ``array[ids]`` for the valid slots only; invalid slots are zero.

    Args:
        array: (N, ...) memmap or array.
        ids: (n, k) int64 row ids.
        valid: (n, k) bool.

    Returns:
        (n, k, ...) array of ``array``'s dtype.
    """
    out = np.zeros(ids.shape + array.shape[1:], dtype=array.dtype)
    flat = ids[valid]
    if flat.size:
        # Each distinct row is read once and in increasing order, so a memmap
        # touches each page once; rows shared by several queries are copied in RAM.
        rows, inverse = np.unique(flat, return_inverse=True)
        out[valid] = np.asarray(array[rows])[inverse.reshape(-1)]
    return out


def exact_distances(queries, keys, ids, valid, chunk_queries=128):
    """Return (n, k) float32 squared L2 distances to the stored keys.

    Args:
        queries: (n, d) float32.
        keys: (N, d) memmap of the datastore keys.
        ids, valid: (n, k) from the search.
        chunk_queries: queries per step; a step holds a few (chunk, k, d)
            float32 temporaries (128 MB each at k = 1024, d = 256).
    """
    out = np.empty(ids.shape, dtype=np.float32)
    for begin in range(0, ids.shape[0], chunk_queries):
        end = begin + chunk_queries
        neighbour_keys = torch.from_numpy(gather_rows(keys, ids[begin:end], valid[begin:end])).float()  # (c, k, d)
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
