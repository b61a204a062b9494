"""S3 (and S3-compatible) object storage for shards: read, write, list, stream.

Configuration comes only from the standard AWS environment, which boto3 reads itself:
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (a self-hosted store: MinIO, SeaweedFS, Ceph, …),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` and
``AWS_DEFAULT_REGION``. Requests use path-style addressing (``http://host/bucket/key``), which
self-hosted stores need. With no credentials at all, requests go unsigned (public buckets).
Credentials are never printed or logged: error messages name the URL and the error code only.

Errors:

* transient (connection refused/reset, timeouts, a stream cut short, HTTP 5xx/429) are retried
  with exponential backoff (:class:`RetryPolicy`); a stream that breaks mid-read is resumed by
  a ranged GET from the current byte offset (pinned to the object's ETag with ``If-Match``, so
  a replaced object is an error rather than a silent splice);
* permanent (no such key/bucket, access denied, …) are not retried;
* both end in :class:`ShardUnavailable` (an :class:`OSError`): one sentence naming the URL and
  what to check. A missing object raises :class:`ShardNotFound`, which is also a
  :class:`FileNotFoundError`; access denied raises :class:`ShardAccessDenied`, also a
  :class:`PermissionError`.

Importing this module registers the streaming reader (and writer) for ``s3://`` URLs in
webdataset's ``gopen``, so ``wds.WebDataset("s3://bucket/train-{000000..000099}.tar")`` works.
``http(s)://`` is left to webdataset's curl handler when curl exists, else a urllib reader with
the same retry/resume behaviour is registered. Local paths need nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator

__all__ = [
    "RetryPolicy",
    "ShardUnavailable",
    "ShardNotFound",
    "ShardAccessDenied",
    "parse_s3_url",
    "exists",
    "read_bytes",
    "write_bytes",
    "upload_file",
    "list_urls",
    "open_write",
    "open_stream",
    "open_http_stream",
    "register_gopen",
    "clear_client_cache",
]

log = logging.getLogger(__name__)

_CHECK_ENDPOINT = "check that the object store at AWS_ENDPOINT_URL is up and reachable"
_CHECK_CREDENTIALS = (
    "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
    "and the bucket's permissions"
)


# ----------------------------------------------------------------------------- errors / policy


class ShardUnavailable(OSError):
    """An object that could not be read or written; ``str()`` is one sentence naming the URL."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        self.message = f"{url}: {reason}"
        super().__init__(self.message)

    def __str__(self) -> str:  # stable even if a caller (webdataset) appends to .args
        return self.message

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.url, self.reason))


class ShardNotFound(ShardUnavailable, FileNotFoundError):
    """The bucket or key does not exist."""


