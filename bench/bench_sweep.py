"""Time a T, mu and lambda sweep against one PP-KD evaluation of the same split.

The sweep (cache pass plus a grid of at least 500 points) replaces one
fairseq-eval-lm run per grid point. This script measures how much more than
one such run it costs. Before timing, it checks that the sweep's perplexity
at T = 10, mu = 0.4, lambda = 0.5 with all teachers equals what
fairseq-eval-lm reports at that point (relative difference at most 1e-6).

Examples::

    # Tiny seeded corpus and models, built in a temporary folder (a few minutes on 2 cores)
    python bench/bench_sweep.py

    # The WikiText-2 run of scripts/reproduce_wikitext2.sh
    python bench/bench_sweep.py --data runs/wikitext2/data-bin \\
        --student runs/wikitext2/checkpoints/student/checkpoint_best.pt \\
        --dstore runs/wikitext2/datastore --teachers causal,masked --split valid --k 1024 \\
        -- --cpu --tokens-per-sample 256 --context-window 128 --max-tokens 8192

Both timed runs start one fairseq-eval-lm process, so both pay its start-up:
importing fairseq and loading the checkpoint, a few seconds. On tiny data
that start-up dominates.
"""

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ppkd_fairseq.cli import sweep as sweep_cli  # noqa: E402

USER_DIR = os.path.join(REPO, "ppkd_fairseq")
TARGET_RATIO = 1.5
MIN_POINTS = 500
POINT = {"temperature": 10.0, "mu": 0.4, "lambda": 0.5}  # PP-KD's best setting in Jin, Ge and Wei (2022)
TINY_K = 16
TINY_EVAL_FLAGS = ["--cpu", "--max-tokens", "256", "--tokens-per-sample", "32", "--no-progress-bar",
                   "--log-format", "simple"]


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--data DATA --student CKPT --dstore DSTORE] [options] [-- FAIRSEQ_EVAL_LM_FLAG ...]",
    )
    parser.add_argument("--data", help="data-bin folder (default: build the tiny corpus of tests/conftest.py)")
    parser.add_argument("--student", help="student checkpoint the datastore was dumped with")
    parser.add_argument("--dstore", help="datastore folder with an index and teachers")
    parser.add_argument("--teachers", default=None,
                        help="comma-separated teachers (default: all stored in the datastore)")
    parser.add_argument("--split", default="valid", help="evaluated split (default: valid)")
    parser.add_argument("--k", type=int, default=None,
                        help=f"neighbours per token (default: {TINY_K} on tiny data, else 1024)")
    parser.add_argument("--work-dir", default=None,
                        help="folder for the tiny setup, caches and outputs (default: a new temporary folder)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="time the checked runs themselves instead of running both again; the first "
                             "runs pay cold file caches")
    return parser


def print_environment():
    import fairseq

    print("environment:")
    print(f"  python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs "
          f"(os.sched_getaffinity: {len(os.sched_getaffinity(0))})")
    print(f"  torch {torch.__version__} with {torch.get_num_threads()} threads, numpy {np.__version__}, "
          f"fairseq {fairseq.__version__}, faiss {faiss.__version__}")
    print(f"  load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes share the CPUs)")


def build_tiny_setup(folder):
    """Build the tiny corpus, student, causal teacher, datastore and index of the tests; return paths.

    A setup that an earlier run completed in ``folder`` is reused.
    """
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import conftest

    data = os.path.join(folder, "data-bin")
    dstore = os.path.join(folder, "dstore")
    done = os.path.join(folder, "setup.json")
    if os.path.exists(done):
        with open(done) as f:
            paths = json.load(f)
        return paths["data"], paths["student"], paths["dstore"]
    raw = os.path.join(folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, lines, seed in (("train", 300, 1), ("valid", 40, 2), ("test", 40, 3)):
        conftest.write_corpus(os.path.join(raw, f"{split}.tokens"), lines, seed)
    conftest.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
                  "--trainpref", os.path.join(raw, "train.tokens"), "--validpref", os.path.join(raw, "valid.tokens"),
                  "--testpref", os.path.join(raw, "test.tokens"), "--destdir", data, "--workers", "1"])
    student = conftest.train(data, os.path.join(folder, "student"),
                             ["--decoder-normalize-before", "--share-decoder-input-output-embed"])
    teacher = conftest.train(
        data, os.path.join(folder, "teacher"),
        ["--decoder-normalize-before", "--criterion", "adaptive_loss", "--adaptive-softmax-cutoff", "20,40",
         "--adaptive-softmax-factor", "2", "--ddp-backend", "legacy_ddp"])
    conftest.eval_lm(data, student, "--ppkd-mode", "dump", "--ppkd-dstore", dstore)
    conftest.run([sys.executable, "-m", "ppkd_fairseq.cli.build_index", dstore])
    conftest.eval_lm(data, teacher, "--ppkd-mode", "dump_teacher", "--ppkd-dstore", dstore,
                     "--ppkd-teacher-name", "causal")
    with open(done, "w") as f:
        json.dump({"data": data, "student": student, "dstore": dstore}, f)
    return data, student, dstore


