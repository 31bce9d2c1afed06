"""The PP-KD mixture, in log space, for target words or full distributions.

With retrieved neighbours j = 1..k of a query (squared L2 distances d_j,
values v_j) and temperature T, the neighbour weights are
``a_j = softmax_j(-d_j / T)`` and

    P_hard(w)  = sum_{j : v_j = w} a_j                        (Eq. 1)
    P_logit(w) = sum_j a_j * p_teacher(w | u_j)               (Eq. 2)
    P_kNN      = mu * P_hard + (1 - mu) * P_logit             (Eq. 3)
    P          = lam * P_kNN + (1 - lam) * P_LM               (Eq. 4)

(Jin, Ge and Wei, "Plug and Play Knowledge Distillation for kNN-LM with
External Logits", AACL-IJCNLP 2022). mu = 1 is the kNN-LM of Khandelwal et
al. (2020) and lam = 0 is the LM. Every function takes and returns natural
log-probabilities; a weight of exactly 0 or 1 selects one side, so that
``log 0`` never meets a finite value in a product and no NaN appears.
Padding neighbours (FAISS id -1, or an excluded row) are marked invalid by a
boolean mask and carry no weight.
"""

import math

import torch


def log_weights(distances, temperature, valid):
    """Return ``log a_j = log_softmax_j(-d_j / T)`` over the valid neighbours.

    Args:
        distances: (n, k) squared L2 distances.
        temperature: T > 0, in the distances' units.
        valid: (n, k) bool; invalid neighbours get ``-inf``.

    Returns:
        (n, k) float32. A row without a valid neighbour is all ``-inf``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = -distances.float() / temperature
    scores = scores.masked_fill(~valid, float("-inf"))
    norm = torch.logsumexp(scores, dim=-1, keepdim=True)
    norm = norm.masked_fill(torch.isinf(norm), 0.0)  # rows without neighbours stay -inf
    return scores - norm


def hard_target_log_prob(log_w, value_match):
    """Return ``log P_hard(target)``, (n,), from (n, k) weights and matches.

    ``value_match[i, j]`` is True where neighbour j's value is the target of
    query i. No match gives ``-inf``.
    """
    return torch.logsumexp(log_w.masked_fill(~value_match, float("-inf")), dim=-1)


def logit_target_log_prob(log_w, teacher_log_probs):
    """Return ``log P_logit(target)``, (n,).

    Args:
        log_w: (n, k) neighbour log-weights.
        teacher_log_probs: (n, k) ``log p_teacher(target | u_j)``.
    """
    return torch.logsumexp(log_w + teacher_log_probs.float().masked_fill(torch.isinf(log_w), 0.0), dim=-1)


def mix(log_a, log_b, weight):
    """Return ``log(weight * a + (1 - weight) * b)`` elementwise.

    ``weight`` in [0, 1]; 0 and 1 return ``log_b`` and ``log_a`` exactly.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {weight}")
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def average_teachers(teacher_log_probs):
    """Average several teachers' distributions (the "mixed" teacher).

    Args:
        teacher_log_probs: list of same-shape tensors of log-probabilities.

    Returns:
        ``log(mean_t p_t)`` with the common shape.
    """
    stacked = torch.stack([t.float() for t in teacher_log_probs], dim=0)
    return torch.logsumexp(stacked, dim=0) - math.log(len(teacher_log_probs))


def ppkd_target_log_prob(lm_log_prob, log_w, value_match, teacher_log_probs, mu, lam):
    """Score the target word under Eqs. 1-4.

    Args:
        lm_log_prob: (n,) ``log P_LM(target)``.
        log_w: (n, k) neighbour log-weights from :func:`log_weights`.
        value_match: (n, k) bool, neighbour value equals the target.
        teacher_log_probs: (n, k) ``log p_teacher(target | u_j)``, or None
            when mu = 1 (no teacher needed).
        mu: weight of P_hard in P_kNN, in [0, 1].
        lam: weight of P_kNN in P, in [0, 1].

    Returns:
        dict of (n,) tensors: ``lm``, ``hard``, ``logit`` (``-inf`` when
        not computed), ``knn``, ``final``. Queries without any valid
        neighbour fall back to the LM (``final == lm``); :func:`has_neighbours`
        tells which ones.
    """
    hard = hard_target_log_prob(log_w, value_match)
    if teacher_log_probs is None:
        if mu != 1.0:
            raise ValueError(f"mu = {mu} needs teacher log-probabilities; pass a teacher or set mu = 1")
        logit = torch.full_like(hard, float("-inf"))
    else:
        logit = logit_target_log_prob(log_w, teacher_log_probs)
    knn = mix(hard, logit, mu)
    final = mix(knn, lm_log_prob.float(), lam)
    found = has_neighbours(log_w)
    final = torch.where(found, final, lm_log_prob.float())
    return {"lm": lm_log_prob.float(), "hard": hard, "logit": logit, "knn": knn, "final": final}


def has_neighbours(log_w):
    """Return (n,) bool: the query has at least one valid neighbour."""
    return torch.isfinite(log_w).any(dim=-1)


def hard_full_log_probs(log_w, values, vocab_size):
    """Return ``log P_hard`` over the vocabulary, (n, V).

    Args:
        log_w: (n, k) neighbour log-weights (``-inf`` for invalid ones).
        values: (n, k) int64 neighbour values; invalid ones may be any id.
    """
    probs = torch.zeros(log_w.shape[0], vocab_size, dtype=torch.float32, device=log_w.device)
    probs.scatter_add_(1, values.long().clamp(min=0), log_w.exp())
    return probs.log()


def logit_full_log_probs(log_w, teacher_full_log_probs):
    """Return ``log P_logit`` over the vocabulary, (n, V).

    Args:
        log_w: (n, k) neighbour log-weights.
        teacher_full_log_probs: (n, k, V) teacher log-distributions per
            neighbour; this costs k * V per query, which is why the target
            path above exists.
    """
    return torch.logsumexp(log_w.unsqueeze(-1) + teacher_full_log_probs.float(), dim=1)
