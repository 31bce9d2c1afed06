"""Tests for the T, mu and lambda sweep: grid math, cache reuse and agreement with fairseq-eval-lm.

The grid is checked against a float64 NumPy computation of Eqs. 1-4 on
seeded random inputs, and, on the tiny corpus of conftest.py, against what
stock fairseq-eval-lm reports at the same settings. The tiny datastore is
the student's keys over the train split, with two teachers: the
adaptive-softmax model (``causal``) and the student itself (``self``).
"""

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import eval_lm, reported_perplexity, run
from ppkd_fairseq import sweep, sweep_report
from ppkd_fairseq.cli import sweep as sweep_cli
from ppkd_fairseq.sweep_cache import SweepCache, cache_mismatches

K = 16
# The conftest eval_lm flags, so that the cache pass and the checks score the same blocks.
EVAL_FLAGS = ["--cpu", "--max-tokens", "256", "--tokens-per-sample", "32", "--no-progress-bar",
              "--log-format", "simple"]


# ---------------------------------------------------------------------------
# Grid math on random inputs


def random_cache(n=60, k=6, teachers=("a", "b"), seed=0):
    """Return cache-like tensors with invalid slots, tokens without neighbours and without matches."""
    rng = np.random.default_rng(seed)
    distances = rng.uniform(0.0, 40.0, size=(n, k)).astype(np.float32)
    valid = rng.random((n, k)) < 0.8
    valid[:3] = False  # three tokens without any neighbour
    distances[~valid] = np.inf
    value_match = (rng.random((n, k)) < 0.3) & valid
    lm = np.log(rng.uniform(0.01, 0.9, size=n)).astype(np.float32)
    teacher_lp = {}
    for name in teachers:
        lp = np.log(rng.uniform(0.001, 0.95, size=(n, k))).astype(np.float32)
        lp[~valid] = -np.inf
        teacher_lp[name] = lp
    return {"lm": lm, "distances": distances, "value_match": value_match, "teachers": teacher_lp}


def chunks_of(data, size):
    n = data["lm"].shape[0]
    for begin in range(0, n, size):
        rows = slice(begin, begin + size)
        yield {
            "lm": torch.from_numpy(data["lm"][rows]),
            "distances": torch.from_numpy(data["distances"][rows]),
            "value_match": torch.from_numpy(data["value_match"][rows]),
            "teachers": {name: torch.from_numpy(lp[rows]) for name, lp in data["teachers"].items()},
        }


def reference_perplexity(data, names, temperature, mu, lam):
    """Eqs. 1-4 token by token in float64 probability space."""
    total = 0.0
    n = data["lm"].shape[0]
    for i in range(n):
        p_lm = math.exp(float(data["lm"][i]))
        d = data["distances"][i].astype(np.float64)
        valid = np.isfinite(d)
        if not valid.any():
            total += math.log(p_lm)
            continue
        scores = -d[valid] / temperature
        a = np.exp(scores - scores.max())
        a /= a.sum()
        hard = a[data["value_match"][i][valid]].sum()
        if names:
            teacher = np.mean([np.exp(data["teachers"][t][i][valid].astype(np.float64)) for t in names], axis=0)
            logit = (a * teacher).sum()
        else:
            logit = 0.0
        p = lam * (mu * hard + (1 - mu) * logit) + (1 - lam) * p_lm
        if p == 0.0:
            return math.inf
        total += math.log(p)
    return math.exp(-total / n)


def test_grid_matches_numpy_reference():
    data = random_cache()
    grid = sweep.Grid([0.5, 10.0, 200.0], [0.0, 0.4, 1.0], [0.0, 0.25, 0.5, 0.95])
    result = sweep.run_sweep(chunks_of(data, 17), grid, ["a", "b"], progress=False)
    assert [s.label for s in result.sets] == ["knn_lm", "ppkd-a", "ppkd-b", "ppkd-a+b"]
    assert result.tokens == 60
    assert result.tokens_without_neighbours == 3
    rows = list(result.rows())
    assert len(rows) == 3 * 1 * 4 + 3 * (3 * 3 * 4)
    for row in rows:
        names = row["teachers"].split("+") if row["teachers"] else []
        expected = reference_perplexity(data, names, row["temperature"], row["mu"], row["lambda"])
        assert row["perplexity"] == pytest.approx(expected, rel=1e-5), row