class ShardAccessDenied(ShardUnavailable, PermissionError):
    """The store refused the credentials or the request."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all (the first included) of one request or of one stalled read;
    the n-th retry waits ``min(max_delay, base_delay * 2**(n-1))``, shortened by up to
    ``jitter`` (a fraction) at random so that many readers do not retry in lockstep."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.2

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.base_delay < 0 or self.max_delay < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy delays must be >= 0 and jitter within [0, 1]")

    def delay(self, retry: int) -> float:
        d = min(self.max_delay, self.base_delay * (2 ** max(0, retry - 1)))
        return d * (1.0 - self.jitter * random.random())


DEFAULT_POLICY = RetryPolicy()


class _Transient(Exception):
    """Internal: a stream ended before its announced length."""


# ----------------------------------------------------------------------------- classification

_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "BandwidthLimitExceeded",
    "RequestThrottled", "ServerBusy", "500", "502", "503", "504",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"}
_DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
    "InvalidSecurity", "403", "401", "Forbidden", "Unauthorized",
}


def _transient_types() -> tuple[type, ...]:
    import botocore.exceptions as bce
    import urllib3.exceptions as u3e

    return (
        bce.ConnectionError,        # EndpointConnectionError, ConnectTimeoutError, SSLError, …
        bce.HTTPClientError,        # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
        bce.IncompleteReadError,
        u3e.HTTPError,              # ProtocolError, ReadTimeoutError, …
        ConnectionError,            # refused / reset / aborted / broken pipe
        TimeoutError,
        http.client.HTTPException,  # IncompleteRead, RemoteDisconnected, …
        _Transient,
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _classify_s3(url: str, exc: BaseException) -> ShardUnavailable | str | None:
    """"transient", a ShardUnavailable to raise, or None (not ours: re-raise unchanged)."""
    import botocore.exceptions as bce

    transient = _transient_types()
    for e in _chain(exc):
        if isinstance(e, ShardUnavailable):
            return e
        if isinstance(e, bce.ClientError):
            err = e.response.get("Error", {}) or {}
            code = str(err.get("Code") or "")
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _MISSING_CODES or (status == 404 and code not in _TRANSIENT_CODES):
                what = "bucket" if code == "NoSuchBucket" else "object"
                return ShardNotFound(
                    url, f"the {what} does not exist; check the bucket/prefix and AWS_ENDPOINT_URL"
                )
            if code in _DENIED_CODES or status in (401, 403):
                return ShardAccessDenied(url, f"access denied ({code or status}); {_CHECK_CREDENTIALS}")
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return "transient"
            if code == "PreconditionFailed" or status == 412:
                return ShardUnavailable(
                    url, "the object was replaced while it was being read; re-read it from the start"
                )
            return ShardUnavailable(url, f"the store rejected the request ({code or status})")
        if isinstance(e, (bce.NoCredentialsError, bce.PartialCredentialsError,
                          bce.CredentialRetrievalError, bce.ProfileNotFound)):
            return ShardAccessDenied(url, f"no usable AWS credentials ({type(e).__name__}); {_CHECK_CREDENTIALS}")
        if isinstance(e, transient):
            return "transient"
    return None


def _classify_http(url: str, exc: BaseException) -> ShardUnavailable | str | None:
    for e in _chain(exc):
        if isinstance(e, ShardUnavailable):
            return e
        if isinstance(e, urllib.error.HTTPError):
            if e.code in (404, 410):
                return ShardNotFound(url, f"does not exist (HTTP {e.code}); check the URL")
            if e.code in (401, 403):
                return ShardAccessDenied(url, f"access denied (HTTP {e.code}); check the URL and its access rights")
            if e.code >= 500 or e.code in (408, 429):
                return "transient"
            return ShardUnavailable(url, f"the server rejected the request (HTTP {e.code})")
        if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError,
                          http.client.HTTPException, _Transient)):
            return "transient"
    return None


def _summary(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _retrying(url: str, policy: RetryPolicy, fn: Callable, classify=_classify_s3,
              on_failure: Callable[[], None] | None = None, what: str = "request"):
    """Run fn() with up to policy.attempts tries; permanent errors raise at once."""
    failures = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, unknown ones re-raised
            kind = classify(url, exc)
            if kind is None:
                raise
            if isinstance(kind, ShardUnavailable):
                raise kind from None
            if on_failure is not None:
                on_failure()
            failures += 1
            if failures >= policy.attempts:
                raise ShardUnavailable(
                    url,
                    f"still failing after {policy.attempts} attempts ({_summary(exc)}); {_CHECK_ENDPOINT}",
                ) from None
            delay = policy.delay(failures)
            log.warning("%s %s failed (%s); retry %d/%d in %.1fs",
                        what, url, _summary(exc), failures, policy.attempts - 1, delay)
            time.sleep(delay)


# ----------------------------------------------------------------------------- client

_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
)
_clients: dict[tuple[int, str], object] = {}
_clients_lock = threading.Lock()


def _env_fingerprint() -> str:
    # A digest, so the cache never holds the secret in a readable key.
    h = hashlib.sha256()
    for k in _ENV_KEYS:
        h.update(k.encode() + b"=" + os.environ.get(k, "\0").encode() + b"\n")
    return h.hexdigest()


def _client():
    """One boto3 S3 client per process (fork-safe: keyed by pid) and AWS environment."""
    key = (os.getpid(), _env_fingerprint())
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            import botocore
            import botocore.config

            pid = os.getpid()
            for k in [k for k in _clients if k[0] != pid]:  # inherited across fork: unusable
                del _clients[k]
            session = boto3.session.Session()
            kw = dict(
                # Retrying is RetryPolicy's job (one place that counts attempts and backs off,
                # and that also resumes broken streams), so botocore makes exactly one attempt.
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=16,
                # boto3 >= 1.36 sends CRC checksums / aws-chunked uploads by default, which many
                # S3-compatible stores reject; only send them where the API requires them.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            if session.get_credentials() is None:
                kw["signature_version"] = botocore.UNSIGNED  # anonymous: public buckets only
            client = session.client("s3", config=botocore.config.Config(**kw))
            _clients[key] = client
    return client


def clear_client_cache() -> None:
    """Forget the cached clients (the next call builds one from the current environment)."""
    with _clients_lock:
        _clients.clear()


# ----------------------------------------------------------------------------- URLs


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")``; the key may be empty."""
    if not isinstance(url, str) or not url[:5].lower() == "s3://":
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest = url[5:]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key


def _require_key(url: str) -> tuple[str, str]:
    bucket, key = parse_s3_url(url)
    if not key:
        raise ValueError(f"s3 URL names a bucket, not an object: {url!r}")
    return bucket, key


# ----------------------------------------------------------------------------- simple operations


