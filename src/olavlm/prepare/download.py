"""Plain-HTTP downloads: Range resume, retries with back-off, size/checksum verification, free-disk check.

``download_http`` writes to ``<dest>.part`` and renames to ``dest`` only once the size and the
checksum (when the registry knows one) match, so a file at ``dest`` is always complete. An
interrupted transfer resumes from the bytes already in ``.part`` (``Range: bytes=N-``); a server that
ignores Range (answers 200) restarts the file. A checksum mismatch deletes the partial file, is
logged, and the file is fetched again, up to ``retries`` times. 404/403/410 are permanent: no retry.

Every request goes through :func:`open_url`: a redirect is followed only to the URL's own host or to
a host the registry allow-lists for that source (``redirect_hosts``; ``.example.com`` = any
subdomain), over http(s); anything else is :class:`RedirectRefused`. The body is capped at the
registry size (or the announced Content-Length): a server that sends more is refused, so a missing
Content-Length cannot fill the disk.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

from olavlm.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read per socket read / hashed per step
PERMANENT_HTTP = (401, 403, 404, 410)  # statuses that retrying cannot fix
USER_AGENT = "olavlm-data-prepare"
TRANSIENT = (ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError, urllib.error.URLError, OSError)


class DownloadError(RuntimeError):
    """A file could not be downloaded (permanent HTTP error, or retries exhausted)."""


class RedirectRefused(DownloadError):
    """The server redirected to a host that is neither the URL's own nor allow-listed for the source."""


class InsufficientDisk(UserError, RuntimeError):
    """Not enough free space under the dataset root for what is left to fetch and unpack."""


def host_allowed(host: str | None, origin: str, allowed: Iterable[str] = ()) -> bool:
    """``host`` is the URL's own host ``origin`` or matches an entry of ``allowed`` (".x.org" = subdomains)."""
    host = (host or "").lower()
    if host and host == origin.lower():
        return True
    for entry in allowed:
        entry = entry.lower()
        if host == entry.lstrip(".") or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


class _RedirectGuard(urllib.request.HTTPRedirectHandler):
    def __init__(self, origin: str, allowed: Iterable[str]) -> None:
        self.origin, self.allowed = origin, tuple(allowed)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urlparse(newurl)
        if target.scheme not in ("http", "https") or not host_allowed(target.hostname, self.origin, self.allowed):
            fp.close()
            hosts = ", ".join((self.origin, *self.allowed))
            raise RedirectRefused(f"{req.full_url}: HTTP {code} redirect to {newurl} refused (allowed hosts: {hosts}; "
                                  "add the host to the source's redirect_hosts in olavlm/prepare/sources.py "
                                  "if it is a CDN of that source)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(req: urllib.request.Request, timeout: float, allowed_hosts: Iterable[str] = ()):
    """``urlopen`` that follows redirects only to the request's own host or ``allowed_hosts``."""
    origin = urllib.parse.urlparse(req.full_url).hostname or ""
    return urllib.request.build_opener(_RedirectGuard(origin, allowed_hosts)).open(req, timeout=timeout)


def parse_checksum(checksum: str) -> tuple[str, str]:
    """``"md5:<hex>"`` / ``"sha256:<hex>"`` -> (algorithm, lower-case hex)."""
    algo, sep, digest = checksum.partition(":")
    if not sep or algo not in ("md5", "sha1", "sha256") or not digest:
        raise ValueError(f"checksum {checksum!r}: expected 'md5:<hex>', 'sha1:<hex>' or 'sha256:<hex>'")
    return algo, digest.lower()


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, size: int | None, checksum: str | None) -> str | None:
    """None when `path` has the expected size and checksum, else a one-line reason."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} != expected {size}"
    if checksum:
        algo, want = parse_checksum(checksum)
        got = file_digest(path, algo)
        if got != want:
            return f"{algo} {got} != expected {want}"
    return None


def http_size(url: str, timeout: float = 30.0, allowed_hosts: Iterable[str] = ()) -> int | None:
    """Content-Length of `url` from a HEAD request (None when the server does not say)."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    try:
        with open_url(req, timeout, allowed_hosts) as resp:
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HEAD {url}: HTTP {e.code} {e.reason}") from None
    except TRANSIENT as e:
        raise DownloadError(f"HEAD {url}: {e}") from None
    return int(length) if length and length.isdigit() else None


