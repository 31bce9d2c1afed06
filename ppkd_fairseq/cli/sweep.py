"""Sweep T, mu and lambda of the kNN-LM and PP-KD on a validation split.

Examples::

    # Cache the valid split's neighbours and teacher log-probabilities, then
    # evaluate the default grid for the kNN-LM, each teacher and their mix
    python -m ppkd_fairseq.cli.sweep data-bin/wikitext-2 \\
        --path checkpoints/student/checkpoint_best.pt \\
        --dstore datastores/wikitext-2-train --k 1024 --out-dir sweeps/wt2 \\
        -- --cpu --tokens-per-sample 256 --context-window 128 --max-tokens 8192

    # A second run with the same inputs reuses the cache and only reruns the grid
    python -m ppkd_fairseq.cli.sweep ... --temperatures 2,5,10,20 --mus 0:1:0.05

Arguments after ``--`` are fairseq-eval-lm flags. They are used for the cache
pass and copied into the printed test-split commands, so that a test run
scores the same blocks with the same context as the sweep did. The cache is
reused while the datastore, checkpoint file, split, k, probe, distance mode,
own-row exclusion, teachers and these flags are unchanged.
"""

import argparse
import hashlib
import logging
import math
import os
import subprocess
import sys
import time

from ppkd_fairseq import manifest as mf
from ppkd_fairseq import sweep_report
from ppkd_fairseq.datastore import Datastore
from ppkd_fairseq.sweep import (
    DEFAULT_LAMBDAS,
    DEFAULT_MUS,
    DEFAULT_TEMPERATURES,
    Grid,
    extend_temperatures,
    median_nearest_distance,
    run_sweep,
    teacher_sets,
)
from ppkd_fairseq.sweep_cache import SweepCache, cache_mismatches, read_manifest

logger = logging.getLogger("ppkd_fairseq.sweep")

USER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags the sweep sets itself; passing them after -- would contradict it.
RESERVED_EVAL_FLAGS = ("--path", "--task", "--user-dir", "--gen-subset")


def parse_values(text):
    """Parse ``a,b,c`` or an inclusive range ``start:stop:step`` into floats."""
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected START:STOP:STEP, got {text!r}")
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected START:STOP:STEP with numbers, got {text!r}")
        if not all(math.isfinite(v) for v in (start, stop, step)):
            raise argparse.ArgumentTypeError(f"expected finite START:STOP:STEP, got {text!r}")
        if not step > 0 or stop < start:
            raise argparse.ArgumentTypeError(f"need STEP > 0 and STOP >= START, got {text!r}")
        count = int(round((stop - start) / step)) + 1
        # Rounding to 10 decimals turns 0.30000000000000004 into 0.3, so the
        # value printed in a command is the value evaluated.
        return [round(start + i * step, 10) for i in range(count) if start + i * step <= stop + step * 1e-9]
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or START:STOP:STEP, got {text!r}")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {bad[0]} in {text!r}")
    return values


def _join(values):
    return ",".join(f"{v:g}" for v in values)


