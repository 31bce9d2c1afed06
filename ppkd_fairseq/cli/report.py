"""Build the results table of a reproduction from its sweep outputs.

Reads the validation sweep's ``best.json`` (tuned settings and validation
perplexities), scores the test split's sweep cache at those settings, tests
each PP-KD row against the kNN-LM with a paired bootstrap over articles,
measures each teacher's cross-entropy on the datastore's own rows, and
collects the stage times. Writes ``results.json`` and a Markdown page whose
numbers all come from that JSON.

Example::

    python -m ppkd_fairseq.cli.report --valid-sweep runs/wt2/sweep-valid \\
        --test-cache runs/wt2/sweep-test/cache --data runs/wt2/data-bin \\
        --dstore runs/wt2/datastore --stages runs/wt2/stages --out-dir runs/wt2/results
"""

import argparse
import glob
import json
import logging
import os
import platform
import sys
import time

import numpy as np

from ppkd_fairseq import manifest as mf
from ppkd_fairseq import results, significance

logger = logging.getLogger("ppkd_fairseq.report")

# Jin, Ge and Wei (2022), Table 1, WikiText-103 test perplexity of the small
# student (4 layers, 384 wide).
PAPER_TABLE1 = {"LM": 35.24, "kNN-LM": 28.50, "PP-KD (large causal teacher)": 25.74}

# Below this many test articles the report flags its bootstrap p values as not meaningful.
MIN_ARTICLES = 10


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--valid-sweep", required=True, help="output folder of the validation sweep (best.json)")
    parser.add_argument("--test-cache", required=True, help="sweep cache folder of the test split")
    parser.add_argument("--data", required=True, help="data-bin of the evaluated splits")
    parser.add_argument("--test-split", default="test", help="split of the test cache (default: test)")
    parser.add_argument("--dstore", required=True, help="datastore folder (for the teachers' cross-entropy)")
    parser.add_argument("--kd-valid-sweep", default=None,
                        help="validation sweep folder of a student trained with logit distillation over its "
                             "own datastore; adds the 'via KD' rows (needs --kd-test-cache)")
    parser.add_argument("--kd-test-cache", default=None, help="test sweep cache folder of that KD student")
    parser.add_argument("--stages", default=None, help="folder of stage records (NAME.json) to report")
    parser.add_argument("--check-summary", action="append", default=[],
                        help="fairseq-eval-lm --ppkd-summary-out JSON to compare with the table (repeatable)")
    parser.add_argument("--bootstrap-samples", type=int, default=10000, help="bootstrap draws (default: 10000)")
    parser.add_argument("--seed", type=int, default=1, help="bootstrap and row-sample seed (default: 1)")
    parser.add_argument("--teacher-rows", type=int, default=200000,
                        help="datastore rows sampled for the teachers' cross-entropy; 0 uses all (default: 200000)")
    parser.add_argument("--out-dir", required=True, help="folder for results.json and results.md")
    parser.add_argument("--title", default="WikiText-2 reproduction", help="title of the Markdown page")
    parser.add_argument("--command", default=None,
                        help="the command that produced the run, quoted on the page (default: this report's)")
    return parser


def test_articles(data, split):
    """Return (N,) article ids of the tokens of a WikiText split."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(os.path.join(data, "dict.txt"))
    dataset = data_utils.load_indexed_dataset(os.path.join(data, split), dictionary)
    equals = dictionary.index("=")
    is_title, lengths = [], []
    for i in range(len(dataset)):
        tokens = dataset[i].tolist()
        lengths.append(len(tokens))
        # A WikiText article starts with a line " = Title = "; section
        # headings have two or more "=" on each side.
        is_title.append(len(tokens) >= 4 and tokens[0] == equals and tokens[1] != equals and tokens[-2] == equals
                        and tokens[-3] != equals)
    return significance.article_ids_from_lines(np.array(is_title), np.array(lengths))


def load_best(sweep_dir, option):
    """Return a validation sweep's best.json, or exit naming the option and the sweep command."""
    path = os.path.join(sweep_dir, "best.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {option} {sweep_dir}: no best.json there; run the validation sweep first "
                         f"(python -m ppkd_fairseq.cli.sweep ... --split valid --out-dir {sweep_dir})")
    with open(path) as f:
        return json.load(f)


