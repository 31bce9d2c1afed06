"""Time teacher scoring per query for several step sizes of TeacherStore.target_log_probs.

``TeacherStore.target_log_probs`` reads the teacher states of whole queries
per step, converts them from float16 to float32 and takes one dot product
per neighbour. Its ``chunk_rows`` sets the rows per step. This script writes
a synthetic float16 state file, scores the same random neighbours with each
step size, checks that every step size gives the same log-probabilities,
and prints the median time per query. Steps whose float32 copy fits in the
CPU's cache are expected to be faster.

    python bench/bench_teacher_step.py
    python bench/bench_teacher_step.py --dims 384,1024 --queries 256 --reps 3
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppkd_fairseq.datastore import TeacherStore  # noqa: E402
from ppkd_fairseq.teacher_head import log_normalizers, softmax_head  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="256,384,1024", help="teacher state widths d_t (default: 256,384,1024)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the state file (default: 200000)")
    parser.add_argument("--vocab", type=int, default=1000, help="teacher vocabulary size (default: 1000)")
    parser.add_argument("--k", type=int, default=1024, help="neighbours per query (default: 1024)")
    parser.add_argument("--queries", type=int, default=256, help="queries per timing (default: 256)")
    parser.add_argument("--queries-per-step", default="1,2,4,16",
                        help="step sizes in whole queries (default: 1,2,4,16)")
    parser.add_argument("--reps", type=int, default=3, help="timings per step size (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def make_teacher(folder, rows, dim, vocab, rng):
    """Return a :class:`TeacherStore` over a float16 state file of ``rows`` x ``dim`` in ``folder``."""
    states = np.lib.format.open_memmap(os.path.join(folder, f"states-{dim}.npy"), mode="w+",
                                       dtype=np.float16, shape=(rows, dim))
    states[:] = rng.standard_normal((rows, dim)).astype(np.float16)
    states.flush()
    head = softmax_head(torch.from_numpy(rng.standard_normal((vocab, dim)).astype(np.float32)) * 0.1)
    lognorm = log_normalizers(head, torch.from_numpy(np.asarray(states[:, :])).float()).numpy()
    states = np.load(os.path.join(folder, f"states-{dim}.npy"), mmap_mode="r")
    return TeacherStore(folder, {"name": f"synthetic-{dim}"}, states, lognorm, head)


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.queries_per_step.split(",")]
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"k = {args.k}, {args.queries} queries, {args.rows:,} rows")
    with tempfile.TemporaryDirectory() as folder:
        for dim in (int(d) for d in args.dims.split(",")):
            teacher = make_teacher(folder, args.rows, dim, args.vocab, rng)
            ids = rng.integers(0, args.rows, size=(args.queries, args.k))
            targets = torch.from_numpy(rng.integers(0, args.vocab, size=args.queries))
            reference = None
            line = []
            for step in steps:
                times = []
                for _ in range(args.reps):
                    started = time.perf_counter()
                    out = teacher.target_log_probs(ids, targets, chunk_rows=step * args.k)
                    times.append(time.perf_counter() - started)
                if reference is None:
                    reference = out
                # Batched products may sum in another order, so equal up to float32 rounding.
                np.testing.assert_allclose(out.numpy(), reference.numpy(), rtol=1e-5, atol=1e-4)
                line.append(f"{step} per step: {statistics.median(times) / args.queries * 1e6:6.0f} us")
            print(f"d_t = {dim:5d}: " + ", ".join(line) + " per query (median)")


if __name__ == "__main__":
    main()
