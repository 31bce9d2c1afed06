"""Shared parts of the benchmark scripts: setup options, in-process runs, timing.

Evaluations run inside the benchmark's own process through
``fairseq_cli.eval_lm.main``, so Python start-up, imports and checkpoint
loading, which cost seconds and vary with the machine's load, stay out of
the measured time. A run's time is measured from the task's
``eval_lm_dataloader`` call to the return of ``main``: that covers opening
the datastore, index and teachers (or the dump files), every batch, and the
handler's ``finish``. Loading the model and the dataset happens before it and
is the same for every configuration. The time fairseq reports in its
"Evaluated N tokens in Xs" line (the model calls only) is kept as
``loop_seconds``.
"""

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
USER_DIR = os.path.join(REPO, "ppkd_fairseq")
sys.path.insert(0, BENCH_DIR)

from standalone import DEFAULT_CACHE_DIR, Setup, build_standalone  # noqa: E402

logger = logging.getLogger("bench")


class BenchmarkCheckError(RuntimeError):
    """Error for a configuration whose results differ where they must agree."""


def add_setup_arguments(parser, default_split="test"):
    """Add the options that select the setup and the evaluation settings."""
    setup = parser.add_argument_group(
        "setup", "a real setup needs --data, --student and --dstore; without them the benchmark "
                 "builds (once) a small standalone setup under --cache-dir")
    setup.add_argument("--data", help="fairseq data-bin of the datastore's corpus")
    setup.add_argument("--student", help="student checkpoint whose keys the datastore holds")
    setup.add_argument("--dstore", help="datastore folder with a complete index")
    setup.add_argument("--teachers", help="comma-separated stored teachers for PP-KD (default: the "
                                          "standalone setup's two teachers)")
    setup.add_argument("--split", default=default_split, help=f"split to evaluate (default: {default_split})")
    setup.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                       help=f"folder for the standalone setup and scratch files (default: {DEFAULT_CACHE_DIR})")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--k", type=int, default=1024, help="neighbours per token (default: 1024)")
    evaluation.add_argument("--probe", type=int, default=32, help="IVF lists probed per query (default: 32)")
    evaluation.add_argument("--tokens-per-sample", type=int, default=256,
                            help="fairseq-eval-lm block length in tokens (default: 256)")
    evaluation.add_argument("--context-window", type=int, default=128,
                            help="tokens of left context prepended to each block (default: 128)")
    evaluation.add_argument("--max-tokens", type=int, default=2048,
                            help="tokens per batch, context included (default: 2048, so about 1024 "
                                 "scored tokens per batch with the default context window)")

    timing = parser.add_argument_group("timing")
    timing.add_argument("--reps", type=int, default=5,
                        help="timed repetitions of each configuration, interleaved (default: 5)")
    timing.add_argument("--threads", type=int, default=None,
                        help="torch and FAISS (OpenMP) threads; default: the libraries' own defaults")
    timing.add_argument("--json-out", help="also write the measurements to this JSON file")
    timing.add_argument("--profile", action="store_true",
                        help="after timing, run each configuration once more under cProfile and print the "
                             "functions with the most own time")
    return parser


def resolve_setup(args):
    """Return the real :class:`Setup` named by the options, or the standalone one."""
    given = [name for name in ("data", "student", "dstore") if getattr(args, name, None)]
    if given and len(given) < 3:
        missing = sorted({"data", "student", "dstore"} - set(given))
        raise SystemExit(f"a real setup needs --data, --student and --dstore; missing: {', '.join(missing)}")
    if given:
        teachers = [t for t in (args.teachers or "").split(",") if t]
        return Setup(data=args.data, student=args.student, dstore=args.dstore, teachers=teachers,
                     split=args.split)
    setup = build_standalone(args.cache_dir)
    if args.teachers:
        setup.teachers = [t for t in args.teachers.split(",") if t]
    setup.split = args.split
    return setup