def test_grid_recovers_underflowed_sums():
    data = random_cache(teachers=("a",))
    # Token 5: the only match lies 100 units beyond the nearest neighbour, so
    # at T = 0.5 its weight is exp(-200), below float32's range.
    data["distances"][5] = np.linspace(1.0, 2.0, data["distances"].shape[1], dtype=np.float32)
    data["distances"][5, -1] = 101.0
    data["value_match"][5] = False
    data["value_match"][5, -1] = True
    # Token 6: the teacher gives exp(-120) to the target at every neighbour.
    data["distances"][6] = 5.0
    data["teachers"]["a"][6] = -120.0
    grid = sweep.Grid([0.5, 10.0], [0.0, 1.0], [0.5, 1.0])
    result = sweep.run_sweep(chunks_of(data, 60), grid, ["a"], progress=False)
    for row in result.rows():
        names = row["teachers"].split("+") if row["teachers"] else []
        expected = reference_perplexity(data, names, row["temperature"], row["mu"], row["lambda"])
        if math.isinf(expected):
            assert math.isinf(row["perplexity"]), row
        else:
            assert row["perplexity"] == pytest.approx(expected, rel=1e-5), row
    # lambda = 1, mu = 0 keeps token 6's exp(-120) instead of a zero probability.
    assert math.isfinite(float(result.perplexity["ppkd-a"][0, 0, 1]))


def test_grid_lm_perplexity_at_lambda_zero():
    data = random_cache(teachers=("a",))
    result = sweep.run_sweep(chunks_of(data, 60), sweep.Grid([10.0], [0.5], [0.0]), ["a"], progress=False)
    expected = math.exp(-float(np.mean(data["lm"].astype(np.float64))))
    assert result.lm_perplexity == pytest.approx(expected, rel=1e-6)
    for row in result.rows():
        assert row["perplexity"] == pytest.approx(expected, rel=1e-6)


def test_grid_zero_probability_gives_infinity():
    data = random_cache(teachers=())
    # lambda = 1 and mu = 1: a token with neighbours but no matching value gets probability 0.
    data["value_match"][5] = False
    data["distances"][5, 0] = 1.0
    result = sweep.run_sweep(chunks_of(data, 60), sweep.Grid([10.0], [1.0], [0.5, 1.0]), [], progress=False)
    table = result.perplexity["knn_lm"]
    assert math.isfinite(float(table[0, 0, 0]))
    assert math.isinf(float(table[0, 0, 1]))
    assert int(result.infinite["knn_lm"][0, 0, 1]) >= 1


def test_mix_many_matches_mix():
    torch.manual_seed(0)
    a, b = torch.randn(1000) * 3, torch.randn(1000) * 3
    weights = [0.0, 0.05, 0.25, 0.5, 0.95, 1.0]
    out = sweep.mix_many(a, b, weights)
    from ppkd_fairseq import mixture

    for row, w in zip(out, weights):
        assert torch.allclose(row, mixture.mix(a, b, w), rtol=1e-6, atol=1e-6), w
    assert torch.equal(out[0], b)
    assert torch.equal(out[-1], a)


def test_extend_temperatures_covers_median_range():
    base = list(sweep.DEFAULT_TEMPERATURES)
    # m = 30: the range [0.3, 300] lies within [0.5, 1000] except below 0.5.
    assert sweep.extend_temperatures(base, 30.0) == [0.2] + base
    # m = 500: [5, 5000] needs 2000 and 5000 above 1000.
    assert sweep.extend_temperatures(base, 500.0) == base + [2000.0, 5000.0]
    assert sweep.extend_temperatures(base, None) == base
    assert 10.0 in sweep.extend_temperatures(base, 1e5)


