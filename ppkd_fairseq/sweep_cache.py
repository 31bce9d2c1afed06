"""The sweep cache: per-token inputs of the PP-KD mixture, stored once.

The target probability under Eqs. 1-4 (see mixture.py) depends on T, mu and
lambda only through the neighbour weights. A grid over them therefore needs,
per evaluated token, the LM's target log-probability, the neighbours'
squared L2 distances, which neighbours have the target as value, and each
teacher's target log-probability at each neighbour. ``fairseq-eval-lm
--ppkd-mode cache --ppkd-cache-dir DIR`` writes them, and reports the plain
LM's perplexity. Layout of DIR (N = tokens in the split's token stream,
row i = stream position i, as for a datastore)::

    manifest.json          what the arrays were computed from; written first
                           with status incomplete, and complete at the end
    written.npy            (N,) bool, True for every token the run scored
    lm.npy                 (N,) float32 natural log P_LM(target)
    distances.npy          (N, k) float32 squared L2 distances, +inf for
                           invalid neighbours (FAISS padding, own row)
    value_match.npy        (N, k) bool, valid neighbour whose value is the target
    teachers/NAME.npy      (N, k) float32 natural log p_teacher(target | u_j),
                           -inf for invalid neighbours; one file per teacher

Rows whose ``written`` entry is False hold no data. The sweep CLI adds a
``request`` entry (checkpoint hash, fairseq-eval-lm flags) to the manifest
after the run, and reuses the cache while :func:`cache_mismatches` finds no
difference from a new request.
"""

import glob
import json
import logging
import math
import os
import time

import numpy as np
import torch

from . import manifest as mf
from .datastore import npy_spec
from .retrieval import gather_rows, search
from .rows import target_rows

logger = logging.getLogger(__name__)

FORMAT = "ppkd-sweep-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEACHERS_DIR = "teachers"


class CacheWriter:
    """Create the cache arrays for ``num_positions`` tokens and fill them by position.

    Args:
        folder: the cache folder; arrays of an earlier cache there are replaced.
        num_positions: N, tokens in the evaluated split.
        k: neighbours per token.
        teacher_names: teachers whose log-probabilities are stored.
        header: manifest fields describing the inputs (datastore, split, settings).
    """

    def __init__(self, folder, num_positions, k, teacher_names, header):
        self.folder = folder
        self.num_positions = int(num_positions)
        self.k = int(k)
        self.teacher_names = list(teacher_names)
        self.header = dict(header)
        self.started = time.time()
        os.makedirs(os.path.join(folder, TEACHERS_DIR), exist_ok=True)
        self.manifest_path = os.path.join(folder, MANIFEST)
        mf.write_json_atomic(self.manifest_path, self._manifest(mf.INCOMPLETE))
        for path in glob.glob(os.path.join(folder, TEACHERS_DIR, "*.npy")):
            os.remove(path)
        n, k = self.num_positions, self.k
        self.written = self._create("written.npy", np.bool_, (n,))
        self.lm = self._create("lm.npy", np.float32, (n,))
        self.distances = self._create("distances.npy", np.float32, (n, k))
        self.value_match = self._create("value_match.npy", np.bool_, (n, k))
        self.teachers = {
            name: self._create(self._teacher_file(name), np.float32, (n, k)) for name in self.teacher_names
        }

    @staticmethod
    def _teacher_file(name):
        return os.path.join(TEACHERS_DIR, name + ".npy")

    def _create(self, filename, dtype, shape):
        path = os.path.join(self.folder, filename)
        if os.path.exists(path):
            os.remove(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def _manifest(self, status, **fields):
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "status": status, **self.header, **fields}

    def write(self, positions, lm, distances, value_match, teacher_log_probs):
        """Store one batch.

        Args:
            positions: (n,) int64 stream positions of the tokens.
            lm: (n,) float32 LM target log-probabilities.
            distances: (n, k) float32, +inf where invalid.
            value_match: (n, k) bool.
            teacher_log_probs: dict teacher name -> (n, k) float32.
        """
        positions = np.asarray(positions, dtype=np.int64)
        n = positions.shape[0]
        if n == 0:
            return
        if positions.min() < 0 or positions.max() >= self.num_positions:
            raise IndexError(
                f"token positions span [{positions.min()}, {positions.max()}] but the split has "
                f"{self.num_positions} tokens"
            )
        assert lm.shape == (n,), f"lm has shape {tuple(lm.shape)}, expected ({n},)"
        assert distances.shape == (n, self.k), f"distances have shape {distances.shape}, expected ({n}, {self.k})"
        assert value_match.shape == (n, self.k), f"value_match has shape {value_match.shape}, expected ({n}, {self.k})"
        assert sorted(teacher_log_probs) == sorted(self.teacher_names), (
            f"got teachers {sorted(teacher_log_probs)}, expected {sorted(self.teacher_names)}"
        )
        self.lm[positions] = lm
        self.distances[positions] = distances
        self.value_match[positions] = value_match
        for name, log_probs in teacher_log_probs.items():
            assert log_probs.shape == (n, self.k), (
                f"teacher {name}: shape {log_probs.shape}, expected ({n}, {self.k})"
            )
            self.teachers[name][positions] = log_probs
        self.written[positions] = True

    def finish(self, **fields):
        """Flush the arrays and mark the cache complete; ``fields`` go into the manifest."""
        arrays = [self.written, self.lm, self.distances, self.value_match, *self.teachers.values()]
        for array in arrays:
            array.flush()
        specs = {
            "written": npy_spec(self.folder, "written.npy"),
            "lm": npy_spec(self.folder, "lm.npy"),
            "distances": npy_spec(self.folder, "distances.npy"),
            "value_match": npy_spec(self.folder, "value_match.npy"),
            "teachers": {name: npy_spec(self.folder, self._teacher_file(name)) for name in self.teacher_names},
        }
        manifest = self._manifest(
            mf.COMPLETE,
            tokens=int(np.count_nonzero(self.written)),
            arrays=specs,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            seconds=round(time.time() - self.started, 2),
            **fields,
        )
        mf.write_json_atomic(self.manifest_path, manifest)
        return manifest


