"""Perplexity of the kNN-LM and PP-KD over a grid of T, mu and lambda.

The inputs are the per-token arrays of the sweep cache (sweep_cache.py), as
tensors. For each temperature T the neighbour weights are computed once and
reduced to per-token ``log P_hard(target)`` and, per teacher set,
``log P_logit(target)``. Every (mu, lambda) pair then costs a few operations
on (n,) vectors. A grid point equals what ``fairseq-eval-lm --ppkd-mode
eval`` reports at the same settings up to float32 rounding (the tests
require a relative difference of at most 1e-6). As there, tokens without a
valid neighbour are scored by the LM alone, and a token with probability 0
makes the perplexity infinite.

A teacher set is one stored teacher, or several averaged as probability
distributions per neighbour (the mixed teacher), as ``--ppkd-teachers a,b``
does. The kNN-LM is mu = 1 and needs no teacher.
"""

import logging
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import mixture

logger = logging.getLogger(__name__)

# 1-2-5 steps from 0.5 to 1000 squared-L2 units; 10 is the best T of Jin, Ge
# and Wei (AACL 2022) for both the kNN-LM and PP-KD.
DEFAULT_TEMPERATURES = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
DEFAULT_MUS = tuple(round(0.1 * i, 10) for i in range(11))  # 0, 0.1, ..., 1; 0.4 is the PP-KD best
DEFAULT_LAMBDAS = tuple(round(0.05 * i, 10) for i in range(20))  # 0, 0.05, ..., 0.95; 0.25 and 0.5 are the bests

# With T = m / 100, where m is the median squared L2 distance to the nearest
# neighbour, a gap of a few percent of m between the first and second
# neighbour already puts nearly all weight on the first; with T = 10 m the
# weights of neighbours within about m of each other are nearly uniform.
# Between the two lies the range where T changes the mixture.
EXTEND_BELOW = 0.01
EXTEND_ABOVE = 10.0

# Sums of float32 products below this are recomputed in log space. The
# smallest normal float32 is 1.2e-38, so the terms that underflow change a
# sum above this bound by at most about 1e-8 of its value.
UNDERFLOW = 1e-30


@dataclass
class Grid:
    """The values of T (squared-L2 units), mu and lambda to evaluate."""

    temperatures: list
    mus: list
    lambdas: list

    def __post_init__(self):
        self.temperatures = sorted(set(float(t) for t in self.temperatures))
        self.mus = sorted(set(float(m) for m in self.mus))
        self.lambdas = sorted(set(float(x) for x in self.lambdas))
        if not self.temperatures or not self.mus or not self.lambdas:
            raise ValueError(f"every axis of the grid needs at least one value, got {self}")
        for option, values in (("--temperatures", self.temperatures), ("--mus", self.mus),
                               ("--lambdas", self.lambdas)):
            bad = [v for v in values if not math.isfinite(v)]
            if bad:
                raise ValueError(f"{option}: values must be finite numbers, got {bad[0]}")
        if self.temperatures[0] <= 0:
            raise ValueError(f"--temperatures: values must be > 0, got {self.temperatures[0]}")
        for option, values in (("--mus", self.mus), ("--lambdas", self.lambdas)):
            if values[0] < 0 or values[-1] > 1:
                raise ValueError(f"{option}: values must be in [0, 1], got {values[0]} .. {values[-1]}")

    @property
    def size(self):
        return len(self.temperatures) * len(self.mus) * len(self.lambdas)


@dataclass
class TeacherSet:
    """A model of the sweep: the kNN-LM (no teacher) or PP-KD with teachers ``names``."""

    names: list

    @property
    def label(self):
        return "knn_lm" if not self.names else "ppkd-" + "+".join(self.names)


def teacher_sets(names):
    """Return the kNN-LM, one set per teacher, and the mixed teacher of two or more."""
    sets = [TeacherSet([])] + [TeacherSet([name]) for name in names]
    if len(names) >= 2:
        sets.append(TeacherSet(list(names)))
    return sets


def one_two_five_series(low, high):
    """Return the 1, 2, 5 times powers of ten from the last one <= low to the first one >= high."""
    assert 0 < low <= high, f"need 0 < low <= high, got {low}, {high}"
    exponents = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 2)
    values = [float(f"{mantissa}e{exponent}") for exponent in exponents for mantissa in (1, 2, 5)]
    start = max(v for v in values if v <= low)
    stop = min(v for v in values if v >= high)
    return [v for v in values if start <= v <= stop]


