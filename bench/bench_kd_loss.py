"""Time one batch of the KD loss, whole-matrix against chunked, forward and backward.

The ``ppkd_distillation`` criterion scores student and teacher over the full
vocabulary. The whole-matrix way (``distillation_loss`` on the student's and
the teacher's (n, V) log-probabilities, autograd through the student's
adaptive softmax) passes over several (n, V) matrices that do not fit in
cache. ``chunked_distillation_loss`` scores a few rows at a time and writes
the gradient in closed form.

This script builds an adaptive-softmax student output layer and a teacher
head with the sizes of ``configs/wt2_cpu_student.yaml`` and
``configs/wt2_cpu_teacher.yaml``. It checks that both ways give the same
loss and gradients, then prints the median time of each and the ratio
whole / chunked, measured in the same run.

    python bench/bench_kd_loss.py
    python bench/bench_kd_loss.py --tokens 2048 --chunk-rows 16,32,64 --reps 5
"""

import argparse
import os
import statistics
import sys
import time

import torch
from fairseq.modules.adaptive_softmax import AdaptiveSoftmax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppkd_fairseq.distillation import (  # noqa: E402
    adaptive_softmax_log_probs,
    adaptive_softmax_logits,
    chunked_distillation_loss,
    distillation_loss,
)
from ppkd_fairseq.teacher_head import adaptive_softmax_head, full_log_probs  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=33280, help="vocabulary size V (default: 33280, WikiText-2)")
    parser.add_argument("--cutoffs", default="2000,10000", help="adaptive-softmax cutoffs (default: 2000,10000)")
    parser.add_argument("--student-dim", type=int, default=256, help="student output width (default: 256)")
    parser.add_argument("--teacher-dim", type=int, default=384, help="teacher state width d_t (default: 384)")
    parser.add_argument("--tokens", type=int, default=2048,
                        help="scored tokens per batch n (default: 2048, half of wt2_cpu_student_kd's --max-tokens)")
    parser.add_argument("--chunk-rows", default="8,16,32,64,256", help="chunk sizes in rows (default: 8,16,32,64,256)")
    parser.add_argument("--alpha", type=float, default=0.5, help="--kd-alpha (default: 0.5)")
    parser.add_argument("--temperature", type=float, default=2.0, help="--kd-temperature (default: 2.0)")
    parser.add_argument("--reps", type=int, default=3, help="timings per way (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cutoffs = [int(c) for c in args.cutoffs.split(",")]
    student = AdaptiveSoftmax(args.vocab, args.student_dim, cutoffs, dropout=0.0, factor=4)
    teacher_head = adaptive_softmax_head(AdaptiveSoftmax(args.vocab, args.teacher_dim, cutoffs, dropout=0.0, factor=4))
    x = torch.randn(args.tokens, args.student_dim, requires_grad=True)  # (n, d) student outputs
    states = torch.randn(args.tokens, args.teacher_dim).half()  # (n, d_t) stored teacher states
    target = torch.randint(0, args.vocab, (args.tokens,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"n = {args.tokens} tokens, V = {args.vocab}, cutoffs {cutoffs}, d = {args.student_dim}, "
          f"d_t = {args.teacher_dim}")

    def whole():
        log_probs = adaptive_softmax_log_probs(student, x)  # (n, V)
        teacher = full_log_probs(teacher_head, states)  # (n, V)
        return distillation_loss(log_probs, teacher, target, args.alpha, args.temperature)

    def chunked(rows):
        head_logits, tail_logits = adaptive_softmax_logits(student, x)
        return chunked_distillation_loss(head_logits, tail_logits, lambda a, b: full_log_probs(teacher_head, states[a:b]),
                                         target, args.alpha, args.temperature, chunk_rows=rows)

    def step(loss_fn):
        """Return (seconds, loss, gradient of x) of one forward and backward pass."""
        x.grad = None
        student.zero_grad()
        started = time.perf_counter()
        loss, _, _ = loss_fn()
        loss.backward()
        return time.perf_counter() - started, float(loss.detach()), x.grad.clone()

    def timed(loss_fn):
        step(loss_fn)  # warm-up
        runs = [step(loss_fn) for _ in range(args.reps)]
        return statistics.median(r[0] for r in runs), runs[-1][1], runs[-1][2]

    whole_s, whole_loss, whole_grad = timed(whole)
    print(f"whole matrices:  {whole_s * 1e3:7.0f} ms per batch (median of {args.reps})")
    for rows in (int(r) for r in args.chunk_rows.split(",")):
        seconds, loss, grad = timed(lambda: chunked(rows))
        # Sums in another order: equal up to float32 rounding.
        assert abs(loss - whole_loss) <= 1e-5 * abs(whole_loss), (loss, whole_loss)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-4, atol=1e-6)
        print(f"chunks of {rows:4d}:  {seconds * 1e3:7.0f} ms per batch, ratio whole / chunked {whole_s / seconds:5.2f}")


if __name__ == "__main__":
    main()