class CacheHandler:
    """Score each batch with the LM and store the mixture's inputs in the cache.

    Args:
        writer: the :class:`CacheWriter`.
        datastore: the opened :class:`~ppkd_fairseq.datastore.Datastore`.
        index: the FAISS index over its keys.
        teachers: list of :class:`~ppkd_fairseq.datastore.TeacherStore`.
        settings: dict with ``k, exact_distance, exclude_own_row``.
        starts: block starts of the evaluated split (see rows.py).
        pad: the padding index.
    """

    def __init__(self, writer, datastore, index, teachers, settings, starts, pad):
        self.writer = writer
        self.datastore = datastore
        self.index = index
        self.teachers = teachers
        self.settings = settings
        self.starts = starts
        self.pad = pad
        self.model_fields = None
        self.total_lm_log_prob = 0.0
        self.count = 0
        self.no_neighbour = 0

    def score_batch(self, model, net_output, sample, base):
        if self.model_fields is None:
            fingerprint = mf.model_fingerprint(model)
            self.datastore.check_student(fingerprint)
            parameter = next(model.parameters())
            self.model_fields = {
                "student_fingerprint": fingerprint,
                "model_dtype": str(parameter.dtype).replace("torch.", ""),
                "device": parameter.device.type,
            }
        s = self.settings
        target = sample["target"]
        mask, positions = target_rows(sample["id"], target, self.pad, self.starts)
        queries = model.ppkd_captured("key", target.shape)[mask].float().cpu().numpy()  # (n, d)
        targets = target[mask].cpu()  # (n,)
        lprobs = base(target_only=True)  # (B, T, V)
        lm_target = lprobs[mask].gather(-1, targets.to(lprobs.device).unsqueeze(-1)).squeeze(-1).cpu()  # (n,)

        nb = search(
            self.index, queries, s["k"], keys=self.datastore.keys,
            exclude_rows=positions if s["exclude_own_row"] else None, exact=s["exact_distance"],
        )
        values = gather_rows(self.datastore.values, nb.ids, nb.valid).astype(np.int64)  # (n, k), 0 where invalid
        value_match = (values == targets.numpy()[:, None]) & nb.valid  # (n, k)
        teacher_lp = {
            t.name: t.neighbour_log_probs(nb.ids, nb.valid, targets).numpy() for t in self.teachers
        }
        self.writer.write(positions, lm_target.float().numpy(), nb.distances, value_match, teacher_lp)

        self.total_lm_log_prob += float(lm_target.double().sum())
        self.count += int(lm_target.numel())
        self.no_neighbour += int((~nb.valid.any(-1)).sum())
        return lprobs

    def finish(self):
        if self.model_fields is None:
            raise RuntimeError(
                f"the cache pass scored no batch, so {self.writer.folder} stays incomplete; check "
                f"that the split is not empty"
            )
        perplexity = 2 ** (-self.total_lm_log_prob / self.count / math.log(2)) if self.count else None
        manifest = self.writer.finish(
            **self.model_fields,
            tokens_without_neighbours=self.no_neighbour,
            lm_perplexity=perplexity,
        )
        if manifest["tokens"] != self.count:
            logger.warning(
                "%d tokens were scored but %d positions are marked written; a position was scored twice",
                self.count, manifest["tokens"],
            )
        logger.info(
            "sweep cache complete: %d of %d tokens (%d without neighbours), k = %d, teachers %s, in %s",
            manifest["tokens"], self.writer.num_positions, self.no_neighbour, self.writer.k,
            ", ".join(self.writer.teacher_names) or "none", self.writer.folder,
        )