def extend_temperatures(temperatures, median_nearest):
    """Add 1-2-5 values so that the temperatures cover [m / 100, 10 m].

    Args:
        temperatures: the requested values.
        median_nearest: m, the median squared L2 distance from a token to its
            nearest neighbour; None or non-positive leaves the list as it is.

    Returns:
        sorted list of the requested values plus the added ones.
    """
    values = sorted(set(float(t) for t in temperatures))
    if median_nearest is None or not median_nearest > 0 or not math.isfinite(median_nearest):
        return values
    low, high = EXTEND_BELOW * median_nearest, EXTEND_ABOVE * median_nearest
    added = []
    if low < values[0]:
        added += [t for t in one_two_five_series(low, values[0]) if t < values[0]]
    if high > values[-1]:
        added += [t for t in one_two_five_series(values[-1], high) if t > values[-1]]
    return sorted(set(values + added))


def median_nearest_distance(distance_chunks):
    """Return the median squared L2 distance from a token to its nearest neighbour.

    Args:
        distance_chunks: iterable of (m, k) float32 distances, +inf where invalid.

    Returns:
        float, or None when no token has a neighbour.
    """
    nearest = [d.float().min(dim=-1).values for d in distance_chunks]  # each (m,)
    nearest = torch.cat(nearest) if nearest else torch.empty(0)
    nearest = nearest[torch.isfinite(nearest)]
    return float(nearest.median()) if nearest.numel() else None


