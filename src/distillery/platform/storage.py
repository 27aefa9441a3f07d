"""Artifact I/O for local paths, file:// and s3:// (boto3, any S3 endpoint from the settings).

Folders are copied recursively. On S3 every object carries its sha256 as metadata (written on upload, verified on
download); a mismatch is fetched again and, if it persists, fails with `ChecksumError`. Transient S3 errors
(throttling, 5xx, dropped connections) are retried by botocore's standard retry mode.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

from distillery.settings import get_settings

log = logging.getLogger(__name__)

CHECKSUM_KEY = "sha256"  # stored as x-amz-meta-sha256
MAX_ATTEMPTS = 5


class ChecksumError(IOError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _s3():
    import boto3
    from botocore.config import Config

    s = get_settings()
    return boto3.client("s3", endpoint_url=s.s3_endpoint_url, region_name=s.s3_region,
                        config=Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}, connect_timeout=10,
                                      read_timeout=60, s3={"addressing_style": "path"}))


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _split(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    if not u.netloc:
        raise ValueError(f"an S3 URI needs a bucket: s3://BUCKET/key, got {uri!r}")
    return u.netloc, u.path.lstrip("/")


def _local(uri: str | Path) -> Path:
    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path, file://PATH or s3://BUCKET/KEY")
    return Path(urlparse(uri).path if uri.startswith("file://") else uri)


def _files(local_path: Path) -> builtins.list[Path]:
    return sorted(p for p in local_path.rglob("*") if p.is_file()) if local_path.is_dir() else [local_path]


def upload(local_path: Path, uri: str) -> builtins.list[str]:
    """Copy a file or a folder to `uri` (a folder's files land under `uri/`); returns the paths/URIs written."""
    local_path = Path(local_path)
    if not local_path.exists():
        raise FileNotFoundError(f"nothing to upload at {local_path}")
    is_dir = local_path.is_dir()
    written = []
    if not is_remote(uri):
        dst = _local(uri)
        for f in _files(local_path):
            target = dst / f.relative_to(local_path) if is_dir else dst
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            written.append(str(target))
        return written
    bucket, prefix = _split(uri)
    if not prefix and not is_dir:
        raise ValueError(f"uploading a file needs a key: s3://{bucket}/KEY, got {uri!r}")
    s3 = _s3()
    for f in _files(local_path):
        key = f"{prefix.rstrip('/')}/{f.relative_to(local_path).as_posix()}".lstrip("/") if is_dir else prefix
        # upload_file switches to multipart for large files; the checksum is of the whole file, not of parts.
        s3.upload_file(str(f), bucket, key, ExtraArgs={"Metadata": {CHECKSUM_KEY: sha256_file(f)}})
        written.append(f"s3://{bucket}/{key}")
    return written


def _keys(bucket: str, prefix: str) -> builtins.list[str]:
    keys = []
    for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _s3_layout(uri: str) -> tuple[str, str, builtins.list[str], bool]:
    """(bucket, prefix, keys, is_single_object). `s3://b/model` is the object `model` if it exists, else the
    folder `model/` (never `model2/...`)."""
    bucket, prefix = _split(uri)
    if prefix and not prefix.endswith("/"):
        exact = [k for k in _keys(bucket, prefix) if k == prefix]
        if exact:
            return bucket, prefix, exact, True
        prefix += "/"
    return bucket, prefix, _keys(bucket, prefix), False


def list_uri(uri: str) -> builtins.list[str]:
    """Every file under `uri` (a file or a folder), as paths or s3:// URIs."""
    if not is_remote(uri):
        p = _local(uri)
        return [str(f) for f in _files(p)] if p.exists() else []
    bucket, _, keys, _ = _s3_layout(uri)
    return [f"s3://{bucket}/{k}" for k in keys]


list = list_uri  # noqa: A001 - the module's public name; builtins.list is used inside


def exists(uri: str) -> bool:
    return bool(list_uri(uri))


def _fetch(s3, bucket: str, key: str, target: Path, attempts: int) -> None:
    for attempt in range(1, attempts + 1):
        obj = s3.get_object(Bucket=bucket, Key=key)
        expected = obj.get("Metadata", {}).get(CHECKSUM_KEY)
        h = hashlib.sha256()
        with open(target, "wb") as out:
            for chunk in obj["Body"].iter_chunks(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if expected is None:
            log.debug("s3://%s/%s has no sha256 metadata (not uploaded by us); not verified", bucket, key)
            return
        if h.hexdigest() == expected:
            return
        log.warning("s3://%s/%s: sha256 mismatch on attempt %d/%d, fetching again", bucket, key, attempt, attempts)
        if attempt < attempts:
            time.sleep(0.2 * attempt)
    target.unlink(missing_ok=True)
    raise ChecksumError(f"s3://{bucket}/{key}: sha256 mismatch after {attempts} attempts (stored {expected[:12]}..., "
                        f"got {h.hexdigest()[:12]}...): the object was corrupted or replaced after upload. Upload it "
                        "again with distillery.platform.storage.upload")


def download(uri: str, local_path: Path, *, attempts: int = 3) -> Path:
    """Copy `uri` (file or folder) to `local_path`, verifying each S3 object's sha256; returns `local_path`."""
    local_path = Path(local_path)
    if not is_remote(uri):
        src = _local(uri)
        if not src.exists():
            raise FileNotFoundError(f"{uri} does not exist")
        if src.is_dir():
            shutil.copytree(src, local_path, dirs_exist_ok=True)
        else:
            local_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, local_path)
        return local_path
    bucket, prefix, keys, single = _s3_layout(uri)
    if not keys:
        raise FileNotFoundError(f"no objects at {uri} (check the bucket, the key and the S3 endpoint)")
    s3 = _s3()
    for key in keys:
        target = local_path if single else local_path / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        _fetch(s3, bucket, key, target, attempts)
    return local_path