def set_threads(threads):
    """Set torch's and FAISS's thread counts when ``threads`` is given."""
    if threads is None:
        return
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def describe_environment():
    """Return a dict of the machine, its load, and library versions and thread counts."""
    import faiss
    import fairseq
    import numpy
    import torch

    cpu_model = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    memory = {}
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":", 1)
                if name in ("MemTotal", "MemAvailable"):
                    memory[name] = f"{int(value.split()[0]) / 2**20:.1f} GiB"
    return {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "memory": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "faiss": faiss.__version__,
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "faiss_compile_options": faiss.get_compile_options(),
        "numpy": numpy.__version__,
        "fairseq": fairseq.__version__,
    }


def print_environment():
    environment = describe_environment()
    print("environment:")
    for name, value in environment.items():
        print(f"  {name}: {value}")
    return environment


def print_setup(setup):
    print("setup:")
    for name in ("data", "student", "dstore", "teachers", "split"):
        print(f"  {name}: {getattr(setup, name)}")


def eval_argv(setup, args, *extra, split=None):
    """Return fairseq-eval-lm arguments for ``setup`` plus ``extra`` flags."""
    return [
        setup.data, "--path", setup.student, "--user-dir", USER_DIR, "--task", "ppkd_language_modeling",
        "--gen-subset", split or setup.split, "--cpu", "--no-progress-bar", "--log-format", "simple",
        "--log-interval", "1000", "--tokens-per-sample", str(args.tokens_per_sample),
        "--context-window", str(args.context_window), "--max-tokens", str(args.max_tokens),
    ] + [str(x) for x in extra]


def knn_argv(setup, args, *extra, split=None):
    """Return arguments of a kNN-LM evaluation (mu = 1) with the benchmark's k and probes."""
    return eval_argv(setup, args, "--ppkd-dstore", setup.dstore, "--ppkd-k", args.k,
                     "--ppkd-probe", args.probe, *extra, split=split)


@dataclass
class EvalResult:
    """One in-process fairseq-eval-lm run."""

    perplexity: float  # fairseq-eval-lm's perplexity (base 2 loss, tokens with finite scores)
    seconds: float  # from eval_lm_dataloader to the end of main (see the module docstring)
    loop_seconds: float  # model calls only, as in fairseq's "Evaluated N tokens in Xs"
    summary: dict  # the PP-KD JSON summary, or None without a datastore


_clock = {"start": None, "loop": 0.0}


def _install_timers():
    """Wrap the task's data loader and the scorer to record when and how long runs take."""
    if _clock.get("installed"):
        return
    from fairseq.sequence_scorer import SequenceScorer

    from ppkd_fairseq.task import PPKDLanguageModelingTask

    loader = PPKDLanguageModelingTask.eval_lm_dataloader

    def timed_loader(self, *a, **kw):
        _clock["start"] = time.perf_counter()
        return loader(self, *a, **kw)

    generate = SequenceScorer.generate

    def timed_generate(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(self, *a, **kw)
        finally:
            _clock["loop"] += time.perf_counter() - t0

    PPKDLanguageModelingTask.eval_lm_dataloader = timed_loader
    SequenceScorer.generate = timed_generate
    _clock["installed"] = True


def quiet_logging():
    """Show warnings only from fairseq and the plugin, progress from the benchmark.

    Python warnings (hydra's deprecation notices at every configuration
    parse, torch's pin_memory notice) are silenced, because they repeat at
    every in-process run.
    """
    import fairseq_cli.eval_lm  # noqa: F401  (its import calls logging.basicConfig at INFO)

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger().setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)


