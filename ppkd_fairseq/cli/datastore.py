"""Inspect and extend PP-KD datastores.

Subcommands::

    info DSTORE                      rows, files, sizes, teachers and index
    add-masked-teacher DSTORE ...    dump a masked LM's states as a teacher
    remove-teacher DSTORE --name N   delete a teacher (K and V are untouched)
    import-knnlm DSTORE ...          wrap memmaps written by the original
                                     kNN-LM code in a manifest, without copying

Keys, values and causal-teacher states are dumped with fairseq-eval-lm (see
the README); the FAISS index with ``python -m ppkd_fairseq.cli.build_index``.
"""

import argparse
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np

logger = logging.getLogger("ppkd_fairseq.datastore")


def _human(num_bytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


def _file_size(folder, spec):
    path = spec["file"] if os.path.isabs(spec["file"]) else os.path.join(folder, spec["file"])
    return os.path.getsize(path) if os.path.exists(path) else 0


def cmd_info(args):
    from ppkd_fairseq.datastore import Datastore

    store = Datastore.open(args.dstore)
    m = store.manifest
    report = {
        "folder": os.path.abspath(args.dstore),
        "rows": m["num_rows"],
        "key_dim": m["key_dim"],
        "keys": f"{m['keys']['dtype']}, {_human(_file_size(args.dstore, m['keys']))}",
        "values": f"{m['values']['dtype']}, {_human(_file_size(args.dstore, m['values']))}",
        "corpus": m.get("corpus"),
        "dictionary_size": m["dictionary"]["size"],
        "teachers": {},
    }
    for name in store.teacher_names():
        teacher = store.open_teacher(name)
        tm = teacher.manifest
        report["teachers"][name] = {
            "kind": tm.get("kind"),
            "states": f"{tm['states']['dtype']} {tm['states']['shape']}, "
                      f"{_human(_file_size(teacher.folder, tm['states']))}",
            "lognorm": _human(_file_size(teacher.folder, tm["lognorm"])),
            "head": tm["head"]["type"],
        }
    index_json = os.path.join(args.dstore, "index", "index.json")
    if os.path.exists(index_json):
        with open(index_json) as f:
            meta = json.load(f)
        size = sum(
            os.path.getsize(os.path.join(args.dstore, "index", name))
            for name in os.listdir(os.path.join(args.dstore, "index"))
            if not name.endswith(".json")
        )
        report["index"] = {"status": meta.get("status"), "factory": meta.get("config", {}).get("factory"),
                           "size": _human(size)}
    print(json.dumps(report, indent=2))


def _load_checkpoint(path, data, cpu):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0]
    model.eval()
    if not cpu:
        import torch

        if torch.cuda.is_available():
            model.cuda()
    return model, task


def _read_stream(data, split, dictionary):
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(os.path.join(data, split), dictionary)
    if dataset is None:
        raise FileNotFoundError(f"split {split!r} not found in {data}; expected {split}.bin and {split}.idx")
    return np.concatenate([dataset[i].numpy() for i in range(len(dataset))]).astype(np.int64)


def _dictionary_prefix_fingerprint(dictionary, size):
    digest = hashlib.sha256("\n".join(dictionary.symbols[:size]).encode("utf-8")).hexdigest()
    return {"sha256": digest, "size": size}


