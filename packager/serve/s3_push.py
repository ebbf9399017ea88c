"""Push a rendered model repository to S3 (or an S3-compatible store) so that Triton can serve it from there.

What lands is checked object by object (size, and the SHA-256 the store computed on receipt), and a second push
uploads nothing that did not change. S3 has no folders: Triton sees a directory only through the keys below it, so
an empty directory (an ensemble's version folder `1/`) gets a small placeholder object, without which Triton
refuses the ensemble. Credentials and region come from the usual AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE, AWS_ENDPOINT_URL ...), through boto3.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import urlparse

from packager.core.contracts import ConfigError, S3Error, YqpackError
from packager.core.repository_index import REPOSITORY_INDEX, RepositoryIndex

PLACEHOLDER_NAME = ".yqpack-keep"
PLACEHOLDER_BODY = b"yqpack: keeps this folder visible in S3 (S3 has no empty folders; Triton needs it)\n"
SHA256_METADATA = "sha256"  # hex digest in x-amz-meta-sha256: what the idempotency check compares
SKIPPED_DIRS = {"__pycache__"}  # written by the Python backend next to model.py; never part of a repository
MAX_OBJECT_BYTES = 5 * 1024**3  # one PUT (a single-part upload keeps the ETag an MD5 that verification reads)
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 2  # an unreachable endpoint fails in seconds, not after botocore's default minutes


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing slash; "" for the bucket root

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise S3Error(f"expected an S3 URL like s3://BUCKET/PREFIX, got {url!r}")
        if ":" in parsed.netloc:
            raise S3Error(
                f"{url!r} names a host:port; push takes s3://BUCKET/PREFIX and the endpoint from --endpoint-url"
            )
        return cls(bucket=parsed.netloc, prefix=parsed.path.strip("/"))

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class LocalObject:
    relative: str  # POSIX path inside the repository
    size: int
    sha256: str  # hex
    md5: str  # hex: what S3 reports as the ETag of a single-part upload
    source: Path | None  # None: the placeholder body

    def open(self) -> BinaryIO:
        """The body, streamed from disk (a model file can be large)."""
        return open(self.source, "rb") if self.source is not None else io.BytesIO(PLACEHOLDER_BODY)


@dataclass(frozen=True)
class PushedObject:
    key: str
    size: int
    sha256: str
    md5: str
    status: str  # "uploaded" or "unchanged"
    placeholder: bool = False


@dataclass(frozen=True)
class PushResult:
    location: S3Location
    endpoint_url: str | None  # None: AWS itself
    objects: list[PushedObject]
    stale: list[str] = field(default_factory=list)  # keys under the prefix that the repository does not have
    deleted: list[str] = field(default_factory=list)

    @property
    def uploaded(self) -> int:
        return sum(o.status == "uploaded" for o in self.objects)

    @property
    def unchanged(self) -> int:
        return sum(o.status == "unchanged" for o in self.objects)

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)


def local_objects(repository: Path) -> list[LocalObject]:
    """Every file of the repository, plus one placeholder per empty directory, in a stable order."""
    objects = []
    for directory, dirnames, filenames in os.walk(repository):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        here = Path(directory)
        relative_dir = here.relative_to(repository).as_posix()
        for name in sorted(filenames):
            path = here / name
            size = path.stat().st_size
            if size > MAX_OBJECT_BYTES:
                raise ConfigError(f"{path} is {size} bytes: larger than one S3 PUT takes (5 GiB)")
            objects.append(LocalObject(_join(relative_dir, name), size, *file_digests(path), path))
        if not filenames and not dirnames and here != repository:
            sha256, md5 = hashlib.sha256(PLACEHOLDER_BODY).hexdigest(), hashlib.md5(PLACEHOLDER_BODY).hexdigest()
            objects.append(LocalObject(_join(relative_dir, PLACEHOLDER_NAME), len(PLACEHOLDER_BODY), sha256, md5, None))
    return objects


def file_digests(path: Path, chunk: int = 1 << 20) -> tuple[str, str]:
    """(sha256, md5) hex digests in one read."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), md5.hexdigest()


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client that fails fast; region/credentials from the environment as boto3 reads them."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as error:  # pragma: no cover - boto3 is a declared dependency
        raise S3Error("boto3 is not installed: pip install boto3") from error
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        s3={"addressing_style": "path"},  # S3-compatible stores on host:port have no per-bucket DNS names
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def push_repository(
    repository: Path,
    destination: str,
    endpoint_url: str | None = None,
    *,
    delete_stale: bool = False,
    client=None,
    progress: Callable[[int, LocalObject, str], None] | None = None,
) -> PushResult:
    """Upload `repository` to `destination` (s3://BUCKET/PREFIX), skip what is already there, verify all of it.

    `progress(total_bytes, item, status)` is called after each object ("uploaded" or "unchanged").
    """
    location = S3Location.parse(destination)
    repository = Path(repository)
    RepositoryIndex.load_servable(repository)
    items = local_objects(repository)
    total = sum(item.size for item in items)
    client = client or s3_client(endpoint_url)
    # An S3-compatible store's endpoint (boto3 reads the variables itself; Triton needs it in the URL).
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    with _s3_errors(location, client.meta.endpoint_url):
        remote = _remote_objects(client, location)  # a GET first: its error body names the cause, a HEAD's cannot
        pushed = []
        for item in items:
            key = location.key(item.relative)
            # Listing carries no metadata: ask for the recorded hash only where the size already matches.
            unchanged = remote.get(key) == item.size and _recorded_sha256(client, location, key) == item.sha256
            if not unchanged:
                with item.open() as body:
                    client.put_object(
                        Bucket=location.bucket, Key=key, Body=body,
                        # Both hashes travel with the body: the store refuses it when either differs.
                        ContentMD5=_b64(item.md5), ChecksumSHA256=_b64(item.sha256),
                        Metadata={SHA256_METADATA: item.sha256},
                    )
            status = "unchanged" if unchanged else "uploaded"
            pushed.append(PushedObject(key, item.size, item.sha256, item.md5, status, item.source is None))
            if progress is not None:
                progress(total, item, status)
        wanted = {o.key for o in pushed}
        stale = sorted(k for k in remote if k not in wanted)
        deleted = []
        if delete_stale and stale:
            for start in range(0, len(stale), 1000):  # DeleteObjects takes at most 1000 keys
                batch = stale[start:start + 1000]
                client.delete_objects(Bucket=location.bucket, Delete={"Objects": [{"Key": k} for k in batch]})
            deleted = stale
        verify_pushed(client, location, pushed)
    return PushResult(location, endpoint, pushed, stale=[k for k in stale if k not in deleted], deleted=deleted)