def run_eval(argv):
    """Run fairseq-eval-lm in this process and return an :class:`EvalResult`."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    _install_timers()
    summary_path = None
    if "--ppkd-dstore" in argv and "--ppkd-mode" not in argv and "--ppkd-summary-out" not in argv:
        fd, summary_path = tempfile.mkstemp(suffix=".json", prefix="ppkd-bench-summary-")
        os.close(fd)
        argv = list(argv) + ["--ppkd-summary-out", summary_path]
    parser = options.get_eval_lm_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=list(argv)))
    gc.collect()
    _clock["start"], _clock["loop"] = None, 0.0
    results = eval_lm.main(cfg)
    end = time.perf_counter()
    if _clock["start"] is None:
        raise RuntimeError("the evaluation did not call the task's eval_lm_dataloader; is --task "
                           "ppkd_language_modeling set?")
    summary = None
    if summary_path:
        with open(summary_path) as f:
            summary = json.load(f)
        os.remove(summary_path)
    return EvalResult(perplexity=float(results["perplexity"]), seconds=end - _clock["start"],
                      loop_seconds=_clock["loop"], summary=summary)


def profile_runs(argvs, top=25):
    """Run each of ``argvs`` (dict name -> fairseq-eval-lm arguments) once under cProfile.

    Prints the ``top`` functions by own time. cProfile sees Python calls only:
    the time of a NumPy or torch kernel is charged to the call that started it.
    """
    import cProfile
    import io
    import pstats

    for name, argv in argvs.items():
        profiler = cProfile.Profile()
        profiler.enable()
        result = run_eval(argv)
        profiler.disable()
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("tottime").print_stats(top)
        print(f"profile of {name} ({result.seconds:.2f} s under cProfile), sorted by own time:")
        print(stream.getvalue())


def interleave(measurements, reps):
    """Run each measurement ``reps`` times, alternating the order every repetition.

    Args:
        measurements: dict ``name -> function`` returning a dict of seconds
            (at least ``"seconds"``).
        reps: repetitions of each.

    Returns:
        dict ``name -> list`` of the returned dicts, in repetition order.
    """
    names = list(measurements)
    samples = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(measurements[name]())
        line = ", ".join(f"{name} {samples[name][-1]['seconds']:.2f} s" for name in names)
        logger.info("repetition %d/%d: %s", rep + 1, reps, line)
    return samples


def median_of(samples, field="seconds"):
    return statistics.median(sample[field] for sample in samples)


def print_times(samples, tokens=None):
    """Print the median, minimum and maximum of each configuration's times."""
    print("times (seconds; median [min, max] over the interleaved repetitions):")
    for name, runs in samples.items():
        values = [run["seconds"] for run in runs]
        line = f"  {name:<28} {statistics.median(values):8.3f} [{min(values):.3f}, {max(values):.3f}]"
        if tokens:
            line += f"  {tokens / statistics.median(values):9.0f} tokens/s"
        extra = sorted(set(runs[0]) - {"seconds"})
        for field in extra:
            line += f"  {field} {median_of(runs, field):.3f}"
        print(line)


def ratio_report(name, numerators, denominators, target):
    """Print and return the ratio of the median numerator to the median denominator.

    The median of the per-repetition ratios is printed too: it pairs runs
    made back to back, so a load change between repetitions cancels out.
    """
    ratio = statistics.median(numerators) / statistics.median(denominators)
    paired = statistics.median(n / d for n, d in zip(numerators, denominators))
    verdict = "met" if ratio <= target else "MISSED"
    print(f"{name}: {ratio:.3f} (median of paired ratios {paired:.3f}); target <= {target}: {verdict}")
    return {"name": name, "ratio": ratio, "paired_ratio": paired, "target": target, "met": ratio <= target}


def check_close(what, actual, expected, rtol=1e-4):
    """Raise :class:`BenchmarkCheckError` unless ``actual`` is within ``rtol`` of ``expected``."""
    if not abs(actual - expected) <= rtol * abs(expected):
        raise BenchmarkCheckError(f"{what}: got {actual!r}, expected {expected!r} (relative tolerance {rtol})")
    print(f"check: {what}: {actual:.6g} == {expected:.6g}")


def write_json(path, obj):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")


def parser_for(description):
    return argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