def reduce_chunk(chunk, temperatures, sets, block_elements=1 << 23):
    """Reduce one chunk of cached tokens to per-T target log-probabilities.

    With ``g_j = d_j - min_j d_j`` and ``e_j = exp(-g_j / T)``, the weights are
    ``a_j = e_j / Z`` with ``Z = sum_j e_j``, so ``P_hard = sum_j e_j [v_j = w] / Z``
    and ``P_logit = sum_j e_j p_j / Z``: one exp per neighbour and T, and one
    batched matrix product for all sums. The nearest neighbour has ``e_j = 1``,
    so ``Z >= 1`` never underflows. A sum below ``UNDERFLOW`` has lost
    precision to float32 underflow, from far matches at a small T or from tiny
    teacher probabilities. Those tokens are recomputed in log space by
    mixture.py, which keeps a nonzero probability where the sum became 0.

    Args:
        chunk: dict with ``distances`` (m, k) float32 squared L2 (+inf where
            invalid), ``value_match`` (m, k) bool, and ``teachers``, a dict
            name -> (m, k) float32 teacher target log-probabilities.
        temperatures: the T values.
        sets: the :class:`TeacherSet` list; only sets with teachers get a
            ``logit`` entry.
        block_elements: tokens x T x k per exp block; 2**23 float32 is 32 MiB.

    Returns:
        dict with ``hard`` (nT, m), ``logit`` (label -> (nT, m)) and
        ``found`` (m,) bool, the token has at least one valid neighbour.
        Tokens without a neighbour get ``-inf`` in ``hard`` and ``logit``.
    """
    distances = chunk["distances"].float()
    value_match = chunk["value_match"]
    m, k = distances.shape
    assert value_match.shape == (m, k), f"value_match has shape {tuple(value_match.shape)}, expected {(m, k)}"
    valid = torch.isfinite(distances)
    found = valid.any(dim=-1)
    teacher_sets_used = [s for s in sets if s.names]
    for s in teacher_sets_used:
        for name in s.names:
            lp = chunk["teachers"][name]
            assert lp.shape == (m, k), f"teacher {name}: shape {tuple(lp.shape)}, expected {(m, k)}"

    # factors[:, c] contains what the weights are summed against: 1 for Z, the
    # value match for P_hard, and each teacher set's probability for P_logit.
    # A mixed set averages the probabilities, as mixture.average_teachers does
    # in log space.
    factors = torch.empty(m, 2 + len(teacher_sets_used), k)  # (m, S, k)
    factors[:, 0] = valid
    factors[:, 1] = value_match
    probs = {}
    for c, s in enumerate(teacher_sets_used, start=2):
        for name in s.names:
            if name not in probs:
                probs[name] = chunk["teachers"][name].float().exp()
        if len(s.names) == 1:
            factors[:, c] = probs[s.names[0]]
        else:
            factors[:, c] = torch.stack([probs[name] for name in s.names]).mean(dim=0)

    nearest = torch.where(found, distances.min(dim=-1).values, torch.zeros(m))
    gaps = distances - nearest.unsqueeze(-1)  # (m, k), >= 0, +inf where invalid
    scale = torch.tensor([-1.0 / t for t in temperatures], dtype=torch.float32)  # (nT,)
    sums = torch.empty(m, len(temperatures), factors.shape[1])  # (m, nT, S)
    block = max(1, block_elements // (len(temperatures) * k))
    for begin in range(0, m, block):
        rows = slice(begin, begin + block)
        e = gaps[rows].unsqueeze(1) * scale.view(1, -1, 1)  # (b, nT, k)
        e.exp_()
        torch.bmm(e, factors[rows].transpose(1, 2), out=sums[rows])
    log_sums = sums.log()
    log_z = log_sums[..., 0]  # (m, nT)
    hard = (log_sums[..., 1] - log_z).t().contiguous()  # (nT, m)
    labels = [s.label for s in teacher_sets_used]
    logit = {label: (log_sums[..., 2 + i] - log_z).t().contiguous() for i, label in enumerate(labels)}

    has_match = value_match.any(dim=-1)
    for i, temperature in enumerate(temperatures):
        redo = has_match & (sums[:, i, 1] < UNDERFLOW)
        for j in range(len(labels)):
            redo |= sums[:, i, 2 + j] < UNDERFLOW
        redo &= found
        if not redo.any():
            continue
        log_w = mixture.log_weights(distances[redo], temperature, valid[redo])
        hard[i, redo] = mixture.hard_target_log_prob(log_w, value_match[redo])
        for s in teacher_sets_used:
            per_teacher = [chunk["teachers"][name][redo] for name in s.names]
            lp = per_teacher[0] if len(per_teacher) == 1 else mixture.average_teachers(per_teacher)
            logit[s.label][i, redo] = mixture.logit_target_log_prob(log_w, lp)

    hard[:, ~found] = float("-inf")
    for values in logit.values():
        values[:, ~found] = float("-inf")
    return {"hard": hard, "logit": logit, "found": found}


def mix_many(log_a, log_b, weights):
    """Return ``log(w * a + (1 - w) * b)`` for each weight, (W, n).

    Like :func:`mixture.mix` row by row: a weight of 0 or 1 gives ``log_b`` or
    ``log_a`` exactly. The other rows can differ from it in the last bit,
    because the vectorised ``logaddexp`` rounds differently.
    """
    w = torch.tensor(weights, dtype=torch.float64)
    log_w = torch.log(w).float().unsqueeze(-1)  # (W, 1)
    log_1mw = torch.log1p(-w).float().unsqueeze(-1)
    out = torch.logaddexp(log_a.unsqueeze(0) + log_w, log_b.unsqueeze(0) + log_1mw)  # (W, n)
    out[w == 0.0] = log_b
    out[w == 1.0] = log_a
    return out


def perplexities(final, count):
    """Return (perplexity, infinite) per row of (G, n) target log-probabilities.

    ``infinite`` counts tokens of probability 0; a row with any gets an
    infinite perplexity, as the PP-KD summary does.
    """
    finite = torch.isfinite(final)
    infinite = (~finite).sum(dim=-1)
    total = torch.where(finite, final, torch.zeros_like(final)).double().sum(dim=-1)
    loss = -total / count / math.log(2)
    perplexity = torch.where(infinite == 0, torch.pow(2.0, loss), torch.full_like(loss, float("inf")))
    return perplexity, infinite


def perplexity_grid(lm, found, hard, logit, mus, lambdas):
    """Return (perplexity, infinite), each (M, L), of one T and teacher set.

    For 0 < lambda < 1 a token's final log-probability is
    ``lm + log1p(lambda * (exp(knn - lm) - 1))``: one multiply and one log1p
    per token and lambda instead of a ``logaddexp``. This differs from
    :func:`mixture.mix` by float32 rounding only. lambda = 0 and 1 take ``lm``
    and ``knn`` exactly, and a mu whose ``exp(knn - lm)`` overflows float32,
    or an LM with a zero probability, goes through :func:`mix_many`.

    Args:
        lm: (n,) ``log P_LM(target)``.
        found: (n,) bool, the token has a valid neighbour.
        hard: (n,) ``log P_hard(target)`` at this T.
        logit: (n,) ``log P_logit(target)`` at this T, or None for the kNN-LM.
        mus, lambdas: the grid values; ``mus`` must be [1.0] without ``logit``.
    """
    n = lm.shape[0]
    assert found.shape == hard.shape == (n,), f"found {tuple(found.shape)}, hard {tuple(hard.shape)}, lm ({n},)"
    if logit is None:
        assert list(mus) == [1.0], f"the kNN-LM has mu = 1 only, got {mus}"
        logit = torch.full_like(hard, float("-inf"))
    lambdas_t = torch.tensor(lambdas, dtype=torch.float64)
    inner = (lambdas_t > 0) & (lambdas_t < 1)
    inner_weights = lambdas_t[inner].float().unsqueeze(-1)  # (L', 1)
    lm_total = lm.double().sum()
    lm_finite = bool(torch.isfinite(lm_total))
    all_found = bool(found.all())
    # Tokens without neighbours keep the LM's probability at every grid point.
    lm_found = lm if all_found else lm[found]
    hard_found = hard if all_found else hard[found]
    logit_found = logit if all_found else logit[found]
    lm_not_found_total = lm_total - lm_found.double().sum()

    perplexity = torch.empty(len(mus), len(lambdas), dtype=torch.float64)
    infinite = torch.zeros(len(mus), len(lambdas), dtype=torch.int64)
    for i, mu in enumerate(mus):
        knn = mixture.mix(hard_found, logit_found, mu)  # (n_found,)
        ratio = torch.exp(knn - lm_found)  # (n_found,) P_kNN / P_LM
        if not lm_finite or (ratio.numel() and float(ratio.max()) == float("inf")):
            knn_all = mixture.mix(hard, logit, mu)
            final = torch.where(found.unsqueeze(0), mix_many(knn_all, lm, lambdas), lm.unsqueeze(0))
            perplexity[i], infinite[i] = perplexities(final, n)
            continue
        totals = torch.empty(len(lambdas), dtype=torch.float64)
        totals[lambdas_t == 0] = lm_total
        if inner.any():
            gains = torch.log1p(inner_weights * (ratio - 1.0))  # (L', n_found)
            totals[inner] = lm_total + gains.sum(dim=-1, dtype=torch.float64)
        if (lambdas_t == 1).any():
            finite = torch.isfinite(knn)
            totals[lambdas_t == 1] = knn[finite].double().sum() + lm_not_found_total
            infinite[i, lambdas_t == 1] = int((~finite).sum())
        loss = -totals / n / math.log(2)
        perplexity[i] = torch.where(infinite[i] == 0, torch.pow(2.0, loss), torch.full_like(loss, float("inf")))
    return perplexity, infinite


@dataclass
class SweepResult:
    """Perplexities of every grid point, per teacher set.

    Attributes:
        grid: the evaluated :class:`Grid`.
        sets: the :class:`TeacherSet` list.
        perplexity: label -> (nT, M, L) float64; M is 1 (mu = 1) for the kNN-LM.
        infinite: label -> (nT, M, L) tokens of probability 0.
        tokens: scored tokens n.
        tokens_without_neighbours: tokens scored by the LM alone.
        lm_perplexity: the LM's perplexity over the same tokens.
        median_nearest: median squared L2 distance to the nearest neighbour.
    """

    grid: Grid
    sets: list
    perplexity: dict
    infinite: dict
    tokens: int
    tokens_without_neighbours: int
    lm_perplexity: float
    median_nearest: float = None

    def mus(self, label):
        return [1.0] if label == "knn_lm" else self.grid.mus

    def rows(self):
        """Yield one dict per grid point: model, teachers, T, mu, lambda, perplexity."""
        for s in self.sets:
            table = self.perplexity[s.label]
            for i, temperature in enumerate(self.grid.temperatures):
                for j, mu in enumerate(self.mus(s.label)):
                    for l, lam in enumerate(self.grid.lambdas):
                        yield {
                            "model": s.label, "teachers": "+".join(s.names), "temperature": temperature,
                            "mu": mu, "lambda": lam, "perplexity": float(table[i, j, l]),
                        }

    def best(self, teacher_set):
        """Return the best point of one teacher set with its edge messages.

        Ties go to the first point in T, mu, lambda order.
        """
        table = self.perplexity[teacher_set.label]
        flat = int(torch.argmin(table.reshape(-1)))
        i, j, l = torch.unravel_index(torch.tensor(flat), table.shape)
        point = {
            "model": teacher_set.label,
            "teachers": list(teacher_set.names),
            "temperature": self.grid.temperatures[int(i)],
            "mu": self.mus(teacher_set.label)[int(j)],
            "lambda": self.grid.lambdas[int(l)],
            "perplexity": float(table[i, j, l]),
            "tokens_with_zero_probability": int(self.infinite[teacher_set.label][i, j, l]),
        }
        point["edges"] = edge_messages(point, self.grid, mu_fixed=not teacher_set.names)
        return point


def edge_messages(point, grid, mu_fixed=False):
    """List the axes on which ``point`` lies on the edge of ``grid``.

    T has no natural bound, so its first and last values are edges. For mu
    and lambda only grid ends inside (0, 1) count, because 0 and 1 are the
    ends of their range.
    """
    messages = []
    temperatures = grid.temperatures
    t = point["temperature"]
    if t in (temperatures[0], temperatures[-1]):
        messages.append(
            f"T = {t:g} is on the edge of the grid [{temperatures[0]:g}, {temperatures[-1]:g}]: "
            f"widen --temperatures"
        )
    axes = [("lambda", grid.lambdas, "--lambdas")]
    if not mu_fixed:
        axes.insert(0, ("mu", grid.mus, "--mus"))
    for name, values, option in axes:
        value = point[name]
        if (value == values[0] and values[0] > 0) or (value == values[-1] and values[-1] < 1):
            messages.append(
                f"{name} = {value:g} is on the edge of the grid [{values[0]:g}, {values[-1]:g}]: widen {option}"
            )
    return messages


def run_sweep(chunks, grid, teacher_names, num_chunks=None, progress=True):
    """Evaluate every grid point for the kNN-LM and each teacher set.

    Args:
        chunks: iterable of dicts with ``lm`` (m,), ``distances`` (m, k),
            ``value_match`` (m, k) and ``teachers`` (name -> (m, k)), as
            :meth:`SweepCache.iter_chunks` yields them.
        grid: the :class:`Grid`.
        teacher_names: the teachers to sweep; with two or more the mixed
            teacher is swept too.
        num_chunks: length of ``chunks``, for the progress bar.
        progress: show tqdm progress bars.

    Returns:
        :class:`SweepResult`.
    """
    sets = teacher_sets(teacher_names)
    temperatures = grid.temperatures
    lm_parts, found_parts, hard_parts = [], [], []
    logit_parts = {s.label: [] for s in sets if s.names}
    for chunk in tqdm(chunks, total=num_chunks, desc="neighbour weights", unit="chunk", disable=not progress):
        reduced = reduce_chunk(chunk, temperatures, sets)
        lm_parts.append(chunk["lm"].float())
        found_parts.append(reduced["found"])
        hard_parts.append(reduced["hard"])
        for label, values in reduced["logit"].items():
            logit_parts[label].append(values)
    if not lm_parts:
        raise ValueError("the sweep got no tokens; the cache is empty")
    lm = torch.cat(lm_parts)  # (n,)
    found = torch.cat(found_parts)  # (n,)
    hard = torch.cat(hard_parts, dim=1)  # (nT, n)
    logit = {label: torch.cat(parts, dim=1) for label, parts in logit_parts.items()}  # each (nT, n)
    n = lm.shape[0]

    perplexity, infinite = {}, {}
    steps = tqdm(total=len(sets) * len(temperatures), desc="grid", unit="T", disable=not progress)
    for s in sets:
        mus = [1.0] if not s.names else grid.mus
        table = torch.empty(len(temperatures), len(mus), len(grid.lambdas), dtype=torch.float64)
        zeros = torch.empty(len(temperatures), len(mus), len(grid.lambdas), dtype=torch.int64)
        for i in range(len(temperatures)):
            table[i], zeros[i] = perplexity_grid(
                lm, found, hard[i], logit[s.label][i] if s.names else None, mus, grid.lambdas
            )
            steps.update()
        perplexity[s.label], infinite[s.label] = table, zeros
    steps.close()

    lm_ppl, _ = perplexities(lm.unsqueeze(0), n)
    return SweepResult(
        grid=grid, sets=sets, perplexity=perplexity, infinite=infinite, tokens=n,
        tokens_without_neighbours=int((~found).sum()), lm_perplexity=float(lm_ppl[0]),
    )