def verify_pushed(client, location: S3Location, pushed: list[PushedObject]) -> None:
    """Ask the store for each object's size and a hash it computed itself; raise on any difference.

    The hash is the SHA-256 checksum where the store keeps one (AWS S3), else the ETag, which is the body's MD5
    for a single-part upload without KMS encryption (AWS, MinIO, moto).
    """
    problems = []
    for item in pushed:
        head = client.head_object(Bucket=location.bucket, Key=item.key, ChecksumMode="ENABLED")
        problem = _verification_problem(item, head)
        if problem:
            problems.append(f"{item.key}: {problem}")
    if problems:
        raise S3Error(f"what landed in {location.url} differs from the repository:\n  " + "\n  ".join(problems))


def read_remote_index(destination: str, endpoint_url: str | None = None, client=None) -> RepositoryIndex:
    """yqpack_repository.json of a pushed repository (what `yqpack k8s --repository s3://...` renders from)."""
    location = S3Location.parse(destination)
    client = client or s3_client(endpoint_url)
    with _s3_errors(location, client.meta.endpoint_url):
        try:
            body = client.get_object(Bucket=location.bucket, Key=location.key(REPOSITORY_INDEX))["Body"].read()
        except client.exceptions.NoSuchKey:
            raise S3Error(f"{location.url} is not a yqpack repository (no {REPOSITORY_INDEX}): yqpack push first")
    try:
        index = RepositoryIndex.from_dict(json.loads(body), f"{location.url}/{REPOSITORY_INDEX}")
    except ValueError as error:  # not JSON at all; RepositoryIndex's own errors are already plain
        if isinstance(error, YqpackError):
            raise
        raise S3Error(f"{location.url}/{REPOSITORY_INDEX} is not JSON: {error}") from None
    if not index.ensembles():
        raise S3Error(f"{location.url} has no ensembles in {REPOSITORY_INDEX}: nothing to serve")
    return index


def _remote_objects(client, location: S3Location) -> dict[str, int]:
    """key -> size for every object under the prefix."""
    prefix = f"{location.prefix}/" if location.prefix else ""
    remote = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            remote[entry["Key"]] = entry["Size"]
    return remote


def _recorded_sha256(client, location: S3Location, key: str) -> str | None:
    return client.head_object(Bucket=location.bucket, Key=key).get("Metadata", {}).get(SHA256_METADATA)


def _verification_problem(item: PushedObject, head: dict) -> str | None:
    if head.get("ContentLength") != item.size:
        return f"{head.get('ContentLength')} bytes in S3, {item.size} locally"
    checksum = head.get("ChecksumSHA256")
    if checksum is not None:
        return None if checksum == _b64(item.sha256) else "the SHA-256 S3 computed differs from the local file's"
    etag = str(head.get("ETag", "")).strip('"')
    if len(etag) == 32 and "-" not in etag:
        return None if etag == item.md5 else "the MD5 (ETag) S3 computed differs from the local file's"
    if head.get("Metadata", {}).get(SHA256_METADATA) != item.sha256:  # e.g. KMS-encrypted: no hash to compare
        return "S3 reports no hash for it, and its recorded SHA-256 differs"
    return None


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _join(directory: str, name: str) -> str:
    return name if directory in ("", ".") else f"{directory}/{name}"