def open_test_cache(folder, option):
    """Return the test split's :class:`SweepCache`, or exit naming the option and the sweep command."""
    from ppkd_fairseq.sweep_cache import SweepCache, read_manifest

    if read_manifest(folder) is None:
        raise SystemExit(f"error: {option} {folder}: no sweep cache there; run the test sweep first "
                         f"(python -m ppkd_fairseq.cli.sweep ... --split test), whose cache is OUT_DIR/cache")
    return SweepCache.open(folder)


def check_same_student(valid, valid_option, cache, cache_option, datastore_id=None):
    """Exit unless the validation sweep, the test cache and the datastore come from one student and datastore.

    Args:
        valid: the validation sweep's best.json content.
        cache: the test :class:`SweepCache`.
        datastore_id: the ``--dstore`` datastore's id, or None to skip that check.
    """
    from ppkd_fairseq.sweep_cache import read_manifest

    test = cache.manifest["datastore"]
    if datastore_id is not None and test["datastore_id"] != datastore_id:
        raise SystemExit(f"error: {cache_option} {cache.folder} searched datastore {test['datastore_id']} "
                         f"({test['folder']}), not the --dstore one ({datastore_id}); pass the datastore "
                         f"the sweeps used")
    valid_folder = valid.get("cache", {}).get("folder")
    valid_manifest = read_manifest(valid_folder) if valid_folder else None
    if valid_manifest is None:
        logger.warning("the validation sweep's cache %s is gone, so its student and datastore are not compared "
                       "with the test cache's", valid_folder)
        return
    for field in ("datastore_id", "student_fingerprint"):
        if valid_manifest["datastore"][field] != test[field]:
            raise SystemExit(
                f"error: {valid_option} and {cache_option} come from different runs: their caches differ in "
                f"{field} ({valid_manifest['datastore'][field]} in {valid_folder}, {test[field]} in "
                f"{cache.folder}); pass the validation and test sweeps of one student and datastore"
            )