def test_edge_messages_per_axis():
    grid = sweep.Grid([1.0, 10.0, 100.0], [0.0, 0.5, 1.0], [0.0, 0.5, 0.9])
    inside = {"temperature": 10.0, "mu": 0.5, "lambda": 0.5}
    assert sweep.edge_messages(inside, grid) == []
    # mu = 0 and 1 and lambda = 0 are ends of their range, not of the grid.
    assert sweep.edge_messages({"temperature": 10.0, "mu": 1.0, "lambda": 0.0}, grid) == []
    low_t = sweep.edge_messages({**inside, "temperature": 1.0}, grid)
    assert len(low_t) == 1
    assert "widen --temperatures" in low_t[0]
    high_lambda = sweep.edge_messages({**inside, "lambda": 0.9}, grid)
    assert len(high_lambda) == 1
    assert "widen --lambdas" in high_lambda[0]


def test_parse_values_ranges_and_lists():
    assert sweep_cli.parse_values("0:1:0.1") == [round(0.1 * i, 10) for i in range(11)]
    assert sweep_cli.parse_values("0:0.95:0.05")[-1] == 0.95
    assert 0.25 in sweep_cli.parse_values("0:0.95:0.05")
    assert sweep_cli.parse_values("2, 5,10") == [2.0, 5.0, 10.0]


def test_default_grid_contains_paper_points():
    assert 10.0 in sweep.DEFAULT_TEMPERATURES
    assert 0.4 in sweep.DEFAULT_MUS
    assert 1.0 in sweep.DEFAULT_MUS
    assert 0.25 in sweep.DEFAULT_LAMBDAS
    assert 0.5 in sweep.DEFAULT_LAMBDAS
    assert sweep.Grid(sweep.DEFAULT_TEMPERATURES, sweep.DEFAULT_MUS, sweep.DEFAULT_LAMBDAS).size >= 500


def test_cache_mismatches_names_each_field():
    manifest = {
        "format": "ppkd-sweep-cache", "status": "complete",
        "datastore": {"datastore_id": "d1"}, "student_fingerprint": "s1",
        "data": "/data", "split": "valid", "k": 16, "distance": "exact", "probe": 32, "exclude_own_row": False,
        "teachers": [{"name": "causal", "head_sha256": "h1"}],
        "request": {"checkpoint_sha256": "c1", "eval_flags": ["--cpu"]},
    }
    request = {
        "datastore_id": "d1", "student_fingerprint": "s1", "data": "/data", "split": "valid", "k": 16,
        "distance": "exact", "probe": 32, "exclude_own_row": False, "teachers": {"causal": "h1"},
        "checkpoint_sha256": "c1", "eval_flags": ["--cpu"],
    }
    assert cache_mismatches(manifest, request) == []
    changes = {
        "datastore_id": "d2", "student_fingerprint": "s2", "split": "test", "k": 8, "distance": "faiss",
        "probe": 8, "exclude_own_row": True, "teachers": {"causal": "h2"}, "checkpoint_sha256": "c2",
        "eval_flags": ["--cpu", "--context-window", "16"],
    }
    for field, value in changes.items():
        reasons = cache_mismatches(manifest, {**request, field: value})
        assert len(reasons) == 1, (field, reasons)
    assert "not in the cache" in cache_mismatches(manifest, {**request, "teachers": {"other": "h"}})[0]
    assert cache_mismatches({**manifest, "status": "incomplete"}, request) != []
    assert cache_mismatches(None, request) == ["there is no cache yet"]


# ---------------------------------------------------------------------------
# The sweep on the tiny corpus, against fairseq-eval-lm


