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


def temper(log_probs, temperature):
    """Return ``log softmax(log_probs / temperature)``, (n, V) float32."""
    return F.log_softmax(log_probs.float() / temperature, dim=-1)


def adaptive_softmax_log_probs(adaptive_softmax, x):
    """Compute an adaptive softmax's full log-distribution, with gradients.

    fairseq 0.12's ``AdaptiveSoftmax.get_log_prob(x, None)`` returns the same
    values, but it adds the cluster prior in place to a ``log_softmax``
    output, so backpropagating through it raises a RuntimeError. This
    function builds the result out of place and applies the module's input
    dropout as its ``forward`` does, so that training sees the dropout that
    ``adaptive_loss`` applies.

    Args:
        adaptive_softmax: a fairseq ``AdaptiveSoftmax`` with cutoffs
            ``c_0 < c_1 < ... < V``.
        x: (n, d) decoder output states.

    Returns:
        (n, V) float32 log-probabilities, whatever the dtype of ``x``.
    """
    module = adaptive_softmax
    x = module.dropout_module(x)
    head_size = module.cutoff[0]
    head = F.log_softmax(module.head(x).float(), dim=-1)  # (n, c_0 + n_tail)
    pieces = [head[:, :head_size]]
    for i, tail in enumerate(module.tail):
        cluster_log_prob = head[:, head_size + i : head_size + i + 1]  # (n, 1)
        pieces.append(F.log_softmax(tail(x).float(), dim=-1) + cluster_log_prob)  # (n, V_i)
    return torch.cat(pieces, dim=-1)


def distillation_loss(student_log_probs, teacher_log_probs, target, alpha, temperature):
    """Compute the KD loss of n tokens, summed over the tokens, in nats.

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
    student_log_probs = student_log_probs.float()
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