def cmd_add_masked_teacher(args):
    import torch

    from ppkd_fairseq import manifest as mf
    from ppkd_fairseq.datastore import Datastore
    from ppkd_fairseq.dump import TeacherWriter, check_teacher_absent
    from ppkd_fairseq.masked_teacher import dump_masked_states, forward_passes_per_token, masked_teacher_head

    store = Datastore.open(args.dstore)
    if not args.overwrite:
        check_teacher_absent(store, args.name)  # before the checkpoint and the split are read
    vocab = store.manifest["dictionary"]["size"]
    model, task = _load_checkpoint(args.checkpoint, args.data, args.cpu)
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "lm_head"):
        raise SystemExit(f"{args.checkpoint} is not a fairseq masked LM (RoBERTa) checkpoint; "
                         f"for a causal teacher use fairseq-eval-lm --ppkd-mode dump_teacher")
    dictionary = task.source_dictionary
    mask_idx = dictionary.index("<mask>")
    if mask_idx < vocab:
        raise mf.DatastoreMismatchError(
            f"the teacher's <mask> has id {mask_idx}, inside the datastore's {vocab}-word vocabulary; the "
            f"teacher's dictionary must be the datastore's dict.txt plus <mask>")
    fingerprint = _dictionary_prefix_fingerprint(dictionary, vocab)
    stream = _read_stream(args.data, args.split, task.source_dictionary)
    if len(stream) != store.num_rows:
        raise mf.DatastoreMismatchError(
            f"split {args.split} of {args.data} has {len(stream)} tokens but datastore {args.dstore} has "
            f"{store.num_rows} rows; pass the data-bin and split the datastore was dumped from "
            f"({store.manifest.get('corpus')})")
    stride = None if args.exact else args.stride
    head = masked_teacher_head(model, vocab)
    metadata = {
        "kind": "masked",
        "teacher": {"fingerprint": mf.model_fingerprint(model), "path": os.path.abspath(args.checkpoint)},
        "corpus": {"data": os.path.abspath(args.data), "split": args.split},
        "masking": {"mode": "exact" if stride is None else "strided", "stride": stride,
                    "window": args.window, "context": args.context},
    }
    writer = TeacherWriter(store, args.name, head, metadata, fingerprint,
                           shard_id=args.shard_id, num_shards=args.num_shards, overwrite=args.overwrite)
    logger.info("masked teacher %r: %d tokens, %s masking, about %.1f forward tokens per token",
                args.name, len(stream), metadata["masking"]["mode"],
                forward_passes_per_token(args.window, args.context, stride))
    device = next(model.parameters()).device
    started = time.time()
    dump_masked_states(model, stream, dictionary.bos(), mask_idx, dictionary.pad(), writer,
                       window=args.window, context=args.context, stride=stride, max_tokens=args.max_tokens,
                       shard_id=args.shard_id, num_shards=args.num_shards, device=device)
    writer.finish()
    logger.info("masked teacher pass took %.1f s", time.time() - started)


def cmd_remove_teacher(args):
    from ppkd_fairseq.datastore import Datastore

    Datastore.open(args.dstore).remove_teacher(args.name)
    logger.info("removed teacher %r from %s", args.name, args.dstore)


