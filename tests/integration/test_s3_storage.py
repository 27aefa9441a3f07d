"""distillery.platform.storage against the Ceph RADOS Gateway: folders round-trip with their sha256, and an object
replaced behind our back is detected."""

from __future__ import annotations

import hashlib
import os

import pytest

pytestmark = pytest.mark.integration


def test_folder_round_trip_with_sha256_metadata(s3_env, s3, tmp_path):
    from distillery.platform import storage

    src = tmp_path / "ds"
    (src / "nested").mkdir(parents=True)
    files = {"data.npz": os.urandom(9_000_000),  # above boto3's 8 MiB multipart threshold
             "nested/manifest.json": b'{"ok": true}'}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    uri = f"s3://{s3.bucket}/datasets/demo"
    written = storage.upload(src, uri)
    assert sorted(written) == sorted(f"{uri}/{rel}" for rel in files)
    assert sorted(s3.keys("datasets/demo/")) == sorted(f"datasets/demo/{rel}" for rel in files)
    for rel, data in files.items():
        head = s3.client().head_object(Bucket=s3.bucket, Key=f"datasets/demo/{rel}")
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert head["ContentLength"] == len(data)
    # `demo` is a folder; the sibling prefix `demo2` must not be mistaken for part of it.
    storage.upload(src / "nested" / "manifest.json", f"s3://{s3.bucket}/datasets/demo2/x.json")
    assert storage.exists(uri) and len(storage.list_uri(uri)) == 2

    out = storage.download(uri, tmp_path / "out")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files

    with pytest.raises(FileNotFoundError, match="no objects"):
        storage.download(f"s3://{s3.bucket}/datasets/absent", tmp_path / "none")


def test_replaced_object_is_detected(s3_env, s3, tmp_path):
    from distillery.platform import storage

    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.safetensors").write_bytes(os.urandom(50_000))
    uri = f"s3://{s3.bucket}/models/tampered"
    storage.upload(src, uri)

    # Someone rewrites the object and copies the old metadata along: the stored checksum no longer matches.
    c, key = s3.client(), "models/tampered/weights.safetensors"
    head = c.head_object(Bucket=s3.bucket, Key=key)
    c.put_object(Bucket=s3.bucket, Key=key, Body=os.urandom(50_000), Metadata=head["Metadata"])
    with pytest.raises(storage.ChecksumError, match="sha256 mismatch"):
        storage.download(uri, tmp_path / "out", attempts=2)
    assert not (tmp_path / "out" / "weights.safetensors").exists()  # no corrupt file left behind
