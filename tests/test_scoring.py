"""Tests for PP-KD scoring in fairseq-eval-lm against the NumPy reference.

Each run scores the ``tiny_data`` valid split (549 tokens) with the pre-norm
student against the shared train datastore of conftest.py: 4,382 rows, an
exact IndexFlatL2 and the teachers ``causal`` and ``postnorm``. It writes
the analysis TSV, the neighbour arrays and the summary JSON.
tests/reference.py recomputes every token's probability by brute-force
search over the stored keys. The queries and P_LM come from tests/capture.py
and the teacher distributions from the stored states and the checkpoints'
output matrices.

A token whose k-th and (k+1)-th nearest keys are equidistant has no unique
top k, and FAISS may pick either. So each run's retrieved ids are checked
to be an exact top k, allowing for ties, and the reference then scores the
token over those ids.
"""

import csv
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

import capture
import reference
from conftest import FakeDatastore, eval_lm, run
from ppkd_fairseq.datastore import TeacherStore
from ppkd_fairseq.handlers import ScoreHandler
from ppkd_fairseq.retrieval import gather_rows, search
from ppkd_fairseq.teacher_head import log_normalizers, softmax_head

K = 16
TOLERANCE = 1e-4
# Squared-L2 difference under which two distances count as equal: the
# plugin's queries and the captured ones differ by float32 rounding.
TIE_GAP = 1e-3
TEACHER_CHECKPOINTS = {"causal": "teacher_adaptive", "postnorm": "student_postnorm"}

# name -> (split, T, mu, lambda, teachers, extra options). The grid has mu
# and lambda at 0 and 1 and temperatures from 1 to 100.
RUNS = {
    "paper": ("valid", 10.0, 0.4, 0.5, "causal", ()),
    "full_distribution": ("valid", 10.0, 0.4, 0.5, "causal", ("--ppkd-full-distribution",)),
    "teacher_only": ("valid", 1.0, 0.0, 1.0, "causal", ()),
    "knn_lm": ("valid", 100.0, 1.0, 0.25, "", ()),
    "mixed_teacher": ("valid", 5.0, 0.3, 0.7, "causal,postnorm", ()),
    "lambda_zero": ("valid", 3.0, 0.4, 0.0, "postnorm", ()),
    "own_row": ("train", 10.0, 0.5, 1.0, "postnorm", ("--ppkd-exclude-own-row",)),
}


class Runs:
    """Run each fairseq-eval-lm configuration once, on first use."""

    def __init__(self, data, models, datastore, root):
        self.data = data
        self.models = models
        self.datastore = datastore
        self.root = root
        self.done = {}

    def __getitem__(self, name):
        if name not in self.done:
            self.done[name] = self._run(name)
        return self.done[name]

    def _run(self, name):
        out = os.path.join(self.root, name)
        if name == "stock":
            # fairseq-eval-lm without the plugin, with eval_lm's batching.
            result = run([sys.executable, "-m", "fairseq_cli.eval_lm", self.data, "--path", self.models["student"],
                          "--task", "language_modeling", "--gen-subset", "valid", "--cpu", "--max-tokens", "256",
                          "--tokens-per-sample", "32", "--no-progress-bar", "--log-format", "simple"])
            return {"output": result.stdout + result.stderr}
        split, temperature, mu, lam, teachers, extra = RUNS[name]
        options = ["--ppkd-dstore", self.datastore["folder"], "--ppkd-k", str(K),
                   "--ppkd-temperature", str(temperature), "--ppkd-mu", str(mu), "--ppkd-lambda", str(lam),
                   "--ppkd-analysis-out", os.path.join(out, "analysis.tsv"),
                   "--ppkd-neighbours-out", os.path.join(out, "neighbours"),
                   "--ppkd-summary-out", os.path.join(out, "summary.json"), *extra]
        if teachers:
            options += ["--ppkd-teachers", teachers]
        output = eval_lm(self.data, self.models["student"], *options, split=split)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        return {
            "output": output,
            "analysis": read_analysis(os.path.join(out, "analysis.tsv")),
            "ids": np.load(os.path.join(out, "neighbours", "ids.npy")),
            "distances": np.load(os.path.join(out, "neighbours", "distances.npy")),
            "summary": summary,
        }


