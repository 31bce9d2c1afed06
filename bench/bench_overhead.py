"""Measure the evaluation time of PP-KD with a mixed teacher over the kNN-LM's.

Both configurations evaluate the same split with the same datastore, index,
k and probes: the kNN-LM with mu = 1 and lambda = 0.25, PP-KD with mu = 0.4,
lambda = 0.5 and every teacher in --teachers averaged (the mixed teacher).
The extra work of PP-KD is reading each neighbour's teacher state and
log-normalizers and one dot product per neighbour and teacher. Target: the
ratio PP-KD / kNN-LM is at most 1.05.

Before timing, the script checks that the kNN-LM with lambda = 0 gives the
LM's perplexity and that PP-KD with mu = 1 gives the kNN-LM's, token counts
included.

    python bench/bench_overhead.py --threads 1
    python bench/bench_overhead.py --data /work/run/wt2/data-bin \
        --student /work/run/wt2/checkpoints/student/checkpoint_last.pt \
        --dstore /work/run/wt2/datastore --teachers causal,masked --split valid
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

TARGET = 1.05


def check_configurations(setup, args):
    """Raise BenchmarkCheckError unless the configurations agree where they must."""
    teachers = ",".join(setup.teachers)
    lm = harness.run_eval(harness.eval_argv(setup, args))
    knn_lambda0 = harness.run_eval(harness.knn_argv(setup, args, "--ppkd-lambda", 0.0))
    harness.check_close("kNN-LM perplexity at lambda = 0 vs the LM's", knn_lambda0.perplexity, lm.perplexity)
    knn = harness.run_eval(harness.knn_argv(setup, args, "--ppkd-mu", 1.0, "--ppkd-lambda", 0.25))
    ppkd_mu1 = harness.run_eval(harness.knn_argv(setup, args, "--ppkd-mu", 1.0, "--ppkd-lambda", 0.25,
                                                 "--ppkd-teachers", teachers))
    harness.check_close("PP-KD perplexity at mu = 1 vs the kNN-LM's", ppkd_mu1.perplexity, knn.perplexity,
                        rtol=1e-6)
    harness.check_close("kNN-LM summary perplexity vs fairseq-eval-lm's", knn.summary["perplexity"],
                        knn.perplexity)
    ppkd = harness.run_eval(harness.knn_argv(setup, args, "--ppkd-mu", 0.4, "--ppkd-lambda", 0.5,
                                             "--ppkd-teachers", teachers))
    if ppkd.summary["tokens"] != knn.summary["tokens"] or ppkd.summary["tokens_with_zero_probability"]:
        raise harness.BenchmarkCheckError(
            f"PP-KD scored {ppkd.summary['tokens']} tokens ({ppkd.summary['tokens_with_zero_probability']} with "
            f"probability 0), the kNN-LM {knn.summary['tokens']}")
    print(f"check: token counts equal ({knn.summary['tokens']}); perplexity LM {lm.perplexity:.3f}, "
          f"kNN-LM {knn.perplexity:.3f}, PP-KD {ppkd.perplexity:.3f}")
    return knn.summary["tokens"]


def main():
    parser = harness.add_setup_arguments(harness.parser_for(__doc__.split("\n\n")[0]))
    args = parser.parse_args()
    harness.quiet_logging()
    harness.set_threads(args.threads)
    environment = harness.print_environment()
    setup = harness.resolve_setup(args)
    harness.print_setup(setup)
    if len(setup.teachers) < 1:
        raise SystemExit("PP-KD needs at least one teacher; pass --teachers")

    tokens = check_configurations(setup, args)
    knn_argv = harness.knn_argv(setup, args, "--ppkd-mu", 1.0, "--ppkd-lambda", 0.25)
    ppkd_argv = harness.knn_argv(setup, args, "--ppkd-mu", 0.4, "--ppkd-lambda", 0.5,
                                 "--ppkd-teachers", ",".join(setup.teachers))

    def measure(argv):
        result = harness.run_eval(argv)
        return {"seconds": result.seconds, "loop_seconds": result.loop_seconds,
                "search_seconds": result.summary["search_seconds"]}

    samples = harness.interleave({
        "knn_lm (mu=1)": lambda: measure(knn_argv),
        f"ppkd (mu=0.4, {len(setup.teachers)} teachers)": lambda: measure(ppkd_argv),
    }, args.reps)
    harness.print_times(samples, tokens)
    knn_times, ppkd_times = ([s["seconds"] for s in runs] for runs in samples.values())
    result = harness.ratio_report("PP-KD / kNN-LM evaluation time", ppkd_times, knn_times, TARGET)
    harness.write_json(args.json_out, {"environment": environment, "setup": vars(setup), "tokens": tokens,
                                       "samples": samples, "result": result, "argv": sys.argv})
    if args.profile:
        harness.profile_runs({"knn_lm": knn_argv, "ppkd": ppkd_argv})


if __name__ == "__main__":
    main()
