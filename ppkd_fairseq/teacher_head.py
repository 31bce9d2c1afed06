"""A teacher's output layer in a form that scores one word per dot product.

For every word ``w`` of the vocabulary, a teacher head stores an output
vector ``E[w]`` (d_t), a bias ``b[w]`` and the index ``c(w)`` of the softmax
cluster that holds ``w``. For a teacher state ``u`` (d_t) it defines

    log p(w | u) = u . E[w] + b[w] - Z(u)[c(w)]

where ``Z(u)`` (C values) are the log-normalizers. A full softmax has one
cluster (C = 1). An adaptive softmax (Grave et al., 2017; Baevski and Auli,
2019) has the head (cluster 0) and one cluster per tail: for a tail word in
cluster ``c``, ``E[w]`` is the sum of the head's logit vector for cluster
``c`` and the tail's word vector mapped back through the tail projection,
and ``Z(u)[c]`` adds the head's and the tail's log-normalizers. The
normalizers are stored per datastore row, so the teacher's probability of
one target costs one dot product per neighbour instead of a softmax over
the vocabulary.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TeacherHead:
    """An output layer as vectors, biases and cluster ids over one vocabulary.

    Attributes:
        weight: (V, d_t) float32 output vectors ``E``.
        bias: (V,) float32 biases ``b`` (zeros when the layer has none).
        word_cluster: (V,) int64 cluster of each word (0 for the head).
        cluster_logit_weight: (C, d_t) float32; row 0 is unused, row c >= 1 is
            the head's logit vector for tail cluster c. Empty rows (C = 1) for
            a full softmax.
        tail_weights: one (V_c, d_t) float32 matrix per tail cluster, the
            tail's word vectors mapped back through its projection.
        tail_ranges: [start, end) word ids of each tail cluster.
        tail_factors: optional ``(projection, words)`` per tail cluster,
            (d_c, d_t) and (V_c, d_c), whose product is the tail matrix;
            the normalizers use them because d_c < d_t makes them cheaper.
        head_size: number of words in the head (V for a full softmax).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    word_cluster: torch.Tensor
    cluster_logit_weight: torch.Tensor
    tail_weights: list
    tail_ranges: list
    head_size: int
    tail_factors: Optional[list] = None

    @property
    def vocab_size(self):
        return self.weight.shape[0]

    @property
    def dim(self):
        return self.weight.shape[1]

    @property
    def num_clusters(self):
        return 1 + len(self.tail_ranges)

    def state_dict(self):
        return {
            "weight": self.weight,
            "bias": self.bias,
            "word_cluster": self.word_cluster,
            "cluster_logit_weight": self.cluster_logit_weight,
            "tail_weights": list(self.tail_weights),
            "tail_ranges": [list(r) for r in self.tail_ranges],
            "head_size": int(self.head_size),
            "tail_factors": [list(f) for f in self.tail_factors] if self.tail_factors else None,
        }

    @classmethod
    def from_state_dict(cls, state):
        return cls(
            weight=state["weight"],
            bias=state["bias"],
            word_cluster=state["word_cluster"],
            cluster_logit_weight=state["cluster_logit_weight"],
            tail_weights=list(state["tail_weights"]),
            tail_ranges=[tuple(r) for r in state["tail_ranges"]],
            head_size=int(state["head_size"]),
            tail_factors=[tuple(f) for f in state["tail_factors"]] if state.get("tail_factors") else None,
        )


def softmax_head(weight, bias=None, vocab_size=None):
    """Build a head for a full softmax ``logits = u @ weight.T + bias``.

    ``vocab_size`` keeps the first rows only. A masked LM's output layer has
    one more row than the shared dictionary (``<mask>``); dropping it gives a
    distribution over the student's vocabulary, renormalized without
    ``<mask>``.
    """
    weight = weight.detach().float()
    v = weight.shape[0] if vocab_size is None else vocab_size
    if v > weight.shape[0]:
        raise ValueError(f"vocab_size {v} exceeds the output layer's {weight.shape[0]} rows")
    bias = torch.zeros(v) if bias is None else bias.detach().float()[:v]
    return TeacherHead(
        weight=weight[:v].contiguous(),
        bias=bias.contiguous(),
        word_cluster=torch.zeros(v, dtype=torch.long),
        cluster_logit_weight=weight.new_zeros(1, weight.shape[1]),
        tail_weights=[],
        tail_ranges=[],
        head_size=v,
    )


