"""Logit distillation math: tempered distributions and the KD loss.

For n scored tokens over a vocabulary of V words, conventional knowledge
distillation (Hinton et al., 2015), as DistilBERT and DistilGPT-2 train
with it, minimizes

    loss = alpha * CE(gold) + (1 - alpha) * tau^2 * KL(p_teacher^tau || p_student^tau)

where ``p^tau`` is a distribution tempered by ``tau``. The ``tau^2`` factor
keeps the gradient of the KL term at the scale of the CE term, which shrinks
as ``1 / tau^2`` otherwise. CE uses the untempered student.

Tempering acts on log-probabilities: ``p^tau = softmax(log p / tau)``. For a
full softmax, ``log p = logits - logZ``, and the constant cancels, so this
equals ``softmax(logits / tau)``. An adaptive softmax has no single logit
vector, because each tail cluster has its own normalizer. For it,
``softmax(log p / tau)`` is the tempered version of its full distribution,
which ranks words as ``p`` does and is ``p`` again at ``tau = 1``.
"""

import torch
import torch.nn.functional as F


def _wide_dtype(dtype):
    """Return float32, or float64 for float64 inputs, which the tests compare in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _wide(t):
    """Return ``t`` in :func:`_wide_dtype`, so float16 and bfloat16 are computed in float32."""
    return t.to(_wide_dtype(t.dtype))


def temper(log_probs, temperature):
    """Return ``log softmax(log_probs / temperature)``, (n, V) float32 (or float64)."""
    return F.log_softmax(_wide(log_probs) / temperature, dim=-1)


def adaptive_softmax_logits(adaptive_softmax, x):
    """Return an adaptive softmax's cluster logits, with gradients.

    The module's input dropout is applied as in its ``forward``, so that
    training uses the same dropout as ``adaptive_loss``.

    Args:
        adaptive_softmax: a fairseq ``AdaptiveSoftmax`` with cutoffs
            ``c_0 < c_1 < ... < V``.
        x: (n, d) decoder output states.

    Returns:
        ``(head_logits, tail_logits)``: (n, c_0 + n_tail) logits of the head
        words and the tail clusters, and a list of n_tail (n, V_i) logits of
        the words inside each tail cluster.
    """
    module = adaptive_softmax
    x = module.dropout_module(x)
    return module.head(x), [tail(x) for tail in module.tail]


def clustered_log_probs(head_logits, tail_logits):
    """Assemble the full log-distribution of cluster logits, (n, V) float32 or float64.

    A head word ``w < c_0`` gets ``log_softmax(head)[w]``; word j of tail
    cluster i gets ``log_softmax(head)[c_0 + i] + log_softmax(tail_i)[j]``.
    With no tails, ``head_logits`` are the logits of a full softmax.
    """
    log_head = F.log_softmax(_wide(head_logits), dim=-1)  # (n, c_0 + n_tail)
    return _join_clusters(log_head, [F.log_softmax(_wide(logits), dim=-1) for logits in tail_logits])


def _join_clusters(log_head, log_tails):
    """Return the (n, V) log-distribution of per-cluster log-probabilities.

    Args:
        log_head: (n, c_0 + n_tail) log-probabilities of the head words and
            the tail clusters.
        log_tails: list of n_tail (n, V_i) log-probabilities within each tail
            cluster; empty for a full softmax, whose ``log_head`` is returned.
    """
    if not log_tails:
        return log_head
    head_size = log_head.shape[1] - len(log_tails)
    pieces = [log_head[:, :head_size]]
    pieces += [log_tail + log_head[:, head_size + i, None] for i, log_tail in enumerate(log_tails)]  # (n, V_i)
    return torch.cat(pieces, dim=-1)


def adaptive_softmax_log_probs(adaptive_softmax, x):
    """Compute an adaptive softmax's full log-distribution, with gradients.

    fairseq 0.12's ``AdaptiveSoftmax.get_log_prob(x, None)`` returns the same
    values, but it adds the cluster prior in place to a ``log_softmax``
    output, so backpropagating through it raises a RuntimeError. This
    function builds the result out of place from
    :func:`adaptive_softmax_logits`, input dropout included.

    Returns:
        (n, V) float32 log-probabilities, whatever the dtype of ``x``.
    """
    return clustered_log_probs(*adaptive_softmax_logits(adaptive_softmax, x))


def distillation_loss(student_log_probs, teacher_log_probs, target, alpha, temperature):
    """Compute the KD loss of n tokens, summed over the tokens, in nats.

    This is the reference definition on whole (n, V) matrices; the criterion
    uses :func:`chunked_distillation_loss`, which the tests check against it.

    Args:
        student_log_probs: (n, V) student log-probabilities at temperature 1.
        teacher_log_probs: (n, V) teacher log-probabilities at temperature 1;
            no gradient flows into them.
        target: (n,) int64 gold word ids.
        alpha: weight of the gold cross-entropy, in [0, 1].
        temperature: tau > 0, applied to both distributions in the KL term.

    Returns:
        ``(loss, nll, kl)``: scalar sums over the n tokens. ``loss`` is
        ``alpha * nll + (1 - alpha) * tau^2 * kl``. ``nll`` is the gold
        cross-entropy, and ``kl`` is ``KL(p_teacher^tau || p_student^tau)``
        without the weight and the ``tau^2`` factor.
    """
    n, vocab_size = student_log_probs.shape
    assert teacher_log_probs.shape == (n, vocab_size), (
        f"teacher log-probabilities have shape {tuple(teacher_log_probs.shape)}, expected {(n, vocab_size)}"
    )
    assert target.shape == (n,), f"target has shape {tuple(target.shape)}, expected {(n,)}"
    student_log_probs = _wide(student_log_probs)
    nll = -student_log_probs.gather(1, target.long().unsqueeze(1)).sum()
    teacher_tempered = temper(teacher_log_probs.detach(), temperature)  # (n, V)
    kl = TemperedKL.apply(student_log_probs, teacher_tempered, temperature)
    loss = alpha * nll + (1.0 - alpha) * temperature**2 * kl
    return loss, nll, kl


class TemperedKL(torch.autograd.Function):
    """``KL(p_t || softmax(s / tau))`` summed over rows, with a one-step gradient.

    Autograd through ``log_softmax`` and ``kl_div`` keeps several (n, V)
    matrices and passes over each of them. The gradient has the closed form
    ``dKL/ds = (softmax(s / tau) - p_t) / tau``, which needs one pass.

    Inputs: ``s`` (n, V) student log-probabilities (or logits), ``log_p_t``
    (n, V) tempered teacher log-probabilities (no gradient), ``tau``.
    """

    @staticmethod
    def forward(ctx, s, log_p_t, tau):
        log_q = torch.log_softmax(s / tau, dim=-1)  # (n, V) tempered student
        p_t = log_p_t.exp()
        kl = (p_t * (log_p_t - log_q)).sum()
        # The gradient reuses both matrices: q in place of log_q, p_t as is.
        ctx.save_for_backward(log_q.exp_(), p_t)
        ctx.tau = tau
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        q, p_t = ctx.saved_tensors
        return (q - p_t).mul_(grad_kl / ctx.tau), None, None


def chunk_rows_for(device, vocab_size):
    """Rows per chunk of :func:`chunked_distillation_loss` on ``device``.

    On a CPU a chunk's (rows, V) float32 matrices should stay in cache from
    one pass to the next: about 2**19 elements (2 MB) each, 16 rows of
    WikiText-2's 33k words, the fastest of the sizes that
    ``bench/bench_kd_loss.py`` compares. A GPU is bound by kernel launches
    rather than by cache, so it takes 2**26 elements (256 MB) per matrix,
    250 rows of WikiText-103's 268k words (not measured on a GPU).
    """
    budget = 2**19 if torch.device(device).type == "cpu" else 2**26
    return max(1, round(budget / vocab_size))


def chunked_distillation_loss(head_logits, tail_logits, teacher, target, alpha, temperature, chunk_rows=None):
    """Compute :func:`distillation_loss` of a clustered student, chunk by chunk.

    The values and gradients are those of ``distillation_loss`` applied to
    ``clustered_log_probs(head_logits, tail_logits)`` and the teacher's
    log-probabilities. But no (n, V) matrix is built except the gradient:
    each chunk of rows is scored and differentiated while it is in cache,
    and the gradient with respect to the logits is computed in closed form
    during the forward pass.

    Args:
        head_logits: (n, c_0 + n_tail) student head logits, or (n, V) logits
            of a full softmax (with ``tail_logits`` empty).
        tail_logits: list of (n, V_i) student tail-cluster logits.
        teacher: callable ``teacher(start, stop)`` that returns the
            (stop - start, V) float32 teacher log-probabilities at
            temperature 1 of rows ``start:stop``, or None for no KL term
            (then ``kl`` is 0 and ``loss`` is ``alpha * nll``).
        target: (n,) int64 gold word ids.
        alpha: weight of the gold cross-entropy, in [0, 1].
        temperature: tau > 0, applied to both distributions in the KL term.
        chunk_rows: rows per chunk; when None, :func:`chunk_rows_for` the
            logits' device and vocabulary.

    Returns:
        ``(loss, nll, kl)`` as :func:`distillation_loss` returns them;
        gradients flow through ``loss`` only.
    """
    if chunk_rows is None:
        vocab_size = head_logits.shape[1] - len(tail_logits) + sum(t.shape[1] for t in tail_logits)
        chunk_rows = chunk_rows_for(head_logits.device, vocab_size)
    return ChunkedDistillation.apply(
        teacher, target, float(alpha), float(temperature), int(chunk_rows), head_logits, *tail_logits
    )


class ChunkedDistillation(torch.autograd.Function):
    """The autograd function behind :func:`chunked_distillation_loss`.

    With ``s`` the student's full log-probabilities, ``q = softmax(s / tau)``
    and ``p_t`` the tempered teacher, the loss's gradient with respect to
    ``s`` is ``g = (1 - alpha) * tau * (q - p_t) - alpha * onehot(gold)``.
    Through ``y = log_softmax(z)`` it becomes ``g_y - softmax(z) * sum(g_y)``:
    each tail cluster takes its slice of ``g``, and the head takes ``g``'s
    head words and, per tail, the sum of the tail's slice.
    """

    @staticmethod
    def forward(ctx, teacher, target, alpha, tau, chunk_rows, head_logits, *tail_logits):
        n = head_logits.shape[0]
        num_tails = len(tail_logits)
        head_size = head_logits.shape[1] - num_tails
        bounds = [head_size]  # column where each tail cluster starts, then V
        for logits in tail_logits:
            bounds.append(bounds[-1] + logits.shape[1])
        want_grad = any(ctx.needs_input_grad[5:])
        # float32 even for float16 logits, so that small gradients survive
        # until backward multiplies them by fp16 training's loss scale.
        grads = [torch.empty(logits.shape, dtype=_wide_dtype(logits.dtype), device=logits.device)
                 for logits in (head_logits, *tail_logits)] if want_grad else []
        nll = torch.zeros((), dtype=torch.float64, device=head_logits.device)
        kl = torch.zeros((), dtype=torch.float64, device=head_logits.device)
        target = target.long()

        for start in range(0, n, chunk_rows):
            rows = slice(start, min(n, start + chunk_rows))
            gold = target[rows].unsqueeze(1)  # (m, 1)
            log_head = F.log_softmax(_wide(head_logits[rows]), dim=-1)  # (m, c_0 + n_tail)
            log_tails = [F.log_softmax(_wide(logits[rows]), dim=-1) for logits in tail_logits]  # (m, V_i)
            s = _join_clusters(log_head, log_tails)  # (m, V)
            nll -= s.gather(1, gold).sum()

            g = None  # (m, V) gradient of the loss with respect to s
            if teacher is not None:
                log_p_t = temper(teacher(rows.start, rows.stop), tau)  # (m, V)
                log_q = F.log_softmax(s / tau, dim=-1)  # (m, V)
                p_t = log_p_t.exp()
                kl += (p_t * (log_p_t - log_q)).sum()
                if want_grad:
                    g = log_q.exp_().sub_(p_t).mul_((1.0 - alpha) * tau)
            if not want_grad:
                continue
            if g is None:
                g = torch.zeros_like(s)
            g.scatter_add_(1, gold, torch.full_like(gold, -alpha, dtype=g.dtype))

            # Back through each cluster's log_softmax.
            g_head = g[:, :head_size]
            if num_tails:
                sums = [g[:, bounds[i] : bounds[i + 1]].sum(-1, keepdim=True) for i in range(num_tails)]
                g_head = torch.cat([g_head, *sums], dim=-1)  # (m, c_0 + n_tail)
            grads[0][rows] = g_head - log_head.exp() * g_head.sum(-1, keepdim=True)
            for i, log_tail in enumerate(log_tails):
                g_tail = g[:, bounds[i] : bounds[i + 1]]  # (m, V_i)
                grads[i + 1][rows] = g_tail - log_tail.exp() * g_tail.sum(-1, keepdim=True)

        ctx.save_for_backward(*grads)
        ctx.dtypes = [logits.dtype for logits in (head_logits, *tail_logits)]
        nll, kl = nll.to(_wide_dtype(head_logits.dtype)), kl.to(_wide_dtype(head_logits.dtype))
        loss = alpha * nll + (1.0 - alpha) * tau**2 * kl
        ctx.mark_non_differentiable(nll, kl)
        return loss, nll, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_nll, grad_kl):
        grads = [(g * grad_loss.to(g.dtype)).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (None, None, None, None, None, *grads)