def build_cache_handler(args, datastore, split, starts, pad, num_positions, num_shards, context_window):
    """Create the :class:`CacheHandler` of ``--ppkd-mode cache``."""
    from .builder import validate_settings
    from .index import load_index

    if num_shards != 1:
        raise ValueError(
            f"--ppkd-mode cache runs as one process, but this run has {num_shards} shards; drop "
            f"--num-shards and --distributed-world-size"
        )
    if not args.ppkd_cache_dir:
        raise ValueError("--ppkd-mode cache needs --ppkd-cache-dir, the folder to write the cache into")
    validate_settings({
        "k": args.ppkd_k, "temperature": args.ppkd_temperature, "mu": args.ppkd_mu,
        "lam": args.ppkd_lambda, "probe": args.ppkd_probe,
    })
    if args.ppkd_teachers == "none":
        names = []
    else:
        names = [n for n in (args.ppkd_teachers or "").split(",") if n] or datastore.teacher_names()
    teachers = [datastore.open_teacher(name) for name in names]
    folder = datastore.folder
    index = load_index(folder, datastore.manifest, nprobe=args.ppkd_probe,
                       use_gpu=args.ppkd_search_device == "gpu", mmap=args.ppkd_index_mmap)
    header = {
        "datastore": {
            "folder": os.path.abspath(folder),
            "datastore_id": datastore.manifest["datastore_id"],
            "num_rows": datastore.num_rows,
            "student_fingerprint": datastore.manifest.get("student", {}).get("fingerprint"),
        },
        "data": os.path.abspath(args.data),
        "split": split,
        "num_positions": int(num_positions),
        "k": args.ppkd_k,
        "distance": str(args.ppkd_distance),
        "probe": args.ppkd_probe,
        "exclude_own_row": bool(args.ppkd_exclude_own_row),
        "teachers": [
            {"name": t.name, "head_sha256": t.manifest["head"]["sha256"],
             "fingerprint": t.manifest.get("teacher", {}).get("fingerprint")}
            for t in teachers
        ],
        "eval": {
            "tokens_per_sample": args.tokens_per_sample,
            "context_window": context_window,
            "sample_break_mode": str(args.sample_break_mode),
        },
    }
    writer = CacheWriter(args.ppkd_cache_dir, num_positions, args.ppkd_k, names, header)
    settings = {
        "k": args.ppkd_k,
        "exact_distance": args.ppkd_distance == "exact",
        "exclude_own_row": args.ppkd_exclude_own_row,
    }
    logger.info("caching k = %d neighbours and teachers %s for %d tokens of split %s into %s",
                args.ppkd_k, ", ".join(names) or "none", num_positions, split, args.ppkd_cache_dir)
    return CacheHandler(writer, datastore, index, teachers, settings, starts, pad)


