"""Shared fixtures: a tiny corpus and tiny trained fairseq models.

The models train for a few updates on a seeded synthetic corpus, which
takes a few seconds each on a CPU; they are built once per test session.
"""

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "ppkd_fairseq")

WORDS = [f"w{i}" for i in range(60)]


def write_corpus(path, num_lines, seed):
    """Write lines of words drawn from 25 shared phrases plus noise.

    The phrases are the same for every split (seed 0), so that a datastore
    over the training split finds matches for the other splits.
    """
    phrase_rng = random.Random(0)
    phrases = [[phrase_rng.choice(WORDS) for _ in range(phrase_rng.randint(3, 6))] for _ in range(25)]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_lines):
            line = []
            while len(line) < rng.randint(6, 18):
                line += rng.choice(phrases) if rng.random() < 0.8 else [rng.choice(WORDS)]
            f.write(" ".join(line) + "\n")


def run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"command failed: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A binarized tiny corpus: train, valid and test."""
    root = tmp_path_factory.mktemp("tiny_data")
    raw = root / "raw"
    raw.mkdir()
    for split, lines, seed in (("train", 300, 1), ("valid", 40, 2), ("test", 40, 3)):
        write_corpus(raw / f"{split}.tokens", lines, seed)
    dest = root / "data-bin"
    run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
         "--trainpref", str(raw / "train.tokens"), "--validpref", str(raw / "valid.tokens"),
         "--testpref", str(raw / "test.tokens"), "--destdir", str(dest), "--workers", "1"])
    return str(dest)


COMMON_LM = [
    "--task", "language_modeling", "--arch", "transformer_lm",
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "2", "--tokens-per-sample", "32", "--sample-break-mode", "none",
    "--max-tokens", "512", "--optimizer", "adam", "--lr", "0.005", "--max-update", "30",
    "--dropout", "0.0", "--seed", "1", "--cpu", "--no-epoch-checkpoints",
    "--disable-validation", "--log-format", "simple", "--log-interval", "100",
]


def train(data, save_dir, extra):
    run([sys.executable, "-m", "fairseq_cli.train", data, "--save-dir", str(save_dir)] + COMMON_LM + extra)
    # --no-last-checkpoints with --disable-validation leaves checkpoint_best.pt
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint1.pt"):
        path = os.path.join(save_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no checkpoint in {save_dir}: {os.listdir(save_dir)}")


@pytest.fixture(scope="session")
def tiny_models(tiny_data, tmp_path_factory):
    """Checkpoints: pre-norm and post-norm students, an adaptive-softmax teacher."""
    root = tmp_path_factory.mktemp("tiny_models")
    models = {
        "student": train(tiny_data, root / "student",
                         ["--decoder-normalize-before", "--share-decoder-input-output-embed"]),
        "student_postnorm": train(tiny_data, root / "student_postnorm", ["--share-decoder-input-output-embed"]),
        "teacher_adaptive": train(
            tiny_data, root / "teacher_adaptive",
            ["--decoder-normalize-before", "--criterion", "adaptive_loss", "--adaptive-softmax-cutoff", "20,40",
             "--adaptive-softmax-factor", "2", "--ddp-backend", "legacy_ddp"]),
    }
    return models


@pytest.fixture(scope="session")
def tiny_mlm(tiny_data, tmp_path_factory):
    """A tiny masked LM (fairseq's roberta on the masked_lm task)."""
    root = tmp_path_factory.mktemp("tiny_mlm")
    run([sys.executable, "-m", "fairseq_cli.train", tiny_data, "--save-dir", str(root),
         "--task", "masked_lm", "--arch", "roberta", "--criterion", "masked_lm",
         "--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
         "--encoder-attention-heads", "2", "--max-positions", "64", "--tokens-per-sample", "64",
         "--sample-break-mode", "none", "--max-tokens", "512", "--optimizer", "adam", "--lr", "0.005",
         "--max-update", "30", "--dropout", "0.0", "--attention-dropout", "0.0", "--seed", "1", "--cpu",
         "--no-epoch-checkpoints", "--disable-validation",
         "--log-format", "simple", "--log-interval", "100"])
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(os.listdir(root))


def eval_lm(data, checkpoint, *extra, split="train"):
    """Run stock fairseq-eval-lm with the plugin and return its output."""
    cmd = [sys.executable, "-m", "fairseq_cli.eval_lm", data, "--path", checkpoint,
           "--user-dir", USER_DIR, "--task", "ppkd_language_modeling", "--gen-subset", split,
           "--cpu", "--max-tokens", "256", "--tokens-per-sample", "32", "--no-progress-bar",
           "--log-format", "simple"] + list(extra)
    result = run(cmd)
    return result.stdout + result.stderr


def reported_perplexity(output):
    line = [l for l in output.splitlines() if "Loss (base 2)" in l][-1]
    return float(line.rsplit("Perplexity:", 1)[1].strip())


def file_snapshot(folder, names=("keys.npy", "values.npy")):
    """Return ``{name: (sha256, mtime_ns)}`` of files in ``folder``."""
    snapshot = {}
    for name in names:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        snapshot[name] = (digest, os.stat(path).st_mtime_ns)
    return snapshot


@pytest.fixture(scope="session")
def tiny_datastore(tiny_data, tiny_models, tmp_path_factory):
    """A datastore over the train split, with an exact index and two teachers.

    Keys come from the pre-norm ``student`` with eval_lm's default batching.
    Teacher ``causal`` is the adaptive-softmax LM and teacher ``postnorm``
    the post-norm student (a full softmax).

    Returns:
        dict with ``folder`` and ``before_teachers``, the
        :func:`file_snapshot` of keys.npy and values.npy taken after the
        index was built and before any teacher was added.
    """
    from ppkd_fairseq.index import build_index

    folder = str(tmp_path_factory.mktemp("tiny_datastore") / "train")
    eval_lm(tiny_data, tiny_models["student"], "--ppkd-mode", "dump", "--ppkd-dstore", folder)
    build_index(folder)  # under flat_below keys, so an exact IndexFlatL2
    before_teachers = file_snapshot(folder)
    for name, model in (("causal", "teacher_adaptive"), ("postnorm", "student_postnorm")):
        eval_lm(tiny_data, tiny_models[model], "--ppkd-mode", "dump_teacher", "--ppkd-dstore", folder,
                "--ppkd-teacher-name", name)
    return {"folder": folder, "before_teachers": before_teachers}


class FakeDatastore:
    """A datastore's keys, values and identity, for handlers built without files."""

    def __init__(self, keys, values):
        self.keys = keys
        self.values = values
        self.folder = "fake"
        self.num_rows = len(values)
        self.manifest = {"datastore_id": "fake"}


def edit_json(path, edit):
    """Apply ``edit`` to the JSON object in ``path`` and write it back."""
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f)
