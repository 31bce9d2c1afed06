"""Measure peak memory of PP-KD evaluation for teacher state files of two sizes.

The second datastore repeats every row of the first ``--rows-factor`` times
(keys, values, teacher states U and log-normalizers, and the index, which
gets each key again with the same PQ code). A query then retrieves the same
number of rows, k per teacher, from files that are ``--rows-factor`` times
larger. Memory that follows U's file size, such as a loader that reads U
into RAM, would show up as a difference between the two runs; memory that
follows the rows read would not.

Each evaluation runs in a fresh subprocess, which reports its peak resident
set (VmHWM from /proc/self/status, and ru_maxrss) and, sampled every
millisecond by a thread, its anonymous (private) and file-backed resident
memory. File-backed pages are the page cache of the memory-mapped rows the
evaluation touched: the kernel maps them in and reclaims them under
pressure. Target: the peak anonymous memory of the larger datastore exceeds
the smaller one's by at most 10% of the growth of the teacher files.

    python bench/bench_memory.py --threads 1
    python bench/bench_memory.py --data /work/run/wt2/data-bin \
        --student /work/run/wt2/checkpoints/student/checkpoint_last.pt \
        --dstore /work/run/wt2/datastore --teachers causal,masked --split valid --rows-factor 2
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

TARGET_FRACTION = 0.10
RESULT_PREFIX = "MEMORY_RESULT "
COPY_ROWS = 262_144  # rows copied per step when tiling a file


def read_status():
    """Return VmRSS, VmHWM, RssAnon and RssFile of this process in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


class PeakSampler(threading.Thread):
    """Record the largest RssAnon and RssFile seen while running.

    Sampling can miss a peak shorter than the interval, so the values are
    lower bounds; VmHWM is exact but counts both kinds together.
    """

    def __init__(self, interval=0.001):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.samples = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            status = read_status()
            for name in self.peak:
                self.peak[name] = max(self.peak[name], status[name])
            self.samples += 1
            time.sleep(self.interval)

    def stop(self):
        self.stopped.set()
        self.join()
        return self.peak


def run_child(argv, threads):
    """Evaluate ``argv`` in this process and print its memory record as one JSON line."""
    harness.quiet_logging()
    harness.set_threads(threads)
    before = read_status()
    sampler = PeakSampler()
    sampler.start()
    result = harness.run_eval(argv)
    peak = sampler.stop()
    after = read_status()
    record = {
        "perplexity": result.perplexity,
        "tokens": result.summary["tokens"] if result.summary else None,
        "seconds": result.seconds,
        "rss_before": before["VmRSS"],
        "vm_hwm": after["VmHWM"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "peak_anon_sampled": peak["RssAnon"],
        "peak_file_sampled": peak["RssFile"],
        "samples": sampler.samples,
    }
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def measure_in_subprocess(argv, threads):
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(argv)]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the evaluation subprocess failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def _tile_npy(source, path, factor):
    """Write ``factor`` copies of the rows of ``source`` (N, ...) to ``path`` as .npy."""
    n = source.shape[0]
    tmp = path + ".tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=source.dtype, shape=(factor * n,) + source.shape[1:])
    for begin in range(0, n, COPY_ROWS):
        chunk = np.asarray(source[begin:begin + COPY_ROWS])
        for copy in range(factor):
            out[copy * n + begin:copy * n + begin + len(chunk)] = chunk
    out.flush()
    del out
    os.replace(tmp, path)