def check_free_disk(root: Path, needed: int, margin: float = 0.05) -> None:
    """Raise InsufficientDisk when `root`'s file system has less than `needed` (+margin) bytes free."""
    root = Path(root)
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(needed * (1 + margin))
    if want > free:
        raise InsufficientDisk(
            f"{root}: {human(free)} free but about {human(want)} are needed for the remaining downloads and "
            "unpacking; free space, choose another --root, or prepare fewer sources with --only"
        )


def human(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _content_total(resp, start: int) -> int | None:
    """Total file size announced by a 200/206 response."""
    crange = resp.headers.get("Content-Range")  # "bytes 100-199/200"
    if crange and "/" in crange:
        total = crange.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    length = resp.headers.get("Content-Length")
    if length and length.isdigit():
        return int(length) + (start if resp.status == 206 else 0)
    return None


def _fetch_once(url: str, part: Path, size: int | None, timeout: float, bar, on_bytes,
                allowed_hosts: Iterable[str] = ()) -> None:
    """One GET (resuming from part's length); returns when the body was read in full."""
    start = part.stat().st_size if part.exists() else 0
    if size is not None and start > size:  # longer than the file can be: garbage
        part.unlink()
        start = 0
    if size is not None and start == size:
        return
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = open_url(req, timeout, allowed_hosts)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing left to send: the part is complete (verified by the caller)
            return
        if e.code in PERMANENT_HTTP:
            raise DownloadError(f"GET {url}: HTTP {e.code} {e.reason}") from None
        raise
    with resp:
        if start and resp.status != 206:  # Range ignored: start over
            if bar is not None:
                bar.update(-start)
            if on_bytes:
                on_bytes(-start)
            start = 0
        total = _content_total(resp, start)
        if size is not None and total is not None and total != size:  # retrying would fetch the same wrong file
            raise DownloadError(f"GET {url}: the server announces {total} bytes but the registry expects {size}; "
                                "the file changed upstream: check it and update olavlm/prepare/sources.py")
        if bar is not None and total is not None:
            bar.total = total
            bar.refresh()
        received = start
        cap = size if size is not None else total  # never more bytes than the registry / server said
        with open(part, "ab" if start else "wb") as f:
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                if cap is not None and received + len(block) > cap:
                    f.close()
                    part.unlink()
                    raise DownloadError(f"GET {url}: the server sent more than the {cap} bytes "
                                        f"{'the registry expects' if size is not None else 'it announced'}; refused")
                f.write(block)
                received += len(block)
                if bar is not None:
                    bar.update(len(block))
                if on_bytes:
                    on_bytes(len(block))
        if total is not None and received < total:
            raise ConnectionError(f"connection closed after {received} of {total} bytes")


def download_http(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    checksum: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
    on_bytes: Callable[[int], None] | None = None,
    allowed_hosts: Iterable[str] = (),
) -> None:
    """Download `url` to `dest` (resume, retry, verify). Raises DownloadError when it cannot."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    initial = part.stat().st_size if part.exists() else 0
    bar = tqdm(total=size, initial=initial, unit="B", unit_scale=True, desc=dest.name, leave=False,
               disable=not progress, position=1)
    last = "no attempt made"
    try:
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * 2 ** (attempt - 1)
                log.warning("%s: %s; retry %d/%d in %.1fs", dest.name, last, attempt, retries, delay)
                time.sleep(delay)
            try:
                _fetch_once(url, part, size, timeout, bar, on_bytes, allowed_hosts)
            except DownloadError:
                raise
            except TRANSIENT as e:  # dropped connection, timeout, 5xx: resume on the next attempt
                last = f"{type(e).__name__}: {e}"
                continue
            problem = verify_file(part, size, checksum)
            if problem is None:
                os.replace(part, dest)
                return
            last = f"verification failed ({problem})"
            log.error("%s: %s; deleting the partial file and fetching it again", dest.name, last)
            n = part.stat().st_size
            part.unlink()
            bar.update(-n)
            if on_bytes:
                on_bytes(-n)
        raise DownloadError(f"GET {url}: gave up after {retries + 1} attempts; last problem: {last}")
    finally:
        bar.close()
