"""Input checks of ``fairseq-eval-lm --task ppkd_language_modeling``.

A mismatched student, a k above the datastore's row count and options that
would have no effect are rejected, or warned about, and a failed run leaves
the outputs of an earlier run as they were.
"""

import argparse
import dataclasses
import hashlib
import json
import os

import faiss
import numpy as np
import pytest
import torch

from conftest import FakeDatastore, eval_lm, reported_perplexity
from ppkd_fairseq.handlers import ScoreHandler
from ppkd_fairseq.task import PPKDLanguageModelingConfig, check_options

VALID_TOKENS = 549  # tokens of the tiny valid split
DATASTORE_ROWS = 4382  # rows of the tiny datastore (tokens of the train split)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def default_options(**changes):
    """Return the task's options at their defaults, as fairseq-eval-lm passes them, with ``changes``."""
    options = {f.name: f.default for f in dataclasses.fields(PPKDLanguageModelingConfig)
               if f.default is not dataclasses.MISSING}
    options.update(changes)
    return argparse.Namespace(**options)


def test_other_student_keeps_earlier_outputs(tiny_data, tiny_models, tiny_datastore, tmp_path):
    analysis = str(tmp_path / "keep.tsv")
    neighbours = str(tmp_path / "nb")
    outputs = ["--ppkd-k", "4", "--ppkd-analysis-out", analysis, "--ppkd-neighbours-out", neighbours]
    eval_lm(tiny_data, tiny_models["student"], "--ppkd-dstore", tiny_datastore["folder"], *outputs, split="valid")
    with open(analysis) as f:
        assert len(f.readlines()) == 1 + VALID_TOKENS
    assert np.load(os.path.join(neighbours, "ids.npy")).shape == (VALID_TOKENS, 4)
    files = [analysis, os.path.join(neighbours, "ids.npy"), os.path.join(neighbours, "distances.npy")]
    before = [sha256(path) for path in files]

    # The post-norm student has the datastore's dictionary and key size, so
    # only the checkpoint fingerprint distinguishes it.
    with pytest.raises(RuntimeError) as failure:
        eval_lm(tiny_data, tiny_models["student_postnorm"], "--ppkd-dstore", tiny_datastore["folder"], *outputs,
                split="valid")

    assert "student checkpoint fingerprint" in str(failure.value)
    assert [sha256(path) for path in files] == before
    assert sorted(os.listdir(tmp_path)) == ["keep.tsv", "nb"]
    assert sorted(os.listdir(neighbours)) == ["distances.npy", "ids.npy"]


class FakeModel:
    """Return fixed queries as the captured keys, or raise like a --softmax-batch run."""

    def __init__(self, queries=None):
        self.queries = queries

    def ppkd_captured(self, name, target_shape):
        if self.queries is None:
            raise ValueError("--softmax-batch splits batches and is not supported with PP-KD")
        return self.queries


def test_handler_renames_outputs_at_finish(tmp_path):
    # Three 1-d keys at 0, 1 and 5. The query at 0.5 has neighbours rows 0 and 1, both at squared L2 0.25.
    keys = np.array([[0.0], [1.0], [5.0]], dtype=np.float32)
    values = np.array([2, 3, 2], dtype=np.int32)
    index = faiss.IndexFlatL2(1)
    index.add(keys)
    settings = {"k": 2, "temperature": 1.0, "mu": 1.0, "lam": 0.5, "probe": 1, "exact_distance": True,
                "exclude_own_row": False, "full_distribution": False}
    analysis = tmp_path / "analysis.tsv"
    analysis.write_text("earlier run\n")
    neighbours = tmp_path / "nb"
    neighbours.mkdir()
    np.save(neighbours / "ids.npy", np.zeros((1, 2), dtype=np.int64))
    before = sha256(neighbours / "ids.npy")
    sample = {"id": torch.tensor([0]), "target": torch.tensor([[2]])}
    lm = torch.log(torch.tensor([[[0.25, 0.25, 0.25, 0.25]]]))  # (B, T, V), P_LM = 1/4 for each word

    def new_handler():
        return ScoreHandler(FakeDatastore(keys, values), index, [], settings, starts=np.array([0]), pad=0,
                            dictionary=["w0", "w1", "w2", "w3"], num_positions=1, analysis_path=str(analysis),
                            neighbours_dir=str(neighbours))

    failing = new_handler()
    with pytest.raises(ValueError, match="--softmax-batch"):
        failing.score_batch(FakeModel(), None, sample, lambda target_only=True: lm.clone())
    assert analysis.read_text() == "earlier run\n"
    assert sha256(neighbours / "ids.npy") == before

    handler = new_handler()
    queries = torch.tensor([[[0.5]]])  # (B, T, d)
    out = handler.score_batch(FakeModel(queries), None, sample, lambda target_only=True: lm.clone())
    assert analysis.read_text() == "earlier run\n"
    handler.finish()

    # Equal distances give each neighbour weight 1/2, and only row 0 has value 2: P_kNN = 1/2 and
    # P = 0.5 * 1/2 + 0.5 * 1/4 = 3/8.
    assert out[0, 0, 2].item() == pytest.approx(np.log(3 / 8), abs=1e-6)
    lines = analysis.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("position\ttarget\tword")
    assert lines[1].split("\t")[:3] == ["0", "2", "w2"]
    np.testing.assert_array_equal(np.load(neighbours / "ids.npy"), [[0, 1]])
    np.testing.assert_allclose(np.load(neighbours / "distances.npy"), [[0.25, 0.25]])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["analysis.tsv", "distances.npy", "ids.npy", "nb"]


