"""Build the FAISS index over a datastore's keys.

Examples::

    # The defaults: IVF4096,PQ64x8 trained on 1,000,000 sampled keys
    python -m ppkd_fairseq.cli.build_index datastores/wikitext-103-train

    # A datastore whose codes exceed RAM: inverted lists in index/index.ivfdata
    python -m ppkd_fairseq.cli.build_index datastores/big --ondisk

The index goes to DSTORE_DIR/index/. A complete index built from the same
datastore with the same options is kept; pass --overwrite to rebuild it.
"""

import argparse
import logging
import os
import sys

from ppkd_fairseq import index as faiss_index
from ppkd_fairseq.manifest import DatastoreMismatchError

logger = logging.getLogger("ppkd_fairseq.build_index")


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dstore_dir", metavar="DSTORE_DIR", help="datastore folder with a complete manifest.json")

    shape = parser.add_argument_group("index shape")
    shape.add_argument(
        "--nlist",
        type=int,
        default=4096,
        help="IVF cells (coarse centroids); shrunk to a power of two with 39 training keys per "
        "cell when the training sample is smaller (default: 4096)",
    )
    shape.add_argument(
        "--code-size",
        type=int,
        default=64,
        help="PQ sub-quantizers M, which is the code size in bytes per key at 8 bits; lowered to "
        "the largest divisor of the key dimension when it does not divide it (default: 64)",
    )
    shape.add_argument("--nbits", type=int, default=8, help="bits per PQ sub-quantizer code, 1..16 (default: 8)")
    shape.add_argument(
        "--flat-below",
        type=int,
        default=faiss_index.FLAT_BELOW,
        help="datastores with fewer keys than this get an exact IndexFlatL2 instead of IVFPQ "
        f"(default: {faiss_index.FLAT_BELOW} keys)",
    )

    build = parser.add_argument_group("build")
    build.add_argument(
        "--train-size",
        type=int,
        default=1_000_000,
        help="keys sampled at random, without replacement, to train the index (default: 1000000)",
    )
    build.add_argument("--seed", type=int, default=1, help="seed of the training sample and of k-means (default: 1)")
    build.add_argument(
        "--add-batch",
        type=int,
        default=faiss_index.ADD_BATCH,
        help="keys read, cast to float32 and added per step, and keys per shard with --ondisk "
        f"(default: {faiss_index.ADD_BATCH})",
    )
    build.add_argument(
        "--gpu",
        action="store_true",
        help="train and add on the current CUDA device; needs faiss-gpu (default: CPU)",
    )
    build.add_argument(
        "--ondisk",
        action="store_true",
        help="store the inverted lists in index/index.ivfdata, mapped from disk at search time, "
        "for datastores whose PQ codes exceed RAM (IVFPQ only)",
    )
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild even when a complete index for this datastore and these options exists",
    )
    return parser


def main(argv=None):
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        level=logging.INFO,
        stream=sys.stdout,
    )
    args = get_parser().parse_args(argv)
    request = {
        "nlist": args.nlist,
        "code_size": args.code_size,
        "nbits": args.nbits,
        "train_size": args.train_size,
        "seed": args.seed,
        "flat_below": args.flat_below,
        "ondisk": args.ondisk,
    }
    try:
        # Before the up-to-date check, which would report an invalid size as a changed option.
        faiss_index.check_batch_sizes(args.train_size, args.add_batch)
        manifest = faiss_index.read_datastore_manifest(args.dstore_dir)
        if not args.overwrite and _is_up_to_date(args.dstore_dir, manifest, request):
            return
        faiss_index.build_index(
            args.dstore_dir,
            nlist=args.nlist,
            code_size=args.code_size,
            nbits=args.nbits,
            train_size=args.train_size,
            add_batch=args.add_batch,
            seed=args.seed,
            use_gpu=args.gpu,
            ondisk=args.ondisk,
            flat_below=args.flat_below,
        )
    except (DatastoreMismatchError, ValueError, faiss_index.GpuUnavailableError) as err:
        raise SystemExit(f"error: {err}")


def _is_up_to_date(dstore_dir, manifest, request):
    """Return True when the existing index matches the datastore and ``request``.

    An index built with other options stops the command, because replacing it
    silently would lose it; an invalid or unfinished one is rebuilt.
    """
    if not os.path.exists(faiss_index.metadata_path(dstore_dir)):
        return False
    try:
        metadata = faiss_index.read_index_metadata(dstore_dir)
        faiss_index.check_index_metadata(metadata, manifest, dstore_dir)
    except DatastoreMismatchError as err:
        logger.info("rebuilding the index: %s", err)
        return False

    built_with = metadata.get("request", {})
    changed = sorted(name for name in request if built_with.get(name) != request[name])
    if changed:
        differences = ", ".join(f"{name} {built_with.get(name)!r} -> {request[name]!r}" for name in changed)
        raise SystemExit(
            f"error: {faiss_index.metadata_path(dstore_dir)} was built with other options "
            f"({differences}); pass --overwrite to rebuild it"
        )
    logger.info(
        "the index in %s is up to date (%s over %d keys); pass --overwrite to rebuild it",
        faiss_index.index_folder(dstore_dir),
        metadata["config"]["factory"],
        metadata["num_rows"],
    )
    return True


if __name__ == "__main__":
    main()