@torch.no_grad()
def adaptive_softmax_head(adaptive_softmax):
    """Build a head from a fairseq ``AdaptiveSoftmax`` module.

    Every map of the module is linear without bias in evaluation mode, so its
    matrices are read by applying the head and each tail to the identity.
    """
    module = adaptive_softmax
    was_training = module.training
    module.eval()
    try:
        d = module.input_dim
        eye = torch.eye(d, dtype=_param_dtype(module), device=_param_device(module))
        zero = torch.zeros(1, d, dtype=eye.dtype, device=eye.device)
        head_matrix = module.head(eye).float().cpu()  # (d, head_size + n_tail): column j = vector of logit j
        if module.head(zero).abs().max() != 0:
            raise ValueError("the adaptive softmax head has a bias; this export assumes none")
        cutoff = list(module.cutoff)
        head_words = cutoff[0]
        n_tail = len(cutoff) - 1
        vocab = cutoff[-1]
        weight = torch.zeros(vocab, d)
        weight[:head_words] = head_matrix[:, :head_words].t()
        word_cluster = torch.zeros(vocab, dtype=torch.long)
        cluster_logit_weight = torch.zeros(1 + n_tail, d)
        tail_weights, tail_ranges, tail_factors = [], [], []
        for i in range(n_tail):
            start, end = cutoff[i], cutoff[i + 1]
            cluster_vec = head_matrix[:, head_words + i]  # (d,)
            tail_matrix = module.tail[i](eye).float().cpu().t()  # (V_c, d)
            if module.tail[i](zero).abs().max() != 0:
                raise ValueError(f"adaptive softmax tail {i} has a bias; this export assumes none")
            cluster_logit_weight[1 + i] = cluster_vec
            tail_weights.append(tail_matrix.contiguous())
            tail_factors.append(_tail_factors(module.tail[i], eye, tail_matrix))
            tail_ranges.append((start, end))
            weight[start:end] = tail_matrix + cluster_vec
            word_cluster[start:end] = 1 + i
    finally:
        module.train(was_training)
    return TeacherHead(
        weight=weight,
        bias=torch.zeros(vocab),
        word_cluster=word_cluster,
        cluster_logit_weight=cluster_logit_weight,
        tail_weights=tail_weights,
        tail_ranges=tail_ranges,
        head_size=head_words,
        tail_factors=tail_factors if all(f is not None for f in tail_factors) else None,
    )


def _tail_factors(tail, eye, tail_matrix):
    """Return ``(projection (d_c, d), words (V_c, d_c))`` of a fairseq tail.

    fairseq's tails are ``Sequential(projection, dropout, output)``; the
    factors are read by applying each linear part to the identity and are
    checked against the whole tail. Returns None for another structure.
    """
    parts = list(tail) if isinstance(tail, torch.nn.Sequential) else []
    if len(parts) != 3:
        return None
    projection = parts[0](eye).float()  # (d, d_c)
    d_c = projection.shape[1]
    words = parts[2](torch.eye(d_c, dtype=eye.dtype, device=eye.device)).float()  # (d_c, V_c)
    product = (projection @ words).t().cpu()  # (V_c, d)
    if not torch.allclose(product, tail_matrix, rtol=1e-4, atol=1e-5):
        return None
    return projection.t().contiguous().cpu(), words.t().contiguous().cpu()


def _param_dtype(module):
    return next(module.parameters()).dtype


def _param_device(module):
    return next(module.parameters()).device