def get_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ppkd_fairseq.cli.sweep",
        usage="%(prog)s DATA --path CKPT --dstore DSTORE --out-dir OUT [options] [-- FAIRSEQ_EVAL_LM_FLAG ...]",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA", help="data-bin folder of the evaluated split (fairseq-preprocess output)")
    parser.add_argument("--path", required=True, help="student checkpoint, the one the datastore's keys came from")
    parser.add_argument("--dstore", required=True, help="datastore folder with a built index")
    parser.add_argument("--out-dir", required=True, help="folder for grid.csv, best.json, heatmaps and commands")
    parser.add_argument("--split", default="valid", help="split to sweep on (default: valid)")
    parser.add_argument(
        "--teachers",
        default=None,
        help="comma-separated teacher names to sweep, 'none' for the kNN-LM only (default: every teacher "
        "stored in the datastore); with two or more the mixed teacher is swept too",
    )
    parser.add_argument("--cache-dir", default=None, help="folder of the sweep cache (default: OUT_DIR/cache)")
    parser.add_argument("--force-cache", action="store_true", help="recompute the cache even when it matches")

    search = parser.add_argument_group("retrieval (fixed by the cache)")
    search.add_argument("--k", type=int, default=1024, help="neighbours per token (default: 1024)")
    search.add_argument("--probe", type=int, default=32, help="IVF lists probed per search (default: 32)")
    search.add_argument(
        "--distance",
        choices=["exact", "faiss"],
        default="exact",
        help="exact: squared L2 recomputed from the stored keys; faiss: the index's quantized distances "
        "(default: exact)",
    )
    search.add_argument(
        "--exclude-own-row",
        action="store_true",
        help="drop each token's own row from its neighbours (sweeping on the datastore's own split)",
    )

    grid = parser.add_argument_group("grid")
    grid.add_argument(
        "--temperatures",
        type=parse_values,
        default=list(DEFAULT_TEMPERATURES),
        help=f"T values in squared-L2 units, a,b,c or START:STOP:STEP (default: {_join(DEFAULT_TEMPERATURES)})",
    )
    grid.add_argument(
        "--no-extend-temperatures",
        action="store_true",
        help="evaluate only --temperatures. By default 1-2-5 values are added so that T covers "
        "[m / 100, 10 m], where m is the median squared L2 distance to the nearest neighbour",
    )
    grid.add_argument(
        "--mus",
        type=parse_values,
        default=list(DEFAULT_MUS),
        help="mu values in [0, 1], the weight of P_hard in P_kNN (default: 0:1:0.1)",
    )
    grid.add_argument(
        "--lambdas",
        type=parse_values,
        default=list(DEFAULT_LAMBDAS),
        help="lambda values in [0, 1], the weight of P_kNN in the final mixture (default: 0:0.95:0.05)",
    )
    grid.add_argument(
        "--chunk-tokens",
        type=int,
        default=4096,
        help="tokens read from the cache per step; the grid's memory is roughly chunk x k x (20 + 16 x "
        "teachers) bytes, about 220 MB at k = 1024 with two teachers (default: 4096)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--test-split", default="test", help="split of the printed evaluation commands (default: test)")
    output.add_argument(
        "--test-commands-out",
        default=None,
        help="bash script with one fairseq-eval-lm command per best point (default: OUT_DIR/test_commands.sh)",
    )
    output.add_argument(
        "--eval-lm-program",
        default="fairseq-eval-lm",
        help="program named in the printed commands (default: fairseq-eval-lm)",
    )
    output.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap PNGs")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def split_eval_flags(argv):
    """Split ``argv`` at the first ``--`` into the sweep's arguments and fairseq-eval-lm flags."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check_eval_flags(flags):
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in RESERVED_EVAL_FLAGS or name.startswith("--ppkd-"):
            raise SystemExit(
                f"error: {name} after -- is set by the sweep itself; use the sweep's own options "
                f"(DATA, --path, --split, --k, --teachers, ...) instead"
            )


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ppkd_flags(args, teachers):
    """Return the --ppkd-* retrieval flags shared by the cache pass and the test commands."""
    flags = [
        "--ppkd-dstore", os.path.abspath(args.dstore),
        "--ppkd-k", str(args.k),
        "--ppkd-probe", str(args.probe),
        "--ppkd-distance", args.distance,
    ]
    if teachers:
        flags += ["--ppkd-teachers", ",".join(teachers)]
    return flags


def cache_command(args, teachers, cache_dir, eval_flags):
    command = [
        sys.executable, "-m", "fairseq_cli.eval_lm", os.path.abspath(args.data),
        "--path", os.path.abspath(args.path),
        "--user-dir", USER_DIR,
        "--task", "ppkd_language_modeling",
        "--gen-subset", args.split,
        "--ppkd-mode", "cache",
        "--ppkd-cache-dir", os.path.abspath(cache_dir),
    ] + ppkd_flags(args, teachers)
    if not teachers:
        # Without --ppkd-teachers the cache pass stores every teacher.
        command += ["--ppkd-teachers", "none"]
    if args.exclude_own_row:
        command.append("--ppkd-exclude-own-row")
    return command + list(eval_flags)


def test_command(args, point, eval_flags, summary_out):
    """Return the fairseq-eval-lm command that scores the test split at a best point.

    The command leaves out own-row exclusion, which applies to the datastore's own split only.
    """
    return [
        args.eval_lm_program, os.path.abspath(args.data),
        "--path", os.path.abspath(args.path),
        "--user-dir", USER_DIR,
        "--task", "ppkd_language_modeling",
        "--gen-subset", args.test_split,
    ] + ppkd_flags(args, point["teachers"]) + [
        "--ppkd-temperature", repr(point["temperature"]),
        "--ppkd-mu", repr(point["mu"]),
        "--ppkd-lambda", repr(point["lambda"]),
        "--ppkd-summary-out", os.path.abspath(summary_out),
    ] + list(eval_flags)


def run_cache_pass(command):
    """Run the cache pass, echoing its output to stderr; exit with an error line on failure."""
    logger.info("cache pass: %s", " ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        sys.stderr.write(line)
    returncode = process.wait()
    if returncode != 0:
        # The pass's own messages were streamed to stderr above.
        raise SystemExit(
            f"error: the cache pass failed with exit status {returncode}; its messages are above. "
            f"Command: {' '.join(command)}"
        )


def prepare_cache(args, teachers, eval_flags, datastore):
    """Reuse the cache when it matches the request, or run the cache pass; return (SweepCache, reused)."""
    cache_dir = args.cache_dir or os.path.join(args.out_dir, "cache")
    request = {
        "datastore_id": datastore.manifest["datastore_id"],
        "student_fingerprint": datastore.manifest.get("student", {}).get("fingerprint"),
        "data": os.path.abspath(args.data),
        "split": args.split,
        "k": args.k,
        "distance": args.distance,
        "probe": args.probe,
        "exclude_own_row": args.exclude_own_row,
        "teachers": {name: datastore.open_teacher(name).manifest["head"]["sha256"] for name in teachers},
        "checkpoint_sha256": file_sha256(args.path),
        "eval_flags": list(eval_flags),
    }

    reasons = cache_mismatches(read_manifest(cache_dir), request)
    if not reasons and not args.force_cache:
        logger.info("reusing the sweep cache in %s: its inputs match", cache_dir)
        return SweepCache.open(cache_dir), True

    logger.info("computing the sweep cache in %s: %s", cache_dir,
                "--force-cache" if not reasons else "; ".join(reasons))
    started = time.time()
    run_cache_pass(cache_command(args, teachers, cache_dir, eval_flags))

    manifest = read_manifest(cache_dir)
    # Everything but the sweep's own record must match now; a difference
    # means the cache pass read other inputs than the sweep asked for.
    problems = [r for r in cache_mismatches(manifest, request)
                if not r.startswith(("checkpoint sha256", "fairseq-eval-lm flags"))]
    if problems:
        raise mf.DatastoreMismatchError(f"the cache pass wrote a cache that does not match: {'; '.join(problems)}")

    manifest["request"] = {
        "checkpoint": os.path.abspath(args.path),
        "checkpoint_sha256": request["checkpoint_sha256"],
        "eval_flags": request["eval_flags"],
    }
    mf.write_json_atomic(os.path.join(cache_dir, "manifest.json"), manifest)
    logger.info("cache pass done in %.1f s", time.time() - started)
    return SweepCache.open(cache_dir), False


def select_teachers(args, datastore):
    stored = datastore.teacher_names()
    if args.teachers is None:
        return stored
    if args.teachers.strip().lower() == "none":
        return []
    names = [n.strip() for n in args.teachers.split(",") if n.strip()]
    missing = [n for n in names if n not in stored]
    if missing:
        raise SystemExit(
            f"error: teacher {', '.join(missing)} not found in datastore {args.dstore}; it has "
            f"{', '.join(stored) or 'none'}"
        )
    return names


def evaluate_grid(args, cache, teachers):
    """Extend the temperatures, evaluate the grid from the cache, and return (result, seconds)."""
    started = time.time()
    median = median_nearest_distance(
        c["distances"] for c in cache.iter_chunks([], args.chunk_tokens, fields=("distances",))
    )
    temperatures = list(args.temperatures)
    if not args.no_extend_temperatures:
        temperatures = extend_temperatures(temperatures, median)
        added = sorted(set(temperatures) - set(args.temperatures))
        if added:
            logger.info("median nearest-neighbour distance %.4g: added T = %s", median, _join(added))
    grid = Grid(temperatures, args.mus, args.lambdas)
    logger.info("evaluating %d T x %d mu x %d lambda for teacher sets %s on %d tokens",
                len(grid.temperatures), len(grid.mus), len(grid.lambdas),
                ", ".join(s.label for s in teacher_sets(teachers)), cache.manifest["tokens"])
    result = run_sweep(cache.iter_chunks(teachers, args.chunk_tokens), grid, teachers,
                       num_chunks=cache.num_chunks(args.chunk_tokens), progress=not args.no_progress)
    result.median_nearest = median
    # The time includes the pass over the distances for the median.
    return result, time.time() - started


def write_outputs(args, result, eval_flags):
    """Write grid.csv, the heatmaps and the test commands; return the best points and the commands path."""
    os.makedirs(args.out_dir, exist_ok=True)
    sweep_report.write_grid_csv(os.path.join(args.out_dir, "grid.csv"), result)
    best, commands = {}, []
    for s in result.sets:
        point = result.best(s)
        summary_out = os.path.join(args.out_dir, f"{args.test_split}-{s.label}.json")
        command = test_command(args, point, eval_flags, summary_out)
        point["test_command"] = sweep_report.format_command(command)
        best[s.label] = point
        commands.append((f"{s.label}: perplexity {point['perplexity']:.4f} on {args.split}", command))
        if s.names and not args.no_heatmaps:
            path = os.path.join(args.out_dir, f"heatmap-{s.label}.png")
            point["heatmap"] = sweep_report.plot_heatmap(path, result, s, point["temperature"], args.split)
    commands_path = args.test_commands_out or os.path.join(args.out_dir, "test_commands.sh")
    sweep_report.write_commands(
        commands_path, commands,
        [f"Evaluate split {args.test_split} at the best points of the sweep on split {args.split}.",
         f"Written by python -m ppkd_fairseq.cli.sweep into {os.path.abspath(args.out_dir)}."],
    )
    return best, commands_path


def sweep(args, eval_flags):
    """Run the cache pass (or reuse it) and the grid; write the outputs and return best.json's content."""
    datastore = Datastore.open(args.dstore)
    if args.k > datastore.num_rows:
        raise SystemExit(f"error: --k {args.k} is more than the {datastore.num_rows} rows of {args.dstore}; "
                         f"lower --k")
    teachers = select_teachers(args, datastore)
    started = time.time()
    cache, reused = prepare_cache(args, teachers, eval_flags, datastore)
    cache_seconds = time.time() - started

    result, grid_seconds = evaluate_grid(args, cache, teachers)
    points = sum(1 for _ in result.rows())
    logger.info("%d grid points in %.2f s", points, grid_seconds)

    best, commands_path = write_outputs(args, result, eval_flags)
    grid = result.grid
    report = {
        "split": args.split,
        "tokens": result.tokens,
        "tokens_without_neighbours": result.tokens_without_neighbours,
        "lm_perplexity": result.lm_perplexity,
        "median_nearest_distance": result.median_nearest,
        "grid": {"temperatures": grid.temperatures, "mus": grid.mus, "lambdas": grid.lambdas, "points": points},
        "best": best,
        "on_edge": any(p["edges"] for p in best.values()),
        "cache": {"folder": os.path.abspath(cache.folder), "reused": reused},
        "cache_seconds": round(cache_seconds, 3),
        "grid_seconds": round(grid_seconds, 3),
    }
    sweep_report.write_best_json(os.path.join(args.out_dir, "best.json"), report)
    print_report(report, commands_path)
    return report


