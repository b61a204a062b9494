"""mirl_ds.data.object_store against a real S3 server (SeaweedFS on loopback, see s3_server.py)."""
import contextlib
import hashlib
import io
import os
import secrets
import socket
import threading
import time
import traceback
import importlib

import pytest
import webdataset as wds

from mirl_ds.data import object_store as obs
from mirl_ds.data.object_store import RetryPolicy, ShardAccessDenied, ShardNotFound, ShardUnavailable

wds_gopen = importlib.import_module("webdataset.gopen")

BUCKET = "objstore-tests"


@pytest.fixture
def bucket(s3_server):
    return s3_server.bucket(BUCKET)


def _url(bucket, key):
    return f"s3://{bucket}/{key}"


@contextlib.contextmanager
def s3_calls(operation):
    """Record the parameters of every `operation` call made by object_store's current client."""
    calls = []
    events = obs._client().meta.events

    def hook(params, **kw):
        calls.append(dict(params))

    events.register(f"before-parameter-build.s3.{operation}", hook)
    try:
        yield calls
    finally:
        events.unregister(f"before-parameter-build.s3.{operation}", hook)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- URLs


def test_parse_s3_url_splits_bucket_and_key_and_rejects_other_schemes():
    assert obs.parse_s3_url("s3://b/some/key.tar") == ("b", "some/key.tar")
    assert obs.parse_s3_url("s3://b/prefix/") == ("b", "prefix/")
    assert obs.parse_s3_url("s3://b") == ("b", "")
    for bad in ("http://b/k", "/local/path", "s3:///k", "b/k"):
        with pytest.raises(ValueError):
            obs.parse_s3_url(bad)


# ----------------------------------------------------------------------------- round trips


def test_write_read_exists_list_round_trip(bucket):
    payload = os.urandom(300_000)
    url = _url(bucket, "rt/a-000000.tar")
    assert not obs.exists(url)
    obs.write_bytes(url, payload)
    obs.write_bytes(_url(bucket, "rt/a-000001.tar"), b"second")
    obs.write_bytes(_url(bucket, "rt/a.manifest.json"), b"{}")
    obs.write_bytes(_url(bucket, "rtx/other"), b"not under rt/")
    assert obs.exists(url)
    assert obs.read_bytes(url) == payload
    assert obs.read_bytes(_url(bucket, "rt/a-000001.tar")) == b"second"
    assert obs.list_urls(_url(bucket, "rt/")) == [
        _url(bucket, "rt/a-000000.tar"), _url(bucket, "rt/a-000001.tar"), _url(bucket, "rt/a.manifest.json"),
    ]
    assert obs.list_urls(_url(bucket, "rt/a-")) == [_url(bucket, "rt/a-000000.tar"), _url(bucket, "rt/a-000001.tar")]
    assert obs.list_urls(_url(bucket, "nothing-here/")) == []


def test_open_write_uploads_only_on_clean_close(bucket):
    url = _url(bucket, "ow/shard.tar")
    with obs.open_write(url) as f:
        f.write(b"abc")
        f.write(memoryview(b"def"))
        assert not obs.exists(url), "open_write must spool locally and upload on close"
    assert obs.read_bytes(url) == b"abcdef"

    failed = _url(bucket, "ow/failed.tar")
    with pytest.raises(RuntimeError):
        with obs.open_write(failed) as f:
            f.write(b"partial")
            raise RuntimeError("writer crashed")
    assert not obs.exists(failed), "a failed write must not leave a partial object"


def test_upload_file_uploads_local_file(bucket, tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(os.urandom(100_000))
    url = _url(bucket, "up/x.bin")
    obs.upload_file(p, url)
    assert obs.read_bytes(url) == p.read_bytes()


def test_client_is_rebuilt_in_a_forked_child(bucket):
    url = _url(bucket, "fork/x")
    obs.write_bytes(url, b"from parent")
    parent_client = obs._client()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's client (and its connection pool)
        ok = b"0"
        try:
            ok = b"1" if obs._client() is not parent_client and obs.read_bytes(url) == b"from parent" else b"0"
        finally:
            os.write(w, ok)
            os._exit(0)
    os.close(w)
    result = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert result == b"1"
    assert obs._client() is parent_client


# ----------------------------------------------------------------------------- errors


def test_missing_key_raises_shard_not_found_naming_url_without_retrying(bucket):
    url = _url(bucket, "missing/x-000000.tar")
    with s3_calls("GetObject") as calls:
        with pytest.raises(ShardNotFound) as ei:
            obs.open_stream(url)
    assert len(calls) == 1, "a missing object is permanent: no retries"
    err = ei.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, OSError)
    msg = str(err)
    assert url in msg and "does not exist" in msg and "AWS_ENDPOINT_URL" in msg
    text = "".join(traceback.format_exception(err))
    assert "botocore" not in text and "ClientError" not in text

    with pytest.raises(ShardNotFound, match="bucket does not exist"):
        obs.read_bytes("s3://no-such-bucket-mirl/x.tar")


