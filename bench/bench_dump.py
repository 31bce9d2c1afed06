"""Measure the datastore dump time over plain fairseq-eval-lm on the same split.

``--ppkd-mode dump`` runs the LM over the split like a plain evaluation and
also writes every target's key (float16 by default) and value into
memory-mapped .npy files, then flushes them and writes the manifest. Each
timed dump writes into an empty scratch folder, removed between runs
outside the timed region. Target: dump / plain evaluation is at most 1.2.

Before timing, the script checks that the dump reports the plain
evaluation's perplexity and that its values equal the split's token stream
and every key row was written.

    python bench/bench_dump.py --threads 1
    python bench/bench_dump.py --data /work/run/wt2/data-bin \
        --student /work/run/wt2/checkpoints/student/checkpoint_last.pt \
        --dstore /work/run/wt2/datastore --split valid
"""

import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from capture import read_stream  # noqa: E402  (tests/capture.py, on the path through standalone.py)

TARGET = 1.2


def dump_argv(setup, args, folder):
    return harness.eval_argv(setup, args, "--ppkd-mode", "dump", "--ppkd-dstore", folder)


def check_dump(setup, args, folder, lm):
    """Raise BenchmarkCheckError unless the dump matches the plain evaluation and the split."""
    from ppkd_fairseq.datastore import Datastore

    dump = harness.run_eval(dump_argv(setup, args, folder))
    harness.check_close("dump perplexity vs plain fairseq-eval-lm's", dump.perplexity, lm.perplexity, rtol=1e-6)
    store = Datastore.open(folder)
    stream = read_stream(setup.data, setup.split)
    if not np.array_equal(np.asarray(store.values, dtype=np.int64), stream):
        raise harness.BenchmarkCheckError(f"{folder}: values differ from the {setup.split} split's tokens")
    unwritten = int((np.abs(np.asarray(store.keys, dtype=np.float32)).sum(-1) == 0).sum())
    if unwritten:
        raise harness.BenchmarkCheckError(f"{folder}: {unwritten} key rows are all zero (not written)")
    print(f"check: the dump holds {store.num_rows} rows whose values are the split's tokens, all keys written")
    return store.num_rows


def main():
    parser = harness.add_setup_arguments(harness.parser_for(__doc__.split("\n\n")[0]), default_split="train")
    args = parser.parse_args()
    harness.quiet_logging()
    harness.set_threads(args.threads)
    environment = harness.print_environment()
    setup = harness.resolve_setup(args)
    harness.print_setup(setup)

    folder = os.path.join(args.cache_dir, f"scratch-dump-{os.getpid()}")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        lm = harness.run_eval(harness.eval_argv(setup, args))
        tokens = check_dump(setup, args, folder, lm)

        def measure_lm():
            result = harness.run_eval(harness.eval_argv(setup, args))
            return {"seconds": result.seconds, "loop_seconds": result.loop_seconds}

        def measure_dump():
            shutil.rmtree(folder, ignore_errors=True)
            result = harness.run_eval(dump_argv(setup, args, folder))
            return {"seconds": result.seconds, "loop_seconds": result.loop_seconds}

        samples = harness.interleave({"lm": measure_lm, "dump": measure_dump}, args.reps)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    harness.print_times(samples, tokens)
    lm_times, dump_times = ([s["seconds"] for s in runs] for runs in samples.values())
    result = harness.ratio_report("dump / plain fairseq-eval-lm time", dump_times, lm_times, TARGET)
    harness.write_json(args.json_out, {"environment": environment, "setup": vars(setup), "tokens": tokens,
                                       "samples": samples, "result": result, "argv": sys.argv})
    if args.profile:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            harness.profile_runs({"lm": harness.eval_argv(setup, args), "dump": dump_argv(setup, args, folder)})
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