def build_tiled_datastore(source_dir, folder, factor, teachers):
    """Write a datastore whose rows are ``factor`` copies of ``source_dir``'s, with its teachers and index."""
    import faiss

    from ppkd_fairseq import index as faiss_index
    from ppkd_fairseq import manifest as mf
    from ppkd_fairseq.datastore import TEACHER_MANIFEST, Datastore, new_datastore_id, npy_spec

    done_marker = os.path.join(folder, ".done-tiled")
    if os.path.exists(done_marker):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    source = Datastore.open(source_dir)
    datastore_id = new_datastore_id()
    num_rows = factor * source.num_rows

    _tile_npy(source.keys, os.path.join(folder, "keys.npy"), factor)
    _tile_npy(source.values, os.path.join(folder, "values.npy"), factor)
    keys = np.load(os.path.join(folder, "keys.npy"), mmap_mode="r")
    key_sample = mf.key_sample_fingerprint(keys)

    for name in teachers:
        teacher = source.open_teacher(name)
        teacher_dir = os.path.join(folder, "teachers", name)
        os.makedirs(teacher_dir)
        _tile_npy(teacher.states, os.path.join(teacher_dir, "states.npy"), factor)
        _tile_npy(teacher.lognorm, os.path.join(teacher_dir, "lognorm.npy"), factor)
        shutil.copyfile(os.path.join(teacher.folder, teacher.manifest["head"]["file"]),
                        os.path.join(teacher_dir, teacher.manifest["head"]["file"]))
        manifest = dict(teacher.manifest, datastore_id=datastore_id, num_rows=num_rows,
                        states=npy_spec(teacher_dir, "states.npy"), lognorm=npy_spec(teacher_dir, "lognorm.npy"),
                        tiled_from={"datastore": os.path.abspath(source_dir), "factor": factor})
        mf.write_json_atomic(os.path.join(teacher_dir, TEACHER_MANIFEST), manifest)

    index = faiss.read_index(os.path.join(faiss_index.index_folder(source_dir), faiss_index.INDEX_FILE))
    for _ in range(factor - 1):
        # Rows are added in order, so copy c of row i gets id c * N + i, as in the files.
        for begin in range(0, source.num_rows, COPY_ROWS):
            index.add(np.ascontiguousarray(source.keys[begin:begin + COPY_ROWS], dtype=np.float32))
    os.makedirs(faiss_index.index_folder(folder))
    tmp = os.path.join(faiss_index.index_folder(folder), faiss_index.INDEX_FILE + ".tmp")
    faiss.write_index(index, tmp)
    os.replace(tmp, os.path.join(faiss_index.index_folder(folder), faiss_index.INDEX_FILE))
    metadata = dict(faiss_index.read_index_metadata(source_dir), datastore_id=datastore_id, num_rows=num_rows,
                    key_sample_sha256=key_sample, tiled_from=os.path.abspath(source_dir))
    mf.write_json_atomic(faiss_index.metadata_path(folder), metadata)

    manifest = dict(source.manifest, datastore_id=datastore_id, num_rows=num_rows, key_sample_sha256=key_sample,
                    keys=npy_spec(folder, "keys.npy"), values=npy_spec(folder, "values.npy"),
                    tiled_from={"datastore": os.path.abspath(source_dir), "factor": factor})
    mf.write_json_atomic(os.path.join(folder, "manifest.json"), manifest)
    with open(done_marker, "w") as f:
        f.write("done\n")
    return folder


def teacher_file_bytes(dstore, teachers):
    """Return the bytes of the teachers' states and log-normalizer files."""
    total = 0
    for name in teachers:
        for filename in ("states.npy", "lognorm.npy"):
            total += os.path.getsize(os.path.join(dstore, "teachers", name, filename))
    return total


def index_bytes(dstore):
    from ppkd_fairseq import index as faiss_index

    return os.path.getsize(os.path.join(faiss_index.index_folder(dstore), faiss_index.INDEX_FILE))


