"""Downloading the catalog's model files from Hugging Face, verified against the published metadata.

Each file is written to `<final>.part` (resumed with an HTTP Range request after an interruption),
checked for the published size and sha256, and only then renamed to its final name, so a file
under the final name is always complete. Every request has a timeout; dropped connections are
retried from the bytes already written.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from .catalog import ModelFile

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY = 2.0
CHUNK_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_START = re.compile(r"bytes (\d+)-")


class FetchError(RuntimeError):
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


class _Retry(Exception):
    """A failure worth another try (dropped connection, timeout, server error)."""


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The given endpoint, else $HF_ENDPOINT, else huggingface.co; http(s) only."""
    chosen = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if urllib.parse.urlsplit(chosen).scheme not in ("http", "https"):
        raise FetchError(f"endpoint {chosen!r} is not an http(s) URL; pass e.g. --endpoint {DEFAULT_ENDPOINT}")
    return chosen


def file_url(entry: ModelFile, endpoint: str) -> str:
    return f"{endpoint}/{entry.repo}/resolve/{entry.revision}/{urllib.parse.quote(entry.file)}"


def _tree_url(entry: ModelFile, endpoint: str) -> str:
    folder = entry.file.rpartition("/")[0]
    url = f"{endpoint}/api/models/{entry.repo}/tree/{entry.revision}"
    return f"{url}/{urllib.parse.quote(folder)}" if folder else url


def _open(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": f"instantid-nodes/{__version__}", **(headers or {})})
    return urllib.request.urlopen(request, timeout=timeout)


def _classify(url: str, error: BaseException) -> FetchError | _Retry:
    """HTTP 4xx (except 408/429) is final; anything else transient becomes a _Retry."""
    if isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 and error.code not in (408, 429):
        return FetchError(f"{url}: HTTP {error.code} {error.reason}; check the --endpoint and that the file is still published")
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return _Retry(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)


def published(entry: ModelFile, endpoint: str, timeout: float, retries: int, retry_delay: float,
              listings: dict[str, object] | None = None) -> Published:
    """Size and sha256 from the Hugging Face tree API; `listings` caches folder listings by URL."""
    url = _tree_url(entry, endpoint)
    cache = {} if listings is None else listings
    if url not in cache:
        cache[url] = _get_json(url, timeout, retries, retry_delay)
    listing = cache[url]
    items = listing if isinstance(listing, list) else []
    item = next((i for i in items if isinstance(i, dict) and i.get("path") == entry.file), None)
    if item is None:
        raise FetchError(f"{entry.file} is not listed in {entry.repo} ({url}); the source may have moved")
    lfs = item.get("lfs") if isinstance(item.get("lfs"), dict) else {}
    size = lfs.get("size", item.get("size"))
    sha256 = lfs.get("oid")
    if not isinstance(size, int) or size < 0:
        raise FetchError(f"{url}: no usable size for {entry.file} in the listing")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise FetchError(f"{url}: the published sha256 for {entry.file} is malformed: {sha256!r}")
    return Published(size=size, sha256=sha256)


def _get_json(url: str, timeout: float, retries: int, retry_delay: float) -> object:
    for attempt in range(retries + 1):
        try:
            with _open(url, timeout) as response:
                body = response.read()
            break
        except (OSError, http.client.HTTPException) as error:
            problem = _classify(url, error)
            if isinstance(problem, FetchError):
                raise problem from None
            if attempt == retries:
                raise FetchError(f"could not read {url} after {retries + 1} tries ({problem}); "
                                 "check the network, or point --endpoint / HF_ENDPOINT at a reachable mirror") from None
            log.info("retrying %s (%s)", url, problem)
            time.sleep(retry_delay)
    try:
        return json.loads(body)
    except ValueError:
        raise FetchError(f"{url} did not answer with JSON; is --endpoint a Hugging Face endpoint?") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, expected: Published) -> bool:
    return path.stat().st_size == expected.size and (expected.sha256 is None or sha256_of(path) == expected.sha256)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _transfer(url: str, part: Path, size: int, timeout: float, bar: tqdm) -> None:
    """One request appending to `part` from its current length (or rewriting it on a plain 200)."""
    have = _size(part)
    headers = {"Range": f"bytes={have}-"} if have else {}
    with _open(url, timeout, headers) as response:
        mode = "ab"
        if response.status == 206:
            start = _CONTENT_RANGE_START.match(response.headers.get("Content-Range", ""))
            if start is None or int(start.group(1)) != have:
                part.unlink()
                raise _Retry(f"the server resumed at {response.headers.get('Content-Range')!r}, not at byte {have}")
        elif response.status == 200:
            if have:
                log.info("%s: the server ignored the Range request; restarting from byte 0", part.name)
                bar.reset(total=size)
            mode, have = "wb", 0
        else:
            raise _Retry(f"unexpected HTTP {response.status}")
        with open(part, mode) as out:
            # read1 hands over whatever has arrived, so a dropped connection loses little. Never
            # write far past the published size: a longer answer is wrong and fails verification.
            while have <= size and (chunk := response.read1(CHUNK_BYTES)):
                out.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))


