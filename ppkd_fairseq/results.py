"""Per-token scores of one PP-KD setting from a sweep cache.

The sweep cache stores, per token, what the mixture needs (see
sweep_cache.py); scoring a setting from it gives the same per-token
log-probabilities as a fairseq-eval-lm run with that setting, which the
tests check.
"""

import numpy as np
import torch

from . import mixture


def score_chunk(chunk, temperature, mu, lam, teacher_names):
    """Return (m,) float64 final log-probabilities of one cache chunk.

    Args:
        chunk: dict with ``lm`` (m,), ``distances`` (m, k) (+inf where no
            neighbour), ``value_match`` (m, k) and ``teachers`` (name ->
            (m, k) target log-probabilities per neighbour).
        temperature, mu, lam: the setting; mu = 1 ignores the teachers.
        teacher_names: teachers to average (the mixed teacher when several).
    """
    distances = chunk["distances"].float()
    valid = torch.isfinite(distances)
    log_w = mixture.log_weights(distances.masked_fill(~valid, 0.0), temperature, valid)
    teacher_lp = None
    if mu < 1.0:
        per_teacher = [chunk["teachers"][name].float() for name in teacher_names]
        teacher_lp = per_teacher[0] if len(per_teacher) == 1 else mixture.average_teachers(per_teacher)
    parts = mixture.ppkd_target_log_prob(chunk["lm"].float(), log_w, chunk["value_match"].bool() & valid,
                                         teacher_lp, mu, lam)
    return parts["final"].double().numpy()


def score_cache(cache, temperature, mu, lam, teacher_names, chunk_tokens=4096):
    """Return (positions, log_probs) of every cached token at one setting."""
    names = list(teacher_names) if mu < 1.0 else []
    scores = [score_chunk(chunk, temperature, mu, lam, names)
              for chunk in cache.iter_chunks(names, chunk_tokens)]
    return cache.positions, np.concatenate(scores) if scores else np.zeros(0)


def lm_log_probs(cache, chunk_tokens=65536):
    """Return (n,) float64 LM log-probabilities of the cached tokens."""
    parts = [chunk["lm"].double().numpy() for chunk in cache.iter_chunks([], chunk_tokens, fields=("lm",))]
    return np.concatenate(parts) if parts else np.zeros(0)


def perplexity(log_probs):
    """Return exp of the mean negative log-probability (inf with any -inf)."""
    if not np.isfinite(log_probs).all():
        return float("inf")
    return float(np.exp(-np.mean(log_probs)))


def teacher_train_cross_entropy(teacher, values, rows, chunk_rows=65536):
    """Return a teacher's mean cross-entropy (nats) on its own datastore rows.

    Args:
        teacher: a :class:`~ppkd_fairseq.datastore.TeacherStore`.
        values: (N,) datastore values, the token at each row.
        rows: (n,) int64 rows to average over, sorted.
    """
    total = 0.0
    for begin in range(0, len(rows), chunk_rows):
        batch = rows[begin:begin + chunk_rows]
        lp = teacher.target_log_probs(batch[:, None], np.asarray(values[batch], dtype=np.int64))[:, 0]
        total += float(lp.double().sum())
    return -total / len(rows)