def test_wrong_secret_is_access_denied_and_never_shows_the_secret(bucket, s3_server, monkeypatch):
    url = _url(bucket, "auth/x")
    obs.write_bytes(url, b"secret data")
    wrong = "WRONG" + secrets.token_urlsafe(24)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with s3_calls("GetObject") as calls:
        with pytest.raises(ShardAccessDenied) as ei:
            obs.read_bytes(url)
    assert len(calls) == 1, "access denied is permanent: no retries"
    assert isinstance(ei.value, PermissionError)
    msg = str(ei.value)
    assert url in msg and "access denied" in msg and "credentials" in msg
    with pytest.raises(ShardAccessDenied) as ei_head:
        obs.exists(url)
    for e in (ei.value, ei_head.value):
        text = "".join(traceback.format_exception(e)) + repr(e)
        assert wrong not in text and s3_server.secret_key not in text


def test_unreachable_endpoint_gives_up_after_the_policy_attempts(bucket, monkeypatch):
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    url = _url(bucket, "dead/x.tar")
    with s3_calls("GetObject") as calls:
        with pytest.raises(ShardUnavailable) as ei:
            obs.read_bytes(url, policy=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02))
    assert len(calls) == 3
    assert not isinstance(ei.value, (ShardNotFound, ShardAccessDenied))
    msg = str(ei.value)
    assert url in msg and "3 attempts" in msg


# ----------------------------------------------------------------------------- streaming


def test_stream_resumes_with_ranged_get_when_endpoint_restarts_mid_read(bucket, s3_server):
    data = os.urandom(24 << 20)  # larger than what loopback socket buffers hold in flight
    url = _url(bucket, "outage/big.bin")
    obs.write_bytes(url, data)
    chunk = 64 << 10
    restart_errors = []

    def restart_later():
        try:
            time.sleep(1.5)
            s3_server.start()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            restart_errors.append(e)

    with s3_calls("GetObject") as calls:
        f = obs.open_stream(url, bufsize=chunk)
        parts = [f.read(chunk)]
        s3_server.stop()  # the endpoint goes away with the rest of the object unread
        t = threading.Thread(target=restart_later)
        t.start()
        t0 = time.monotonic()
        try:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                parts.append(b)
        finally:
            t.join()
            f.close()
        elapsed = time.monotonic() - t0
    assert not restart_errors, restart_errors
    got = b"".join(parts)
    n_got, n_want = len(got), len(data)
    assert n_got == n_want
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    resumed = [c for c in calls if c.get("Range")]
    assert resumed, "the read should have been resumed by a ranged GET"
    assert all(c["Range"].startswith("bytes=") and int(c["Range"][6:-1]) > 0 for c in resumed)
    assert elapsed > 1.0, "the outage should have been noticed"


def test_register_gopen_routes_s3_reads_and_writes(bucket):
    obs.register_gopen()
    obs.register_gopen()
    assert wds_gopen.gopen_schemes["s3"] is obs._gopen_s3
    url = _url(bucket, "gopen/x.bin")
    with wds.gopen(url, "wb") as f:
        f.write(b"written through gopen")
    with wds.gopen(url, "rb") as f:
        assert f.read() == b"written through gopen"


def test_webdataset_pipeline_yields_every_sample_from_s3_shards(bucket, tmp_path):
    expected = {}
    for shard in range(2):
        samples = []
        for i in range(5):
            key = f"s{shard}_{i:03d}"
            jpg = os.urandom(1000 + i)
            expected[key] = (jpg, str(i).encode())
            samples.append({"__key__": key, "jpg": jpg, "cls": str(i).encode()})
        url = _url(bucket, f"wds/x-{shard:06d}.tar")
        if shard == 0:  # in memory, one PUT
            buf = io.BytesIO()
            with wds.TarWriter(buf) as tw:
                for s in samples:
                    tw.write(s)
            obs.write_bytes(url, buf.getvalue())
        else:  # a local file, uploaded
            path = tmp_path / f"x-{shard:06d}.tar"
            with wds.TarWriter(str(path)) as tw:
                for s in samples:
                    tw.write(s)
            obs.upload_file(path, url)

    ds = wds.WebDataset(_url(bucket, "wds/x-{000000..000001}.tar"), shardshuffle=False)
    got = {s["__key__"]: (s["jpg"], s["cls"]) for s in ds}
    assert got == expected


def test_http_reader_streams_a_presigned_url_and_reports_missing(bucket, s3_server):
    data = os.urandom(200_000)
    obs.write_bytes(_url(bucket, "http/x.bin"), data)
    c = s3_server.client()
    ok = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "http/x.bin"}, ExpiresIn=300)
    with obs.open_http_stream(ok) as f:
        assert f.read() == data
    missing = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "http/none"}, ExpiresIn=300)
    with pytest.raises(ShardNotFound):
        obs.open_http_stream(missing)


def test_open_write_retries_the_upload_when_the_endpoint_comes_back(bucket, s3_server):
    # boto3 closes the file it uploads from when a transfer fails; the retry must still read it.
    url = _url(bucket, "outage/written.bin")
    data = os.urandom(1 << 20)
    s3_server.stop()
    t = threading.Timer(1.0, s3_server.start)
    t.start()
    try:
        with obs.open_write(url, policy=RetryPolicy(attempts=8, base_delay=0.5, max_delay=2.0)) as f:
            f.write(data)
    finally:
        t.join()
    assert obs.read_bytes(url) == data
