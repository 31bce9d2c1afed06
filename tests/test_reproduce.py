"""The reproduction scripts: dry runs of every recipe and the WikiText-2 smoke run."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("WIKITEXT_DIR", os.path.join(os.path.dirname(REPO), "shared", "data"))

SCRIPTS = {
    "reproduce_wikitext2.sh": ["prepare_data", "train_student", "train_teacher", "train_mlm_teacher",
                               "dump_datastore", "build_index", "dump_teacher_causal", "dump_teacher_masked",
                               "sweep_valid", "sweep_test", "train_student_kd", "dump_datastore_kd",
                               "build_index_kd", "sweep_valid_kd", "sweep_test_kd", "report_kd"],
    "reproduce_table1.sh": ["train_student", "train_teacher", "dump_datastore", "dump_teacher_causal",
                            "sweep_valid", "train_student_kd", "dump_datastore_kd", "report_kd"],
    "reproduce_table2.sh": ["train_mlm_teacher", "dump_teacher_masked", "report"],
    "reproduce_table4.sh": ["train_student_small", "dump_datastore_gpt2small", "train_student_kd_small",
                            "dump_datastore_kd_mid", "sweep_test_kd_gpt2small", "report_gpt2small"],
}


def dry_run(script, run_dir, **variables):
    """Run ``scripts/SCRIPT --dry-run`` with RUN_DIR and ``variables`` set; return its stdout."""
    env = dict(os.environ, RUN_DIR=str(run_dir), **variables)
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", script), "--dry-run"],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


def printed_stages(stdout):
    """Return the stage names of a dry run's ``# stage NAME`` lines."""
    return [line.split()[-1] for line in stdout.splitlines() if line.startswith("# stage ")]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_dry_run_prints_stages(script, tmp_path):
    stages = printed_stages(dry_run(script, tmp_path / "run", NUM_SHARDS="2"))
    for stage in SCRIPTS[script]:
        assert stage in stages, f"{script} dry run lacks stage {stage}"
    assert not (tmp_path / "run" / "stages").exists(), "a dry run must not record stages"


def test_skip_kd_leaves_out_kd_stages(tmp_path):
    stages = printed_stages(dry_run("reproduce_wikitext2.sh", tmp_path / "run", SKIP_KD="1"))
    assert "report" in stages
    assert "sweep_test" in stages
    assert not [stage for stage in stages if "_kd" in stage]


def test_dry_run_shards_dumps(tmp_path):
    stdout = dry_run("reproduce_table1.sh", tmp_path / "run", NUM_SHARDS="4")
    dump = [line for line in stdout.splitlines() if "--ppkd-mode dump " in line]
    assert dump and dump[0].startswith("shards fairseq-eval-lm")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "wikitext-2")),
                    reason=f"WikiText-2 token files not found in {SHARED_DATA} (set WIKITEXT_DIR)")
def test_wikitext2_smoke_run(tmp_path):
    run_dir = tmp_path / "smoke"
    env = dict(os.environ, RUN_DIR=str(run_dir), WIKITEXT_DIR=SHARED_DATA, CHECK_TEST="1")
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "reproduce_wikitext2.sh"), "--smoke"],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(run_dir / "results" / "results.json") as f:
        report = json.load(f)
    systems = [row["system"] for row in report["rows"]]
    assert systems[:2] == ["LM", "kNN-LM"]
    assert "PP-KD (causal + masked)" in systems
    via_kd = {row["label"]: row for row in report["rows"] if row["training"] == "via KD"}
    assert sorted(via_kd) == ["knn_lm_kd", "lm_kd"]
    assert via_kd["knn_lm_kd"]["mu"] == 1.0
    assert 0.0 <= via_kd["knn_lm_kd"]["p_value_vs_knn_lm"] <= 1.0
    for row in report["rows"]:
        assert row["test_perplexity"] > 1.0
    assert set(report["teachers"]) == {"causal", "masked"}
    check = report["checks"][0]
    # The table scores the test split from the sweep cache; the stock
    # fairseq-eval-lm run at the same point must agree.
    assert check["table_perplexity"] == pytest.approx(check["fairseq_eval_lm_perplexity"], rel=1e-5)
    # A rerun skips every finished stage.
    again = subprocess.run(["bash", os.path.join(REPO, "scripts", "reproduce_wikitext2.sh"), "--smoke"],
                           capture_output=True, text=True, env=env, cwd=REPO)
    assert again.returncode == 0
    assert "running:" not in again.stdout
