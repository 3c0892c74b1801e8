"""OCR-VQA images: one fetch per image from the URLs of OCR-VQA's ``dataset.json``.

Only the images the LLaVA-665K json references are fetched (all of dataset.json when that json is
not there yet). Each image is saved under the exact name the json expects (``<key>.jpg``); content
that is GIF/PNG/... is re-encoded to a real JPEG (the reference saved GIF bytes under .jpg).
A thread pool does the fetching; every image is tried ``retries + 1`` times with back-off.

Outcomes, written to ``spec.report`` (json) next to the images:

* ``dead``: permanent (HTTP 403/404/410, refused redirect, no http(s) URL); not retried by later
  runs unless asked (``--retry-dead``);
* ``bad_images``: the bytes are not a usable image (undecodable, decompression bomb, over
  ``MAX_IMAGE_BYTES``); counted per file, never fatal, not retried unless asked;
* ``unsafe_names``: file names from the jsons that are not a plain file name (``../x.jpg``,
  ``/abs.jpg``, ``a/b.jpg``): never written, so nothing lands outside the image folder;
* ``failed``: transient problems that outlived the retries; retried by the next run;
* ``missing_samples``: ids of LLaVA records whose image is in any of the above or unlisted, which
  ``olavlm data check`` then counts as ``missing_image``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from olavlm.data.images import MAX_IMAGE_PIXELS
from olavlm.prepare.download import PERMANENT_HTTP, TRANSIENT, USER_AGENT, RedirectRefused, open_url
from olavlm.prepare.sources import OcrVqaSpec

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_QUALITY = 95  # quality of re-encoded GIF/PNG content
MAX_IMAGE_BYTES = 32 << 20  # a book cover is 10-100 KB; a body larger than this is refused
MAX_NAME_BYTES = 255  # longest file name most file systems accept


class DeadLink(Exception):
    """This image will not come back by retrying (reason in the message)."""


class BadImage(DeadLink):
    """The bytes are not a usable image: undecodable, a decompression bomb, or over the byte cap."""


def unsafe_name(name) -> str | None:
    """Why ``name`` cannot be written as a file directly inside the image folder, or None."""
    if not isinstance(name, str) or not name:
        return "empty file name"
    if "/" in name or "\\" in name or "\x00" in name:
        return "not a plain file name (folder part, absolute path or NUL)"
    if name in (".", "..") or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return "not a usable file name"
    return None


def is_jpeg(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(3) == JPEG_MAGIC
    except OSError:
        return False


def to_jpeg(data: bytes) -> tuple[bytes, str]:
    """(JPEG bytes, original format); JPEG content is kept byte for byte, anything else re-encoded.
    Raises :class:`BadImage` for bytes that are not a usable image (a bomb is refused from its header)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
        try:
            return _to_jpeg(data)
        except Image.DecompressionBombError as e:
            raise BadImage(f"decompression bomb: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            raise BadImage(f"not a decodable image ({type(e).__name__})") from None


def _to_jpeg(data: bytes) -> tuple[bytes, str]:
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format or "unknown"
        w, h = img.size  # from the header: refuse a bomb before decoding it
        if w * h > MAX_IMAGE_PIXELS:
            raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > {MAX_IMAGE_PIXELS}")
        if fmt == "JPEG":
            img.verify()
            return data, fmt
        img.seek(0)  # first frame of an animation
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))
        else:
            rgb = img.convert("RGB")
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), fmt


def _fetch(url: str, timeout: float, allowed_hosts=()) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with open_url(req, timeout, allowed_hosts) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_IMAGE_BYTES:
                raise BadImage(f"{length} bytes announced, more than the {MAX_IMAGE_BYTES} accepted for one image")
            data = resp.read(MAX_IMAGE_BYTES + 1)  # no Content-Length: still never more than the cap
    except urllib.error.HTTPError as e:
        if e.code in PERMANENT_HTTP:
            raise DeadLink(f"HTTP {e.code}") from None
        raise
    except RedirectRefused as e:
        raise DeadLink(str(e)) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"more than the {MAX_IMAGE_BYTES} bytes accepted for one image")
    if length and length.isdigit() and len(data) < int(length):
        raise ConnectionError(f"short body: {len(data)} of {length} bytes")
    if not data:
        raise DeadLink("empty response")
    return data


def fetch_one(url: str, target: Path, *, retries: int, backoff: float, timeout: float, allowed_hosts=()) -> str:
    """Fetch one image to `target` as JPEG; returns its original format. Raises DeadLink or the last transient error."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            data = _fetch(url, timeout, allowed_hosts)
        except DeadLink:
            raise
        except TRANSIENT as e:
            last = e
            continue
        jpeg, fmt = to_jpeg(data)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(jpeg)
        os.replace(tmp, target)
        return fmt
    assert last is not None
    raise last


def _reencode_in_place(path: Path, converted: dict[str, int]) -> bool:
    """Rewrite a present non-JPEG file as JPEG; False (file left alone) when it is not an image."""
    try:
        jpeg, fmt = to_jpeg(path.read_bytes())
    except DeadLink:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(jpeg)
    os.replace(tmp, path)
    converted[fmt] = converted.get(fmt, 0) + 1
    return True


def _wanted(spec: OcrVqaSpec, root: Path, records: dict) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(file name -> dataset.json key) to fetch, and file name -> ids of the LLaVA records using it."""
    from olavlm.data.records import iter_records, record_images

    users: dict[str, list[str]] = {}
    if spec.referenced_by and (root / spec.referenced_by).is_file():
        for _, _, rec in iter_records(root / spec.referenced_by):  # streamed: the 665K json is ~1 GB
            try:
                images = record_images(rec)
            except ValueError:
                continue  # malformed image field: `data check` reports the record
            for image in images:
                if image.startswith(spec.image_prefix):
                    users.setdefault(image[len(spec.image_prefix):], []).append(str(rec.get("id")))
        names = {name: Path(name).stem for name in users}
    else:
        names = {f"{key}.jpg": key for key in records}
    return names, users


