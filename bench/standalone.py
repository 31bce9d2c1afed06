"""Build the small standalone setup the benchmarks use without a real run.

The setup is a synthetic corpus, a student, two causal teachers, a datastore
over the training split with an IVFPQ index, and both teachers' states. Its
shapes follow the WikiText-2 CPU run at a tenth of the rows: keys of
d = 256 (the student's width), teacher states of d_t = 384 (adaptive
softmax) and 256 (full softmax), and an IVF index whose probed lists hold a
few thousand keys each. Models train for a few updates only, because the
benchmarks measure time and memory, not perplexity.

Every step writes a marker file when it finishes, so a second call with the
same configuration reuses the cached folder.
"""

import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from conftest import eval_lm, run, train  # noqa: E402  (tests/conftest.py)

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/tmp/ppkd-bench"


@dataclass(frozen=True)
class StandaloneConfig:
    """Sizes of the standalone setup; changing any field builds a new one."""

    vocab_size: int = 3000  # word types; Zipf-distributed, so a few hundred dominate
    num_phrases: int = 400  # recurring phrases, shared by all splits so that neighbours match
    train_lines: int = 10_000  # about 20 tokens per line: ~200k datastore rows
    eval_lines: int = 300  # valid and test: ~6k tokens each
    student_dim: int = 256  # key dimension d
    causal_adaptive_dim: int = 384  # teacher "causal_adaptive": d_t of an adaptive softmax teacher
    causal_softmax_dim: int = 256  # teacher "causal_softmax": d_t of a full softmax teacher
    max_update: int = 60  # training updates per model; enough for non-random states
    nlist: int = 256  # IVF lists: ~800 keys each, so 32 probes scan ~25k codes per query
    code_size: int = 32  # PQ bytes per key (8 dimensions per sub-quantizer at d = 256)
    train_size: int = 65_536  # keys sampled to train the index
    seed: int = 1

    def fingerprint(self):
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


@dataclass
class Setup:
    """Paths of one benchmark setup, standalone or real."""

    data: str  # fairseq data-bin
    student: str  # student checkpoint
    dstore: str  # datastore folder with a complete index
    teachers: list  # names of stored teachers
    split: str  # split evaluated


def write_zipf_corpus(path, num_lines, vocab_size, num_phrases, seed):
    """Write lines of Zipf-distributed words, 80% of them inside recurring phrases.

    The phrases come from seed 0 for every split, so a datastore over the
    training split holds neighbours whose values match the other splits.
    """
    words = [f"w{i}" for i in range(vocab_size)]
    weights = [1.0 / (rank + 1) for rank in range(vocab_size)]
    phrase_rng = random.Random(0)
    phrases = [phrase_rng.choices(words, weights, k=phrase_rng.randint(3, 8)) for _ in range(num_phrases)]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num_lines):
            line = []
            length = rng.randint(8, 30)
            while len(line) < length:
                if rng.random() < 0.8:
                    line += rng.choice(phrases)
                else:
                    line += rng.choices(words, weights)
            f.write(" ".join(line) + "\n")


def _step_done(folder, name):
    return os.path.exists(os.path.join(folder, f".done-{name}"))


def _mark_done(folder, name):
    with open(os.path.join(folder, f".done-{name}"), "w") as f:
        f.write("done\n")


def _model_args(dim, extra):
    # These flags follow conftest.COMMON_LM on train()'s command line, and
    # argparse keeps the last value of a repeated flag. Blocks of 256 tokens allow evaluating
    # with --tokens-per-sample 256 --context-window 128, as the WikiText-2 run does.
    return [
        "--decoder-embed-dim", str(dim), "--decoder-ffn-embed-dim", str(4 * dim),
        "--decoder-attention-heads", "4", "--decoder-normalize-before",
        "--tokens-per-sample", "256", "--max-tokens", "2048",
    ] + extra


def build_standalone(cache_dir=DEFAULT_CACHE_DIR, config=StandaloneConfig()):
    """Build, or reuse, the standalone setup in ``cache_dir`` and return its :class:`Setup`."""
    from ppkd_fairseq.index import build_index

    root = os.path.join(cache_dir, f"standalone-{config.fingerprint()}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    data = os.path.join(root, "data-bin")
    checkpoints = {name: os.path.join(root, name, "checkpoint_last.pt")
                   for name in ("student", "causal_adaptive", "causal_softmax")}
    dstore = os.path.join(root, "datastore")

    if not _step_done(root, "data"):
        logger.info("writing the synthetic corpus into %s", root)
        raw = os.path.join(root, "raw")
        os.makedirs(raw, exist_ok=True)
        for split, lines, seed in (("train", config.train_lines, 1), ("valid", config.eval_lines, 2),
                                   ("test", config.eval_lines, 3)):
            write_zipf_corpus(os.path.join(raw, f"{split}.tokens"), lines, config.vocab_size,
                              config.num_phrases, config.seed + seed)
        run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
             "--trainpref", os.path.join(raw, "train.tokens"), "--validpref", os.path.join(raw, "valid.tokens"),
             "--testpref", os.path.join(raw, "test.tokens"), "--destdir", data, "--workers", "1"])
        _mark_done(root, "data")

    models = {
        "student": _model_args(config.student_dim, ["--share-decoder-input-output-embed"]),
        "causal_adaptive": _model_args(
            config.causal_adaptive_dim,
            ["--criterion", "adaptive_loss", "--adaptive-softmax-cutoff", "500,1500",
             "--adaptive-softmax-factor", "4", "--ddp-backend", "legacy_ddp"]),
        "causal_softmax": _model_args(config.causal_softmax_dim, ["--share-decoder-input-output-embed"]),
    }
    for name, extra in models.items():
        if not _step_done(root, name):
            logger.info("training %s (%d updates)", name, config.max_update)
            path = train(data, os.path.join(root, name), extra + ["--max-update", str(config.max_update)])
            if path != checkpoints[name]:
                os.replace(path, checkpoints[name])
            _mark_done(root, name)

    dump_args = ["--tokens-per-sample", "256", "--context-window", "128", "--max-tokens", "2048"]
    if not _step_done(root, "datastore"):
        logger.info("dumping the datastore over the training split")
        eval_lm(data, checkpoints["student"], "--ppkd-mode", "dump", "--ppkd-dstore", dstore,
                "--ppkd-overwrite", *dump_args)
        build_index(dstore, nlist=config.nlist, code_size=config.code_size, train_size=config.train_size,
                    flat_below=0)
        _mark_done(root, "datastore")
    for name in ("causal_adaptive", "causal_softmax"):
        if not _step_done(root, f"teacher-{name}"):
            logger.info("dumping teacher %s", name)
            eval_lm(data, checkpoints[name], "--ppkd-mode", "dump_teacher", "--ppkd-dstore", dstore,
                    "--ppkd-teacher-name", name, *dump_args)
            _mark_done(root, f"teacher-{name}")

    return Setup(data=data, student=checkpoints["student"], dstore=dstore,
                 teachers=["causal_adaptive", "causal_softmax"], split="test")