def read_analysis(path):
    """Read the analysis TSV into arrays sorted by position."""
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    columns = {}
    for name in ("position", "target", "n_match", "n_valid"):
        columns[name] = np.array([int(r[name]) for r in rows], dtype=np.int64)
    for name in ("log_p_lm", "log_p_hard", "log_p_logit", "log_p_knn", "log_p"):
        columns[name] = np.array([float(r[name]) for r in rows])
    columns["word"] = np.array([r["word"] for r in rows])
    order = np.argsort(columns["position"])
    return {name: values[order] for name, values in columns.items()}


def reported(output, pattern):
    """Return the last match of ``pattern`` in eval-lm's output, as a float."""
    matches = re.findall(pattern, output)
    assert matches, f"{pattern!r} not found in the output:\n{output[-2000:]}"
    return float(matches[-1].replace(",", ""))


def reported_loss(output):
    return reported(output, r"Loss \(base 2\): ([0-9.]+)")


def reported_perplexity(output):
    return reported(output, r"Perplexity: ([0-9.]+)")


def reported_tokens(output):
    return int(reported(output, r"Evaluated ([0-9,]+) tokens"))


@pytest.fixture(scope="module")
def runs(tiny_data, tiny_models, tiny_datastore, tmp_path_factory):
    return Runs(tiny_data, tiny_models, tiny_datastore, str(tmp_path_factory.mktemp("scoring_runs")))


@pytest.fixture(scope="module")
def tables(tiny_data, tiny_models, tiny_datastore):
    """Datastore arrays and teacher distributions read without the plugin."""
    folder = tiny_datastore["folder"]
    teachers = {}
    for name, model in TEACHER_CHECKPOINTS.items():
        states = np.load(os.path.join(folder, "teachers", name, "states.npy"))
        matrices = capture.output_layer_matrices(tiny_models[model])
        if matrices[0] == "adaptive":
            teachers[name] = reference.adaptive_softmax_log_probs(states, *matrices[1:])  # (N, V)
        else:
            teachers[name] = reference.softmax_log_probs(states, *matrices[1:])  # (N, V)
    return {
        "keys": np.load(os.path.join(folder, "keys.npy")),
        "values": np.load(os.path.join(folder, "values.npy")).astype(np.int64),
        "teachers": teachers,
        "streams": {split: capture.read_stream(tiny_data, split) for split in ("train", "valid")},
        "captures": {split: capture.capture_student(tiny_models["student"], tiny_data, split)
                     for split in ("train", "valid")},
    }


def check_neighbours(ids, queries, keys, k, exclude_rows=None):
    """Check that ``ids`` are an exact top k of each query, allowing for ties.

    Block-initial tokens see no context, so their keys repeat exactly and
    several rows often share the k-th nearest distance. Any of them is a
    correct k-th neighbour. Returns the (n, k) float64 squared L2 distances
    of ``ids``.
    """
    assert (ids >= 0).all(), "a token got fewer than k neighbours"
    assert (np.diff(np.sort(ids, axis=1), axis=1) > 0).all(), "a row was retrieved twice for one token"
    _, nearest, _ = reference.exact_search(queries, keys, k, exclude_rows=exclude_rows)
    kth = nearest[:, -1:]  # (n, 1)
    distances = ((np.asarray(queries, np.float64)[:, None, :] - np.asarray(keys, np.float64)[ids]) ** 2).sum(-1)
    assert (distances <= kth + TIE_GAP).all(), "a retrieved row is farther than the k-th nearest key"
    # Every key strictly nearer than the k-th distance must be retrieved:
    # then the k retrieved distances are the k smallest.
    np.testing.assert_allclose(np.sort(distances, axis=1), nearest, rtol=0, atol=TIE_GAP)
    return distances


