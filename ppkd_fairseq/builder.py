"""Build the handler of a PP-KD run from the task's options.

Kept apart from the task class so that the task stays a thin fairseq
wrapper: this module opens and checks the datastore, the index and the
teachers, and creates the writers for the dump modes.
"""

import logging
import os

from . import hooks
from . import manifest as mf
from .datastore import Datastore
from .dump import DatastoreWriter, TeacherWriter
from .handlers import DumpKeysHandler, DumpTeacherHandler, ScoreHandler
from .rows import block_starts, num_stream_tokens
from .teacher_head import adaptive_softmax_head, softmax_head

logger = logging.getLogger(__name__)


def _describe_model(model):
    decoder = model.decoder
    cls = type(model)
    if issubclass(cls, hooks.PPKDModelMixin):
        cls = cls.__mro__[2]
    return {
        "fingerprint": mf.model_fingerprint(model),
        "class": cls.__name__,
        "layers": len(getattr(decoder, "layers", [])),
        "embed_dim": int(getattr(decoder, "embed_dim", 0)),
        "normalize_before": bool(getattr(getattr(decoder, "layers", [None])[-1], "normalize_before", False)),
    }


def causal_teacher_head(model, vocab_size):
    """Return the :class:`TeacherHead` of a fairseq causal LM."""
    decoder = model.decoder
    if decoder.adaptive_softmax is not None:
        head = adaptive_softmax_head(decoder.adaptive_softmax)
    else:
        projection = decoder.output_projection
        head = softmax_head(projection.weight, getattr(projection, "bias", None))
    if head.vocab_size != vocab_size:
        raise mf.DatastoreMismatchError(
            f"the teacher's output layer covers {head.vocab_size} words but its dictionary has {vocab_size}"
        )
    return head