def cmd_import_knnlm(args):
    from ppkd_fairseq import manifest as mf
    from ppkd_fairseq.datastore import MANIFEST, new_datastore_id

    key_dtype = np.dtype(args.keys_dtype)
    value_dtype = np.dtype(args.values_dtype)
    key_bytes = os.path.getsize(args.keys)
    row_bytes = args.dim * key_dtype.itemsize
    if key_bytes % row_bytes:
        raise SystemExit(f"{args.keys} has {key_bytes} bytes, not a multiple of dim {args.dim} x "
                         f"{key_dtype.itemsize} bytes; check --dim and --keys-dtype")
    num_rows = key_bytes // row_bytes
    value_bytes = os.path.getsize(args.values)
    if value_bytes != num_rows * value_dtype.itemsize:
        raise SystemExit(
            f"{args.values} has {value_bytes} bytes but {num_rows} rows of {value_dtype.name} need "
            f"{num_rows * value_dtype.itemsize}; check --values-dtype (the original code writes int16 or int64)")
    # The original code sizes memmaps with --dstore-size; rows past the
    # written ones stay zero. The token stream check below catches that.
    values = np.memmap(args.values, dtype=value_dtype, mode="r", shape=(num_rows, 1))
    if (values < 0).any():
        raise SystemExit(f"{args.values} holds negative token ids: int16 values overflow for vocabularies "
                         f"above 32,767 words (WikiText-103 has 267k); redump the values as int64")
    model, task = _load_checkpoint(args.student, args.data, cpu=True)
    dictionary = task.target_dictionary
    stream = _read_stream(args.data, args.split, dictionary)
    if len(stream) != num_rows or not np.array_equal(stream, np.asarray(values[:, 0], dtype=np.int64)):
        mismatch = next((i for i in range(min(len(stream), num_rows)) if stream[i] != values[i, 0]), None)
        raise SystemExit(
            f"the imported values are not the token stream of split {args.split} of {args.data} "
            f"({num_rows} rows vs {len(stream)} tokens, first difference at row {mismatch}); PP-KD needs "
            f"rows in corpus order, which the original code writes with --context-window > 0")
    keys = mf.array_spec(os.path.abspath(args.keys), key_dtype, (num_rows, args.dim), layout="raw")
    manifest = {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "status": mf.COMPLETE,
        "datastore_id": new_datastore_id(), "num_rows": int(num_rows), "key_dim": args.dim,
        "keys": keys,
        "values": mf.array_spec(os.path.abspath(args.values), value_dtype, (num_rows, 1), layout="raw"),
        "key_sample_sha256": mf.key_sample_fingerprint(mf.open_array(args.dstore, keys, what="keys")),
        "value_sample_sha256": mf.value_sample_fingerprint(values),
        "dictionary": mf.dictionary_fingerprint(dictionary),
        "student": {"fingerprint": mf.model_fingerprint(model), "path": os.path.abspath(args.student),
                    "key": "imported from the original kNN-LM code (--knn-keytype)"},
        "corpus": {"data": os.path.abspath(args.data), "split": args.split},
        "imported": {"keys": os.path.abspath(args.keys), "values": os.path.abspath(args.values)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.makedirs(args.dstore, exist_ok=True)
    mf.write_json_atomic(os.path.join(args.dstore, MANIFEST), manifest)
    logger.info("imported %d rows of %d-dim keys into %s without copying", num_rows, args.dim, args.dstore)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print rows, files, sizes, teachers and index of a datastore")
    p.add_argument("dstore", help="datastore folder")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("add-masked-teacher", help="dump a fairseq masked LM's states as a teacher")
    p.add_argument("dstore", help="datastore folder with finished keys and values")
    p.add_argument("--checkpoint", required=True, help="masked LM checkpoint (fairseq masked_lm/roberta)")
    p.add_argument("--data", required=True, help="data-bin the datastore was dumped from (same dict.txt)")
    p.add_argument("--split", default="train", help="split the datastore was dumped from (default: train)")
    p.add_argument("--name", default="masked", help="teacher name (default: masked)")
    p.add_argument("--stride", type=int, default=7,
                   help="strided mode: mask every STRIDE-th position, STRIDE passes per window "
                        "(default: 7, i.e. 14%% masked, near the 15%% used in training)")
    p.add_argument("--exact", action="store_true",
                   help="mask one position per forward pass (exact, about window/STRIDE times slower)")
    p.add_argument("--window", type=int, default=254,
                   help="tokens per window, without the prepended <s>; at most the model's max "
                        "positions minus 2 (default: 254)")
    p.add_argument("--context", type=int, default=32,
                   help="minimum context in tokens on each side of a target (default: 32)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per forward batch (default: 8192)")
    p.add_argument("--shard-id", type=int, default=0, help="this process's shard (default: 0)")
    p.add_argument("--num-shards", type=int, default=1, help="processes sharing the pass (default: 1)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished teacher of the same --name (default: stop with an error)")
    p.set_defaults(func=cmd_add_masked_teacher)

    p = sub.add_parser("remove-teacher", help="delete a teacher; keys and values are untouched")
    p.add_argument("dstore", help="datastore folder")
    p.add_argument("--name", required=True, help="teacher to delete")
    p.set_defaults(func=cmd_remove_teacher)

    p = sub.add_parser("import-knnlm", help="wrap the original kNN-LM code's memmaps in a manifest")
    p.add_argument("dstore", help="new datastore folder (the memmaps stay where they are)")
    p.add_argument("--keys", required=True, help="keys memmap, e.g. dstore_keys.npy (raw, no header)")
    p.add_argument("--values", required=True, help="values memmap, e.g. dstore_vals.npy (raw, no header)")
    p.add_argument("--dim", type=int, required=True, help="key dimension (1024 for the WikiText-103 model)")
    p.add_argument("--keys-dtype", choices=["float16", "float32"], default="float16",
                   help="keys dtype: float16 with --dstore-fp16, else float32 (default: float16)")
    p.add_argument("--values-dtype", choices=["int16", "int32", "int64"], default="int64",
                   help="values dtype: int16 with --dstore-fp16 in the original code, else int64 (default)")
    p.add_argument("--data", required=True, help="data-bin of the dumped split (its dict.txt)")
    p.add_argument("--split", default="train", help="dumped split (default: train)")
    p.add_argument("--student", required=True, help="checkpoint whose keys these are")
    p.set_defaults(func=cmd_import_knnlm)
    return parser


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    args = get_parser().parse_args(argv)
    if getattr(args, "exact", False) and args.stride != 7:
        raise SystemExit("--exact and --stride exclude each other; pass one")
    try:
        args.func(args)
    except (ValueError, OSError, OverflowError) as err:
        # DatastoreMismatchError is a ValueError. OSError covers a missing
        # teacher, a finished teacher without --overwrite and missing files.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