def exists(url: str, policy: RetryPolicy | None = None) -> bool:
    """True if the object exists (False for a missing key or bucket)."""
    bucket, key = _require_key(url)
    policy = policy or DEFAULT_POLICY

    def head():
        try:
            _client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:  # noqa: BLE001
            if isinstance(_classify_s3(url, exc), ShardNotFound):
                return False
            raise

    return _retrying(url, policy, head, what="HEAD")


def read_bytes(url: str, policy: RetryPolicy | None = None) -> bytes:
    """The whole object (resumed by ranged GETs if the connection breaks)."""
    with open_stream(url, policy=policy) as f:
        return f.read()


def write_bytes(url: str, data: bytes, policy: RetryPolicy | None = None) -> None:
    """Write the object with one PUT."""
    bucket, key = _require_key(url)
    data = bytes(data)
    _retrying(url, policy or DEFAULT_POLICY,
              lambda: _client().put_object(Bucket=bucket, Key=key, Body=data), what="PUT")


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)


class _KeepOpen:
    """A file object boto3 cannot close: s3transfer closes the file it uploads from when a
    transfer ends, failed ones included, and a retry must read the same file again."""

    def __init__(self, f):
        self._f = f

    def close(self) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._f, name)


def _upload_fileobj(fileobj, url: str, policy: RetryPolicy) -> None:
    bucket, key = _require_key(url)

    def put():
        fileobj.seek(0)
        _client().upload_fileobj(_KeepOpen(fileobj), bucket, key, Config=_transfer_config())

    _retrying(url, policy, put, what="upload")


def upload_file(path: str | os.PathLike, url: str, policy: RetryPolicy | None = None) -> None:
    """Upload a local file (multipart above 64 MiB)."""
    with open(path, "rb") as f:
        _upload_fileobj(f, url, policy or DEFAULT_POLICY)


def list_urls(prefix_url: str, policy: RetryPolicy | None = None) -> list[str]:
    """Sorted ``s3://`` URLs of every object whose key starts with the URL's key (a plain
    string prefix, as in S3: end it with ``/`` to list a "folder")."""
    bucket, prefix = parse_s3_url(prefix_url)
    policy = policy or DEFAULT_POLICY
    out: list[str] = []
    token = None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        page = _retrying(prefix_url, policy, lambda: _client().list_objects_v2(**kw), what="LIST")
        out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", ()))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            break
    return sorted(out)


# ----------------------------------------------------------------------------- writing


class _SpooledUpload(io.RawIOBase):
    """Write to a temporary file; ``close()`` uploads it, ``abort()`` discards it."""

    def __init__(self, url: str, policy: RetryPolicy):
        super().__init__()
        _require_key(url)
        self.url = url
        self._policy = policy
        self._tmp = tempfile.TemporaryFile(prefix="mirl_ds_upload_")
        self._done = False

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.closed:
            raise ValueError("write to a closed upload")
        return self._tmp.write(b)

    def tell(self) -> int:
        return self._tmp.tell()

    def flush(self) -> None:
        if not self._done:
            self._tmp.flush()

    def __del__(self):
        # Dropped without close(): never upload a possibly partial object.
        with contextlib.suppress(Exception):
            self.abort()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._tmp.close()
        super().close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._done:
                self._tmp.flush()
                _upload_fileobj(self._tmp, self.url, self._policy)
        finally:
            self._done = True
            self._tmp.close()
            super().close()


@contextlib.contextmanager
def open_write(url: str, policy: RetryPolicy | None = None):
    """``with open_write("s3://b/k") as f: f.write(...)`` uploads on a clean exit; on an
    exception nothing is uploaded."""
    w = _SpooledUpload(url, policy or DEFAULT_POLICY)
    try:
        yield w
    except BaseException:
        w.abort()
        raise
    w.close()


# ----------------------------------------------------------------------------- streaming reads


def _skip(body, n: int) -> None:
    while n:
        chunk = body.read(min(n, 1 << 20))
        if not chunk:
            raise _Transient("connection closed while skipping to the resume offset")
        n -= len(chunk)