@pytest.fixture(scope="module")
def datastore(tiny_data, tiny_models, tmp_path_factory):
    """The student's train-split datastore with its index and teachers ``causal`` and ``self``."""
    folder = str(tmp_path_factory.mktemp("sweep_dstore") / "dstore")
    eval_lm(tiny_data, tiny_models["student"], "--ppkd-mode", "dump", "--ppkd-dstore", folder)
    run([sys.executable, "-m", "ppkd_fairseq.cli.build_index", folder])
    for name, model in (("causal", "teacher_adaptive"), ("self", "student")):
        eval_lm(tiny_data, tiny_models[model], "--ppkd-mode", "dump_teacher", "--ppkd-dstore", folder,
                "--ppkd-teacher-name", name)
    return folder


def sweep_argv(data, student, dstore, out_dir, *extra):
    return [data, "--path", student, "--dstore", dstore, "--out-dir", str(out_dir), "--k", str(K),
            "--test-split", "valid", "--no-progress", *extra, "--", *EVAL_FLAGS]


@pytest.fixture(scope="module")
def swept(tiny_data, tiny_models, datastore, tmp_path_factory):
    """One default sweep over the valid split; returns (best.json content, out dir)."""
    out_dir = tmp_path_factory.mktemp("sweep_out")
    report = sweep_cli.run(sweep_argv(tiny_data, tiny_models["student"], datastore, out_dir))
    return report, out_dir


def grid_perplexity(out_dir, model, temperature, mu, lam):
    with open(os.path.join(out_dir, "grid.csv")) as f:
        for row in csv.DictReader(f):
            if (row["model"], float(row["temperature"]), float(row["mu"]), float(row["lambda"])) == (
                    model, temperature, mu, lam):
                return float(row["perplexity"])
    raise KeyError((model, temperature, mu, lam))


def eval_point(data, student, dstore, summary, *ppkd):
    output = eval_lm(data, student, "--ppkd-dstore", dstore, "--ppkd-k", str(K), "--ppkd-summary-out",
                     str(summary), *ppkd, split="valid")
    with open(summary) as f:
        return json.load(f)["perplexity"], reported_perplexity(output)


@pytest.mark.parametrize(
    "model, teachers, temperature, mu, lam",
    [
        ("knn_lm", None, 10.0, 1.0, 0.25),  # the kNN-LM's best setting in Jin, Ge and Wei (2022)
        ("ppkd-causal", "causal", 10.0, 0.4, 0.5),  # PP-KD's best setting there
        ("ppkd-causal+self", "causal,self", 2.0, 0.7, 0.35),
    ],
)
def test_sweep_point_equals_eval_lm(swept, tiny_data, tiny_models, datastore, tmp_path,
                                    model, teachers, temperature, mu, lam):
    report, out_dir = swept
    swept_ppl = grid_perplexity(out_dir, model, temperature, mu, lam)
    ppkd = ["--ppkd-temperature", str(temperature), "--ppkd-mu", str(mu), "--ppkd-lambda", str(lam)]
    if teachers:
        ppkd += ["--ppkd-teachers", teachers]
    summary_ppl, printed_ppl = eval_point(tiny_data, tiny_models["student"], datastore,
                                          tmp_path / "summary.json", *ppkd)
    assert swept_ppl == pytest.approx(summary_ppl, rel=1e-6)
    # fairseq-eval-lm prints 2 decimals of a float32 sum.
    assert abs(swept_ppl - printed_ppl) <= 0.005 + 1e-6 * swept_ppl
    # A point away from the LM's perplexity shows that the check covers the mixture, not only the LM.
    assert swept_ppl != pytest.approx(report["lm_perplexity"], rel=1e-4)


def test_sweep_best_command_reproduces_best(swept, tmp_path):
    report, out_dir = swept
    best = report["best"]["ppkd-causal+self"]
    with open(os.path.join(out_dir, "test_commands.sh")) as f:
        script = f.read()
    assert script.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in script
    # Run the printed command, with python -m in place of the console script.
    command = best["test_command"].replace("fairseq-eval-lm", f"{sys.executable} -m fairseq_cli.eval_lm", 1)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out_dir, "valid-ppkd-causal+self.json")) as f:
        summary = json.load(f)
    assert best["perplexity"] == pytest.approx(summary["perplexity"], rel=1e-6)
    assert summary["settings"]["teachers"] == ["causal", "self"]