def mib(num_bytes):
    return f"{num_bytes / 2**20:9.1f} MiB"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        threads = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--threads" else None
        run_child(json.loads(sys.argv[2]), threads)
        return

    parser = harness.add_setup_arguments(harness.parser_for(__doc__.split("\n\n")[0]))
    parser.add_argument("--rows-factor", type=int, default=4,
                        help="copies of every row in the larger datastore (it needs this many times the "
                             "datastore's disk space under --cache-dir)")
    parser.set_defaults(reps=2)
    args = parser.parse_args()
    if args.rows_factor < 2:
        raise SystemExit(f"--rows-factor must be at least 2, got {args.rows_factor}")
    harness.quiet_logging()
    harness.set_threads(args.threads)
    environment = harness.print_environment()
    setup = harness.resolve_setup(args)
    harness.print_setup(setup)
    if not setup.teachers:
        raise SystemExit("PP-KD needs at least one teacher; pass --teachers")
    teachers = ",".join(setup.teachers)

    tiled_dir = os.path.join(args.cache_dir, f"tiled{args.rows_factor}-" + os.path.basename(
        os.path.dirname(os.path.abspath(setup.dstore))) + "-" + os.path.basename(os.path.abspath(setup.dstore)))
    harness.logger.info("writing the %dx datastore into %s", args.rows_factor, tiled_dir)
    build_tiled_datastore(setup.dstore, tiled_dir, args.rows_factor, setup.teachers)

    tiled = harness.Setup(data=setup.data, student=setup.student, dstore=tiled_dir, teachers=setup.teachers,
                          split=setup.split)
    ppkd_flags = ("--ppkd-mu", 0.4, "--ppkd-lambda", 0.5, "--ppkd-teachers", teachers)
    variants = {
        "lm": harness.eval_argv(setup, args),
        "knn_lm 1x": harness.knn_argv(setup, args),
        "ppkd 1x": harness.knn_argv(setup, args, *ppkd_flags),
        f"ppkd {args.rows_factor}x rows": harness.knn_argv(tiled, args, *ppkd_flags),
    }
    records = {name: [] for name in variants}
    for rep in range(args.reps):
        order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
        for name in order:
            records[name].append(measure_in_subprocess(variants[name], args.threads))
            harness.logger.info("repetition %d, %s: VmHWM %s", rep + 1, name, mib(records[name][-1]["vm_hwm"]))

    fields = ("rss_before", "vm_hwm", "ru_maxrss", "peak_anon_sampled", "peak_file_sampled")
    medians = {name: {field: statistics.median(r[field] for r in runs) for field in fields}
               for name, runs in records.items()}
    print("memory per evaluation (median over the repetitions, each in a fresh process):")
    print(f"  {'':<18}" + "".join(f"{field:>22}" for field in fields))
    for name, values in medians.items():
        print(f"  {name:<18}" + "".join(f"{mib(values[field]):>22}" for field in fields))

    small, large = "ppkd 1x", f"ppkd {args.rows_factor}x rows"
    perplexities = {name: runs[0]["perplexity"] for name, runs in records.items()}
    tokens = records[small][0]["tokens"]
    teacher_growth = teacher_file_bytes(tiled_dir, setup.teachers) - teacher_file_bytes(setup.dstore, setup.teachers)
    index_growth = index_bytes(tiled_dir) - index_bytes(setup.dstore)
    anon_growth = medians[large]["peak_anon_sampled"] - medians[small]["peak_anon_sampled"]
    hwm_growth = medians[large]["vm_hwm"] - medians[small]["vm_hwm"]
    row_bytes = 0
    for name in setup.teachers:
        with open(os.path.join(setup.dstore, "teachers", name, "teacher.json")) as f:
            manifest = json.load(f)
        for spec in (manifest["states"], manifest["lognorm"]):
            row_bytes += int(np.prod(spec["shape"][1:])) * np.dtype(spec["dtype"]).itemsize
    rows_read_bytes = tokens * args.k * row_bytes
    print(f"perplexity: {', '.join(f'{name} {value:.3f}' for name, value in perplexities.items())}")
    print(f"teacher files (U and log-normalizers): {mib(teacher_file_bytes(setup.dstore, setup.teachers))} and "
          f"{mib(teacher_file_bytes(tiled_dir, setup.teachers))}, growth {mib(teacher_growth)}")
    print(f"teacher rows read per evaluation: {tokens} tokens x k {args.k} x {row_bytes} bytes = "
          f"{mib(rows_read_bytes)} (with repeats)")
    print(f"index file growth (repeated PQ codes and ids, held in RAM): {mib(index_growth)}")
    print(f"peak RSS (VmHWM) growth: {mib(hwm_growth)}; peak anonymous memory growth: {mib(anon_growth)}")
    limit = TARGET_FRACTION * teacher_growth
    met = anon_growth <= limit
    print(f"anonymous memory growth / teacher file growth: {anon_growth / teacher_growth:.3f}; target <= "
          f"{TARGET_FRACTION}: {'met' if met else 'MISSED'}")
    harness.write_json(args.json_out, {
        "environment": environment, "setup": vars(setup), "tiled_dstore": tiled_dir, "records": records,
        "medians": medians, "teacher_file_growth": teacher_growth, "index_growth": index_growth,
        "rows_read_bytes": rows_read_bytes, "anon_growth": anon_growth, "vm_hwm_growth": hwm_growth,
        "met": met, "argv": sys.argv,
    })


if __name__ == "__main__":
    main()
