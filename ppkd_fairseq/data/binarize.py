"""Binarize token files into a fairseq data-bin folder, once per input.

A stamp file records the SHA-1 of every input and the settings; it is written
last, so a folder without a matching stamp is an interrupted or stale run and
is binarized again from scratch.
"""

import json
import logging
import os
import subprocess
import sys

from .wikitext import SPLITS, sha1_of_file

logger = logging.getLogger(__name__)

STAMP = "ppkd_prepared.json"


def _expected_stamp(splits, srcdict, workers):
    return {
        "inputs": {split: sha1_of_file(path) for split, path in sorted(splits.items())},
        "srcdict": sha1_of_file(srcdict) if srcdict else None,
        "format": "fairseq-preprocess --only-source",
    }


def is_prepared(destdir, splits, srcdict=None, workers=1):
    """Return True when ``destdir`` holds a finished run over the same inputs."""
    stamp_path = os.path.join(destdir, STAMP)
    if not os.path.exists(stamp_path):
        return False
    with open(stamp_path) as f:
        stamp = json.load(f)
    if stamp != _expected_stamp(splits, srcdict, workers):
        return False
    needed = ["dict.txt"] + [f"{s}.{ext}" for s in splits for ext in ("bin", "idx")]
    return all(os.path.exists(os.path.join(destdir, name)) for name in needed)


def binarize(splits, destdir, srcdict=None, workers=1):
    """Run ``fairseq-preprocess --only-source`` over token files.

    Args:
        splits: dict ``split -> token file``; the dictionary is built from
            ``train`` unless ``srcdict`` is given.
        destdir: output data-bin folder (``dict.txt``, ``{split}.bin/.idx``).
        srcdict: an existing ``dict.txt`` to reuse, so that every model
            trained on ``destdir`` shares one vocabulary.
        workers: fairseq-preprocess worker processes.

    Returns True when it ran, False when ``destdir`` was already up to date.
    """
    if not splits:
        raise ValueError("no token files to binarize")
    if "train" not in splits and srcdict is None:
        raise ValueError(
            f"no training split among {sorted(splits)} and no --srcdict: the "
            f"dictionary must come from the training split. Pass the training "
            f"split's dict.txt with --srcdict."
        )
    if is_prepared(destdir, splits, srcdict, workers):
        logger.info("%s is up to date; nothing to do", destdir)
        return False
    os.makedirs(destdir, exist_ok=True)
    stamp_path = os.path.join(destdir, STAMP)
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    # Outputs of an interrupted or older run go first: fairseq-preprocess
    # raises FileExistsError on an existing dict.txt unless --srcdict is set,
    # and a split left from another dictionary would not match the new one.
    for name in ["dict.txt"] + [f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")]:
        path = os.path.join(destdir, name)
        if os.path.exists(path):
            logger.info("removing %s from an unfinished or outdated run", path)
            os.remove(path)
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source"]
    prefix_flag = {"train": "--trainpref", "valid": "--validpref", "test": "--testpref"}
    for split, path in splits.items():
        # Without --source-lang, fairseq reads the prefix itself as the file.
        cmd += [prefix_flag[split], path]
    if srcdict:
        cmd += ["--srcdict", srcdict]
    cmd += ["--destdir", destdir, "--workers", str(workers)]
    logger.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    stamp = _expected_stamp(splits, srcdict, workers)
    tmp = stamp_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stamp, f, indent=2)
    os.replace(tmp, stamp_path)
    return True
