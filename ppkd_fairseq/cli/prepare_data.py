"""Prepare WikiText or a raw-text corpus as a fairseq data-bin folder.

Examples::

    # WikiText-2 from local copies (plain or .xz token files)
    python -m ppkd_fairseq.cli.prepare_data wikitext-2 --source ../shared/data --destdir data-bin/wikitext-2

    # WikiText-103, downloaded from the first mirror that answers
    python -m ppkd_fairseq.cli.prepare_data wikitext-103 --destdir data-bin/wikitext-103

    # Any raw-text corpus (for example BookCorpus): 90/5/5 split by document
    python -m ppkd_fairseq.cli.prepare_data text --source books/ --destdir data-bin/books

A rerun with unchanged inputs does nothing.
"""

import argparse
import io
import json
import logging
import os
import sys

from ppkd_fairseq.data import binarize, corpus, wikitext

logger = logging.getLogger("ppkd_fairseq.prepare_data")

# Records which source and seed produced the tokenized splits of 'text'.
TEXT_STAMP = "text_split.json"


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "corpus",
        choices=["wikitext-2", "wikitext-103", "text"],
        help="which corpus: the official WikiText token files, or 'text' for a raw-text corpus",
    )
    parser.add_argument(
        "--source",
        default=os.environ.get("WIKITEXT_DIR"),
        help="folder or archive with the token files (.tokens or .tokens.xz); for 'text', a "
        "folder of .txt documents or one file with blank-line-separated documents "
        "(default: $WIKITEXT_DIR; WikiText is downloaded when neither is set)",
    )
    parser.add_argument("--destdir", required=True, help="output data-bin folder")
    parser.add_argument(
        "--rawdir",
        default=None,
        help="where the verified token files go (default: DESTDIR/raw)",
    )
    parser.add_argument(
        "--srcdict",
        default=None,
        help="reuse this dict.txt instead of building one from the training split, so "
        "that another model (for example a masked-LM teacher) shares the vocabulary",
    )
    parser.add_argument(
        "--splits",
        default="train,valid,test",
        help="comma-separated splits to prepare (default: train,valid,test)",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="fail instead of downloading when --source is not given",
    )
    parser.add_argument(
        "--max-lines",
        type=int,
        default=None,
        help="keep only the first MAX_LINES lines of each verified split (for smoke tests; the "
        "slices go to RAWDIR/slice-MAX_LINES)",
    )
    parser.add_argument("--seed", type=int, default=1, help="document shuffle seed for 'text' (default: 1)")
    parser.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers (default: 1)")
    return parser


def main(argv=None):
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=logging.INFO,
        stream=sys.stdout,
    )
    args = get_parser().parse_args(argv)
    rawdir = args.rawdir or os.path.join(args.destdir, "raw")
    splits = tuple(s for s in args.splits.split(",") if s)
    for split in splits:
        if split not in wikitext.SPLITS:
            raise SystemExit(f"invalid split {split!r} in --splits; expected some of train,valid,test")

    if args.corpus == "text":
        if args.source is None:
            raise SystemExit("'text' needs --source: a folder of .txt documents or one text file")
        paths = _prepare_text(args.source, rawdir, args.seed)
    else:
        if args.source is None and args.no_download:
            raise SystemExit(
                f"no --source and no $WIKITEXT_DIR for {args.corpus}, and --no-download is set; "
                f"pass the folder or archive holding the token files"
            )
        try:
            paths = wikitext.fetch_token_files(
                args.corpus, rawdir, source=args.source, splits=splits, download=not args.no_download
            )
        except (wikitext.ChecksumError, RuntimeError, FileNotFoundError, ValueError) as err:
            # A mismatch, a damaged file, a failed download or a missing or
            # unusable source is a user error, so it ends with its message
            # (which names the fix) instead of a traceback.
            raise SystemExit(f"error: {err}")
    paths = {s: p for s, p in paths.items() if s in splits}
    if args.max_lines is not None:
        paths = _slice(paths, os.path.join(rawdir, f"slice-{args.max_lines}"), args.max_lines)

    srcdict = args.srcdict
    if "train" not in paths and srcdict is None:
        srcdict = _dictionary_without_train(paths, args.destdir)
    binarize.binarize(paths, args.destdir, srcdict=srcdict, workers=args.workers)
    logger.info("prepared %s in %s (splits: %s)", args.corpus, args.destdir, ",".join(sorted(paths)))


def _slice(paths, folder, max_lines):
    if max_lines < 1:
        raise SystemExit(f"--max-lines must be >= 1, got {max_lines}")
    os.makedirs(folder, exist_ok=True)
    sliced = {}
    for split, path in paths.items():
        out = os.path.join(folder, os.path.basename(path))
        if not os.path.exists(out):
            tmp = out + ".tmp"
            with open(path, encoding="utf-8") as fin, open(tmp, "w", encoding="utf-8") as fout:
                for i, line in enumerate(fin):
                    if i >= max_lines:
                        break
                    fout.write(line)
            os.replace(tmp, out)
        sliced[split] = out
    return sliced


def _prepare_text(source, rawdir, seed):
    # The split and tokenization are redone only when the source files or the
    # seed differ from those recorded in the stamp, which is written last.
    os.makedirs(rawdir, exist_ok=True)
    paths = {split: os.path.join(rawdir, f"{split}.tokens") for split in wikitext.SPLITS}
    stamp_path = os.path.join(rawdir, TEXT_STAMP)
    expected = {
        "seed": seed,
        "fractions": list(corpus.FRACTIONS),
        "tokenizer": "sacremoses en, escape=False",
        **corpus.source_fingerprint(source),
    }
    if os.path.exists(stamp_path) and all(os.path.exists(p) for p in paths.values()):
        with open(stamp_path) as f:
            if json.load(f) == expected:
                logger.info("%s already contains the split of %s; reusing it", rawdir, source)
                return paths
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    parts = corpus.split_documents(corpus.read_documents(source), seed=seed)
    for split, documents in parts.items():
        logger.info("%s: %d documents", split, len(documents))
        corpus.write_tokenized(documents, paths[split])
    tmp = stamp_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(expected, f, indent=2)
    os.replace(tmp, stamp_path)
    return paths


def _dictionary_without_train(paths, destdir):
    # WikiText-103's training split is 540 MB and often absent (for example
    # when only valid and test are at hand). A dictionary from the available
    # splits keeps them usable for tests, but it is not the official one.
    from fairseq.data import Dictionary

    logger.warning(
        "no training split: building the dictionary from %s. Models trained on the "
        "official training split need its dict.txt; pass it with --srcdict.",
        ",".join(sorted(paths)),
    )
    os.makedirs(destdir, exist_ok=True)
    path = os.path.join(destdir, "dict.from-eval-splits.txt")
    dictionary = Dictionary()
    for split in sorted(paths):
        Dictionary.add_file_to_dictionary(paths[split], dictionary, _tokenize_line, 1)
    dictionary.finalize(padding_factor=8)
    # Rewriting an identical file would only change its mtime, so an
    # unchanged rerun leaves it alone; changed inputs replace it.
    buffer = io.StringIO()
    dictionary.save(buffer)
    content = buffer.getvalue()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == content:
                return path
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
    os.replace(tmp, path)
    return path


def _tokenize_line(line):
    from fairseq.tokenizer import tokenize_line

    return tokenize_line(line)


if __name__ == "__main__":
    main()
