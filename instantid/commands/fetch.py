"""Downloading the catalog's model files from Hugging Face through huggingface_hub (which brings the
token, HF_TOKEN or `hf auth login`, the endpoint, Range resume, Xet storage and its progress bar),
verified here for the published size and sha256 (the catalog's pin where it has one) before the
file takes its final name. Every request has a timeout."""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..file_digest import file_sha256
from ..model_files import HUB, ModelFile
from .errors import CommandError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY = 2.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


class FetchError(CommandError):
    """An expected failure (network, server, checksum, disk); the message is one actionable line."""


@dataclass(frozen=True)
class Published:
    """What the source publishes about a file: its size, and its sha256 where it has one (LFS)."""

    size: int
    sha256: str | None


@dataclass(frozen=True)
class FetchResult:
    entry: ModelFile
    path: Path
    downloaded: bool  # False: a verified copy was already there
    sha256_checked: bool


def _with_retries(entry: ModelFile, endpoint: str, call: Callable[[], T], retries: int, retry_delay: float,
                  failed: Callable[[str], str], before_retry: Callable[[str], None]) -> T:
    """`call()`, tried again after a transient failure (`before_retry` says so first) at most `retries`
    times; an access or missing-file error, or the last failure (as `failed` words it), is a FetchError."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:  # huggingface_hub's errors differ by version and HTTP library: _problem sorts them
            problem = _problem(entry, endpoint, error)
            if isinstance(problem, FetchError):
                raise problem from None
            if attempt == retries:
                raise FetchError(failed(problem)) from None
            before_retry(problem)
            time.sleep(retry_delay)
    raise AssertionError("unreachable")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The given endpoint, else $HF_ENDPOINT, else huggingface.co; http(s) only."""
    chosen = (endpoint or os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")
    if urllib.parse.urlsplit(chosen).scheme not in ("http", "https"):
        raise FetchError(f"endpoint {chosen!r} is not an http(s) URL; pass e.g. --endpoint {HUB}")
    return chosen


def _problem(entry: ModelFile, endpoint: str, error: Exception) -> FetchError | str:
    """huggingface_hub's errors as one line: access and missing files are final (FetchError), the rest
    (dropped connection, timeout, server error) worth another try (the text)."""
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    where = f"{entry.repo}/{entry.file}"
    if isinstance(error, GatedRepoError):
        return FetchError(f"{where}: {endpoint} refuses the file without access to the gated repository; accept its "
                          f"licence on {endpoint}/{entry.repo}, then set HF_TOKEN or run `hf auth login`")
    if isinstance(error, RepositoryNotFoundError):
        return FetchError(f"{where}: {endpoint} has no repository {entry.repo} you can read; if it is private or "
                          "gated, set HF_TOKEN or run `hf auth login`, else check --endpoint")
    if isinstance(error, (EntryNotFoundError, RevisionNotFoundError)):
        return FetchError(f"{entry.file} is not in {entry.repo} at revision {entry.revision} on {endpoint}; the source "
                          "may have moved")
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(error, HfHubHTTPError) and status is not None and 400 <= status < 500 and status not in (408, 429):
        return FetchError(f"{entry.url(endpoint)}: HTTP {status}; check the --endpoint and that the file is "
                          "still published")
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@contextmanager
def _download_timeout(seconds: float) -> Iterator[None]:
    """huggingface_hub reads its body timeout from this setting only (HF_HUB_DOWNLOAD_TIMEOUT)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_DOWNLOAD_TIMEOUT
    constants.HF_HUB_DOWNLOAD_TIMEOUT = seconds
    try:
        yield
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = before


def published(entry: ModelFile, endpoint: str, timeout: float, retries: int, retry_delay: float) -> Published:
    """Size and sha256 from the metadata huggingface_hub reads for a download (HEAD /resolve/): for
    an LFS file its ETag is the sha256, as huggingface_hub itself relies on."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(entry.repo, entry.file, revision=entry.revision, endpoint=endpoint)
    metadata = _with_retries(entry, endpoint, lambda: get_hf_file_metadata(url, timeout=timeout), retries, retry_delay,
                             lambda problem: f"could not read {url} after {retries + 1} tries ({problem}); check the "
                                             "network, or point --endpoint / HF_ENDPOINT at a reachable mirror",
                             lambda problem: log.info("retrying %s (%s)", url, problem))
    if not isinstance(metadata.size, int) or metadata.size < 0:
        raise FetchError(f"{url}: no usable size for {entry.file}; is --endpoint a Hugging Face endpoint?")
    etag = (metadata.etag or "").lower()
    return Published(size=metadata.size, sha256=etag if _SHA256.fullmatch(etag) else None)


def download(entry: ModelFile, endpoint: str, destination: Path, expected: Published, *,
             timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
             retry_delay: float = DEFAULT_RETRY_DELAY) -> None:
    """hf_hub_download into a staging folder beside `destination`, then the size and sha256 check and
    the rename: a file under the final name is always complete; one that fails is deleted."""
    from huggingface_hub import hf_hub_download

    staging = destination.parent / f".{destination.name}.download"  # on the same disk: the move is a rename
    staging.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(staging).free
    if expected.size > free:
        raise FetchError(f"{destination}: needs {expected.size} bytes, {free} free on that disk")

    def download_once() -> Path:
        with _download_timeout(timeout):
            return Path(hf_hub_download(entry.repo, entry.file, revision=entry.revision, local_dir=staging,
                                        endpoint=endpoint, etag_timeout=timeout))

    def before_retry(problem: str) -> None:
        log.info("%s: %s; trying again", destination.name, problem)
        # A partial file longer than the published size cannot be resumed into the right one (older
        # huggingface_hub appends a whole answer when a server ignores Range): the next try starts over.
        for partial in staging.rglob("*.incomplete"):
            if partial.stat().st_size > expected.size:
                partial.unlink()

    tries = "1 try" if retries == 0 else f"{retries + 1} tries"
    staged = _with_retries(entry, endpoint, download_once, retries, retry_delay, lambda problem: f"{destination}: download "
                           f"failed after {tries} ({problem}); check the network and run again", before_retry)
    try:
        _verify(staged, destination, expected, entry.url(endpoint))
    except FetchError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staged, destination)
    shutil.rmtree(staging, ignore_errors=True)