def download(url: str, destination: Path, expected: Published, *, timeout: float = DEFAULT_TIMEOUT,
             retries: int = DEFAULT_RETRIES, retry_delay: float = DEFAULT_RETRY_DELAY) -> None:
    """Download `url` to `destination` through `destination.part`, resuming that file if present.

    `retries` counts consecutive tries that gained no bytes, so a long download over a flaky link
    still finishes while a dead server fails fast. The final name appears only after verification."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    if _size(part) > expected.size:
        part.unlink()
    free = shutil.disk_usage(destination.parent).free
    if expected.size - _size(part) > free:
        raise FetchError(f"{destination}: needs {expected.size - _size(part)} more bytes, {free} free on that disk")
    failures = 0
    with tqdm(total=expected.size, initial=_size(part), unit="B", unit_scale=True, unit_divisor=1024,
              desc=destination.name, file=sys.stderr) as bar:
        while (before := _size(part)) < expected.size:
            problem = "the connection closed early"
            try:
                _transfer(url, part, expected.size, timeout, bar)
            except _Retry as error:
                problem = str(error)
            except (OSError, http.client.HTTPException) as error:
                if isinstance(error, urllib.error.HTTPError) and error.code == 416 and part.exists():
                    part.unlink()  # the published size and the server's file disagree: start over
                classified = _classify(url, error)
                if isinstance(classified, FetchError):
                    raise classified from None
                problem = str(classified)
            failures = 0 if _size(part) > before else failures + 1
            if failures > retries:
                raise FetchError(f"{destination}: download failed {failures} times in a row ({problem}); "
                                 f"run again to resume from byte {_size(part)}")
            if _size(part) < expected.size:
                log.info("%s: %s; resuming at byte %d", destination.name, problem, _size(part))
                if failures:
                    time.sleep(retry_delay)
    _verify(part, destination, expected, url)
    os.replace(part, destination)


def _verify(part: Path, destination: Path, expected: Published, url: str) -> None:
    got = part.stat().st_size
    if got != expected.size:
        part.unlink()
        raise FetchError(f"{destination}: size mismatch: expected {expected.size} bytes, got {got} from {url}; "
                         "the download was deleted, run again")
    if expected.sha256 is not None:
        digest = sha256_of(part)
        if digest != expected.sha256:
            part.unlink()
            raise FetchError(f"{destination}: sha256 mismatch: expected {expected.sha256}, got {digest} from {url}; "
                             "the download was deleted and nothing was installed")


def _pinned(entry: ModelFile, expected: Published, endpoint: str) -> Published:
    """The published size/sha256 checked against the catalog's pin. huggingface.co must agree with
    the pin; a mirror is the user's explicit choice, so its own listing is trusted (with a note)."""
    if entry.sha256 is None or expected.sha256 == entry.sha256:
        return expected
    if endpoint == DEFAULT_ENDPOINT:
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

    Stops at the first failure (FetchError); files finished before it stay, and a partial one
    resumes on the next run."""
    base = resolve_endpoint(endpoint)
    listings: dict[str, object] = {}
    results = []
    for entry in entries:
        destination = folders[entry.folder] / entry.path
        expected = _pinned(entry, published(entry, base, timeout, retries, retry_delay, listings), base)
        if expected.sha256 is None:
            log.warning("%s: %s publishes no sha256 for %s; checking the size only", entry.id, entry.repo, entry.file)
        if destination.is_file():
            if _matches(destination, expected):
                log.info("%s: already present and verified: %s", entry.id, destination)
                results.append(FetchResult(entry, destination, False, expected.sha256 is not None))
                continue
            log.warning("%s: %s differs from the published file; downloading a replacement", entry.id, destination)
        log.info("%s: downloading %s from %s", entry.id, entry.file, entry.repo)
        download(file_url(entry, base), destination, expected, timeout=timeout, retries=retries, retry_delay=retry_delay)
        results.append(FetchResult(entry, destination, True, expected.sha256 is not None))
    return results