def expected_scores(tables, name, ids):
    """Return the reference scores of run ``name`` over the neighbours ``ids`` it retrieved."""
    split, temperature, mu, lam, teachers, _ = RUNS[name]
    captured = tables["captures"][split]
    n = len(captured["targets"])
    exclude = np.arange(n) if name == "own_row" else None
    distances = check_neighbours(ids, captured["keys"], tables["keys"], K, exclude_rows=exclude)
    names = [t for t in teachers.split(",") if t]
    parts = reference.ppkd_probabilities(
        captured["lm_log_probs"], ids, distances, tables["values"], captured["targets"],
        [tables["teachers"][t] for t in names], temperature, mu, lam,
    )
    n_match = (tables["values"][ids] == captured["targets"][:, None]).sum(1)
    return {"distances": distances, "parts": parts, "n_match": n_match,
            "lm_log_probs": captured["lm_log_probs"], "targets": captured["targets"]}


def assert_log_close(actual, expected, name):
    """Compare log-probabilities to TOLERANCE, with -inf at the same places."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert not np.isnan(actual).any(), f"{name} has NaN"
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=f"{name}: -inf differs")
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=TOLERANCE, err_msg=name)


def check_against_reference(run_result, tables, name):
    split, _, mu, _, _, _ = RUNS[name]
    table = run_result["analysis"]
    expected = expected_scores(tables, name, run_result["ids"])
    n = len(expected["targets"])
    np.testing.assert_array_equal(table["position"], np.arange(n))
    np.testing.assert_array_equal(table["target"], tables["streams"][split])
    np.testing.assert_array_equal(expected["targets"], tables["streams"][split])
    np.testing.assert_array_equal(table["n_valid"], K)
    np.testing.assert_allclose(run_result["distances"], expected["distances"], rtol=1e-4, atol=1e-4)
    parts = expected["parts"]
    assert_log_close(table["log_p_lm"], expected["lm_log_probs"], "log_p_lm")
    assert_log_close(table["log_p"], reference.safe_log(parts["final"]), "log_p")
    assert_log_close(table["log_p_knn"], reference.safe_log(parts["knn"]), "log_p_knn")
    assert_log_close(table["log_p_hard"], reference.safe_log(parts["hard"]), "log_p_hard")
    if mu < 1.0:
        assert_log_close(table["log_p_logit"], reference.safe_log(parts["logit"]), "log_p_logit")
    else:
        assert np.isneginf(table["log_p_logit"]).all(), "mu = 1 should not score the teacher"
    np.testing.assert_array_equal(table["n_match"], expected["n_match"])


@pytest.mark.parametrize("name", [n for n in RUNS if n != "full_distribution"])
def test_scores_match_reference(runs, tables, name):
    check_against_reference(runs[name], tables, name)


def test_full_distribution_matches_target_only(runs, tables):
    full = runs["full_distribution"]["analysis"]
    target_only = runs["paper"]["analysis"]
    np.testing.assert_array_equal(full["position"], target_only["position"])
    np.testing.assert_allclose(full["log_p"], target_only["log_p"], rtol=0, atol=1e-5)
    check_against_reference(runs["full_distribution"], tables, "full_distribution")
    assert runs["full_distribution"]["summary"]["perplexity"] == pytest.approx(
        runs["paper"]["summary"]["perplexity"], rel=1e-5)


def test_mixed_teacher_averages_distributions(runs, tables):
    # The run's P_logit equals Eq. 2 with the mean of the two teachers'
    # probabilities, and differs from either teacher alone.
    result = runs["mixed_teacher"]
    table = result["analysis"]
    expected = expected_scores(tables, "mixed_teacher", result["ids"])
    assert_log_close(table["log_p_logit"], reference.safe_log(expected["parts"]["logit"]), "mixed")
    a = reference.neighbour_weights(expected["distances"], RUNS["mixed_teacher"][1])
    targets = expected["targets"][:, None]
    for name in ("causal", "postnorm"):
        alone = (a * np.exp(tables["teachers"][name][result["ids"], targets])).sum(1)
        assert np.abs(table["log_p_logit"] - np.log(alone)).max() > 1e-2, f"equals teacher {name} alone"


def test_lambda_zero_equals_stock_eval_lm(runs):
    stock = runs["stock"]["output"]
    result = runs["lambda_zero"]
    table = result["analysis"]
    np.testing.assert_array_equal(table["log_p"], table["log_p_lm"])
    assert reported_tokens(result["output"]) == reported_tokens(stock) == 549
    assert result["summary"]["tokens"] == 549
    assert reported_loss(result["output"]) == reported_loss(stock)
    assert reported_perplexity(result["output"]) == reported_perplexity(stock)
    # The stock loss is printed to 4 decimals.
    loss = -table["log_p_lm"].mean() / math.log(2)
    assert loss == pytest.approx(reported_loss(stock), abs=1e-4)


@pytest.mark.parametrize("name", ["paper", "knn_lm", "mixed_teacher"])
def test_summary_matches_printed_perplexity(runs, name):
    result = runs[name]
    summary = result["summary"]
    table = result["analysis"]
    assert summary["tokens"] == reported_tokens(result["output"]) == len(table["log_p"])
    assert summary["tokens_without_neighbours"] == 0
    assert summary["perplexity"] == pytest.approx(math.exp(-table["log_p"].mean()), rel=1e-6)
    # fairseq prints 2 decimals of the perplexity and 4 of the base-2 loss.
    assert summary["perplexity"] == pytest.approx(reported_perplexity(result["output"]), abs=0.005 + 1e-9)
    assert summary["loss_base2"] == pytest.approx(reported_loss(result["output"]), abs=5e-5 + 1e-9)
    _, temperature, mu, lam, teachers, _ = RUNS[name]
    assert summary["settings"]["k"] == K
    assert summary["settings"]["temperature"] == temperature
    assert summary["settings"]["mu"] == mu
    assert summary["settings"]["lambda"] == lam
    assert summary["settings"]["teachers"] == [t for t in teachers.split(",") if t]


def test_exclude_own_row_never_returns_own_row(runs):
    ids = runs["own_row"]["ids"]
    assert ids.shape == (4382, K)
    assert (ids >= 0).all()
    assert not (ids == np.arange(len(ids))[:, None]).any()


def test_own_row_is_nearest_without_exclusion(tables):
    # Without the exclusion a token's own key is its nearest neighbour, so
    # the check above is not vacuous. The rows are the 8th token of every
    # 32-token block, because block-initial keys see no context and repeat.
    captured = tables["captures"]["train"]
    rows = np.arange(7, 4382, 32)
    ids, _, _ = reference.exact_search(captured["keys"][rows], tables["keys"], 1)
    np.testing.assert_array_equal(ids[:, 0], rows)


# -1 ids: FAISS pads results with -1 when it finds fewer than k vectors.


class StrictRows:
    """An array stand-in that raises on a negative row, as -1 would wrap around."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.shape = self.array.shape
        self.dtype = self.array.dtype
        self.reads = []

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        if rows.dtype != np.bool_ and (rows < 0).any():
            raise IndexError(f"negative row ids reached the table: {rows[rows < 0].tolist()}")
        self.reads.append(rows.copy())
        return self.array[rows]

    def __len__(self):
        return self.shape[0]