def test_sweep_report_contents(swept):
    report, out_dir = swept
    assert set(report["best"]) == {"knn_lm", "ppkd-causal", "ppkd-self", "ppkd-causal+self"}
    assert report["grid"]["points"] >= 500
    with open(os.path.join(out_dir, "best.json")) as f:
        assert json.load(f)["best"]["knn_lm"]["mu"] == 1.0
    knn = report["best"]["knn_lm"]["perplexity"]
    for label in ("ppkd-causal", "ppkd-self", "ppkd-causal+self"):
        # mu = 1 is in the grid, so PP-KD is never worse than the kNN-LM.
        assert report["best"][label]["perplexity"] <= knn
    temperatures = report["grid"]["temperatures"]
    for point in report["best"].values():
        at_edge = point["temperature"] in (temperatures[0], temperatures[-1])
        assert any("widen --temperatures" in m for m in point["edges"]) == at_edge


def test_sweep_heatmaps_are_png(swept):
    report, out_dir = swept
    for label in ("ppkd-causal", "ppkd-self", "ppkd-causal+self"):
        path = os.path.join(out_dir, f"heatmap-{label}.png")
        assert report["best"][label]["heatmap"] == path
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(os.path.join(out_dir, "heatmap-knn_lm.png"))


def test_sweep_cache_matches_lm_and_manifest(swept, tiny_models):
    report, out_dir = swept
    cache = SweepCache.open(report["cache"]["folder"])
    manifest = cache.manifest
    assert manifest["status"] == "complete"
    assert manifest["k"] == K
    assert manifest["split"] == "valid"
    assert manifest["distance"] == "exact"
    assert [t["name"] for t in manifest["teachers"]] == ["causal", "self"]
    assert all(len(t["head_sha256"]) == 64 for t in manifest["teachers"])
    assert manifest["tokens"] == report["tokens"] == int(np.count_nonzero(cache.written))
    assert manifest["lm_perplexity"] == pytest.approx(report["lm_perplexity"], rel=1e-6)
    assert manifest["request"]["eval_flags"] == EVAL_FLAGS
    written = np.asarray(cache.written)
    distances = np.asarray(cache.distances)[written]
    assert not np.asarray(cache.value_match)[written][np.isinf(distances)].any()
    for name in ("causal", "self"):
        lp = np.asarray(cache.teachers[name])[written]
        assert np.isneginf(lp[np.isinf(distances)]).all()
        assert (lp[np.isfinite(distances)] <= 0).all()


def test_sweep_cache_reused_when_unchanged(swept, tiny_data, tiny_models, datastore, tmp_path):
    report, _ = swept
    cache_dir = report["cache"]["folder"]
    files = [os.path.join(cache_dir, name) for name in ("manifest.json", "distances.npy", "teachers/causal.npy")]
    before = [os.stat(p).st_mtime_ns for p in files]
    again = sweep_cli.run(sweep_argv(tiny_data, tiny_models["student"], datastore, tmp_path / "again",
                                     "--cache-dir", cache_dir, "--no-heatmaps"))
    assert again["cache"]["reused"] is True
    assert [os.stat(p).st_mtime_ns for p in files] == before
    assert again["best"]["ppkd-causal"]["perplexity"] == report["best"]["ppkd-causal"]["perplexity"]


def test_sweep_cache_recomputed_for_new_k(swept, tiny_data, tiny_models, datastore, tmp_path):
    report, _ = swept
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(report["cache"]["folder"], cache_dir)
    changed = sweep_cli.run(
        [tiny_data, "--path", tiny_models["student"], "--dstore", datastore, "--out-dir", str(tmp_path / "k8"),
         "--k", "8", "--cache-dir", cache_dir, "--teachers", "none", "--no-heatmaps", "--no-progress",
         "--", *EVAL_FLAGS]
    )
    assert changed["cache"]["reused"] is False
    cache = SweepCache.open(cache_dir)
    assert cache.manifest["k"] == 8
    assert cache.distances.shape[1] == 8
    assert cache.teachers == {}
    assert set(changed["best"]) == {"knn_lm"}