class _s3_errors:
    """Turn botocore's failures into one plain sentence naming the bucket and endpoint."""

    def __init__(self, location: S3Location, endpoint: str):
        self.where = f"{location.url} (endpoint {endpoint})"

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, S3Error):
            return False
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if isinstance(error, NoCredentialsError):
            raise S3Error(f"no AWS credentials for {self.where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            hint = {
                "InvalidAccessKeyId": "the access key is not known to the store: check AWS_ACCESS_KEY_ID",
                "SignatureDoesNotMatch": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY",
                "NoSuchBucket": "the bucket does not exist: create it first",
                "404": "the bucket does not exist: create it first",
                "403": "access denied: check the credentials and the bucket policy",
                "AccessDenied": "access denied: check the credentials and the bucket policy",
            }.get(code, error.response.get("Error", {}).get("Message", str(error)))
            raise S3Error(f"S3 refused the request for {self.where}: {code or status}: {hint}") from None
        if isinstance(error, BotoCoreError):
            raise S3Error(f"cannot reach {self.where}: {error}") from None
        return False


def triton_s3_repository(url: str, environ: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Triton's --model-repository value for an S3 repository, and the environment to add for it.

    s3://BUCKET/PREFIX stays as it is for AWS; with AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL set (an S3-compatible
    store) it becomes Triton's s3://HOST:PORT/BUCKET/PREFIX. A URL already in that form passes through. Triton
    reads AWS_DEFAULT_REGION only, so AWS_REGION is copied there when it alone is set.
    """
    environ = dict(os.environ if environ is None else environ)
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise S3Error(f"expected s3://BUCKET/PREFIX or s3://HOST:PORT/BUCKET/PREFIX, got {url!r}")
    extra = {}
    if not environ.get("AWS_DEFAULT_REGION") and environ.get("AWS_REGION"):
        extra["AWS_DEFAULT_REGION"] = environ["AWS_REGION"]
    if ":" in parsed.netloc:  # already host:port/bucket/prefix
        return url.rstrip("/"), extra
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    location = S3Location.parse(url)
    if not endpoint:
        return location.url, extra
    return triton_endpoint_url(location, endpoint), extra


def triton_endpoint_url(location: S3Location, endpoint_url: str) -> str:
    """s3://HOST:PORT/BUCKET/PREFIX for an S3-compatible endpoint such as http://minio.storage:9000."""
    endpoint = urlparse(endpoint_url)
    if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
        raise S3Error(f"the S3 endpoint must look like http(s)://HOST[:PORT], got {endpoint_url!r}")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    scheme = "https://" if endpoint.scheme == "https" else ""  # Triton speaks plain HTTP unless told otherwise
    path = f"{location.bucket}/{location.prefix}" if location.prefix else location.bucket
    return f"s3://{scheme}{endpoint.hostname}:{port}/{path}"


def push_with_progress(repository: Path, destination: str, endpoint_url: str | None = None, *,
                       delete_stale: bool = False) -> PushResult:
    """push_repository with a rich progress bar (bytes) on stderr."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"push to {destination}", total=None)

        def advance(total: int, item: LocalObject, status: str) -> None:
            bar.update(task, total=total, advance=item.size, description=f"{status}: {item.relative}")

        return push_repository(repository, destination, endpoint_url, delete_stale=delete_stale, progress=advance)


def report_push(result: PushResult, echo: Callable[[str], None]) -> None:
    """A short account of a push: what was uploaded, what was skipped, what is stale, and the Triton URL."""
    placeholders = sum(o.placeholder for o in result.objects)
    echo(
        f"pushed {len(result.objects)} objects ({result.total_bytes / 1e6:.1f} MB) to {result.location.url}: "
        f"{result.uploaded} uploaded, {result.unchanged} unchanged (skipped), {placeholders} folder placeholder(s); "
        "sizes and hashes verified"
    )
    if result.uploaded == 0:
        echo("nothing changed: the repository in S3 was already up to date")
    for key in result.deleted:
        echo(f"deleted stale {key}")
    if result.stale:
        echo(f"warning: {len(result.stale)} object(s) under the prefix are not in the repository "
             f"(Triton would see them; --delete-stale removes them): {', '.join(result.stale[:5])}")
    url = triton_endpoint_url(result.location, result.endpoint_url) if result.endpoint_url else result.location.url
    echo(f"serve it: yqpack serve --repository {url}")
