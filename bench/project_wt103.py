"""Project WikiText-103 evaluation time, disk and memory from measured per-token costs.

A projection, not a measurement: it takes the per-token costs that
bench_limit.py and bench_overhead.py measured on a small datastore and
scales each with the quantity that drives it at WikiText-103 size:

- LM forward: with layers x width^2 of the student (attention over the
  same context is a small share at these widths);
- FAISS search: with the PQ codes scanned per query, N * probe / nlist,
  times the code size in bytes;
- exact distances: with k * key dimension (rows read and subtracted);
- teacher scoring: with k * teacher state dimension, per teacher.

On one GPU, the kNN-LM's time per token comes from a published figure
(``--gpu-knn-tokens-per-second``). The teacher rows do not fit in GPU memory
at this size, so they are gathered on the host as here, with the measured
CPU cost divided by ``--gpu-host-cores`` over the cores measured. Disk and
memory follow from the array shapes.

    python bench/project_wt103.py --limit-json limit.json --overhead-json overhead.json
"""

import argparse
import json
import os

GB = 1e9


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-json", required=True, help="--json-out of bench/bench_limit.py")
    parser.add_argument("--overhead-json", required=True, help="--json-out of bench/bench_overhead.py")
    target = parser.add_argument_group("WikiText-103 setting (defaults: the paper's small student)")
    target.add_argument("--rows", type=int, default=103_227_021, help="datastore rows (default: WikiText-103's 103,227,021 training tokens)")
    target.add_argument("--layers", type=int, default=4, help="student layers (default: 4)")
    target.add_argument("--key-dim", type=int, default=384, help="student width = key dimension (default: 384)")
    target.add_argument("--teacher-dims", default="1024,1024",
                        help="state dimension of each teacher; two for the mixed teacher (default: 1024,1024)")
    target.add_argument("--teacher-clusters", type=int, default=3,
                        help="log-normalizers per row (adaptive softmax clusters; default: 3)")
    target.add_argument("--k", type=int, default=1024, help="neighbours (default: 1024)")
    target.add_argument("--nlist", type=int, default=4096, help="IVF lists (default: 4096)")
    target.add_argument("--probe", type=int, default=32, help="lists probed (default: 32)")
    target.add_argument("--code-bytes", type=int, default=64, help="PQ code size in bytes (default: 64)")
    measured = parser.add_argument_group("the measured setup (defaults: bench/standalone.py's)")
    measured.add_argument("--measured-layers", type=int, default=2, help="its student's layers (default: 2)")
    measured.add_argument("--measured-key-dim", type=int, default=256, help="its key dimension (default: 256)")
    measured.add_argument("--measured-teacher-dims", default="384,256",
                          help="its teachers' state dimensions (default: 384,256)")
    gpu = parser.add_argument_group("one GPU (assumptions, not measured here)")
    gpu.add_argument("--gpu-knn-tokens-per-second", type=float, default=3204.0,
                     help="kNN-LM throughput with FAISS on a GPU on WikiText-103, from efficient-knnlm's "
                          "README (default: 3204)")
    gpu.add_argument("--gpu-host-cores", type=int, default=16,
                     help="host cores gathering teacher rows next to the GPU (default: 16)")
    return parser


def load(path):
    with open(path) as f:
        return json.load(f)


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def seconds(samples, prefix):
    """Return the median seconds of the configuration whose name starts with ``prefix``."""
    name = next(n for n in samples if n.startswith(prefix))
    return median([s["seconds"] if isinstance(s, dict) else s for s in samples[name]])


def flag(argv, name, default):
    """Return the value after ``name`` in a benchmark's recorded argv, or ``default``."""
    return type(default)(argv[argv.index(name) + 1]) if name in argv else default


def measured_costs(limit, overhead, args):
    """Return the measured setup's per-token costs in seconds, and the drivers they scale with."""
    tokens = limit["tokens"]
    ls = limit["samples"]
    # The benchmarks' defaults are k = 1024 and 32 probes (bench/harness.py).
    k = flag(limit["argv"], "--k", 1024)
    probe = flag(limit["argv"], "--probe", 32)
    index = read_index_config(limit["setup"]["dstore"])
    codes = index["num_rows"] * min(probe, index["nlist"]) / index["nlist"]
    teacher_dims = [int(d) for d in args.measured_teacher_dims.split(",")]
    knn = seconds(overhead["samples"], "knn_lm")
    ppkd = seconds(overhead["samples"], "ppkd")
    return {
        "cores": limit["environment"]["cpus_usable"] or limit["environment"]["cpu_count"],
        "lm": seconds(ls, "lm") / tokens,
        "search_per_code_byte": seconds(ls, "faiss search alone") / tokens / (codes * index["code_bytes"]),
        "exact_per_neighbour_dim": (seconds(ls, "knn_lm (exact") - seconds(ls, "knn_lm (faiss")) / tokens
        / (k * args.measured_key_dim),
        "teacher_per_neighbour_dim": (ppkd - knn) / overhead["tokens"] / (k * sum(teacher_dims)),
        "codes_per_query": codes,
    }