def stored_teachers(dstore):
    from ppkd_fairseq.datastore import Datastore

    return Datastore.open(dstore).teacher_names()


def run_eval(args, teachers, eval_flags, summary):
    """Run fairseq-eval-lm once at POINT; return (wall seconds, summary perplexity)."""
    command = [
        sys.executable, "-m", "fairseq_cli.eval_lm", args.data, "--path", args.student, "--user-dir", USER_DIR,
        "--task", "ppkd_language_modeling", "--gen-subset", args.split, "--ppkd-dstore", args.dstore,
        "--ppkd-k", str(args.k), "--ppkd-temperature", str(POINT["temperature"]), "--ppkd-mu", str(POINT["mu"]),
        "--ppkd-lambda", str(POINT["lambda"]), "--ppkd-summary-out", summary,
    ]
    if teachers:
        command += ["--ppkd-teachers", ",".join(teachers)]
    started = time.perf_counter()
    result = subprocess.run(command + eval_flags, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"fairseq-eval-lm failed:\n{' '.join(command + eval_flags)}\n{result.stderr[-3000:]}")
    with open(summary) as f:
        return seconds, json.load(f)["perplexity"]


def run_sweep(args, teachers, eval_flags, out_dir):
    """Run the sweep CLI with a fresh cache; return (wall seconds, report, grid.csv path)."""
    argv = [args.data, "--path", args.student, "--dstore", args.dstore, "--out-dir", out_dir,
            "--split", args.split, "--k", str(args.k), "--teachers", ",".join(teachers) or "none",
            "--force-cache", "--no-heatmaps", "--no-progress", "--", *eval_flags]
    started = time.perf_counter()
    report = sweep_cli.run(argv)
    return time.perf_counter() - started, report


def grid_value(out_dir, label, point):
    import csv

    with open(os.path.join(out_dir, "grid.csv")) as f:
        for row in csv.DictReader(f):
            if row["model"] == label and all(float(row[key]) == value for key, value in point.items()):
                return float(row["perplexity"])
    raise SystemExit(f"grid.csv in {out_dir} has no row for {label} at {point}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, eval_flags = sweep_cli.split_eval_flags(argv)
    args = get_parser().parse_args(own)
    paths_given = [args.data, args.student, args.dstore]
    if any(paths_given) and not all(paths_given):
        raise SystemExit("error: pass all of --data, --student and --dstore, or none for the tiny setup")
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        force=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_sweep_")
    os.makedirs(work, exist_ok=True)
    print_environment()
    if not any(paths_given):
        print(f"building the tiny setup in {work} ...", flush=True)
        args.data, args.student, args.dstore = build_tiny_setup(os.path.join(work, "tiny"))
        eval_flags = eval_flags or list(TINY_EVAL_FLAGS)
        args.k = args.k or TINY_K
    args.k = args.k or 1024
    teachers = [t for t in (args.teachers or "").split(",") if t] or stored_teachers(args.dstore)
    label = "ppkd-" + "+".join(teachers) if teachers else "knn_lm"
    point = dict(POINT) if teachers else {**POINT, "mu": 1.0}
    print(f"data {args.data}, split {args.split}, k = {args.k}, teachers {', '.join(teachers) or 'none'}")
    print(f"fairseq-eval-lm flags: {' '.join(eval_flags)}", flush=True)

    # Correctness first: no time is reported for a sweep that disagrees with fairseq-eval-lm.
    eval_seconds, eval_ppl = run_eval(args, teachers, eval_flags, os.path.join(work, "eval-summary.json"))
    sweep_seconds, report = run_sweep(args, teachers, eval_flags, os.path.join(work, "sweep"))
    swept_ppl = grid_value(os.path.join(work, "sweep"), label, point)
    difference = abs(swept_ppl - eval_ppl) / eval_ppl
    print(f"check: fairseq-eval-lm {eval_ppl!r}, sweep {swept_ppl!r}, relative difference {difference:.2e}")
    if not difference <= 1e-6:
        raise SystemExit("FAIL: the sweep disagrees with fairseq-eval-lm; no timing reported")
    points = report["grid"]["points"]
    if points < MIN_POINTS:
        raise SystemExit(f"FAIL: the grid has {points} points, fewer than {MIN_POINTS}")

    if not args.no_warmup:
        eval_seconds, _ = run_eval(args, teachers, eval_flags, os.path.join(work, "eval-summary.json"))
        sweep_seconds, report = run_sweep(args, teachers, eval_flags, os.path.join(work, "sweep"))
    ratio = sweep_seconds / eval_seconds
    print(f"\none fairseq-eval-lm run with PP-KD: {eval_seconds:.2f} s")
    print(f"sweep of {points} grid points: {sweep_seconds:.2f} s (cache pass {report['cache_seconds']:.2f} s, "
          f"grid {report['grid_seconds']:.2f} s, rest: outputs)")
    print(f"ratio sweep / one evaluation: {ratio:.2f} (target <= {TARGET_RATIO}); "
          f"{'within' if ratio <= TARGET_RATIO else 'OVER'} target")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