def _verify(part: Path, destination: Path, expected: Published, url: str) -> None:
    got = part.stat().st_size
    if got != expected.size:
        part.unlink()
        raise FetchError(f"{destination}: size mismatch: expected {expected.size} bytes, got {got} from {url}; "
                         "the download was deleted, run again")
    if expected.sha256 is not None:
        digest = file_sha256(part)
        if digest != expected.sha256:
            part.unlink()
            raise FetchError(f"{destination}: sha256 mismatch: expected {expected.sha256}, got {digest} from {url}; "
                             "the download was deleted and nothing was installed")


def _pinned(entry: ModelFile, expected: Published, endpoint: str) -> Published:
    """The published size/sha256 checked against the catalog's pin. huggingface.co must agree with
    the pin; a mirror is the user's explicit choice, so its own listing is trusted (with a note)."""
    if entry.sha256 is None or expected.sha256 == entry.sha256:
        return expected
    if endpoint == HUB:
        raise FetchError(f"{entry.repo}/{entry.file}: {endpoint} publishes sha256 {expected.sha256}, the catalog pins "
                         f"{entry.sha256}; nothing was downloaded. The file changed at the source: report it, or "
                         "pick another checkpoint")
    log.warning("%s: %s publishes sha256 %s, not the catalog's %s; verifying against the mirror's listing",
                entry.id, endpoint, expected.sha256, entry.sha256)
    return expected


def fetch_models(entries: Iterable[ModelFile], folders: Mapping[str, Path], *, endpoint: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 retry_delay: float = DEFAULT_RETRY_DELAY) -> list[FetchResult]:
    """Make each entry present and verified at `folders[entry.folder] / entry.path`.

    Stops at the first failure (FetchError); files finished before it stay."""
    base = resolve_endpoint(endpoint)
    results = []
    for entry in entries:
        destination = folders[entry.folder] / entry.path
        expected = _pinned(entry, published(entry, base, timeout, retries, retry_delay), base)
        if expected.sha256 is None:
            log.warning("%s: %s publishes no sha256 for %s; checking the size only", entry.id, entry.repo, entry.file)
        if destination.is_file():
            if destination.stat().st_size == expected.size and (expected.sha256 is None
                                                                 or file_sha256(destination) == expected.sha256):
                log.info("%s: already present and verified: %s", entry.id, destination)
                results.append(FetchResult(entry, destination, False, expected.sha256 is not None))
                continue
            log.warning("%s: %s differs from the published file; downloading a replacement", entry.id, destination)
        log.info("%s: downloading %s from %s", entry.id, entry.file, entry.repo)
        download(entry, base, destination, expected, timeout=timeout, retries=retries, retry_delay=retry_delay)
        results.append(FetchResult(entry, destination, True, expected.sha256 is not None))
    return results