def test_sweep_flags_best_on_grid_edge(swept, tiny_data, tiny_models, datastore, tmp_path):
    report, _ = swept
    edge = sweep_cli.run(sweep_argv(
        tiny_data, tiny_models["student"], datastore, tmp_path / "edge", "--cache-dir", report["cache"]["folder"],
        "--temperatures", "10", "--no-extend-temperatures", "--mus", "0.4", "--lambdas", "0.5", "--no-heatmaps"))
    assert edge["on_edge"] is True
    assert edge["grid"]["temperatures"] == [10.0]
    messages = edge["best"]["ppkd-causal"]["edges"]
    assert any("on the edge of the grid" in m and "widen --temperatures" in m for m in messages)
    assert any("widen --mus" in m for m in messages)
    assert any("widen --lambdas" in m for m in messages)
    assert not any("--mus" in m for m in edge["best"]["knn_lm"]["edges"])


def test_sweep_knn_only_reuses_cache(swept, tiny_data, tiny_models, datastore, tmp_path):
    report, _ = swept
    knn = sweep_cli.run(sweep_argv(tiny_data, tiny_models["student"], datastore, tmp_path / "knn",
                                   "--cache-dir", report["cache"]["folder"], "--teachers", "none"))
    assert knn["cache"]["reused"] is True
    assert set(knn["best"]) == {"knn_lm"}
    # Without teacher columns the batched sums round differently, in the last bits.
    assert knn["best"]["knn_lm"]["perplexity"] == pytest.approx(report["best"]["knn_lm"]["perplexity"], rel=1e-8)
    assert not os.path.exists(tmp_path / "knn" / "heatmap-knn_lm.png")


def test_sweep_rejects_reserved_eval_flags(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="--ppkd-k"):
        sweep_cli.run([tiny_data, "--path", "x.pt", "--dstore", "d", "--out-dir", str(tmp_path), "--",
                       "--ppkd-k", "8"])


@pytest.mark.parametrize("text", ["nan,5", "inf", "0:nan:0.1"])
def test_parse_values_rejects_non_finite(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        sweep_cli.parse_values(text)


def test_grid_names_option_of_bad_value():
    with pytest.raises(ValueError, match="--lambdas"):
        sweep.Grid([10.0], [0.5], [0.2, 1.5])
    with pytest.raises(ValueError, match="--mus"):
        sweep.Grid([10.0], [float("nan")], [0.5])


@pytest.mark.parametrize("flag", ["--k", "--probe"])
def test_sweep_rejects_zero_search_sizes(flag, tiny_data, tmp_path):
    with pytest.raises(SystemExit, match=f"{flag} must be >= 1, got 0"):
        sweep_cli.run([tiny_data, "--path", "x.pt", "--dstore", "d", "--out-dir", str(tmp_path), flag, "0"])


def test_sweep_rejects_k_above_datastore_rows(tiny_data, tiny_models, datastore, tmp_path):
    with pytest.raises(SystemExit, match="lower --k"):
        sweep_cli.run(sweep_argv(tiny_data, tiny_models["student"], datastore, tmp_path, "--k", "10000000"))

    assert not os.path.exists(tmp_path / "cache")


def test_test_commands_print_labels_and_perplexities(tmp_path):
    commands = []
    for label, ppl in (("knn_lm", 12.5), ("ppkd-causal", 11.25)):
        summary = tmp_path / f"{label}.json"
        summary.write_text(json.dumps({"perplexity": ppl}))
        commands.append((f"{label}: perplexity 1.0 on valid", ["true", "--ppkd-summary-out", str(summary)]))
    script = tmp_path / "test_commands.sh"

    sweep_report.write_commands(str(script), commands, ["header"])
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                            env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "== knn_lm: perplexity 1.0 on valid"
    assert lines[-3:] == ["== perplexities", "knn_lm 12.5", "ppkd-causal 11.25"]
