"""Prepare one dataset of the registry: plan, free-disk check, download, unpack, OCR-VQA, assemble, check.

Every step is idempotent: a step whose done-marker (``state.py``) and outputs are in place is only
re-verified, so a second run makes no network request. A failing step (dead URL, unsafe archive,
file that must be fetched by hand) is recorded and the other steps go on; the report says what is
missing. Only a failed free-disk check stops the run before anything is fetched.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from olavlm.prepare import state
from olavlm.prepare.allava import assemble
from olavlm.prepare.archive import ArchiveError, UnsafeArchive, safe_extract
from olavlm.prepare.download import DownloadError, check_free_disk, download_http, http_size, human
from olavlm.prepare.hub import download_hub, hub_metadata
from olavlm.prepare.ocr_vqa import fetch_ocr_vqa
from olavlm.prepare.sources import TEXT_ONLY, DatasetSpec, Fetch, HttpFile, HubFile, Source

log = logging.getLogger(__name__)


@dataclass
class Step:
    """Outcome of one step."""

    source: str  # registry source name
    what: str  # the file (root-relative) or step name
    status: str  # "done" (work done now), "verified" (already done), "planned" (dry run), "failed", "manual"
    detail: str = ""  # why it failed / what to do / what was done


@dataclass
class Options:
    """How to prepare (the command-line knobs)."""

    workers: int = 8  # threads for OCR-VQA images and for `data check`
    retries: int = 4  # attempts after the first, per file / image
    backoff: float = 1.0  # seconds before the first retry; doubles each retry
    timeout: float = 60.0  # socket timeout per request, seconds
    hub_endpoint: str | None = None  # Hub endpoint (None = HF_ENDPOINT or huggingface.co)
    delete_archives: bool = False  # delete each archive once it is unpacked
    retry_dead: bool = False  # retry OCR-VQA links an earlier run found dead
    dry_run: bool = False  # only show the plan; no network, no writes
    progress: bool = True  # tqdm bars
    check: bool = True  # run `data check` on the prepared json


@dataclass
class Report:
    """What `prepare` did for one dataset, and the counts against the expected ones."""

    dataset: str
    steps: list[Step] = field(default_factory=list)
    records: int | None = None  # records in the data file
    per_source: dict[str, int] = field(default_factory=dict)  # top image folder (or text-only) -> records
    check: dict | None = None  # olavlm.data.check.check_dataset report
    ocr_vqa: dict | None = None  # OCR-VQA download report
    assembled: dict | None = None  # ALLaVA assemble stats
    dry_run: bool = False  # only a plan: nothing was fetched or counted

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status in ("failed", "manual")]


def select_sources(spec: DatasetSpec, only: list[str] | None) -> list[Source]:
    """The sources to prepare, in registry order: `only` if given, else every non-optional one."""
    if not only:
        return [s for s in spec.sources if not s.optional]
    wanted = {spec.source(name).name for name in only}  # raises KeyError naming the known sources
    return [s for s in spec.sources if s.name in wanted]


def _fetch_done(root: Path, f: Fetch) -> bool:
    """True when this fetch's final output is in place (unpacked archive / downloaded file)."""
    if f.unpack_to is not None:
        marker = state.read_marker(root, "unpack", f.save_as)
        return marker is not None and all((root / p).exists() for p in f.expect)
    marker = state.read_marker(root, "download", f.save_as)
    path = root / f.save_as
    return marker is not None and path.is_file() and path.stat().st_size == marker.get("size")


def _archive_downloaded(root: Path, f: Fetch) -> bool:
    marker = state.read_marker(root, "download", f.save_as)
    path = root / f.save_as
    return marker is not None and path.is_file() and path.stat().st_size == marker.get("size")


def _remote_size(f: Fetch, opts: Options) -> int | None:
    r = f.remote
    if r.size is not None:
        return r.size
    if isinstance(r, HubFile):
        return hub_metadata(r, opts.hub_endpoint)[0]
    return http_size(r.url, timeout=opts.timeout, allowed_hosts=r.redirect_hosts) if r.url else None


def _describe(r) -> str:
    return f"hub {r.repo_id}:{r.filename}" if isinstance(r, HubFile) else (r.url or f"manual download: {r.note}")


