"""Locate, fetch and verify the official WikiText token files.

WikiText (Merity et al., 2016) ships as ``wikitext-2-v1.zip`` and
``wikitext-103-v1.zip``, each holding ``wiki.{train,valid,test}.tokens``
already tokenized at the word level. The SHA-1 values below are those of the
decompressed token files in the official archives (the WikiText-103 training
value is the one published with the GluonNLP and MXNet dataset loaders).
"""

import hashlib
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")

TOKEN_SHA1 = {
    "wikitext-2": {
        "train": "863f29c46ef9d167fff4940ec821195882fe29d1",
        "valid": "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422",
        "test": "c7b8ce0aa086fb34dab808c5c49224211eb2b172",
    },
    "wikitext-103": {
        "train": "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211",
        "valid": "c326ac59dc587676d58c422eb8a03e119582f92b",
        "test": "8a5befc548865cec54ed4273cf87dbbad60d1e47",
    },
}

# The original S3 link (research.metamind.io) has been reported dead, so
# every mirror is tried in order and each download is verified by checksum.
ARCHIVE_URLS = {
    "wikitext-2": [
        "https://wikitext.smerity.com/wikitext-2-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
    ],
    "wikitext-103": [
        "https://wikitext.smerity.com/wikitext-103-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
        "https://dax-cdn.cdn.appdomain.cloud/dax-wikitext-103/1.0.1/wikitext-103.tar.gz",
    ],
}


class ChecksumError(ValueError):
    """A token file whose SHA-1 differs from the official value."""


def sha1_of_file(path, chunk_bytes=1 << 20):
    """Return the hex SHA-1 of the file at ``path``."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_token_file(path, corpus, split, origin=None):
    """Raise :class:`ChecksumError` unless ``path`` has the official SHA-1.

    ``origin`` names the file the user supplied when ``path`` is a copy of it.
    """
    expected = TOKEN_SHA1[corpus][split]
    actual = sha1_of_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{origin or path}: SHA-1 {actual} does not match the official {corpus} "
            f"{split} value {expected}. The file is corrupted or is not the "
            f"official wiki.{split}.tokens; delete it and fetch it again "
            f"(for example with --source pointing at a fresh copy)."
        )
    return actual


def _candidates(source, corpus, split):
    name = f"wiki.{split}.tokens"
    for folder in (os.path.join(source, corpus), os.path.join(source, f"{corpus}-v1"), source):
        for suffix in ("", ".xz"):
            yield os.path.join(folder, name + suffix)


class DamagedSourceError(RuntimeError):
    """A compressed token file or archive that cannot be read to its end."""


# Exceptions the standard library raises on a truncated or corrupted .xz, zip or tar file.
_READ_ERRORS = (EOFError, lzma.LZMAError, zlib.error, zipfile.BadZipFile, tarfile.TarError, OSError)


def _copy_to(open_source, origin, dst):
    """Copy the stream ``open_source()`` to ``dst`` through ``dst.tmp``.

    A read error removes the partial ``dst.tmp`` and raises
    :class:`DamagedSourceError` naming ``origin``, so nothing half-written is
    left behind.
    """
    tmp = dst + ".tmp"
    try:
        with open_source() as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except _READ_ERRORS as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DamagedSourceError(
            f"{origin}: cannot be read to its end ({type(err).__name__}: {err}); the file is truncated or "
            f"corrupted, so copy or download it again"
        ) from err
    os.replace(tmp, dst)


def _copy_decompressed(src, dst):
    opener = lzma.open if src.endswith(".xz") else open
    _copy_to(lambda: opener(src, "rb"), src, dst)


def _extract_from_archive(archive, corpus, split, dst):
    name = f"wiki.{split}.tokens"
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if os.path.basename(m) == name]
            if not members:
                return False
            _copy_to(lambda: zf.open(members[0]), f"{archive}:{members[0]}", dst)
            return True
    if tarfile.is_tarfile(archive):
        try:
            with tarfile.open(archive) as tf:
                members = [m for m in tf.getmembers() if os.path.basename(m.name) == name]
                if not members:
                    return False
                _copy_to(lambda: tf.extractfile(members[0]), f"{archive}:{members[0].name}", dst)
        except _READ_ERRORS as err:
            raise DamagedSourceError(f"{archive}: cannot be read ({type(err).__name__}: {err}); the archive is "
                                     f"truncated or corrupted, so download it again") from err
        return True
    raise ValueError(f"{archive}: not a zip or tar archive; pass the folder or the official archive")


def download_archive(corpus, dest_dir, urls=None):
    """Download the official archive, trying each mirror; return its path.

    Raises ``RuntimeError`` listing every URL and its error when all fail.
    """
    urls = urls or ARCHIVE_URLS[corpus]
    errors = []
    for url in urls:
        target = os.path.join(dest_dir, os.path.basename(url))
        if os.path.exists(target):
            return target
        logger.info("downloading %s", url)
        fd, tmp = tempfile.mkstemp(dir=dest_dir, suffix=".part")
        os.close(fd)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            os.replace(tmp, target)
            return target
        except OSError as err:  # URLError and HTTPError are OSErrors
            errors.append(f"{url}: {err}")
            logger.warning("download failed: %s: %s", url, err)
            if os.path.exists(tmp):
                os.remove(tmp)
    raise RuntimeError(
        f"could not download {corpus} from any mirror:\n  "
        + "\n  ".join(errors)
        + f"\nDownload the archive yourself and pass it with --source (or WIKITEXT_DIR)."
    )


def fetch_token_files(corpus, raw_dir, source=None, splits=SPLITS, download=True):
    """Place verified ``wiki.{split}.tokens`` files in ``raw_dir``.

    ``source`` is a folder (holding ``.tokens`` or ``.tokens.xz`` files, either
    directly or under ``<corpus>/``) or an official archive. Without a source,
    the archive is downloaded. Splits absent from a local source are skipped
    with a warning, so that a folder holding only valid and test works.

    Returns a dict ``split -> path`` of the files placed.
    """
    if corpus not in TOKEN_SHA1:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {sorted(TOKEN_SHA1)}")
    os.makedirs(raw_dir, exist_ok=True)
    placed = {}
    archive = None
    if source is None and download:
        archive = download_archive(corpus, raw_dir)
    elif source is not None and os.path.isfile(source):
        archive = source
    elif source is None:
        raise ValueError(f"no source for {corpus} and download=False; pass the folder or archive")
    elif not os.path.isdir(source):
        raise FileNotFoundError(f"WikiText source {source} is neither a folder nor an archive")

    for split in splits:
        dst = os.path.join(raw_dir, f"wiki.{split}.tokens")
        if os.path.exists(dst):
            try:
                verify_token_file(dst, corpus, split)
                placed[split] = dst
                continue
            except ChecksumError:
                logger.warning("%s fails its checksum; fetching it again", dst)
                os.remove(dst)
        origin = None
        if archive is not None:
            if _extract_from_archive(archive, corpus, split, dst):
                origin = f"{archive}:wiki.{split}.tokens"
        else:
            for candidate in _candidates(source, corpus, split):
                if os.path.isfile(candidate):
                    _copy_decompressed(candidate, dst)
                    origin = candidate
                    break
        if origin is None:
            logger.warning("%s %s split not found in %s; skipping it", corpus, split, source or archive)
            continue
        try:
            verify_token_file(dst, corpus, split, origin=origin)
        except ChecksumError:
            os.remove(dst)
            raise
        placed[split] = dst
    return placed
