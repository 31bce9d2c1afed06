"""Paired bootstrap test of two systems' perplexity over articles.

Tokens of one article are not independent, so the resampling unit is the
article (Koehn, 2004, "Statistical Significance Tests for Machine
Translation Evaluation", applied to perplexity): draw articles with
replacement, compare both systems' perplexity on the same draw, and report
how often the candidate is not better than the baseline.
"""

import numpy as np


def article_ids_from_lines(line_is_title, line_lengths):
    """Return (N,) int64 article index of every token of a split.

    Args:
        line_is_title: (L,) bool, True where a line starts an article.
        line_lengths: (L,) tokens per line, end-of-line token included.

    Tokens before the first title belong to article 0.
    """
    article_of_line = np.maximum(np.cumsum(line_is_title) - 1, 0)
    return np.repeat(article_of_line, line_lengths).astype(np.int64)


def article_sums(log_probs, articles):
    """Return per-article sums of log-probabilities and token counts."""
    num = int(articles.max()) + 1 if articles.size else 0
    sums = np.bincount(articles, weights=log_probs, minlength=num)
    counts = np.bincount(articles, minlength=num).astype(np.float64)
    keep = counts > 0
    return sums[keep], counts[keep]


def paired_bootstrap(baseline, candidate, counts, samples=10000, seed=1):
    """Return the one-sided p-value that ``candidate`` is not better.

    Args:
        baseline, candidate: (A,) per-article sums of natural
            log-probabilities of the two systems on the same tokens.
        counts: (A,) tokens per article.
        samples: bootstrap draws.
        seed: NumPy seed of the draws.

    Returns:
        dict with ``p_value`` (the share of draws where the candidate's
        perplexity is not lower, with the +1 correction), ``samples``,
        ``articles`` and the observed perplexities.
    """
    baseline = np.asarray(baseline, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    num = len(counts)
    rng = np.random.default_rng(seed)
    not_better = 0
    for start in range(0, samples, 1000):
        draws = rng.integers(0, num, size=(min(1000, samples - start), num))  # (S, A)
        tokens = counts[draws].sum(1)
        gap = (candidate[draws].sum(1) - baseline[draws].sum(1)) / tokens  # mean log-prob gain
        not_better += int((gap <= 0).sum())
    return {
        "p_value": (not_better + 1) / (samples + 1),
        "samples": samples,
        "articles": num,
        "baseline_perplexity": float(np.exp(-baseline.sum() / counts.sum())),
        "candidate_perplexity": float(np.exp(-candidate.sum() / counts.sum())),
    }