def print_report(report, commands_path):
    print(f"LM perplexity on {report['split']}: {report['lm_perplexity']:.4f} ({report['tokens']} tokens)")
    for label, point in report["best"].items():
        print(f"best {label}: perplexity {point['perplexity']:.4f} at T = {point['temperature']:g}, "
              f"mu = {point['mu']:g}, lambda = {point['lambda']:g}")
        for message in point["edges"]:
            print(f"  WARNING: {message}")
    print(f"\nTest-split commands (also in {commands_path}):\n")
    for label, point in report["best"].items():
        print(f"# {label}\n{point['test_command']}\n")


def run(argv):
    """Parse ``argv`` (without the program name), sweep, and return best.json's content."""
    argv = list(argv)
    own, eval_flags = split_eval_flags(argv)
    args = get_parser().parse_args(own)
    check_eval_flags(eval_flags)
    if args.chunk_tokens < 1:
        raise SystemExit(f"error: --chunk-tokens must be >= 1, got {args.chunk_tokens}")
    if args.k < 1:
        raise SystemExit(f"error: --k must be >= 1, got {args.k}")
    if args.probe < 1:
        raise SystemExit(f"error: --probe must be >= 1, got {args.probe}")
    try:
        Grid(args.temperatures, args.mus, args.lambdas)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    return sweep(args, eval_flags)


def main(argv=None):
    # force=True because importing fairseq has already configured the root
    # logger, at level DEBUG, which would let matplotlib's debug lines through.
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stderr,
        force=True,
    )
    run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