def fetch_ocr_vqa(spec: OcrVqaSpec, root: Path, *, workers: int = 16, retries: int = 3, backoff: float = 1.0,
                  timeout: float = 30.0, retry_dead: bool = False, progress: bool = True) -> dict:
    """Fetch the missing OCR-VQA images; returns (and writes) the report."""
    root = Path(root)
    ds_path = root / spec.dataset_json
    with open(ds_path) as f:
        records = json.load(f)
    if not isinstance(records, dict):
        raise ValueError(f"{ds_path}: expected OCR-VQA's dataset.json (an object keyed by image id), "
                         f"got a {type(records).__name__}")
    names, users = _wanted(spec, root, records)
    report_path = root / spec.report
    old = json.loads(report_path.read_text()) if report_path.is_file() else {}
    known_dead = {} if retry_dead else dict(old.get("dead", {}))
    known_bad = {} if retry_dead else dict(old.get("bad_images", {}))

    image_dir = root / spec.image_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    dead: dict[str, str] = {}
    bad: dict[str, str] = {}
    unsafe: dict[str, str] = {}
    failed: dict[str, str] = {}
    converted: dict[str, int] = {}
    present = 0
    todo: list[tuple[str, str]] = []
    for name, key in sorted(names.items()):
        why = unsafe_name(name)
        if why is not None:
            unsafe[name] = why
            continue
        rec = records.get(key)
        url = rec.get(spec.url_field) if isinstance(rec, dict) else None
        target = image_dir / name
        if target.is_file() and is_jpeg(target):
            present += 1
        elif target.is_file() and _reencode_in_place(target, converted):  # e.g. GIF saved as .jpg by other tools
            present += 1
        elif not isinstance(url, str) or not url:
            dead[name] = f"no {spec.url_field} for key {key!r} in dataset.json"
        elif not url.lower().startswith(("http://", "https://")):
            dead[name] = f"{spec.url_field} {url[:80]!r} is not an http(s) URL"
        elif name in known_dead:
            dead[name] = known_dead[name]
        elif name in known_bad:
            bad[name] = known_bad[name]
        else:
            todo.append((name, url))

    fetched = _download(todo, image_dir, spec, bad=bad, dead=dead, failed=failed, converted=converted,
                        workers=workers, retries=retries, backoff=backoff, timeout=timeout, progress=progress)

    lost = sorted(set(dead) | set(failed) | set(bad) | set(unsafe))
    report = {
        "requested": len(names),
        "already_present": present,
        "attempted": len(todo),
        "fetched": fetched,
        "reencoded_to_jpeg": converted,
        "dead": dict(sorted(dead.items())),
        "bad_images": dict(sorted(bad.items())),
        "unsafe_names": dict(sorted(unsafe.items())),
        "failed": dict(sorted(failed.items())),
        "missing_samples": sorted(i for name in lost for i in users.get(name, [])),
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, report_path)
    if lost:
        log.warning("ocr_vqa: %d of %d images could not be fetched (%d dead, %d bad images, %d unsafe names, "
                    "%d failed); see %s", len(lost), len(names), len(dead), len(bad), len(unsafe), len(failed),
                    report_path)
    return report


def _download(todo: list[tuple[str, str]], image_dir: Path, spec: OcrVqaSpec, *, bad: dict, dead: dict, failed: dict,
              converted: dict, workers: int, retries: int, backoff: float, timeout: float, progress: bool) -> int:
    """Fetch ``todo`` (name, url) in a thread pool; sorts each failure into ``bad`` / ``dead`` /
    ``failed`` and counts re-encoded formats in ``converted``. Returns the number fetched."""
    fetched = 0
    bar = tqdm(total=len(todo), unit="img", desc="ocr_vqa images", leave=False, disable=not progress, position=1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, bar:
        futures = {pool.submit(fetch_one, url, image_dir / name, retries=retries, backoff=backoff, timeout=timeout,
                               allowed_hosts=spec.redirect_hosts): name for name, url in todo}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                fmt = fut.result()
            except BadImage as e:
                bad[name] = str(e)
            except DeadLink as e:
                dead[name] = str(e)
            except ValueError as e:  # urllib: malformed URL (bad host, unknown scheme)
                dead[name] = f"invalid URL: {e}"
            except TRANSIENT as e:
                failed[name] = f"{type(e).__name__}: {e}"
            else:
                fetched += 1
                if fmt != "JPEG":
                    converted[fmt] = converted.get(fmt, 0) + 1
            bar.update(1)
    return fetched