def build(args):
    from ppkd_fairseq.datastore import Datastore

    valid = load_best(args.valid_sweep, "--valid-sweep")
    cache = open_test_cache(args.test_cache, "--test-cache")
    if args.kd_valid_sweep and not args.kd_test_cache:
        raise SystemExit("error: --kd-valid-sweep needs --kd-test-cache, the KD student's test sweep cache")
    store = Datastore.open(args.dstore)
    check_same_student(valid, "--valid-sweep", cache, "--test-cache", store.manifest["datastore_id"])
    articles = test_articles(args.data, args.test_split)
    lm = results.lm_log_probs(cache)
    positions = cache.positions
    article_of_token = articles[positions]

    rows = [{"system": "LM", "label": "lm", "training": "from scratch", "teachers": [], "temperature": None,
             "mu": None, "lambda": None, "valid_perplexity": valid["lm_perplexity"],
             "test_perplexity": results.perplexity(lm)}]
    scores = {}
    for label, point in valid["best"].items():
        _, log_probs = results.score_cache(cache, point["temperature"], point["mu"], point["lambda"],
                                           point["teachers"])
        scores[label] = log_probs
        name = "kNN-LM" if not point["teachers"] else "PP-KD (" + " + ".join(point["teachers"]) + ")"
        rows.append({"system": name, "label": label, "training": "from scratch", "teachers": point["teachers"],
                     "temperature": point["temperature"], "mu": point["mu"], "lambda": point["lambda"],
                     "valid_perplexity": point["perplexity"], "test_perplexity": results.perplexity(log_probs),
                     "on_grid_edge": bool(point.get("edges"))})
    knn_label = next(label for label, p in valid["best"].items() if not p["teachers"])
    base_sums, counts = significance.article_sums(scores[knn_label], article_of_token)
    for row in rows:
        if row["teachers"]:
            cand_sums, _ = significance.article_sums(scores[row["label"]], article_of_token)
            test = significance.paired_bootstrap(base_sums, cand_sums, counts, samples=args.bootstrap_samples,
                                                 seed=args.seed)
            row["p_value_vs_knn_lm"] = test["p_value"]
            row["articles"] = test["articles"]
    lm_sums, _ = significance.article_sums(lm, article_of_token)
    knn_row = next(r for r in rows if r.get("label") == knn_label)
    if len(counts) < MIN_ARTICLES:
        logger.warning("only %d articles in the test split: the bootstrap p-values are not meaningful", len(counts))
    knn_row["p_value_vs_lm"] = significance.paired_bootstrap(
        lm_sums, base_sums, counts, samples=args.bootstrap_samples, seed=args.seed)["p_value"]

    if args.kd_valid_sweep:
        rows += kd_rows(args, positions, article_of_token, base_sums)

    teachers = {}
    every_row = np.arange(store.num_rows, dtype=np.int64)
    if 0 < args.teacher_rows < store.num_rows:
        every_row = np.sort(np.random.default_rng(args.seed).choice(store.num_rows, args.teacher_rows, replace=False))
    for name in store.teacher_names():
        teacher = store.open_teacher(name)
        ce = results.teacher_train_cross_entropy(teacher, store.values, every_row)
        teachers[name] = {"kind": teacher.manifest.get("kind"), "train_cross_entropy_nats": ce,
                          "train_perplexity": float(np.exp(ce)), "rows": int(len(every_row)),
                          "masking": teacher.manifest.get("masking")}

    checks = []
    for path in args.check_summary:
        with open(path) as f:
            summary = json.load(f)
        s = summary["settings"]
        # At mu = 1 fairseq-eval-lm lists the given teachers as unused.
        summary_teachers = s["teachers"] + s.get("unused_teachers", [])
        match = next((r for r in rows if r["teachers"] == summary_teachers and r["mu"] == s["mu"]
                      and r["lambda"] == s["lambda"] and r["temperature"] == s["temperature"]), None)
        checks.append({"summary": os.path.abspath(path), "fairseq_eval_lm_perplexity": summary["perplexity"],
                       "tokens": summary["tokens"],
                       "table_perplexity": match["test_perplexity"] if match else None})

    stages = {}
    if args.stages:
        for path in sorted(glob.glob(os.path.join(args.stages, "*.json"))):
            with open(path) as f:
                record = json.load(f)
            stages[record["stage"]] = {"seconds": record["seconds"], "finished": record["finished"]}
    return {
        "title": args.title,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "test_tokens": int(len(lm)),
        "valid_tokens": valid["tokens"],
        "k": cache.manifest.get("k"),
        "rows": rows,
        "teachers": teachers,
        "bootstrap": {"unit": "article", "samples": args.bootstrap_samples, "seed": args.seed,
                      "articles": int(len(counts))},
        "checks": checks,
        "stages": stages,
        "paper_table1_wikitext103": PAPER_TABLE1,
    }


