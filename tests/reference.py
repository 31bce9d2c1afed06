"""Brute-force NumPy reference for kNN-LM and PP-KD scoring.

Every probability the plugin computes is recomputed here the slow, obvious
way: exact nearest-neighbour search over all keys in float64, teacher
distributions over the whole vocabulary from the raw output-layer matrices,
and Eqs. 1-4 of Jin, Ge and Wei (AACL-IJCNLP 2022) mixed in probability
space in float64:

    a_j        = softmax_j(-d_j / T)                 (d_j: squared L2)
    P_hard(w)  = sum_{j : v_j = w} a_j               (Eq. 1)
    P_logit(w) = sum_j a_j * p_teacher(w | u_j)      (Eq. 2)
    P_kNN      = mu * P_hard + (1 - mu) * P_logit    (Eq. 3)
    P          = lam * P_kNN + (1 - lam) * P_LM      (Eq. 4)

Nothing here imports the plugin, so a bug shared by both sides would have
to be written twice.
"""

import numpy as np

# Queries per block of the brute-force distance matrix: 512 x N float64.
SEARCH_BLOCK = 512


def log_softmax(x, axis=-1):
    """Return ``log softmax(x)`` along ``axis`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def exact_search(queries, keys, k, exclude_rows=None):
    """Find the k nearest keys of each query by squared L2, over all keys.

    Args:
        queries: (n, d) query vectors.
        keys: (N, d) keys; float16 keys are widened to float64 first.
        k: neighbours per query.
        exclude_rows: optional (n,) row of each query that must not be
            returned (the query's own row).

    Returns:
        ``(ids, distances, next_distance)``: (n, k) int64 row ids sorted by
        distance, their (n, k) float64 squared L2 distances, and the (n,)
        distance of the (k+1)-th neighbour. A query whose k-th and (k+1)-th
        distances are nearly equal has no unique top k.
    """
    q = np.asarray(queries, dtype=np.float64)
    x = np.asarray(keys, dtype=np.float64)
    n = q.shape[0]
    assert q.shape[1] == x.shape[1], f"queries have d={q.shape[1]} but keys have d={x.shape[1]}"
    assert k < x.shape[0], f"k={k} needs more than {x.shape[0]} keys"
    ids = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k))
    next_distance = np.empty(n)
    key_norms = (x**2).sum(1)  # (N,)
    for start in range(0, n, SEARCH_BLOCK):
        end = min(start + SEARCH_BLOCK, n)
        # |q - x|^2 = |q|^2 + |x|^2 - 2 q.x, which float64 keeps accurate to
        # about 1e-12 at these magnitudes.
        block = q[start:end]
        d = (block**2).sum(1)[:, None] + key_norms[None, :] - 2.0 * block @ x.T  # (b, N)
        d = np.maximum(d, 0.0)
        if exclude_rows is not None:
            d[np.arange(end - start), np.asarray(exclude_rows[start:end])] = np.inf
        # The k + 1 smallest in any order, then sorted; ties keep any of their rows.
        order = np.argpartition(d, k, axis=1)[:, : k + 1]
        order = np.take_along_axis(order, np.argsort(np.take_along_axis(d, order, axis=1), axis=1), axis=1)
        nearest = np.take_along_axis(d, order, axis=1)
        ids[start:end] = order[:, :k]
        distances[start:end] = nearest[:, :k]
        next_distance[start:end] = nearest[:, k]
    return ids, distances, next_distance


def softmax_log_probs(states, weight, bias=None):
    """Return (n, V) ``log_softmax(states @ weight.T + bias)`` in float64."""
    logits = np.asarray(states, dtype=np.float64) @ np.asarray(weight, dtype=np.float64).T
    if bias is not None:
        logits = logits + np.asarray(bias, dtype=np.float64)
    return log_softmax(logits)


def adaptive_softmax_log_probs(states, head_weight, tails, cutoff):
    """Return (n, V) log-probabilities of a bias-free adaptive softmax.

    The head scores the ``cutoff[0]`` frequent words plus one logit per tail
    cluster. A word of tail cluster i has probability
    ``p_head(cluster i) * softmax(tail_i(u))[word - cutoff[i]]``.

    Args:
        states: (n, d) inputs of the adaptive softmax.
        head_weight: (cutoff[0] + n_tail, d) head matrix.
        tails: one ``(projection, output)`` pair per tail cluster, shaped
            (d_i, d) and (cutoff[i + 1] - cutoff[i], d_i).
        cutoff: word-id boundaries; ``cutoff[-1]`` is the vocabulary size.
    """
    u = np.asarray(states, dtype=np.float64)
    head = log_softmax(u @ np.asarray(head_weight, dtype=np.float64).T)  # (n, cutoff[0] + n_tail)
    out = np.empty((u.shape[0], cutoff[-1]))
    out[:, : cutoff[0]] = head[:, : cutoff[0]]
    for i, (projection, output) in enumerate(tails):
        hidden = u @ np.asarray(projection, dtype=np.float64).T  # (n, d_i)
        tail = log_softmax(hidden @ np.asarray(output, dtype=np.float64).T)  # (n, V_i)
        out[:, cutoff[i]: cutoff[i + 1]] = head[:, cutoff[0] + i, None] + tail
    return out


def neighbour_weights(distances, temperature):
    """Return (n, k) ``softmax_j(-d_j / T)`` in float64."""
    return np.exp(log_softmax(-np.asarray(distances, dtype=np.float64) / temperature))


def ppkd_probabilities(lm_log_probs, ids, distances, values, targets, teacher_log_probs, temperature, mu, lam):
    """Score each target under Eqs. 1-4.

    Args:
        lm_log_probs: (n,) natural log ``P_LM(target)``.
        ids: (n, k) neighbour rows, all valid.
        distances: (n, k) their squared L2 distances.
        values: (N,) datastore values.
        targets: (n,) target word ids.
        teacher_log_probs: list of (N, V) log-distributions, one per teacher,
            row-aligned with the datastore; several are averaged as
            probabilities. May be empty when ``mu == 1``.
        temperature, mu, lam: T, mu and lambda.

    Returns:
        dict of (n,) float64 probabilities ``hard``, ``logit``, ``knn`` and
        ``final`` (``logit`` is NaN when there is no teacher).
    """
    targets = np.asarray(targets, dtype=np.int64)
    a = neighbour_weights(distances, temperature)  # (n, k)
    match = np.asarray(values)[ids] == targets[:, None]  # (n, k)
    hard = (a * match).sum(1)
    if teacher_log_probs:
        # p_teacher(target | u_j), averaged over teachers: (n, k)
        p_teacher = np.mean([np.exp(t[ids, targets[:, None]]) for t in teacher_log_probs], axis=0)
        logit = (a * p_teacher).sum(1)
    else:
        assert mu == 1.0, f"mu = {mu} needs teacher distributions"
        logit = np.full(hard.shape, np.nan)
    knn = hard if mu == 1.0 else mu * hard + (1 - mu) * logit
    final = lam * knn + (1 - lam) * np.exp(np.asarray(lm_log_probs, dtype=np.float64))
    return {"hard": hard, "logit": logit, "knn": knn, "final": final}


def safe_log(p):
    """Return ``log p`` with ``log 0 = -inf`` and no warning."""
    with np.errstate(divide="ignore"):
        return np.log(p)