class PaddedIndex:
    """A FAISS index stand-in that returns fixed ids, -1 for missing results."""

    def __init__(self, ids):
        self.ids = np.asarray(ids, dtype=np.int64)

    def search(self, queries, k):
        assert k == self.ids.shape[1], f"searched k={k}, the stand-in holds {self.ids.shape[1]}"
        distances = np.where(self.ids >= 0, 1.0, np.finfo(np.float32).max).astype(np.float32)
        return distances, self.ids.copy()


def test_search_masks_minus_one():
    rng = np.random.default_rng(0)
    keys = StrictRows(rng.normal(size=(10, 4)).astype(np.float16))
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    index = PaddedIndex([[3, 7, -1, -1], [-1, -1, -1, -1], [1, 2, 5, 9]])
    nb = search(index, queries, 4, keys=keys)
    np.testing.assert_array_equal(nb.valid, [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(nb.ids[~nb.valid], -1)
    assert np.isinf(nb.distances[~nb.valid]).all()
    expected = ((queries[0] - keys.array[[3, 7]].astype(np.float32)) ** 2).sum(-1)
    np.testing.assert_allclose(nb.distances[0, :2], expected, rtol=1e-6)


def test_search_faiss_distances_mask_minus_one():
    index = PaddedIndex([[4, -1, -1]])
    nb = search(index, np.zeros((1, 2), dtype=np.float32), 3, exact=False)
    np.testing.assert_array_equal(nb.valid, [[True, False, False]])
    np.testing.assert_array_equal(nb.distances, [[1.0, np.inf, np.inf]])


def test_search_exclude_rows_with_minus_one():
    keys = StrictRows(np.arange(20, dtype=np.float32).reshape(10, 2))
    # k = 2, so the stand-in returns k + 1 = 3 ids per query.
    index = PaddedIndex([[5, 6, -1], [-1, -1, -1], [2, 8, 9]])
    nb = search(index, np.zeros((3, 2), dtype=np.float32), 2, keys=keys, exclude_rows=np.array([5, 0, 8]))
    np.testing.assert_array_equal(nb.ids, [[6, -1], [-1, -1], [2, 9]])
    np.testing.assert_array_equal(nb.valid, [[True, False], [False, False], [True, True]])


def test_gather_rows_skips_invalid():
    table = StrictRows(np.arange(6, dtype=np.int32) * 10)
    ids = np.array([[4, -1], [0, 5]])
    out = gather_rows(table, ids, ids >= 0)
    np.testing.assert_array_equal(out, [[40, 0], [0, 50]])


class FakeModel:
    """The two methods ScoreHandler calls on the student."""

    def __init__(self, queries):
        self.queries = queries

    def state_dict(self):
        return {}

    def ppkd_captured(self, name, target_shape):
        assert name == "key"
        return self.queries


@pytest.mark.parametrize("full_distribution", [False, True])
def test_minus_one_never_reaches_values_or_states(full_distribution):
    rng = np.random.default_rng(1)
    n_rows, dim, vocab, dim_t = 10, 4, 6, 3
    keys = StrictRows(rng.normal(size=(n_rows, dim)).astype(np.float16))
    values = StrictRows(rng.integers(1, vocab, size=n_rows).astype(np.int32))
    head = softmax_head(torch.from_numpy(rng.normal(size=(vocab, dim_t)).astype(np.float32)))
    states = rng.normal(size=(n_rows, dim_t)).astype(np.float16)
    lognorm = log_normalizers(head, torch.from_numpy(states)).numpy()
    teacher = TeacherStore("fake", {"name": "t"}, StrictRows(states), StrictRows(lognorm), head)
    index = PaddedIndex([[3, 7, -1, -1], [-1, -1, -1, -1], [1, 2, 5, 9]])
    settings = {"k": 4, "temperature": 1.0, "mu": 0.5, "lam": 0.5, "probe": 1, "exact_distance": True,
                "exclude_own_row": False, "full_distribution": full_distribution}
    handler = ScoreHandler(FakeDatastore(keys, values), index, [teacher], settings, starts=np.array([0]), pad=0,
                           dictionary=None, num_positions=3)
    queries = torch.from_numpy(rng.normal(size=(1, 3, dim)).astype(np.float32))  # (B, T, d)
    target = torch.tensor([[2, 3, 4]])
    lm = torch.log_softmax(torch.from_numpy(rng.normal(size=(1, 3, vocab)).astype(np.float32)), dim=-1)
    sample = {"id": torch.tensor([0]), "target": target}
    out = handler.score_batch(FakeModel(queries), None, sample, lambda target_only=True: lm.clone())

    for table in (keys, values, teacher.states, teacher.lognorm):
        for rows in table.reads:
            assert rows.dtype == np.bool_ or (rows >= 0).all()
    scores = out[0, torch.arange(3), target[0]].double().numpy()
    # Position 1 has no neighbour: the LM alone.
    assert scores[1] == pytest.approx(lm[0, 1, 3].item(), abs=1e-6)
    teacher_full = reference.softmax_log_probs(states, head.weight.numpy())  # (N, V)
    for position, ids in ((0, [3, 7]), (2, [1, 2, 5, 9])):
        q = queries[0, position].double().numpy()
        d = ((keys.array[ids].astype(np.float64) - q) ** 2).sum(-1)
        expected = reference.ppkd_probabilities(
            lm[0, position, target[0, position]].double().numpy()[None], np.array([ids]), d[None],
            values.array.astype(np.int64), target[0, position].numpy()[None], [teacher_full], 1.0, 0.5, 0.5,
        )
        assert scores[position] == pytest.approx(np.log(expected["final"][0]), abs=1e-5)