def kd_rows(args, positions, article_of_token, knn_sums):
    """Return the LM and kNN-LM rows of the KD-trained student.

    Its kNN-LM uses its own datastore and its own tuned T and lambda. The p
    value tests it against the from-scratch kNN-LM on the same test tokens.
    """
    valid = load_best(args.kd_valid_sweep, "--kd-valid-sweep")
    cache = open_test_cache(args.kd_test_cache, "--kd-test-cache")
    check_same_student(valid, "--kd-valid-sweep", cache, "--kd-test-cache")
    if not np.array_equal(cache.positions, positions):
        raise SystemExit(
            f"the KD student's test cache {args.kd_test_cache} scored other tokens than {args.test_cache}; "
            f"sweep both with the same fairseq-eval-lm flags"
        )
    lm = results.lm_log_probs(cache)
    label = next(label for label, p in valid["best"].items() if not p["teachers"])
    point = valid["best"][label]
    _, log_probs = results.score_cache(cache, point["temperature"], point["mu"], point["lambda"], [])
    sums, counts = significance.article_sums(log_probs, article_of_token)
    test = significance.paired_bootstrap(knn_sums, sums, counts, samples=args.bootstrap_samples, seed=args.seed)
    return [
        {"system": "LM", "label": "lm_kd", "training": "via KD", "teachers": [], "temperature": None,
         "mu": None, "lambda": None, "valid_perplexity": valid["lm_perplexity"],
         "test_perplexity": results.perplexity(lm)},
        {"system": "kNN-LM", "label": "knn_lm_kd", "training": "via KD", "teachers": [],
         "temperature": point["temperature"], "mu": point["mu"], "lambda": point["lambda"],
         "valid_perplexity": point["perplexity"], "test_perplexity": results.perplexity(log_probs),
         "on_grid_edge": bool(point.get("edges")), "p_value_vs_knn_lm": test["p_value"]},
    ]