def log_normalizers(head, states):
    """Return the log-normalizers ``Z`` of teacher states.

    Args:
        head: a :class:`TeacherHead`.
        states: (n, d_t) teacher states; float16 states are scored in float32.

    Returns:
        (n, C) float32: column 0 is the head's (or full softmax's)
        log-normalizer; column c >= 1 adds tail c's to it.
    """
    u = states.float()
    w = head.weight.to(u.device)
    if not head.tail_ranges:
        logits = u @ w.t() + head.bias.to(u.device)  # (n, V)
        return torch.logsumexp(logits, dim=-1, keepdim=True)
    head_logits = torch.cat(
        [u @ w[: head.head_size].t(), u @ head.cluster_logit_weight[1:].to(u.device).t()], dim=-1
    )  # (n, head_size + n_tail)
    z_head = torch.logsumexp(head_logits, dim=-1)  # (n,)
    columns = [z_head]
    for i, tail in enumerate(head.tail_weights):
        if head.tail_factors:
            # Through the d_c-wide projection: V_c * d_c instead of V_c * d_t per state.
            projection, words = head.tail_factors[i]
            logits = (u @ projection.to(u.device).t()) @ words.to(u.device).t()  # (n, V_c)
        else:
            logits = u @ tail.to(u.device).t()  # (n, V_c)
        columns.append(z_head + torch.logsumexp(logits, dim=-1))
    return torch.stack(columns, dim=-1)


def target_log_probs(head, states, normalizers, targets):
    """Score one target word per state with one dot product.

    Args:
        head: a :class:`TeacherHead`.
        states: (..., d_t) teacher states.
        normalizers: (..., C) their log-normalizers from :func:`log_normalizers`.
        targets: (...) int64 word ids; the leading shape may also be
            broadcast as (n, 1) against states (n, k, d_t).

    Returns:
        (...) float32 ``log p_teacher(target | state)``.
    """
    u = states.float()
    targets = targets.long()
    vec = head.weight.to(u.device)[targets]  # (..., d_t)
    cluster = head.word_cluster.to(u.device)[targets]  # (...)
    # einsum contracts d_t without a (..., d_t) product; for (n, 1) targets
    # against (n, k, d_t) states it is one batched matrix product.
    logit = torch.einsum("...d,...d->...", u, vec) + head.bias.to(u.device)[targets]
    shape = logit.shape  # states' and targets' shapes broadcast
    z = normalizers.float().expand(*shape, normalizers.shape[-1])
    z = z.gather(-1, cluster.expand(shape).unsqueeze(-1)).squeeze(-1)
    return logit - z


def full_log_probs(head, states):
    """Return the teacher's full log-distribution, (n, V) float32 (costly).

    An adaptive softmax is scored cluster by cluster, as its own forward
    pass does, with one log-softmax per cluster and no second pass for the
    normalizers. With ``tail_factors`` the tails go through their d_c-wide
    projections, which costs a fraction of the folded vectors' product.
    """
    u = states.float()
    if head.tail_ranges:
        return _clustered_log_probs(head, u)
    z = log_normalizers(head, u)  # (n, C)
    logits = u @ head.weight.to(u.device).t() + head.bias.to(u.device)  # (n, V)
    return logits - z[:, head.word_cluster.to(u.device)]


def _clustered_log_probs(head, u):
    """Return :func:`full_log_probs` of an adaptive softmax for (n, d_t) float32 states ``u``."""
    w = head.weight.to(u.device)
    head_logits = torch.cat(
        [u @ w[: head.head_size].t(), u @ head.cluster_logit_weight[1:].to(u.device).t()], dim=-1
    )  # (n, head_size + n_tail)
    head_lp = torch.log_softmax(head_logits, dim=-1)
    pieces = [head_lp[:, : head.head_size]]
    expected_start = head.head_size
    for i, (start, end) in enumerate(head.tail_ranges):
        assert start == expected_start, f"tail cluster {i} starts at word {start}, expected {expected_start}"
        expected_start = end
        if head.tail_factors:
            projection, words = head.tail_factors[i]
            logits = (u @ projection.to(u.device).t()) @ words.to(u.device).t()  # (n, V_c)
        else:
            logits = u @ head.tail_weights[i].to(u.device).t()  # (n, V_c)
        cluster = head_lp[:, head.head_size + i].unsqueeze(-1)  # (n, 1)
        pieces.append(torch.log_softmax(logits, dim=-1).add_(cluster))
    return torch.cat(pieces, dim=-1)