def prepare(spec: DatasetSpec, root: Path, *, only: list[str] | None = None, opts: Options | None = None) -> Report:
    """Prepare `spec` under `root`; never raises for a single failing file (see Report.failed)."""
    opts = opts or Options()
    root = Path(root)
    report = Report(dataset=spec.name)
    sources = select_sources(spec, only)
    todo: list[tuple[Source, Fetch]] = []
    for src in sources:
        for f in src.fetches:
            if _fetch_done(root, f):
                report.steps.append(Step(src.name, f.save_as, "verified"))
            else:
                todo.append((src, f))
    if opts.dry_run:
        report.dry_run = True
        for src, f in todo:
            size = f" ({human(f.remote.size)})" if f.remote.size else ""
            report.steps.append(Step(src.name, f.save_as, "planned", f"{_describe(f.remote)}{size}"
                                     + (f" -> {f.unpack_to}/" if f.unpack_to else "")))
        for src in sources:
            if src.ocr_vqa is not None:
                report.steps.append(Step(src.name, src.ocr_vqa.image_dir, "planned",
                                         "fetch the referenced images that are not there yet"))
            if src.hub_files is not None:
                report.steps.append(Step(src.name, src.hub_files.local_dir, "planned",
                                         f"fetch the files {src.hub_files.listing} lists that are not there yet"))
        if spec.assemble is not None:
            report.steps.append(Step("assemble", spec.assemble.output, "planned", "(re)assemble if its inputs changed"))
        return report

    # sizes first (one HEAD each), so the free-disk check happens before any byte is fetched
    needed = fetch_total = fetched_before = 0
    for src, f in todo:
        if isinstance(f.remote, HttpFile) and f.remote.url is None:
            continue
        try:
            size = _remote_size(f, opts) or 0
        except DownloadError as e:
            report.steps.append(Step(src.name, f.save_as, "failed", str(e)))
            continue
        if not (f.unpack_to and _archive_downloaded(root, f)):
            part = root / (f.save_as + ".part")
            have = min(size, part.stat().st_size) if part.exists() else 0
            needed += size - have
            fetch_total += size
            fetched_before += have
        if f.unpack_to:
            needed += size  # unpacked images take about the archive's size (already-compressed JPEGs)
    check_free_disk(root, needed)

    failed_now = {s.what for s in report.steps if s.status == "failed"}
    overall = tqdm(total=fetch_total, initial=fetched_before, unit="B", unit_scale=True, desc=f"{spec.name} total",
                   disable=not opts.progress, position=0)
    with overall:
        for src, f in todo:
            if f.save_as in failed_now:
                continue
            report.steps.append(_run_fetch(src, f, root, opts, overall.update))
        for src in sources:
            if src.ocr_vqa is not None:
                report.steps.append(_run_ocr_vqa(src, root, opts, report))
            if src.hub_files is not None:
                report.steps.append(_run_hub_files(src, root, opts))
    if spec.assemble is not None:
        report.steps.append(_run_assemble(spec, root, report))
    _count_and_check(spec, root, opts, report)
    return report


def _run_fetch(src: Source, f: Fetch, root: Path, opts: Options, on_bytes) -> Step:
    path = root / f.save_as
    try:
        if not (f.unpack_to and _archive_downloaded(root, f)):
            r = f.remote
            if isinstance(r, HttpFile) and r.url is None:
                if not path.is_file():
                    return Step(src.name, f.save_as, "manual", f"not downloadable automatically: {r.note}")
            elif isinstance(r, HubFile):
                download_hub(r, root / f.local_dir, endpoint=opts.hub_endpoint, retries=opts.retries,
                             backoff=opts.backoff, progress=opts.progress, on_bytes=on_bytes)
            else:
                download_http(r.url, path, size=r.size, checksum=r.checksum, retries=opts.retries,
                              backoff=opts.backoff, timeout=opts.timeout, progress=opts.progress, on_bytes=on_bytes,
                              allowed_hosts=r.redirect_hosts)
            state.write_marker(root, "download", f.save_as,
                               {"size": path.stat().st_size, "from": _describe(r), "time": time.time()})
        if f.unpack_to is None:
            return Step(src.name, f.save_as, "done")
        n = safe_extract(path, root / f.unpack_to, flatten=f.flatten, progress=opts.progress,
                         max_bytes=f.max_unpacked_bytes)
        missing = [p for p in f.expect if not (root / p).exists()]
        if missing:
            top = sorted({p.name for p in (root / f.unpack_to).iterdir()})[:10]
            raise ArchiveError(f"{f.save_as} unpacked into {f.unpack_to}/ but {', '.join(missing)} is missing "
                               f"(found: {', '.join(top)}); the archive layout changed: update the registry")
        state.write_marker(root, "unpack", f.save_as, {"files": n, "archive_size": path.stat().st_size})
        if opts.delete_archives:
            path.unlink()
        detail = f"{n} files" + (f" (published: {f.expected_files})" if f.expected_files else "")
        return Step(src.name, f.save_as, "done", detail)
    except (DownloadError, ArchiveError, UnsafeArchive, OSError) as e:
        log.error("%s: %s", f.save_as, e)
        return Step(src.name, f.save_as, "failed", str(e))


