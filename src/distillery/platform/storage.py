"""Artifact I/O for local paths and s3:// (boto3): directories recursively, sha256 of every object stored as
metadata on upload and verified on download, retries for transient errors and for corrupted transfers."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

from distillery.settings import get_settings

CHECKSUM_KEY = "sha256"


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
                        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10,
                                      read_timeout=60, s3={"addressing_style": "path"}))


def _split(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    return u.netloc, u.path.lstrip("/")


def _local(uri: str) -> Path:
    return Path(urlparse(uri).path if uri.startswith("file://") else uri)


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def upload(local_path: Path, uri: str) -> list[str]:
    """Copy a file or a folder to `uri`; returns the keys (or paths) written."""
    local_path = Path(local_path)
    files = [local_path] if local_path.is_file() else sorted(p for p in local_path.rglob("*") if p.is_file())
    if not local_path.exists():
        raise FileNotFoundError(f"nothing to upload at {local_path}")
    written = []
    if not is_remote(uri):
        dst = _local(uri)
        for f in files:
            target = dst if local_path.is_file() else dst / f.relative_to(local_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            written.append(str(target))
        return written
    bucket, prefix = _split(uri)
    s3 = _s3()
    for f in files:
        key = prefix if local_path.is_file() else f"{prefix.rstrip('/')}/{f.relative_to(local_path).as_posix()}"
        with open(f, "rb") as body:
            s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={CHECKSUM_KEY: sha256_file(f)})
        written.append(f"s3://{bucket}/{key}")
    return written


def list_uri(uri: str) -> list[str]:
    if not is_remote(uri):
        p = _local(uri)
        return [str(f) for f in sorted(p.rglob("*")) if f.is_file()] if p.is_dir() else ([str(p)] if p.exists() else [])
    bucket, prefix = _split(uri)
    keys = []
    for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
    return keys


def exists(uri: str) -> bool:
    return bool(list_uri(uri))


def download(uri: str, local_path: Path, *, attempts: int = 3) -> Path:
    """Copy `uri` (file or folder) to `local_path`, verifying each object's sha256."""
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
    bucket, prefix = _split(uri)
    keys = list_uri(uri)
    if not keys:
        raise FileNotFoundError(f"no objects under {uri}")
    s3 = _s3()
    single = len(keys) == 1 and keys[0] == f"s3://{bucket}/{prefix}"
    for full in keys:
        key = _split(full)[1]
        target = local_path if single else local_path / key[len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            obj = s3.get_object(Bucket=bucket, Key=key)
            target.write_bytes(obj["Body"].read())
            expected = obj.get("Metadata", {}).get(CHECKSUM_KEY)
            if expected is None or sha256_file(target) == expected:
                break
            if attempt == attempts:
                got = sha256_file(target)
                target.unlink(missing_ok=True)
                raise ChecksumError(f"s3://{bucket}/{key}: sha256 mismatch after {attempts} attempts (stored "
                                    f"{expected[:12]}..., got {got[:12]}...); the object changed or was corrupted "
                                    "after upload")
            time.sleep(0.2 * attempt)
    return local_path
