"""Artifact storage: local paths and file://, and s3:// against moto (a mock, used here for fault injection:
corrupted objects, transient server errors). The real S3 server is exercised by the integration tests."""

from __future__ import annotations

import hashlib
import io

import pytest


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(bytes(range(256)) * 40)
    (src / "sub" / "b.txt").write_text("b")
    return src


def test_local_round_trip(tmp_path, tree):
    from distillery.platform import storage

    written = storage.upload(tree, str(tmp_path / "store"))
    assert sorted(written) == sorted([str(tmp_path / "store" / "a.bin"), str(tmp_path / "store" / "sub" / "b.txt")])
    out = storage.download(f"file://{tmp_path / 'store'}", tmp_path / "out")
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert storage.sha256_file(out / "a.bin") == hashlib.sha256((tree / "a.bin").read_bytes()).hexdigest()
    storage.upload(tree / "sub" / "b.txt", f"file://{tmp_path / 'single' / 'b.txt'}")
    assert storage.list(str(tmp_path / "single")) == [str(tmp_path / "single" / "b.txt")]
    assert storage.exists(str(tmp_path / "store")) and not storage.exists(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.download(str(tmp_path / "none"), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="nothing to upload"):
        storage.upload(tmp_path / "none", str(tmp_path / "y"))
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.upload(tree, "gs://bucket/x")


@pytest.fixture
def s3(home, monkeypatch):
    """moto's in-process S3 with one bucket; credentials are fake and only for the mock."""
    moto = pytest.importorskip("moto")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto.mock_aws():
        from distillery.platform import storage

        storage._s3().create_bucket(Bucket="bkt")
        yield storage._s3()


def test_s3_folders_checksums_and_prefixes(s3, tmp_path, tree):
    from distillery.platform import storage

    keys = storage.upload(tree, "s3://bkt/models/m")
    assert sorted(keys) == ["s3://bkt/models/m/a.bin", "s3://bkt/models/m/sub/b.txt"]
    head = s3.head_object(Bucket="bkt", Key="models/m/a.bin")
    assert head["Metadata"]["sha256"] == storage.sha256_file(tree / "a.bin")
    storage.upload(tree / "sub" / "b.txt", "s3://bkt/models/m2/only.txt")  # a sibling sharing the prefix "m"

    assert storage.list("s3://bkt/models/m") == keys
    assert storage.exists("s3://bkt/models/m/a.bin") and not storage.exists("s3://bkt/models/nothing")
    out = storage.download("s3://bkt/models/m", tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a.bin", "sub/b.txt"]
    assert (out / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
    one = storage.download("s3://bkt/models/m2/only.txt", tmp_path / "one.txt")
    assert one.read_text() == "b"
    with pytest.raises(FileNotFoundError, match="no objects at"):
        storage.download("s3://bkt/models/none", tmp_path / "none")
    with pytest.raises(ValueError, match="needs a key"):
        storage.upload(tree / "a.bin", "s3://bkt")
    # Objects written by others (no sha256 metadata) download unverified.
    s3.put_object(Bucket="bkt", Key="foreign/x.txt", Body=b"x")
    assert storage.download("s3://bkt/foreign/x.txt", tmp_path / "x.txt").read_bytes() == b"x"


def test_s3_corrupted_object_is_detected(s3, tmp_path, tree):
    from distillery.platform import storage

    storage.upload(tree / "a.bin", "s3://bkt/data/a.bin")
    good = s3.head_object(Bucket="bkt", Key="data/a.bin")["Metadata"]["sha256"]
    s3.put_object(Bucket="bkt", Key="data/a.bin", Body=b"bit rot", Metadata={"sha256": good})
    with pytest.raises(storage.ChecksumError, match="sha256 mismatch after 2 attempts"):
        storage.download("s3://bkt/data/a.bin", tmp_path / "a.bin", attempts=2)
    assert not (tmp_path / "a.bin").exists()  # no corrupted file left behind


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


def _inject(client, event: str, fault):
    """Run `fault(call_number)` before each matching request; a returned response replaces the real one."""
    calls = []

    def handler(request, **kwargs):
        calls.append(request.url)
        return fault(len(calls))

    client.meta.events.register_first(f"before-send.s3.{event}", handler)
    return calls


def test_s3_transient_corruption_and_server_errors_are_retried(s3, tmp_path, tree, monkeypatch):
    from botocore.awsrequest import AWSResponse
    from botocore.response import StreamingBody

    from distillery.platform import storage

    storage.upload(tree / "a.bin", "s3://bkt/data/a.bin")
    shared = storage._s3()
    monkeypatch.setattr(storage, "_s3", lambda: shared)

    # The first read returns a damaged body: fetched again, and the second read verifies.
    real_get = shared.get_object
    reads = []

    def flaky_get(**kw):
        obj = real_get(**kw)
        reads.append(kw["Key"])
        if len(reads) == 1:
            obj["Body"].read()
            obj["Body"] = StreamingBody(io.BytesIO(b"garbled"), len(b"garbled"))
        return obj

    monkeypatch.setattr(shared, "get_object", flaky_get)
    out = storage.download("s3://bkt/data/a.bin", tmp_path / "a.bin")
    assert len(reads) == 2 and out.read_bytes() == (tree / "a.bin").read_bytes()
    monkeypatch.setattr(shared, "get_object", real_get)

    # Two 503s from the server, then success: botocore's standard retry mode absorbs them.
    def busy(n):
        if n <= 2:
            return AWSResponse("https://bkt", 503, {}, _Raw(b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"))
        return None

    calls = _inject(shared, "GetObject", busy)
    out = storage.download("s3://bkt/data/a.bin", tmp_path / "b.bin")
    assert len(calls) == 3 and out.read_bytes() == (tree / "a.bin").read_bytes()