def _fmt(value, digits=2):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report):
    """Return the Markdown tables of a report."""
    lines = ["| system | student | T | µ | λ | valid ppl | test ppl | p vs kNN-LM |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        p = r.get("p_value_vs_knn_lm")
        lines.append(f"| {r['system']} | {r.get('training', 'from scratch')} | {_fmt(r['temperature'], 3)} | {_fmt(r['mu'], 2)} | {_fmt(r['lambda'], 2)} | "
                     f"{_fmt(r['valid_perplexity'])} | {_fmt(r['test_perplexity'])} | {_fmt(p, 4) if p is not None else ''} |")
    lines += ["", "| teacher | kind | cross-entropy on training rows (nats) | perplexity | rows sampled |",
              "| --- | --- | ---: | ---: | ---: |"]
    for name, t in report["teachers"].items():
        lines.append(f"| {name} | {t['kind']} | {t['train_cross_entropy_nats']:.3f} | {t['train_perplexity']:.2f} | "
                     f"{t['rows']:,} |")
    if report["checks"]:
        lines += ["", "| check: fairseq-eval-lm summary | its perplexity | table perplexity | tokens |",
                  "| --- | ---: | ---: | ---: |"]
        for c in report["checks"]:
            lines.append(f"| {os.path.basename(c['summary'])} | {c['fairseq_eval_lm_perplexity']:.4f} | "
                         f"{_fmt(c['table_perplexity'], 4)} | {c['tokens']} |")
    if report["stages"]:
        lines += ["", "| stage | wall time (min) | finished |", "| --- | ---: | --- |"]
        for name, s in report["stages"].items():
            lines.append(f"| {name} | {s['seconds'] / 60:.1f} | {s['finished']} |")
    return "\n".join(lines) + "\n"


def render_page(report, command):
    """Return the whole results page: tables, run details and the comparison."""
    rows = {r.get("label"): r for r in report["rows"]}
    lm = rows["lm"]
    knn = rows["knn_lm"]
    ppkd = [r for r in report["rows"] if r["teachers"]]
    mixed = max(ppkd, key=lambda r: len(r["teachers"])) if ppkd else None
    lines = [
        f"# {report['title']}",
        "",
        f"Written by `python -m ppkd_fairseq.cli.report` from `results.json` on {report['created']}.",
        f"Command: `{command}`",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, Python "
        f"{report['machine']['python']}. Test tokens: {report['test_tokens']:,}; validation tokens: "
        f"{report['valid_tokens']:,}; k = {report['k']}.",
        "",
        "T, µ and λ were tuned on the validation split (best point of the sweep grid); the test column "
        "scores the test split at those settings. p is a one-sided paired bootstrap over "
        f"{report['bootstrap']['articles']} test articles ({report['bootstrap']['samples']:,} draws, seed "
        f"{report['bootstrap']['seed']}) that the row is not better than the from-scratch kNN-LM."
        + (" The 'via KD' student was trained with logit distillation from the causal teacher, and its "
           "kNN-LM searches a datastore of its own keys." if "knn_lm_kd" in rows else "")
        + (f" With only {report['bootstrap']['articles']} articles the p values are not meaningful."
           if report["bootstrap"]["articles"] < MIN_ARTICLES else ""),
        "",
        render_markdown(report),
        "## Against the paper",
        "",
        "The paper reports WikiText-103 test perplexity with a 4-layer, 384-wide student (Table 1): "
        + ", ".join(f"{name} {value:.2f}" for name, value in report["paper_table1_wikitext103"].items())
        + ". Absolute numbers differ here (WikiText-2, CPU-scale models trained for minutes); the shape is what "
        "can match:",
        "",
        f"- kNN-LM better than the LM on test: {'yes' if knn['test_perplexity'] < lm['test_perplexity'] else 'no'} "
        f"({knn['test_perplexity']:.2f} vs {lm['test_perplexity']:.2f}; paper: 28.50 vs 35.24).",
    ]
    for r in ppkd:
        verdict = "yes" if r["test_perplexity"] < knn["test_perplexity"] else "no"
        lines.append(f"- {r['system']} better than the kNN-LM on test: {verdict} ({r['test_perplexity']:.2f} vs "
                     f"{knn['test_perplexity']:.2f}, p = {r['p_value_vs_knn_lm']:.4f}).")
    if mixed is not None and len(mixed["teachers"]) > 1:
        best_single = min((r for r in ppkd if len(r["teachers"]) == 1), key=lambda r: r["test_perplexity"])
        verdict = "yes" if mixed["test_perplexity"] <= best_single["test_perplexity"] else "no"
        lines.append(f"- The mixed teacher best among the teachers: {verdict} ({mixed['test_perplexity']:.2f} vs "
                     f"{best_single['system']} {best_single['test_perplexity']:.2f}).")
    knn_kd = rows.get("knn_lm_kd")
    if knn_kd is not None:
        lm_kd = rows["lm_kd"]
        lines.append(f"- The KD-trained student better than the from-scratch one as an LM on test: "
                     f"{'yes' if lm_kd['test_perplexity'] < lm['test_perplexity'] else 'no'} "
                     f"({lm_kd['test_perplexity']:.2f} vs {lm['test_perplexity']:.2f}).")
        for r in ppkd:
            verdict = "yes" if r["test_perplexity"] < knn_kd["test_perplexity"] else "no"
            lines.append(f"- {r['system']} with the from-scratch student better than the kNN-LM via KD on "
                         f"test (the paper's main claim): {verdict} ({r['test_perplexity']:.2f} vs "
                         f"{knn_kd['test_perplexity']:.2f}).")
    teachers = report["teachers"]
    if "masked" in teachers and "causal" in teachers:
        verdict = "yes" if teachers["masked"]["train_cross_entropy_nats"] < teachers["causal"]["train_cross_entropy_nats"] else "no"
        lines.append(f"- The masked teacher's cross-entropy on the training rows is lower than the causal one's "
                     f"(the paper's Table 3): {verdict}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    args = get_parser().parse_args(argv)
    report = build(args)
    os.makedirs(args.out_dir, exist_ok=True)
    mf.write_json_atomic(os.path.join(args.out_dir, "results.json"), {**report, "status": mf.COMPLETE})
    page = render_page(report, args.command or "python -m ppkd_fairseq.cli.report " + " ".join(argv or sys.argv[1:]))
    path = os.path.join(args.out_dir, "results.md")
    with open(path + ".tmp", "w") as f:
        f.write(page)
    os.replace(path + ".tmp", path)
    sys.stdout.write(page)


if __name__ == "__main__":
    main()
