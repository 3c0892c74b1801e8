"""Hub files: ``huggingface_hub.hf_hub_download(repo_type="dataset", local_dir=...)`` plus verification.

huggingface_hub does the transfer (resume of ``.incomplete`` files, its own retries on dropped
connections); this module adds what prepare needs around it: the size from the file's metadata
(for the free-disk check), a sha256 check against the LFS etag or the registry's checksum, and
retries with back-off around the whole call. The endpoint is ``endpoint=`` or ``HF_ENDPOINT``.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable

from olavlm.prepare.download import DownloadError, verify_file
from olavlm.prepare.sources import HubFile

log = logging.getLogger(__name__)

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _offline_guard() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise DownloadError("huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset it to download hub files")


def hub_metadata(remote: HubFile, endpoint: str | None = None) -> tuple[int | None, str | None]:
    """(size, etag) of a hub file, from one HEAD request."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    _offline_guard()
    url = hf_hub_url(remote.repo_id, remote.filename, repo_type="dataset", revision=remote.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, GatedRepoError) as e:
        raise DownloadError(f"hub {remote.repo_id}:{remote.filename}@{remote.revision}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0]}") from None
    except Exception as e:  # network problems: reported by the caller, prepare goes on with other sources
        raise DownloadError(f"hub {remote.repo_id}:{remote.filename}: metadata request failed: {e}") from None
    return meta.size, meta.etag


def expected_checksum(remote: HubFile, etag: str | None) -> str | None:
    """The registry's checksum, else the LFS etag when it is a sha256."""
    if remote.checksum:
        return remote.checksum
    if etag and SHA256.match(etag):
        return f"sha256:{etag}"
    return None


def download_hub(
    remote: HubFile,
    local_dir: Path,
    *,
    endpoint: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    progress: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Download one hub dataset file to ``local_dir / remote.filename`` and verify it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars, are_progress_bars_disabled

    hub_size, etag = hub_metadata(remote, endpoint)
    if remote.size is not None and hub_size is not None and hub_size != remote.size:
        raise DownloadError(f"hub {remote.repo_id}:{remote.filename}: the hub announces {hub_size} bytes but the "
                            f"registry expects {remote.size}; update olavlm/prepare/sources.py (or pin revision)")
    size = remote.size if remote.size is not None else hub_size
    checksum = expected_checksum(remote, etag)
    last, force = "no attempt made", False
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * 2 ** (attempt - 1)
                log.warning("%s: %s; retry %d/%d in %.1fs", remote.filename, last, attempt, retries, delay)
                time.sleep(delay)
            try:
                path = Path(hf_hub_download(remote.repo_id, remote.filename, repo_type="dataset",
                                            revision=remote.revision, local_dir=local_dir, endpoint=endpoint,
                                            force_download=force))
            except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, GatedRepoError) as e:
                raise DownloadError(f"hub {remote.repo_id}:{remote.filename}: {type(e).__name__}") from None
            except Exception as e:  # transient: connection, 5xx, consistency check
                last = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            problem = verify_file(path, size, checksum)
            if problem is None:
                if on_bytes:
                    on_bytes(path.stat().st_size)
                return path
            last = f"verification failed ({problem})"
            log.error("%s: %s; deleting it and fetching it again", remote.filename, last)
            path.unlink()
            force = True
        raise DownloadError(f"hub {remote.repo_id}:{remote.filename}: gave up after {retries + 1} attempts; "
                            f"last problem: {last}")
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