def build_handler(task, model, dataset, shard_id=0, num_shards=1, context_window=0):
    """Create the handler for ``task.args.ppkd_mode`` on the loaded split."""
    args = task.args
    split = task.ppkd_split
    starts = block_starts(dataset)
    num_rows = num_stream_tokens(dataset)
    dictionary = task.target_dictionary
    pad = dictionary.pad()
    folder = args.ppkd_dstore
    if folder is None:
        raise ValueError(f"--ppkd-mode {args.ppkd_mode} needs --ppkd-dstore")

    if args.ppkd_mode == "dump":
        key_dim = model.decoder.layers[-1].fc1.in_features
        metadata = {
            "dictionary": mf.dictionary_fingerprint(dictionary),
            "student": {**_describe_model(model),
                        "key": "input of the last decoder layer's feed-forward block (fc1)"},
            "corpus": {"data": os.path.abspath(args.data), "split": split},
            "dump": {"tokens_per_sample": args.tokens_per_sample, "context_window": context_window,
                     "sample_break_mode": str(args.sample_break_mode), "num_shards": num_shards},
        }
        writer = DatastoreWriter(folder, num_rows, key_dim, str(args.ppkd_key_dtype), metadata,
                                 shard_id=shard_id, num_shards=num_shards, overwrite=args.ppkd_overwrite)
        logger.info("dumping %d rows of %d-dim keys from split %s into %s", num_rows, key_dim, split, folder)
        return DumpKeysHandler(writer, starts, pad)

    datastore = Datastore.open(folder, dictionary=dictionary)
    if args.ppkd_mode in ("eval", "cache"):
        # Checked before any output file is opened, so that a run with the
        # wrong checkpoint leaves earlier outputs as they were.
        datastore.check_student(mf.model_fingerprint(model))
        if args.ppkd_k > datastore.num_rows:
            raise ValueError(
                f"--ppkd-k {args.ppkd_k} exceeds the {datastore.num_rows} rows of datastore {folder}; "
                f"lower --ppkd-k to at most {datastore.num_rows}"
            )
    if num_rows != datastore.num_rows and (args.ppkd_mode == "dump_teacher" or args.ppkd_exclude_own_row):
        raise mf.DatastoreMismatchError(
            f"split {split} of {args.data} has {num_rows} tokens but datastore {folder} has "
            f"{datastore.num_rows} rows ({datastore.manifest['corpus']}); use the datastore's split"
        )

    if args.ppkd_mode == "dump_teacher":
        head = causal_teacher_head(model, len(dictionary))
        metadata = {
            "kind": "causal",
            "teacher": _describe_model(model),
            "corpus": {"data": os.path.abspath(args.data), "split": split},
            "dump": {"tokens_per_sample": args.tokens_per_sample, "context_window": context_window},
        }
        writer = TeacherWriter(datastore, args.ppkd_teacher_name, head, metadata,
                               mf.dictionary_fingerprint(dictionary), shard_id=shard_id, num_shards=num_shards,
                               overwrite=args.ppkd_overwrite)
        return DumpTeacherHandler(writer, starts, pad)

    if args.ppkd_mode == "cache":
        from .sweep_cache import build_cache_handler

        return build_cache_handler(args, datastore, split, starts, pad, num_rows, num_shards, context_window)

    # eval
    from .index import load_index

    settings = {
        "k": args.ppkd_k, "temperature": args.ppkd_temperature, "mu": args.ppkd_mu, "lam": args.ppkd_lambda,
        "probe": args.ppkd_probe, "exact_distance": args.ppkd_distance == "exact",
        "exclude_own_row": args.ppkd_exclude_own_row, "full_distribution": args.ppkd_full_distribution,
    }
    validate_settings(settings)
    names = [n for n in (args.ppkd_teachers or "").split(",") if n]
    if settings["mu"] < 1.0 and not names:
        raise ValueError(
            f"--ppkd-mu {settings['mu']} mixes in teacher logits but no teacher is given; pass "
            f"--ppkd-teachers with some of: {', '.join(datastore.teacher_names()) or 'none stored'}"
        )
    # Teachers are opened, and so checked, even at mu = 1 where they are unused.
    teachers = [datastore.open_teacher(name) for name in names]
    unused_teachers = []
    if teachers and settings["mu"] == 1.0:
        # This is a warning, not an error, because a sweep's best point may be
        # mu = 1 for a teacher set and its check run passes that set with --ppkd-mu 1.
        logger.warning(
            "--ppkd-teachers %s has no effect at --ppkd-mu 1, which is the kNN-LM; set --ppkd-mu below 1 "
            "to mix in the teachers, or drop --ppkd-teachers. The summary lists them as unused_teachers",
            ",".join(names),
        )
        unused_teachers, teachers = names, []
    index = load_index(folder, datastore.manifest, nprobe=args.ppkd_probe,
                       use_gpu=args.ppkd_search_device == "gpu", mmap=args.ppkd_index_mmap)
    return ScoreHandler(
        datastore, index, teachers, settings, starts, pad, dictionary, num_rows,
        analysis_path=args.ppkd_analysis_out, neighbours_dir=args.ppkd_neighbours_out,
        summary_path=args.ppkd_summary_out, split=split, unused_teachers=unused_teachers,
    )


def validate_settings(settings):
    """Raise ``ValueError`` naming the option when a setting is out of range."""
    if settings["k"] < 1:
        raise ValueError(f"--ppkd-k must be >= 1, got {settings['k']}")
    if not settings["temperature"] > 0:
        raise ValueError(f"--ppkd-temperature must be > 0, got {settings['temperature']}")
    for option, key in (("--ppkd-mu", "mu"), ("--ppkd-lambda", "lam")):
        if not 0.0 <= settings[key] <= 1.0:
            raise ValueError(f"{option} must be in [0, 1], got {settings[key]}")
    if settings["probe"] < 1:
        raise ValueError(f"--ppkd-probe must be >= 1, got {settings['probe']}")