class SweepCache:
    """A complete cache opened read-only: its manifest and memmaps."""

    def __init__(self, folder, manifest, written, lm, distances, value_match, teachers):
        self.folder = folder
        self.manifest = manifest
        self.written = written
        self.lm = lm
        self.distances = distances
        self.value_match = value_match
        self.teachers = teachers

    @classmethod
    def open(cls, folder):
        """Open a complete cache, checking every array's size against the manifest."""
        fix = "Run the cache pass again (python -m ppkd_fairseq.cli.sweep recomputes it)."
        manifest = read_manifest(folder)
        if manifest is None or manifest.get("status") != mf.COMPLETE:
            raise mf.DatastoreMismatchError(
                f"sweep cache {folder}: {os.path.join(folder, MANIFEST)} is missing or incomplete. {fix}"
            )
        arrays = manifest["arrays"]
        n, k = manifest["num_positions"], manifest["k"]
        opened = {}
        for name in ("written", "lm", "distances", "value_match"):
            opened[name] = mf.open_array(folder, arrays[name], what=f"sweep cache {name}")
        teachers = {
            name: mf.open_array(folder, spec, what=f"sweep cache teacher {name}")
            for name, spec in arrays["teachers"].items()
        }
        for name, array in [*opened.items(), *teachers.items()]:
            expected = (n,) if name in ("written", "lm") else (n, k)
            mf.check_equal(f"sweep cache {folder}", f"{name} shape", list(expected), list(array.shape), fix)
        return cls(folder, manifest, teachers=teachers, **opened)

    @property
    def positions(self):
        """(n,) int64 positions of the scored tokens."""
        return np.flatnonzero(self.written)

    def iter_chunks(self, teacher_names, chunk_tokens, fields=("lm", "distances", "value_match", "teachers")):
        """Yield dicts of tensors for consecutive chunks of the scored tokens.

        A dict has the requested ``fields`` among ``lm`` (m,), ``distances``
        (m, k), ``value_match`` (m, k) and ``teachers`` (a dict name -> (m, k)
        over ``teacher_names``), with m <= ``chunk_tokens``.
        """
        missing = [name for name in teacher_names if name not in self.teachers]
        if missing:
            raise KeyError(
                f"sweep cache {self.folder} has no teacher {', '.join(missing)}; it has "
                f"{', '.join(sorted(self.teachers)) or 'none'}"
            )
        positions = self.positions
        contiguous = positions.size == 0 or positions[-1] - positions[0] + 1 == positions.size
        for begin in range(0, positions.size, chunk_tokens):
            if contiguous:
                # Slices read a memmap sequentially; fancy indexing would copy row by row.
                end = min(begin + chunk_tokens, positions.size)
                rows = slice(int(positions[begin]), int(positions[end - 1]) + 1)
            else:
                rows = positions[begin:begin + chunk_tokens]
            chunk = {}
            for name in fields:
                if name == "teachers":
                    chunk[name] = {t: torch.from_numpy(np.array(self.teachers[t][rows])) for t in teacher_names}
                else:
                    chunk[name] = torch.from_numpy(np.array(getattr(self, name)[rows]))
            yield chunk

    def num_chunks(self, chunk_tokens):
        return -(-int(self.manifest["tokens"]) // chunk_tokens)


def read_manifest(folder):
    """Return the cache manifest in ``folder``, or None when there is none."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cache_mismatches(manifest, request):
    """List how a cache manifest differs from a request; empty means reusable.

    Args:
        manifest: the cache's manifest dict, or None when there is none.
        request: dict with ``datastore_id``, ``student_fingerprint`` (the
            datastore's), ``data``, ``split``, ``k``, ``distance``, ``probe``,
            ``exclude_own_row``, ``teachers`` (name -> head sha256), and
            ``checkpoint_sha256`` and ``eval_flags`` (compared with the
            manifest's ``request`` entry).

    Returns:
        list of sentences, one per difference.
    """
    if manifest is None:
        return ["there is no cache yet"]
    if manifest.get("format") != FORMAT:
        return [f"the folder's manifest has format {manifest.get('format')!r}, not {FORMAT!r}"]
    if manifest.get("status") != mf.COMPLETE:
        return [f"the cache has status {manifest.get('status')!r}, so its pass was interrupted"]
    reasons = []

    def compare(field, cached, requested):
        if cached != requested:
            reasons.append(f"{field} is {cached!r} in the cache but {requested!r} now")

    compare("datastore_id", manifest["datastore"]["datastore_id"], request["datastore_id"])
    compare("student fingerprint", manifest.get("student_fingerprint"), request["student_fingerprint"])
    for field in ("data", "split", "k", "distance", "probe", "exclude_own_row"):
        compare(field, manifest.get(field), request[field])
    cached_teachers = {t["name"]: t["head_sha256"] for t in manifest.get("teachers", [])}
    for name, sha in request["teachers"].items():
        if name not in cached_teachers:
            reasons.append(f"teacher {name!r} is not in the cache, which has {sorted(cached_teachers)}")
        else:
            compare(f"teacher {name!r} head sha256", cached_teachers[name], sha)
    cached_request = manifest.get("request", {})
    compare("checkpoint sha256", cached_request.get("checkpoint_sha256"), request["checkpoint_sha256"])
    compare("fairseq-eval-lm flags", cached_request.get("eval_flags"), request["eval_flags"])
    return reasons