class _ResumableReader(io.RawIOBase):
    """A sequential reader that survives broken connections: a transient error while opening
    or reading re-issues the request from the current byte offset, with backoff."""

    def __init__(self, url: str, policy: RetryPolicy, classify, what: str):
        super().__init__()
        self.url = url
        self._policy = policy
        self._classify = classify
        self._what = what
        self._body = None
        self._pos = 0
        self._size: int | None = None
        _retrying(url, policy, self._ensure_open, classify, self._drop, what)

    # subclasses: return (body with .read(n)/.close(), total size or None)
    def _open_at(self, offset: int):
        raise NotImplementedError

    def _ensure_open(self) -> None:
        if self._body is None:
            self._body, size = self._open_at(self._pos)
            if self._size is None:
                self._size = size

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                body.close()

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int | None:
        return self._size

    def _read_some(self, n: int) -> bytes:
        self._ensure_open()
        data = self._body.read(n)
        if not data and (self._size is None or self._pos < self._size):
            if self._size is None:  # length unknown: a clean end is the end
                return b""
            raise _Transient(f"connection closed at byte {self._pos} of {self._size}")
        return data

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read from a closed stream")
        mv = memoryview(b).cast("B")
        if len(mv) == 0 or (self._size is not None and self._pos >= self._size):
            return 0
        data = _retrying(self.url, self._policy, lambda: self._read_some(len(mv)),
                         self._classify, self._drop, self._what)
        n = len(data)
        mv[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        chunks = []
        while True:
            chunk = self.read(1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()


class _S3Reader(_ResumableReader):
    def __init__(self, url: str, policy: RetryPolicy):
        self._bucket, self._key = _require_key(url)
        self._etag = None
        super().__init__(url, policy, _classify_s3, "GET")

    def _open_at(self, offset: int):
        kw = {"Bucket": self._bucket, "Key": self._key}
        if offset:
            kw["Range"] = f"bytes={offset}-"
            if self._etag:
                kw["IfMatch"] = self._etag
        resp = _client().get_object(**kw)
        body = resp["Body"]
        if offset == 0:
            self._etag = resp.get("ETag")
            return body, int(resp.get("ContentLength", 0))
        if not str(resp.get("ContentRange", "")).startswith(f"bytes {offset}-"):
            # The store ignored the Range header and sent the whole object: skip to offset.
            if self._etag and resp.get("ETag") and resp.get("ETag") != self._etag:
                body.close()
                raise ShardUnavailable(self.url, "the object was replaced while it was being read; "
                                                 "re-read it from the start")
            _skip(body, offset)
        return body, None


class _HTTPReader(_ResumableReader):
    def __init__(self, url: str, policy: RetryPolicy, timeout: float = 60.0):
        self._timeout = timeout
        self._validator = None
        super().__init__(url, policy, _classify_http, "GET")

    def _open_at(self, offset: int):
        headers = {"User-Agent": "mirl_ds"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self._validator:
                headers["If-Range"] = self._validator
        resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                      timeout=self._timeout)
        if offset == 0:
            self._validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            length = resp.headers.get("Content-Length")
            return resp, int(length) if length is not None else None
        if resp.status != 206:  # range ignored (or object changed): skip what we already have
            if resp.headers.get("ETag") and self._validator and resp.headers.get("ETag") != self._validator:
                resp.close()
                raise ShardUnavailable(self.url, "the file changed while it was being read; re-read it from the start")
            _skip(resp, offset)
        return resp, None


def open_stream(url: str, policy: RetryPolicy | None = None, bufsize: int = 1 << 20):
    """A buffered, sequential, binary file object over an ``s3://`` object. The GET is issued
    here, so a missing object raises :class:`ShardNotFound` at once; a connection that breaks
    while reading is resumed from the current offset."""
    raw = _S3Reader(url, policy or DEFAULT_POLICY)
    return io.BufferedReader(raw, buffer_size=max(int(bufsize), 64 << 10))


def open_http_stream(url: str, policy: RetryPolicy | None = None, bufsize: int = 1 << 20,
                     timeout: float = 60.0):
    """Like :func:`open_stream` for ``http(s)://`` URLs, with urllib (resumed with ``Range``)."""
    raw = _HTTPReader(url, policy or DEFAULT_POLICY, timeout=timeout)
    return io.BufferedReader(raw, buffer_size=max(int(bufsize), 64 << 10))


# ----------------------------------------------------------------------------- webdataset


def _gopen_s3(url, mode="rb", bufsize=8192, **kw):
    if mode[0] == "r":
        return open_stream(url, bufsize=bufsize)
    if mode[0] == "w":
        return _SpooledUpload(url, DEFAULT_POLICY)
    raise ValueError(f"{mode}: unknown mode")


def _gopen_http(url, mode="rb", bufsize=8192, **kw):
    if mode[0] == "r":
        return open_http_stream(url, bufsize=bufsize)
    raise ValueError(f"{url}: writing over http(s) needs curl")


def register_gopen() -> None:
    """Register our handlers in webdataset's gopen table (idempotent)."""
    import importlib

    # (``webdataset.gopen`` the attribute is the function; the module is in sys.modules)
    wds_gopen = importlib.import_module("webdataset.gopen")
    wds_gopen.gopen_schemes["s3"] = _gopen_s3
    if shutil.which("curl") is None:
        for scheme in ("http", "https"):
            if wds_gopen.gopen_schemes.get(scheme) in (wds_gopen.gopen_curl, _gopen_http):
                wds_gopen.gopen_schemes[scheme] = _gopen_http


try:
    register_gopen()
except ImportError:  # webdataset not installed: the plain API still works
    pass
