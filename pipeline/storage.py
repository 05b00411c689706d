"""Local paths and s3:// URIs behind one small set of functions; the only module that knows S3.

Every function takes a URI (`/data/facades`, `relative/dir` or `s3://bucket/prefix`) and an
optional `endpoint` for S3-compatible servers. Without one, the endpoint comes from
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, and region and credentials from the usual AWS
environment variables and config files (boto3's chain), so nothing secret is ever passed around
as an argument or written down.

Writes are atomic: a local file is written under a hidden temporary name in the same folder and
renamed; an S3 object only becomes visible when its PUT or multipart upload completes. Failed S3
calls are retried a bounded number of times (botocore "standard" mode) and then raise
StorageError, whose message names the endpoint, bucket and key but never a credential.
Time is bounded too: $TRANSMUTE_S3_TIMEOUT_S (default 20 s) is shared out over the attempts of one
call as its connect and read timeouts, for boto3 and pyarrow alike, so an endpoint that accepts
connections but never answers fails one call in about that time (plus a few seconds of backoff).
"""

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import uuid
from functools import lru_cache
from urllib.parse import unquote

from pyarrow import fs as pafs

try:  # a GPU box may have torch and pyarrow but not boto3: local paths work without it
    import boto3
    import botocore.config
    import botocore.exceptions
    from boto3.s3.transfer import TransferConfig
except ImportError:
    boto3 = None

log = logging.getLogger(__name__)

S3 = "s3://"
MAX_ATTEMPTS = 3  # bounded: a dead server fails in seconds, not minutes
CONNECT_TIMEOUT_S = 3  # at most; less when the call's time divided over its attempts is less
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "TRANSMUTE_S3_TIMEOUT_S", 20.0  # one call, all its attempts
TEMP_MARK = ".tmp-"  # hidden temp files: readers (pyarrow, Ray) skip names starting with "."
# One PUT up to this size; above it a multipart upload, which is invisible until completed.
TRANSFER = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=16 * 2**20) if boto3 else None


class StorageError(RuntimeError):
    """A storage call failed; the message says where (endpoint, bucket, key) and why."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3)


def join(base: str, *parts: str) -> str:
    """Join with "/" for S3 and os.path for local paths; empty parts are skipped."""
    parts = [p.strip("/") for p in parts if p]
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(str(base), *parts)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    bucket, _, key = uri[len(S3) :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket: {uri!r} (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint URL in use: the explicit one, else the AWS environment's, else AWS itself."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _where(endpoint: str | None) -> str:
    return resolve_endpoint(endpoint) or "AWS S3 (default endpoint)"


def timeouts() -> tuple[float, float]:
    """(connect, read) seconds of one attempt of an S3 call: $TRANSMUTE_S3_TIMEOUT_S divided over
    MAX_ATTEMPTS, the connect timeout at most CONNECT_TIMEOUT_S. A read timeout bounds each wait
    for the next bytes, not a whole transfer, so large objects still stream."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        total = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        total = -1.0
    if not 0 < total < float("inf"):
        raise StorageError(f"{TIMEOUT_ENV}={text} must be a number of seconds > 0 "
                           f"(default {DEFAULT_TIMEOUT_S:g})")
    per_attempt = total / MAX_ATTEMPTS
    return min(CONNECT_TIMEOUT_S, per_attempt), per_attempt


