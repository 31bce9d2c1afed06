"""Measure kNN-LM evaluation time against its floor: LM forward plus FAISS search.

The floor is the work no kNN-LM can skip: the plain LM evaluation of the
split, plus loading the index and searching it for the same queries in the
same batches, timed alone with ``index.search``. Everything else the
kNN-LM evaluation does (exact distances from the stored keys, reading
values, the mixture, bookkeeping) is overhead on top. Target: kNN-LM /
(LM + search) is at most 1.15.

The queries are recorded from one kNN-LM evaluation, and the script checks
that searching them alone returns the same neighbour ids before timing. A
kNN-LM with the index's quantized distances (``--ppkd-distance faiss``)
is timed too, to show what the exact distances cost.

    python bench/bench_limit.py --threads 1
    python bench/bench_limit.py --data /work/run/wt2/data-bin \
        --student /work/run/wt2/checkpoints/student/checkpoint_last.pt \
        --dstore /work/run/wt2/datastore --split valid
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

TARGET = 1.15


def record_queries(setup, args):
    """Run one kNN-LM evaluation and return its per-batch queries and neighbour ids."""
    from ppkd_fairseq import handlers

    batches = []
    search = handlers.search

    def recording_search(index, queries, k, **kwargs):
        nb = search(index, queries, k, **kwargs)
        batches.append((np.array(queries, dtype=np.float32, copy=True), nb.ids.copy()))
        return nb

    handlers.search = recording_search
    try:
        result = harness.run_eval(harness.knn_argv(setup, args))
    finally:
        handlers.search = search
    return result, batches


def time_search_alone(setup, args, batches):
    """Load the index and search every recorded batch; return the seconds and the ids."""
    from ppkd_fairseq.index import load_index

    start = time.perf_counter()
    index = load_index(setup.dstore, nprobe=args.probe)
    ids = []
    for queries, _ in batches:
        _, found = index.search(queries, args.k)  # (n, k)
        ids.append(found)
    return time.perf_counter() - start, ids


def main():
    parser = harness.add_setup_arguments(harness.parser_for(__doc__.split("\n\n")[0]))
    args = parser.parse_args()
    harness.quiet_logging()
    harness.set_threads(args.threads)
    environment = harness.print_environment()
    setup = harness.resolve_setup(args)
    harness.print_setup(setup)

    lm = harness.run_eval(harness.eval_argv(setup, args))
    knn, batches = record_queries(setup, args)
    tokens = knn.summary["tokens"]
    recorded = sum(len(q) for q, _ in batches)
    if recorded != tokens:
        raise harness.BenchmarkCheckError(f"recorded {recorded} queries but the kNN-LM scored {tokens} tokens")
    _, alone_ids = time_search_alone(setup, args, batches)
    for i, ((_, expected), found) in enumerate(zip(batches, alone_ids)):
        found = np.where(found >= 0, found, -1)
        if not np.array_equal(found, expected):
            raise harness.BenchmarkCheckError(
                f"batch {i}: searching the recorded queries alone returned other neighbours "
                f"({int((found != expected).sum())} of {found.size} ids differ)")
    print(f"check: {len(batches)} batches, {recorded} queries: the search alone returns the evaluation's ids")
    print(f"perplexity: LM {lm.perplexity:.3f}, kNN-LM {knn.perplexity:.3f}")

    def measure_eval(argv):
        result = harness.run_eval(argv)
        return {"seconds": result.seconds, "loop_seconds": result.loop_seconds}

    def measure_search():
        seconds, _ = time_search_alone(setup, args, batches)
        return {"seconds": seconds}

    samples = harness.interleave({
        "lm": lambda: measure_eval(harness.eval_argv(setup, args)),
        "knn_lm (exact distances)": lambda: measure_eval(harness.knn_argv(setup, args)),
        "faiss search alone": measure_search,
        "knn_lm (faiss distances)": lambda: measure_eval(harness.knn_argv(setup, args, "--ppkd-distance", "faiss")),
    }, args.reps)
    harness.print_times(samples, tokens)
    seconds = {name: [s["seconds"] for s in runs] for name, runs in samples.items()}
    floor = [lm_s + search_s for lm_s, search_s in zip(seconds["lm"], seconds["faiss search alone"])]
    results = [
        harness.ratio_report("kNN-LM / (LM + FAISS search) evaluation time",
                             seconds["knn_lm (exact distances)"], floor, TARGET),
        harness.ratio_report("kNN-LM with FAISS distances / (LM + FAISS search)",
                             seconds["knn_lm (faiss distances)"], floor, TARGET),
    ]
    harness.write_json(args.json_out, {"environment": environment, "setup": vars(setup), "tokens": tokens,
                                       "batches": len(batches), "samples": samples, "results": results,
                                       "argv": sys.argv})
    if args.profile:
        harness.profile_runs({"lm": harness.eval_argv(setup, args), "knn_lm": harness.knn_argv(setup, args)})


if __name__ == "__main__":
    main()