def read_index_config(dstore):
    with open(os.path.join(dstore, "index", "index.json")) as f:
        index = json.load(f)
    return {"num_rows": index["num_rows"], "nlist": index["config"]["nlist"],
            "code_bytes": index["config"]["code_bytes"]}


def project(costs, args):
    teacher_dims = [int(d) for d in args.teacher_dims.split(",")]
    lm_scale = (args.layers * args.key_dim**2) / (args.measured_layers * args.measured_key_dim**2)
    codes = args.rows * args.probe / args.nlist
    cpu = {
        "lm": costs["lm"] * lm_scale,
        "search": costs["search_per_code_byte"] * codes * args.code_bytes,
        "exact": costs["exact_per_neighbour_dim"] * args.k * args.key_dim,
        "teachers": costs["teacher_per_neighbour_dim"] * args.k * sum(teacher_dims),
    }
    host_speedup = args.gpu_host_cores / costs["cores"]
    gpu = {
        "knn": 1.0 / args.gpu_knn_tokens_per_second,
        "teachers": cpu["teachers"] / host_speedup,
    }
    disk = {
        "keys (float16)": args.rows * args.key_dim * 2,
        "values (int32)": args.rows * 4,
        "teacher states (float16)": sum(args.rows * d * 2 for d in teacher_dims),
        "teacher log-normalizers (float32)": len(teacher_dims) * args.rows * args.teacher_clusters * 4,
        "index (codes + ids)": args.rows * (args.code_bytes + 8),
    }
    return cpu, gpu, disk, codes


def main():
    args = get_parser().parse_args()
    limit, overhead = load(args.limit_json), load(args.overhead_json)
    costs = measured_costs(limit, overhead, args)
    cpu, gpu, disk, codes = project(costs, args)
    knn_cpu = cpu["lm"] + cpu["search"] + cpu["exact"]
    ppkd_cpu = knn_cpu + cpu["teachers"]
    ppkd_gpu = gpu["knn"] + gpu["teachers"]

    print(f"PROJECTION for {args.rows:,} rows, k = {args.k}, {args.probe} of {args.nlist} lists "
          f"({codes:,.0f} codes per query), keys of {args.key_dim} dims, teachers of {args.teacher_dims} dims")
    print(f"measured per-token costs on {costs['cores']} cores: LM {costs['lm'] * 1e3:.3f} ms, search "
          f"{costs['search_per_code_byte'] * 1e12:.1f} ps per code byte, exact distances "
          f"{costs['exact_per_neighbour_dim'] * 1e9:.2f} ns per neighbour-dimension, teachers "
          f"{costs['teacher_per_neighbour_dim'] * 1e9:.2f} ns per neighbour-dimension")

    print()
    print(f"| per token, {costs['cores']} CPU cores (ms) | value |")
    print("| --- | ---: |")
    for name, value in cpu.items():
        print(f"| {name} | {value * 1e3:.2f} |")
    print(f"| kNN-LM total | {knn_cpu * 1e3:.2f} ({1 / knn_cpu:,.0f} tokens/s) |")
    print(f"| PP-KD total | {ppkd_cpu * 1e3:.2f} ({1 / ppkd_cpu:,.0f} tokens/s) |")
    print(f"| PP-KD / kNN-LM | {ppkd_cpu / knn_cpu:.3f} |")
    print(f"| kNN-LM / (LM + search) | {knn_cpu / (cpu['lm'] + cpu['search']):.3f} |")

    print()
    print(f"| per token, one GPU, teacher rows gathered by {args.gpu_host_cores} host cores (ms) | value |")
    print("| --- | ---: |")
    print(f"| kNN-LM (published GPU throughput) | {gpu['knn'] * 1e3:.2f} |")
    print(f"| teacher rows on the host | {gpu['teachers'] * 1e3:.2f} |")
    print(f"| PP-KD / kNN-LM | {ppkd_gpu / gpu['knn']:.3f} |")

    print()
    print("| disk | GB |")
    print("| --- | ---: |")
    for name, size in disk.items():
        print(f"| {name} | {size / GB:.1f} |")
    print(f"| total | {sum(disk.values()) / GB:.1f} |")

    print()
    resident = disk["index (codes + ids)"] + args.nlist * args.key_dim * 4
    print(f"resident memory: the index ({resident / GB:.1f} GB unless memory-mapped) plus the models and one "
          f"batch's temporaries; keys and teacher states are memory-mapped, so only the rows read enter the "
          f"page cache")


if __name__ == "__main__":
    main()
