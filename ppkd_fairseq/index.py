"""FAISS index over the datastore keys: choose its shape, build, load, search.

The index of a datastore lives in ``<datastore>/index/``::

    index.faiss    the index: IndexFlatL2, or IndexIVFPQ over a flat L2 coarse quantizer
    index.ivfdata  the inverted lists of an on-disk build (``ondisk=True`` only)
    index.json     metadata, written last; loaders compare it with manifest.json

``index.json`` has ``status: incomplete`` from the start of a build until the
index file is in place, so an interrupted build is rejected at load time.
Distances are squared L2. An IVFPQ index computes them from the PQ codes, so
they are approximate; ``retrieval.py`` can recompute them from the keys.
"""

import enum
import glob
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from .manifest import (
    COMPLETE,
    INCOMPLETE,
    DatastoreMismatchError,
    check_equal,
    chmod_default,
    key_sample_fingerprint,
    open_array,
    read_json,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

INDEX_FOLDER = "index"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
METADATA_FILE = "index.json"
DATASTORE_MANIFEST = "manifest.json"
INDEX_FORMAT = "ppkd-index"
INDEX_FORMAT_VERSION = 1

# faiss k-means prints a warning below 39 training points per centroid
# (ClusteringParameters.min_points_per_centroid in faiss 1.15). The coarse
# quantizer has nlist centroids and every PQ sub-quantizer has 2**nbits.
MIN_POINTS_PER_CENTROID = 39

# Below this many keys the default index is an exact IndexFlatL2. At d = 1024
# it takes 400 MB of float32 keys and 1e8 multiply-adds per query, which is
# affordable, and IVF4096 would need 39 * 4096 = 159,744 keys to train
# without shrinking nlist.
FLAT_BELOW = 100_000

# Keys per add() call and per on-disk shard: 2 GB of float32 at d = 1024.
ADD_BATCH = 500_000

# Rows read per step when gathering the training sample from the key memmap.
READ_CHUNK = 65_536

# faiss's GpuIndexIVFPQ.h documents that float16 lookup tables are required when
# M * 2**nbits > 16384. Codes of 64 bytes at 8 bits sit exactly at that
# limit, so they get float16 tables too.
GPU_FLOAT16_LUT_ENTRIES = 16384

REBUILD_FIX = "Rebuild the index with: python -m ppkd_fairseq.cli.build_index {dir} --overwrite"
DUMP_FIX = (
    "Finish or rerun the datastore dump before building or loading its index: fairseq-eval-lm DATA "
    "--user-dir ppkd_fairseq --task ppkd_language_modeling --path STUDENT_CHECKPOINT --gen-subset SPLIT "
    "... --ppkd-mode dump --ppkd-dstore {dir}"
)


class GpuUnavailableError(RuntimeError):
    """Error for a GPU index request when faiss lacks GPU support or finds no GPU."""


class IndexKind(str, enum.Enum):
    """Kind of FAISS index built over a datastore's keys."""

    FLAT = "flat"  # exact IndexFlatL2
    IVFPQ = "ivfpq"  # IndexIVFPQ: inverted file over nlist cells, PQ-compressed keys


@dataclass(frozen=True)
class IndexConfig:
    """Shape of a FAISS index over keys of dimension ``dim``."""

    kind: IndexKind
    dim: int
    nlist: int = 0  # IVF cells (coarse centroids); 0 for a flat index
    pq_m: int = 0  # PQ sub-quantizers, each coding dim / pq_m dimensions; 0 for flat
    nbits: int = 0  # bits per sub-quantizer code, so 2**nbits centroids each; 0 for flat

    @property
    def code_bytes(self):
        """Bytes of PQ code per key (4 * dim for the float32 keys of a flat index)."""
        if self.kind is IndexKind.FLAT:
            return 4 * self.dim
        return (self.pq_m * self.nbits + 7) // 8

    @property
    def factory(self):
        """The ``faiss.index_factory`` string of this index."""
        if self.kind is IndexKind.FLAT:
            return "Flat"
        return f"IVF{self.nlist},PQ{self.pq_m}x{self.nbits}"

    def to_dict(self):
        return {
            "kind": self.kind.value,
            "dim": self.dim,
            "nlist": self.nlist,
            "pq_m": self.pq_m,
            "nbits": self.nbits,
            "code_bytes": self.code_bytes,
            "factory": self.factory,
        }

    @classmethod
    def from_dict(cls, obj):
        return cls(
            kind=IndexKind(obj["kind"]),
            dim=int(obj["dim"]),
            nlist=int(obj["nlist"]),
            pq_m=int(obj["pq_m"]),
            nbits=int(obj["nbits"]),
        )


def choose_index_config(
    num_rows, dim, nlist=4096, code_size=64, nbits=8, flat_below=FLAT_BELOW, train_size=None
):
    """Choose the index for ``num_rows`` keys of dimension ``dim``.

    Args:
        num_rows: keys in the datastore (N).
        dim: key dimension (d).
        nlist: requested IVF cells.
        code_size: requested PQ sub-quantizers M, which is the code size in
            bytes when ``nbits`` is 8.
        nbits: bits per sub-quantizer code.
        flat_below: datastores with fewer keys get an exact IndexFlatL2.
        train_size: keys sampled for training; None means all N.

    Returns:
        An :class:`IndexConfig`. Too few training keys for the requested nlist
        shrink it to a power of two with 39 keys per cell. Too few keys for
        the PQ codebooks (39 * 2**nbits, 9,984 at 8 bits) give a flat index
        when the whole datastore is that small. A ``code_size`` that does not
        divide ``dim`` becomes its largest divisor of ``dim``. Each of these
        changes logs a warning.

    Raises:
        ValueError: on a non-positive size, ``nbits`` outside 1..16, or a
            ``train_size`` too small for the PQ codebooks of a larger datastore.
    """
    for name, value in (("num_rows", num_rows), ("dim", dim), ("nlist", nlist), ("code_size", code_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 1 <= nbits <= 16:
        raise ValueError(f"nbits must be in 1..16, got {nbits}")
    if flat_below < 0:
        raise ValueError(f"flat_below must be at least 0, got {flat_below}")
    if train_size is not None and train_size < 1:
        raise ValueError(f"train_size must be at least 1, got {train_size}")

    if num_rows < flat_below:
        logger.info("%d keys are below flat_below=%d, so the index is an exact IndexFlatL2", num_rows, flat_below)
        return IndexConfig(IndexKind.FLAT, dim)

    num_train = num_rows if train_size is None else min(num_rows, train_size)
    min_pq_train = MIN_POINTS_PER_CENTROID * 2**nbits
    if num_rows < min_pq_train:
        logger.warning(
            "%d keys are too few to train PQ codebooks of 2**%d centroids (faiss k-means wants %d "
            "training points), so the index is an exact IndexFlatL2 instead of IVFPQ",
            num_rows,
            nbits,
            min_pq_train,
        )
        return IndexConfig(IndexKind.FLAT, dim)
    if num_train < min_pq_train:
        raise ValueError(
            f"train_size={train_size} is too small to train PQ codebooks of 2**{nbits} centroids: "
            f"faiss k-means wants {min_pq_train} training points. Raise --train-size to at least "
            f"{min_pq_train}"
        )

    max_nlist = num_train // MIN_POINTS_PER_CENTROID
    if nlist > max_nlist:
        shrunk = 1 << (max_nlist.bit_length() - 1)  # largest power of two <= max_nlist
        hint = "pass a smaller --nlist"
        if num_train < num_rows:
            hint = "raise --train-size or pass a smaller --nlist"
        logger.warning(
            "nlist=%d needs %d training keys (%d per cell) but only %d are available, so nlist is "
            "%d; %s to choose it yourself",
            nlist,
            nlist * MIN_POINTS_PER_CENTROID,
            MIN_POINTS_PER_CENTROID,
            num_train,
            shrunk,
            hint,
        )
        nlist = shrunk

    pq_m = min(code_size, dim)
    while dim % pq_m:
        pq_m -= 1
    if pq_m != code_size:
        logger.warning(
            "code_size=%d sub-quantizers do not divide the key dimension %d, so the index uses %d, "
            "the largest divisor of %d that is at most %d",
            code_size,
            dim,
            pq_m,
            dim,
            code_size,
        )
    return IndexConfig(IndexKind.IVFPQ, dim, nlist=nlist, pq_m=pq_m, nbits=nbits)


def index_folder(datastore_dir):
    return os.path.join(datastore_dir, INDEX_FOLDER)


def metadata_path(datastore_dir):
    return os.path.join(datastore_dir, INDEX_FOLDER, METADATA_FILE)


def read_datastore_manifest(datastore_dir):
    """Read a datastore's complete ``manifest.json``."""
    return read_json(
        os.path.join(datastore_dir, DATASTORE_MANIFEST),
        "datastore manifest",
        DUMP_FIX.format(dir=datastore_dir) + ".",
    )


def read_index_metadata(datastore_dir):
    """Read a complete ``index/index.json``; a missing or unfinished one raises."""
    return read_json(
        metadata_path(datastore_dir),
        "FAISS index metadata",
        REBUILD_FIX.format(dir=datastore_dir),
    )


def check_index_metadata(metadata, manifest, datastore_dir):
    """Check ``index.json`` against the datastore manifest and the files it lists.

    Raises:
        DatastoreMismatchError: naming the first field that differs, both
            values and the rebuild command.
    """
    what = f"FAISS index {metadata_path(datastore_dir)}"
    fix = REBUILD_FIX.format(dir=datastore_dir)
    check_equal(what, "format", INDEX_FORMAT, metadata.get("format"), fix)
    check_equal(what, "format_version", INDEX_FORMAT_VERSION, metadata.get("format_version"), fix)
    for field in ("datastore_id", "num_rows", "key_dim", "key_sample_sha256"):
        check_equal(what, field, manifest[field], metadata.get(field), fix)
    for name in metadata["files"].values():
        path = os.path.join(index_folder(datastore_dir), name)
        if not os.path.exists(path):
            raise DatastoreMismatchError(f"{what}: {path} is missing although index.json lists it. {fix}")


def build_index(
    datastore_dir,
    nlist=4096,
    code_size=64,
    nbits=8,
    train_size=1_000_000,
    add_batch=ADD_BATCH,
    seed=1,
    use_gpu=False,
    ondisk=False,
    flat_below=FLAT_BELOW,
):
    """Train an index over a datastore's keys, add all keys and write it to ``index/``.

    Row i of the keys gets id i. Keys are read from the memmap and cast to
    float32 one batch of ``add_batch`` rows at a time. An existing index in
    the folder is replaced.

    Args:
        datastore_dir: folder with a complete ``manifest.json``.
        nlist, code_size, nbits, flat_below: see :func:`choose_index_config`.
        train_size: keys sampled without replacement (seeded) for training.
        add_batch: keys per add() call, and per shard of an on-disk build.
        seed: seed of the training sample and of faiss k-means.
        use_gpu: train and add on the current CUDA device. Without faiss-gpu
            or a visible GPU this raises :class:`GpuUnavailableError`.
        ondisk: store the inverted lists in ``index.ivfdata`` through faiss
            OnDiskInvertedLists, for datastores whose codes exceed RAM.
            Ignored, with a warning, for a flat index.

    Returns:
        The metadata written to ``index/index.json``.
    """
    check_batch_sizes(train_size, add_batch)
    if use_gpu:
        _require_gpu()
    manifest = read_datastore_manifest(datastore_dir)
    keys = _open_keys(datastore_dir, manifest)  # (N, d)
    num_rows, key_dim = manifest["num_rows"], manifest["key_dim"]

    config = choose_index_config(num_rows, key_dim, nlist, code_size, nbits, flat_below, train_size)
    request = {
        "nlist": nlist,
        "code_size": code_size,
        "nbits": nbits,
        "train_size": train_size,
        "seed": seed,
        "flat_below": flat_below,
        "ondisk": ondisk,
    }
    if ondisk and config.kind is IndexKind.FLAT:
        logger.warning("ondisk applies to IVF inverted lists only, so the flat index is built in memory")
        ondisk = False

    folder = index_folder(datastore_dir)
    os.makedirs(folder, exist_ok=True)
    _remove_temporary_files(folder)
    files = {"index": INDEX_FILE}
    if ondisk:
        files["ivfdata"] = IVFDATA_FILE
    metadata = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "status": INCOMPLETE,
        "datastore_id": manifest["datastore_id"],
        "num_rows": num_rows,
        "key_dim": key_dim,
        "key_sample_sha256": manifest["key_sample_sha256"],
        "metric": "squared_l2",
        "config": config.to_dict(),
        "request": request,
        "files": files,
        "ondisk": ondisk,
        "seed": seed,
        "faiss_version": faiss.__version__,
        "built_on": "gpu" if use_gpu else "cpu",
    }
    write_json_atomic(metadata_path(datastore_dir), metadata)

    start = time.perf_counter()
    index = _new_index(config, seed)
    train_rows = 0
    if config.kind is IndexKind.IVFPQ:
        xt = read_training_sample(keys, train_size, seed)  # (n_train, d) float32
        train_rows = xt.shape[0]
        logger.info("training %s on %d keys of dimension %d", config.factory, train_rows, key_dim)
        index = _train(index, xt, config, use_gpu)
        del xt
        logger.info("trained in %.1f s", time.perf_counter() - start)

    if ondisk:
        _fill_ondisk(index, keys, folder, add_batch, config, use_gpu)
    else:
        _fill_in_memory(index, keys, folder, add_batch, config, use_gpu)

    metadata.update(
        status=COMPLETE,
        train_rows=train_rows,
        build_seconds=round(time.perf_counter() - start, 3),
    )
    write_json_atomic(metadata_path(datastore_dir), metadata)
    logger.info(
        "wrote %s over %d keys to %s in %.1f s", config.factory, num_rows, folder, metadata["build_seconds"]
    )
    return metadata


def check_batch_sizes(train_size, add_batch):
    """Raise ``ValueError`` naming the option when ``train_size`` or ``add_batch`` is below 1."""
    for name, option, value in (("train_size", "--train-size", train_size), ("add_batch", "--add-batch", add_batch)):
        if value < 1:
            raise ValueError(f"{name} ({option}) must be an integer of at least 1, got {value}")


def read_training_sample(keys, train_size, seed):
    """Return up to ``train_size`` random rows of ``keys`` as float32, in row order.

    Args:
        keys: (N, d) float16 or float32 memmap.

    Returns:
        (min(N, train_size), d) float32 C-contiguous array.
    """
    n, d = keys.shape
    num_train = min(n, train_size)
    if num_train == n:
        rows = np.arange(n, dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        # Sorted rows read the memmap front to back.
        rows = np.sort(rng.choice(n, size=num_train, replace=False))
    xt = np.empty((num_train, d), dtype=np.float32)  # (n_train, d)
    for begin in range(0, num_train, READ_CHUNK):
        end = min(begin + READ_CHUNK, num_train)
        xt[begin:end] = keys[rows[begin:end]]
    return xt


def load_index(datastore_dir, manifest=None, nprobe=32, use_gpu=False, mmap=False):
    """Load a datastore's index after checking it against the datastore manifest.

    Args:
        datastore_dir: the datastore folder.
        manifest: its manifest dict; read from ``manifest.json`` when None.
        nprobe: IVF cells visited per query (at most nlist); ignored for flat.
        use_gpu: copy the index to the current CUDA device. Without faiss-gpu
            or a visible GPU this raises :class:`GpuUnavailableError`.
        mmap: map the codes from the index file instead of reading them into
            RAM. An on-disk index always maps ``index.ivfdata``.

    Raises:
        DatastoreMismatchError: when ``index.json`` is missing or incomplete,
            when it or the index differs from the manifest in datastore_id,
            num_rows, key_dim, key_sample_sha256, ntotal or d. The message
            names the field, both values and the rebuild command.
    """
    if manifest is None:
        manifest = read_datastore_manifest(datastore_dir)
    if use_gpu:
        _require_gpu()
    metadata = read_index_metadata(datastore_dir)
    check_index_metadata(metadata, manifest, datastore_dir)
    config = IndexConfig.from_dict(metadata["config"])

    path = os.path.abspath(os.path.join(index_folder(datastore_dir), metadata["files"]["index"]))
    if metadata["ondisk"]:
        # The index file stores the absolute path that index.ivfdata had at
        # build time. This flag looks for it next to the index file instead,
        # so the datastore folder can move.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    elif mmap and config.kind is IndexKind.FLAT:
        flags = faiss.IO_FLAG_MMAP_IFC
    elif mmap:
        flags = faiss.IO_FLAG_MMAP
    else:
        flags = 0
    what = f"FAISS index {path}"
    fix = REBUILD_FIX.format(dir=datastore_dir)
    try:
        index = faiss.read_index(path, flags)
    except RuntimeError as err:
        # faiss raises RuntimeError for a truncated or corrupt file, and its
        # message names no fix.
        raise DatastoreMismatchError(f"{what}: faiss cannot read the file, which is truncated or corrupt "
                                     f"({str(err).strip()}). {fix}") from err
    check_equal(what, "ntotal (indexed keys)", manifest["num_rows"], int(index.ntotal), fix)
    check_equal(what, "d (key dimension)", manifest["key_dim"], int(index.d), fix)

    if use_gpu:
        index = _to_gpu(index, config)
    if config.kind is IndexKind.IVFPQ:
        set_nprobe(index, nprobe)
    logger.info("loaded %s over %d keys from %s", config.factory, index.ntotal, path)
    return index


def set_nprobe(index, nprobe):
    """Set the IVF cells an index visits per query, clamped to nlist; return the value set.

    A flat index has no cells, so it is left unchanged and the result is None.
    """
    assert nprobe >= 1, f"nprobe must be at least 1, got {nprobe}"
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        nlist = ivf.nlist
    elif _is_gpu_index(index):
        nlist = index.nlist
    else:
        return None
    if nprobe > nlist:
        logger.warning("nprobe=%d exceeds nlist=%d, so every cell is searched (nprobe=%d)", nprobe, nlist, nlist)
        nprobe = nlist
    if ivf is not None:
        ivf.nprobe = nprobe
    else:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    return nprobe


def search(index, queries, k):
    """Return the ``k`` nearest keys of each query, nearest first.

    Args:
        index: a FAISS index over keys of dimension d.
        queries: (n, d) float32 C-contiguous array.
        k: neighbours per query.

    Returns:
        D: (n, k) float32 squared L2 distances (from PQ codes for IVFPQ).
        I: (n, k) int64 datastore rows. Slots beyond the keys found in the
        visited cells, or beyond ntotal, contain id -1 and distance +inf.
    """
    assert queries.ndim == 2, f"queries must be (n, d), got shape {queries.shape}"
    n, d = queries.shape
    assert d == index.d, f"queries have dimension {d}, but the index has d={index.d}"
    assert queries.dtype == np.float32, f"queries must be float32, got {queries.dtype}"
    assert queries.flags.c_contiguous, "queries must be C-contiguous; pass np.ascontiguousarray(queries)"
    assert k >= 1, f"k must be at least 1, got {k}"
    D, I = index.search(queries, k)
    I = I.astype(np.int64, copy=False)
    # faiss reports missing neighbours with the largest float32, not +inf.
    D = np.where(I >= 0, D, np.inf).astype(np.float32, copy=False)
    assert D.shape == (n, k), f"faiss returned D of shape {D.shape}, expected {(n, k)}"
    assert I.shape == (n, k), f"faiss returned I of shape {I.shape}, expected {(n, k)}"
    return D, I


def recall_at_k(index_I, exact_I, exact_D=None):
    """Return the fraction of the exact k nearest neighbours found, averaged over queries.

    Args:
        index_I: (n, k) ids from the search under test; -1 counts as a miss.
        exact_I: (n, k2) ids from exact search, nearest first, k2 >= k.
        exact_D: optional (n, k2) exact squared L2 distances. With them, any
            id whose exact distance ties the k-th one counts as a hit, so the
            result does not depend on how exact search broke ties. Pass
            k2 > k so that ``exact_I`` contains the tied ids beyond column k.

    Returns:
        Recall in [0, 1].
    """
    index_I = np.asarray(index_I)
    exact_I = np.asarray(exact_I)
    assert index_I.ndim == 2, f"index_I must be (n, k), got shape {index_I.shape}"
    n, k = index_I.shape
    assert exact_I.ndim == 2, f"exact_I must be (n, k2), got shape {exact_I.shape}"
    assert exact_I.shape[0] == n, f"exact_I has {exact_I.shape[0]} rows, but index_I has {n}"
    assert exact_I.shape[1] >= k, f"exact_I has {exact_I.shape[1]} columns, fewer than k={k}"
    if n == 0:
        return 1.0

    if exact_D is None:
        accepted = exact_I[:, :k] >= 0  # (n, k)
        exact_I = exact_I[:, :k]
    else:
        exact_D = np.asarray(exact_D)
        assert exact_D.shape == exact_I.shape, (
            f"exact_D has shape {exact_D.shape}, but exact_I has {exact_I.shape}"
        )
        kth = exact_D[:, k - 1 : k]  # (n, 1)
        accepted = (exact_I >= 0) & (exact_D <= kth)  # (n, k2)

    # Offset each query's ids into its own range so that one np.isin call
    # compares ids query by query.
    stride = int(max(index_I.max(), exact_I.max())) + 1
    offsets = np.arange(n, dtype=np.int64)[:, None] * stride  # (n, 1)
    found = index_I >= 0
    hits = np.zeros((n, k), dtype=bool)
    hits[found] = np.isin((index_I + offsets)[found], (exact_I + offsets)[accepted])
    per_query = np.minimum(hits.sum(axis=1), k) / k  # (n,)
    return float(per_query.mean())


def _open_keys(datastore_dir, manifest):
    """Open the (N, d) key memmap and check it against the manifest."""
    keys = open_array(datastore_dir, manifest["keys"], what="datastore keys")
    where = f"datastore keys in {datastore_dir}"
    fix = "The manifest does not describe these keys. " + DUMP_FIX.format(dir=datastore_dir) + " --ppkd-overwrite."
    check_equal(where, "shape", [manifest["num_rows"], manifest["key_dim"]], list(keys.shape), fix)
    check_equal(where, "key_sample_sha256", manifest["key_sample_sha256"], key_sample_fingerprint(keys), fix)
    if keys.dtype not in (np.float16, np.float32):
        raise DatastoreMismatchError(f"{where}: dtype is {keys.dtype}, expected float16 or float32. {fix}")
    return keys


def _new_index(config, seed):
    index = faiss.index_factory(config.dim, config.factory, faiss.METRIC_L2)
    if config.kind is IndexKind.IVFPQ:
        faiss.extract_index_ivf(index).cp.seed = seed
        index.pq.cp.seed = seed
        # Polysemous training reorders PQ codes for Hamming-distance filtering,
        # which search here does not use, and takes most of the training time.
        index.do_polysemous_training = False
    return index


def _train(index, xt, config, use_gpu):
    """Train ``index`` on ``xt`` (n_train, d) float32 and return the trained CPU index."""
    if not use_gpu:
        index.train(xt)
        return index
    gpu_index = _to_gpu(index, config)
    gpu_index.train(xt)
    return faiss.index_gpu_to_cpu(gpu_index)


def _add_rows(index, keys, begin, end, add_batch, config, progress):
    """Add ``keys[begin:end]`` to ``index`` with their row numbers as ids."""
    is_flat = config.kind is IndexKind.FLAT
    for lo in range(begin, end, add_batch):
        hi = min(lo + add_batch, end)
        xb = np.ascontiguousarray(keys[lo:hi], dtype=np.float32)  # (hi - lo, d)
        if is_flat:
            # A flat index numbers keys in insertion order, which is row order here.
            index.add(xb)
        else:
            index.add_with_ids(xb, np.arange(lo, hi, dtype=np.int64))
        progress.update(hi - lo)


def _fill_in_memory(trained, keys, folder, add_batch, config, use_gpu):
    """Add all keys to ``trained`` in RAM and write it to ``folder``."""
    index = _to_gpu(trained, config) if use_gpu else trained
    with _progress_bar(keys.shape[0]) as progress:
        _add_rows(index, keys, 0, keys.shape[0], add_batch, config, progress)
    if use_gpu:
        index = faiss.index_gpu_to_cpu(index)
    _write_index_atomic(index, os.path.join(folder, INDEX_FILE))
    stale = os.path.join(folder, IVFDATA_FILE)  # left by an earlier on-disk build
    if os.path.exists(stale):
        os.remove(stale)


def _fill_ondisk(trained, keys, folder, add_batch, config, use_gpu):
    """Add all keys into on-disk inverted lists and write the index to ``folder``.

    Each batch of ``add_batch`` keys is added to a copy of the trained index
    and written as a shard. The shards' inverted lists are then mapped from
    their files and merged, list by list, into one ``index.ivfdata``, so the
    codes need not fit in RAM at once.
    """
    num_rows = keys.shape[0]
    shard_dir = tempfile.mkdtemp(dir=folder, prefix=".tmp-shards-")
    ivfdata_tmp = os.path.join(folder, ".tmp-" + IVFDATA_FILE)
    ivfdata_path = os.path.abspath(os.path.join(folder, IVFDATA_FILE))
    try:
        shard_paths = []
        with _progress_bar(num_rows) as progress:
            for number, begin in enumerate(range(0, num_rows, add_batch)):
                shard = faiss.clone_index(trained)
                if use_gpu:
                    shard = _to_gpu(shard, config)
                end = min(begin + add_batch, num_rows)
                _add_rows(shard, keys, begin, end, add_batch, config, progress)
                if use_gpu:
                    shard = faiss.index_gpu_to_cpu(shard)
                path = os.path.join(shard_dir, f"shard-{number:05d}.faiss")
                faiss.write_index(shard, path)
                shard_paths.append(path)
                del shard

        index = faiss.clone_index(trained)
        _merge_shards_ondisk(index, shard_paths, ivfdata_tmp)
        os.replace(ivfdata_tmp, ivfdata_path)
        # The open mapping survives the rename, but the index file must store
        # the final name.
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = ivfdata_path
        _write_index_atomic(index, os.path.join(folder, INDEX_FILE))
        del index
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
        if os.path.exists(ivfdata_tmp):
            os.remove(ivfdata_tmp)


def _merge_shards_ondisk(index, shard_paths, ivfdata_path):
    """Move the inverted lists of the shard files into ``index`` as OnDiskInvertedLists.

    ``index`` must be trained and empty. Shard ids are kept as they are.
    """
    ivf = faiss.extract_index_ivf(index)
    assert ivf.ntotal == 0, f"the index to merge into must be empty, it has {ivf.ntotal} keys"
    # IO_FLAG_MMAP maps the shard codes instead of reading them. The shard
    # indexes stay referenced until the merge is done, because they own the
    # mapped lists.
    shards = [faiss.read_index(path, faiss.IO_FLAG_MMAP) for path in shard_paths]
    lists = faiss.InvertedListsPtrVector()
    for shard in shards:
        lists.push_back(faiss.extract_index_ivf(shard).invlists)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata_path)
    ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False)
    del lists, shards
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns the lists now
    ivf.ntotal = ntotal
    index.ntotal = ntotal


def _write_index_atomic(index, path):
    """Write ``index`` to a temporary name next to ``path``, then rename it."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _remove_temporary_files(folder):
    """Delete temporary files and shard folders that an interrupted build left."""
    for path in glob.glob(os.path.join(folder, ".tmp-*")):
        logger.info("removing %s, left by an interrupted build", path)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _progress_bar(total):
    return tqdm(total=total, unit="key", unit_scale=True, desc="add keys")


def _require_gpu():
    num_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if num_gpus == 0 or not hasattr(faiss, "StandardGpuResources"):
        raise GpuUnavailableError(
            f"a GPU index was requested (use_gpu=True or --gpu), but faiss {faiss.__version__} "
            f"sees no GPU (faiss.get_num_gpus() returned {num_gpus}). Install faiss-gpu on a "
            f"machine with a CUDA GPU, or drop --gpu to use the CPU."
        )


def _is_gpu_index(index):
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def _current_cuda_device():
    """Return torch's current CUDA device, which follows CUDA_VISIBLE_DEVICES and set_device."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _to_gpu(index, config):
    # NOTE: the GPU path has not been run; the tests use faiss-cpu. faiss's
    # GPU IVFPQ also accepts only some sub-quantizer counts M and raises for
    # the others.
    options = faiss.GpuClonerOptions()
    if config.kind is IndexKind.IVFPQ and config.pq_m * 2**config.nbits >= GPU_FLOAT16_LUT_ENTRIES:
        options.useFloat16LookupTables = True
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, _current_cuda_device(), index, options)
    # The GPU index uses the resources' memory, so they live as long as it does.
    gpu_index.referenced_objects = [resources]
    return gpu_index