def _run_ocr_vqa(src: Source, root: Path, opts: Options, report: Report) -> Step:
    spec = src.ocr_vqa
    assert spec is not None
    if not (root / spec.dataset_json).is_file():
        return Step(src.name, spec.image_dir, "failed", f"{spec.dataset_json} is missing (see the step above)")
    try:
        rep = fetch_ocr_vqa(spec, root, workers=opts.workers, retries=opts.retries, backoff=opts.backoff,
                            timeout=opts.timeout, retry_dead=opts.retry_dead, progress=opts.progress)
    except (OSError, ValueError) as e:
        return Step(src.name, spec.image_dir, "failed", str(e))
    report.ocr_vqa = rep
    status = "done" if rep["attempted"] else "verified"
    return Step(src.name, spec.image_dir, status,
                f"{rep['fetched']} fetched, {rep['already_present']} present, {len(rep['dead'])} dead links, "
                f"{len(rep['bad_images'])} bad images, {len(rep['unsafe_names'])} unsafe names, "
                f"{len(rep['failed'])} failed (report: {spec.report})")


def _run_hub_files(src: Source, root: Path, opts: Options) -> Step:
    from olavlm.prepare.hub_listed import fetch_listed

    spec = src.hub_files
    if not (root / spec.listing).is_file():
        return Step(src.name, spec.local_dir, "failed", f"{spec.listing} is missing (see the step above)")
    try:
        rep = fetch_listed(spec, root, workers=opts.workers, retries=opts.retries, backoff=opts.backoff,
                           endpoint=opts.hub_endpoint, progress=opts.progress)
    except (OSError, ValueError) as e:
        return Step(src.name, spec.local_dir, "failed", str(e))
    lost = {**rep["failed"], **rep["unsafe_names"]}
    detail = (f"{rep['fetched']} fetched, {rep['already_present']} present of {rep['listed']} listed"
              + (f"; NOT fetched: {len(lost)} (e.g. {', '.join(list(lost)[:3])})" if lost else ""))
    return Step(src.name, spec.local_dir, "failed" if lost else ("done" if rep["fetched"] else "verified"), detail)


def _run_assemble(spec: DatasetSpec, root: Path, report: Report) -> Step:
    a = spec.assemble
    assert a is not None
    missing = [rel for rel, _ in a.parts if not (root / rel).is_file()]
    if missing:
        return Step("assemble", a.output, "failed", f"needs {', '.join(missing)}")
    inputs = {rel: [(root / rel).stat().st_size, (root / rel).stat().st_mtime_ns] for rel, _ in a.parts}
    marker = state.read_marker(root, "assemble", a.output)
    if marker and marker.get("inputs") == inputs and (root / a.output).is_file():
        report.assembled = marker.get("stats")
        return Step("assemble", a.output, "verified")
    try:
        stats = assemble(a, root)
    except (ValueError, OSError) as e:  # RecordFileError (malformed part) is a ValueError
        return Step("assemble", a.output, "failed", str(e))
    state.write_marker(root, "assemble", a.output, {"inputs": inputs, "stats": stats})
    report.assembled = stats
    return Step("assemble", a.output, "done", f"{stats['records']} records")


def count_per_source(data_file: Path) -> tuple[int, dict[str, int]]:
    """(records, records per top folder of the (first) image path; TEXT_ONLY for records without image).

    Streams the file (olavlm.data.records), so memory stays small on the 1 GB 665K json.
    """
    from olavlm.data.records import iter_records, record_images

    per: Counter = Counter()
    total = 0
    for _, _, rec in iter_records(data_file):
        total += 1
        try:
            images = record_images(rec)
        except ValueError:
            per["(malformed image field)"] += 1
            continue
        per[images[0].replace("\\", "/").split("/", 1)[0] if images else TEXT_ONLY] += 1
    return total, dict(per)


def _count_and_check(spec: DatasetSpec, root: Path, opts: Options, report: Report) -> None:
    data_file = root / spec.data_file
    if not data_file.is_file():
        return
    if spec.counter is not None:  # a benchmark file: counted by its evaluation reader
        import importlib

        module, _, func = spec.counter.partition(":")
        try:
            report.records = getattr(importlib.import_module(module), func)(data_file)
        except ValueError as e:
            report.steps.append(Step("check", spec.data_file, "failed", str(e)))
        return
    try:
        report.records, report.per_source = count_per_source(data_file)
    except ValueError as e:  # RecordFileError: the json itself is malformed (names line and column)
        report.steps.append(Step("check", spec.data_file, "failed", str(e)))
        return
    if opts.check:
        from olavlm.data.check import check_dataset

        report.check = check_dataset(data_file, root / spec.image_folder, tokenizer=None, workers=opts.workers,
                                     progress=opts.progress)
