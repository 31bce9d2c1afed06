"""Split a raw-text corpus 90/5/5 by document and tokenize it with Moses.

The paper splits BookCorpus this way. A document is one ``.txt`` file of a
folder, or one blank-line-separated block of a single text file.
"""

import os
import random

FRACTIONS = (0.90, 0.05, 0.05)


def source_fingerprint(source):
    """Return the name, size and mtime of every document file of ``source``.

    Stored next to the tokenized splits so that a rerun over a changed source
    writes them again. It is cheap because it reads no file contents.
    """
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.endswith(".txt"))
        paths = [os.path.join(source, n) for n in names]
    else:
        paths = [source]
    listing = []
    for path in paths:
        info = os.stat(path)
        listing.append([os.path.basename(path), info.st_size, info.st_mtime_ns])
    return {"source": os.path.abspath(source), "files": listing}


def read_documents(source):
    """Return the documents of ``source`` as lists of non-empty lines."""
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.endswith(".txt"))
        if not names:
            raise FileNotFoundError(f"{source} holds no .txt files; expected one document per file")
        documents = []
        for name in names:
            with open(os.path.join(source, name), encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
            if lines:
                documents.append(lines)
        return documents
    documents, current = [], []
    with open(source, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                current.append(line)
            elif current:
                documents.append(current)
                current = []
    if current:
        documents.append(current)
    return documents


def split_documents(documents, seed=1, fractions=FRACTIONS):
    """Shuffle documents with ``seed`` and split them into train/valid/test.

    Every split gets at least one document when there are three or more.
    """
    if len(documents) < 3:
        raise ValueError(f"{len(documents)} documents cannot be split three ways; need at least 3")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_valid = max(1, round(n * fractions[1]))
    n_test = max(1, round(n * fractions[2]))
    n_train = n - n_valid - n_test
    parts = {
        "train": order[:n_train],
        "valid": order[n_train : n_train + n_valid],
        "test": order[n_train + n_valid :],
    }
    return {split: [documents[i] for i in sorted(idx)] for split, idx in parts.items()}


def write_tokenized(documents, path, lang="en"):
    """Write Moses-tokenized lines, a blank line after each document."""
    from sacremoses import MosesTokenizer

    tokenizer = MosesTokenizer(lang=lang)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for lines in documents:
            for line in lines:
                f.write(tokenizer.tokenize(line, escape=False, return_str=True) + "\n")
            f.write("\n")
    os.replace(tmp, path)