@lru_cache(maxsize=8)
def _client(endpoint: str | None, identity: str, limits: tuple[float, float]):
    # `identity` only keys the cache, so that changed credentials get a new client.
    config = botocore.config.Config(
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=limits[0],
        read_timeout=limits[1],
        s3={"addressing_style": "path"} if endpoint else None,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def client(endpoint: str | None = None):
    """A boto3 S3 client with bounded retries and timeouts (cached per endpoint and identity)."""
    if boto3 is None:
        raise RuntimeError("s3:// paths need boto3, which is not installed here: pip install boto3")
    warn_open_credentials()
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION")
    identity = hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()
    return _client(resolve_endpoint(endpoint), identity, timeouts())


def _secrets() -> list[str]:
    if boto3 is None:
        return []
    creds = boto3.session.Session().get_credentials()
    if creds is None:
        return []
    frozen = creds.get_frozen_credentials()
    return [s for s in (frozen.secret_key, frozen.token, frozen.access_key) if s]


def _scrub(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def _error(op: str, uri: str, endpoint: str | None, exc: Exception) -> StorageError:
    """Turn a botocore failure into one line that says where and what to check, without secrets."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "?")
        why = f"{code}: {err.get('Message', '')}".strip()
        if code == "403":  # HEAD answers carry no error body
            why = "403 Forbidden: wrong credentials or no permission"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            why += " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS profile in use)"
        elif code in ("NoSuchBucket", "404", "NoSuchKey"):
            why += " (does the bucket / key exist?)"
    elif isinstance(exc, botocore.exceptions.NoCredentialsError):
        why = "no credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile)"
    elif isinstance(
        exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError
    ):
        why = f"cannot connect after {MAX_ATTEMPTS} attempts (is the server running?)"
    elif isinstance(exc, botocore.exceptions.ReadTimeoutError):
        why = (f"no answer within {timeouts()[1]:g} s, {MAX_ATTEMPTS} attempts (is it an S3 server, and "
               f"is it up? {TIMEOUT_ENV} sets the time a call may take)")
    else:
        why = f"{type(exc).__name__}: {exc}"
    msg = f"S3 {op} {uri} at {_where(endpoint)} failed: {why}"
    return StorageError(_scrub(msg))


def _s3_call(op: str, uri: str, endpoint: str | None, fn):
    try:
        return fn(client(endpoint))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise _error(op, uri, endpoint, exc) from None


# ----------------------------------------------------------------------------- reading


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    if not is_s3(uri):
        with open(uri, "rb") as f:
            return f.read()
    bucket, key = split_s3(uri)
    return _s3_call("GET", uri, endpoint, lambda c: c.get_object(Bucket=bucket, Key=key)["Body"].read())


def exists(uri: str, endpoint: str | None = None) -> bool:
    """True for an existing file / object, or a folder / prefix with something in it."""
    if not is_s3(uri):
        return os.path.exists(uri)
    return is_file(uri, endpoint) or bool(list_files(uri, endpoint, limit=1))


def is_file(uri: str, endpoint: str | None = None) -> bool:
    if not is_s3(uri):
        return os.path.isfile(uri)
    bucket, key = split_s3(uri)
    if not key:
        return False
    try:
        client(endpoint).head_object(Bucket=bucket, Key=key)
        return True
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _error("HEAD", uri, endpoint, exc) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise _error("HEAD", uri, endpoint, exc) from None


def list_files(uri: str, endpoint: str | None = None, limit: int | None = None) -> list[str]:
    """Every file under a folder / prefix, recursively, as sorted "/"-separated relative paths."""
    if is_s3(uri):
        return _list_s3(uri, endpoint, limit)
    if not os.path.isdir(uri):
        return []
    found = []
    for root, _, names in os.walk(uri):
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), uri).replace(os.sep, "/"))
    return sorted(found)[:limit]


def _list_s3(uri: str, endpoint: str | None, limit: int | None) -> list[str]:
    bucket, key = split_s3(uri)
    prefix = key + "/" if key else ""

    def run(c):
        found = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [obj["Key"][len(prefix) :] for obj in page.get("Contents", [])]
            if limit and len(found) >= limit:
                break
        return found

    return sorted(k for k in _s3_call("LIST", uri, endpoint, run) if k and not k.endswith("/"))[:limit]


# ----------------------------------------------------------------------------- writing


def write_bytes(uri: str, data: bytes, endpoint: str | None = None) -> None:
    """Write a whole file atomically: readers see the old file, no file, or the complete new one."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(
            "PUT", uri, endpoint, lambda c: c.upload_fileobj(io.BytesIO(data), bucket, key, Config=TRANSFER)
        )
        return
    with replacing(uri) as temp, open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def replacing(path: str):
    """A hidden temp path beside local `path` for the block to write (torch.save, PIL, safetensors),
    renamed over `path` when the block ends, removed if it fails: readers see the old file, no
    file, or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{os.path.basename(path)}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def remove(uri: str, endpoint: str | None = None) -> None:
    """Remove one file / object, or everything under a folder / prefix. Missing is not an error."""
    if not is_s3(uri):
        if os.path.isdir(uri):
            shutil.rmtree(uri)
        elif os.path.lexists(uri):
            os.remove(uri)
        return
    bucket, key = split_s3(uri)
    keys = [key] if key and is_file(uri, endpoint) else [join(key, k) for k in list_files(uri, endpoint)]
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        chunk = [{"Key": k} for k in keys[start : start + 1000]]
        _s3_call(
            "DELETE",
            uri,
            endpoint,
            lambda c, ch=chunk: c.delete_objects(Bucket=bucket, Delete={"Objects": ch}),
        )


def make_bucket(uri: str, endpoint: str | None = None) -> None:
    """Create the bucket of an s3:// URI if it does not exist yet."""
    bucket, _ = split_s3(uri)
    try:
        client(endpoint).head_bucket(Bucket=bucket)
        return
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise _error("HEAD bucket", uri, endpoint, exc) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise _error("HEAD bucket", uri, endpoint, exc) from None
    _s3_call("CREATE bucket", uri, endpoint, lambda c: c.create_bucket(Bucket=bucket))


# ----------------------------------------------------------------------------- pyarrow


def arrow_filesystem(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for pyarrow / Ray Data readers.

    For S3 it holds no credentials: Ray Train, Tune and Ray Data pickle it to their workers, and a
    pickle must never carry a key. Each process that uses it resolves them itself through the AWS
    default chain (environment, AWS_SHARED_CREDENTIALS_FILE / AWS_PROFILE, instance role), the
    same sources boto3 reads: a local Ray's workers inherit the driver's environment; on a cluster
    each node's environment, credentials file or role provides them.
    """
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    bucket, key = split_s3(uri)
    url = resolve_endpoint(endpoint)
    kwargs = {}
    if url:
        scheme, _, host = url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    warn_open_credentials()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    connect, read = timeouts()
    s3fs = pafs.S3FileSystem(
        region=region,
        connect_timeout=connect,
        request_timeout=read,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        **kwargs,
    )
    return s3fs, f"{bucket}/{key}".rstrip("/")


_warned = set()  # credentials files already warned about in this process


def warn_open_credentials() -> None:
    """Warn once if the AWS credentials file in use can be read by other users (mode wider than 0600)."""
    path = os.path.expanduser(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials")
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return
    if mode & 0o077 and path not in _warned:
        _warned.add(path)
        log.warning("AWS credentials file %s has mode %o: other users can read it; chmod 600 %s",
                    path, mode, path)


# Query parameters that carry secrets: presigned S3 URLs (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token), tokens, passwords, keys, signatures. Matched on the name, case-insensitively.
SECRET_PARAM = re.compile(r"^x-amz-|secret|token|passw|pwd|signature|credential|^sig$|^key$|api_?key|^auth",
                          re.IGNORECASE)


def public_uri(uri: str) -> str:
    """The URI as it may be logged, printed or stored: no user:password@ part, and no query parameter
    whose name says it holds a secret (SECRET_PARAM). Other query parameters stay, because a stored
    URI must still work (a database URI's sslmode=require); the fragment stays too."""
    scheme, sep, rest = str(uri).partition("://")
    if not sep:
        return str(uri)
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    host, slash, path = rest.partition("/")
    kept = [p for p in query.split("&") if p and not SECRET_PARAM.search(unquote(p.partition("=")[0]))]
    query = "?" + "&".join(kept) if kept else ""
    return f"{scheme}://{host.rpartition('@')[2]}{slash}{path}{query}{hash_}{fragment}"