@pytest.mark.parametrize("mode", ["eval", "cache"])
def test_k_above_rows_rejected(tiny_data, tiny_models, tiny_datastore, tmp_path, mode):
    cache = ["--ppkd-cache-dir", str(tmp_path / "cache")] if mode == "cache" else []
    with pytest.raises(RuntimeError) as failure:
        eval_lm(tiny_data, tiny_models["student"], "--ppkd-mode", mode, "--ppkd-dstore", tiny_datastore["folder"],
                "--ppkd-k", str(DATASTORE_ROWS + 1), *cache, split="valid")

    message = str(failure.value)
    assert f"--ppkd-k {DATASTORE_ROWS + 1} exceeds the {DATASTORE_ROWS} rows of datastore" in message
    assert f"lower --ppkd-k to at most {DATASTORE_ROWS}" in message
    assert not (tmp_path / "cache").exists()


def test_teachers_at_mu_one_warn(tiny_data, tiny_models, tiny_datastore, tmp_path):
    knn = ["--ppkd-dstore", tiny_datastore["folder"], "--ppkd-k", "4", "--ppkd-mu", "1"]
    with_teachers = eval_lm(tiny_data, tiny_models["student"], *knn, "--ppkd-teachers", "causal",
                            "--ppkd-summary-out", str(tmp_path / "teachers.json"), split="valid")
    without = eval_lm(tiny_data, tiny_models["student"], *knn, "--ppkd-summary-out", str(tmp_path / "knn.json"),
                      split="valid")

    assert with_teachers.count("--ppkd-teachers causal has no effect at --ppkd-mu 1") == 1
    summaries = [json.loads((tmp_path / name).read_text()) for name in ("teachers.json", "knn.json")]
    assert summaries[0]["settings"]["teachers"] == []
    assert summaries[0]["settings"]["unused_teachers"] == ["causal"]
    assert summaries[1]["settings"]["unused_teachers"] == []
    assert summaries[0]["perplexity"] == summaries[1]["perplexity"]
    assert reported_perplexity(with_teachers) == reported_perplexity(without)


# A checkpoint path that does not exist, so these checks must fail before fairseq loads it.
MISSING_CHECKPOINT = "/nonexistent/checkpoint.pt"


@pytest.mark.parametrize("options, message", [
    (["--ppkd-teachers", "causal", "--ppkd-mu", "0.4"],
     "--ppkd-mu 0.4, --ppkd-teachers causal: without --ppkd-dstore, --ppkd-mode eval scores the plain LM"),
    (["--ppkd-lambda", "0.5", "--ppkd-summary-out", "ppkd.json", "--ppkd-exclude-own-row"],
     "--ppkd-lambda 0.5, --ppkd-exclude-own-row, --ppkd-summary-out ppkd.json: without --ppkd-dstore"),
    (["--ppkd-dstore", "ds", "--ppkd-mu", "1.5"], "--ppkd-mu must be in [0, 1], got 1.5"),
    (["--ppkd-dstore", "ds", "--ppkd-temperature", "0"], "--ppkd-temperature must be > 0, got 0.0"),
    (["--ppkd-dstore", "ds", "--ppkd-k", "0"], "--ppkd-k must be >= 1, got 0"),
])
def test_options_checked_before_checkpoint_load(tiny_data, options, message):
    with pytest.raises(RuntimeError) as failure:
        eval_lm(tiny_data, MISSING_CHECKPOINT, *options, split="valid")

    assert message in str(failure.value)
    assert "in setup_task" in str(failure.value)


def test_check_options_defaults_and_dump_modes():
    check_options(default_options())
    # Given explicitly at its default, an option is indistinguishable from an omitted one.
    check_options(default_options(ppkd_mu=1.0, ppkd_lambda=0.25))
    check_options(default_options(ppkd_dstore="ds", ppkd_teachers="causal", ppkd_mu=0.4))
    # The dump modes read none of the scoring options.
    for mode in ("dump", "dump_teacher"):
        check_options(default_options(ppkd_mode=mode, ppkd_dstore="ds", ppkd_k=0, ppkd_mu=2.0))
    with pytest.raises(ValueError, match=r"--ppkd-lambda must be in \[0, 1\], got nan"):
        check_options(default_options(ppkd_mode="cache", ppkd_dstore="ds", ppkd_lambda=float("nan")))
