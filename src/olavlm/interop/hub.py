"""``--push-to-hub REPO``: upload an exported folder with huggingface_hub (create the repo, one commit).

The endpoint is ``--hub-endpoint`` or ``HF_ENDPOINT`` (default huggingface.co); the token is
``--token``, ``HF_TOKEN`` or the cached login. Any Hub failure is one line naming the repository.
"""

from __future__ import annotations

import logging
from pathlib import Path

from olavlm.interop import InteropError

log = logging.getLogger(__name__)


def push_folder(folder: str | Path, repo_id: str, *, endpoint: str | None = None, token: str | None = None,
                private: bool = False, revision: str | None = None,
                commit_message: str = "Upload OLA-VLM model exported by olavlm") -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not folder.is_dir():
        raise InteropError(f"{folder}: no such folder to push")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=commit_message)
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {first})") from None
    url = getattr(info, "commit_url", None) or str(info)
    log.info("pushed %s to %s (%s)", folder, repo_id, url)
    return url
