"""`olavlm data prepare NAME --root datasets [--only SOURCE ...] [--workers N] [--dry-run]`.

``olavlm.data.cli`` calls :func:`add_prepare_parser` with its sub-parsers; :func:`run` is the
command. NAME is a registry dataset (``sources.DATASETS``) or ``all``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from olavlm.prepare.sources import ALL, DATASETS, DatasetSpec


def add_prepare_parser(data_subparsers) -> None:
    """Add the `prepare` sub-command to `olavlm data`."""
    p = data_subparsers.add_parser(
        "prepare",
        help="download and lay out a dataset (LLaVA-558K, LLaVA-665K, ALLaVA-Caption; benchmarks cv-bench, mmstar)",
        description="Download, verify and unpack a dataset into --root exactly as the training jsons expect, "
                    "then run `data check` on it. Idempotent: a second run only verifies.",
        epilog=_sources_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=[*DATASETS, ALL], help="dataset to prepare")
    p.add_argument("--root", default="datasets", help="dataset root folder (default: datasets)")
    p.add_argument("--only", nargs="+", metavar="SOURCE", default=None,
                   help="prepare only these sources (e.g. coco gqa); with NAME=all write DATASET:SOURCE")
    p.add_argument("--workers", type=int, default=8, help="threads for OCR-VQA images and the final check")
    p.add_argument("--dry-run", action="store_true", help="show what would be fetched; no network, no writes")
    p.add_argument("--retries", type=int, default=4, help="retries per file/image after the first attempt")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout per request, seconds")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubles each retry)")
    p.add_argument("--hub-endpoint", default=None, help="Hugging Face Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--delete-archives", action="store_true", help="delete each archive after it is unpacked")
    p.add_argument("--retry-dead", action="store_true", help="retry OCR-VQA links an earlier run found dead")
    p.add_argument("--no-check", action="store_true", help="skip the final `data check`")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _sources_help() -> str:
    lines = ["sources (for --only):"]
    for spec in DATASETS.values():
        lines.append(f"  {spec.name}:")
        for src in spec.sources:
            lines.append(f"    {src.name:<15} {src.description}" + (" [only with --only]" if src.optional else ""))
    return "\n".join(lines)


def _only_for(spec: DatasetSpec, only: list[str] | None, several: bool) -> list[str] | None:
    if not only:
        return None
    picked = []
    for item in only:
        ds, sep, src = item.rpartition(":")
        if sep and ds == spec.name:
            picked.append(src)
        elif not sep and not several:
            picked.append(item)
    return picked


def _validate_only(specs: list[DatasetSpec], only: list[str] | None) -> None:
    """Every --only item must name a source of a selected dataset (clear error otherwise)."""
    for item in only or []:
        ds, sep, src = item.rpartition(":")
        if len(specs) > 1 and not sep:
            raise SystemExit(f"--only {item}: with NAME=all write DATASET:SOURCE (e.g. llava-665k:{item})")
        matches = [s for s in specs if (not sep or s.name == ds) and any(x.name == src for x in s.sources)]
        if not matches:
            known = ", ".join(f"{s.name}:{x.name}" if len(specs) > 1 else x.name for s in specs for x in s.sources)
            raise SystemExit(f"--only {item}: unknown source (known: {known})")


def run(args) -> int:
    from olavlm.prepare.download import InsufficientDisk
    from olavlm.prepare.runner import Options, prepare

    specs = [d for d in DATASETS.values() if not d.evaluation] if args.name == ALL else [DATASETS[args.name]]
    _validate_only(specs, args.only)
    opts = Options(workers=args.workers, retries=args.retries, backoff=args.backoff, timeout=args.timeout,
                   hub_endpoint=args.hub_endpoint,
                   delete_archives=args.delete_archives, retry_dead=args.retry_dead, dry_run=args.dry_run,
                   progress=not args.no_progress, check=not args.no_check)
    root = Path(args.root)
    failed = 0
    for spec in specs:
        only = _only_for(spec, args.only, several=len(specs) > 1)
        if args.only and not only:
            continue
        try:
            report = prepare(spec, root, only=only, opts=opts)
        except InsufficientDisk as e:
            print(f"== {spec.name}: not started: {e}")
            return 2
        print(format_report(spec, report, root))
        failed += len(report.failed)
    return 1 if failed else 0


def _n(x: int | None) -> str:
    return "?" if x is None else f"{x:,}"


def format_report(spec: DatasetSpec, report, root: Path) -> str:
    """Human summary: steps, counts against the expected ones, what is missing."""
    lines = [f"== {spec.name} (root {root})"]
    for s in report.steps:
        lines.append(f"  [{s.status:>8}] {s.source:<11} {s.what}" + (f": {s.detail}" if s.detail else ""))
    if report.records is not None:
        ok = "ok" if report.records == spec.expected_records else "DIFFERS"
        lines.append(f"  records: {_n(report.records)} in {spec.data_file} (expected {_n(spec.expected_records)}) {ok}")
        for key, want in spec.expected_per_source.items():
            got = report.per_source.get(key, 0)
            lines.append(f"    {key:<13} {_n(got):>9} / {_n(want):>9}" + ("" if got == want else "  DIFFERS"))
    elif not report.dry_run:
        lines.append(f"  {spec.data_file} is not there yet: records cannot be counted")
    if report.check is not None:
        c = report.check
        lines.append(f"  data check: {_n(c.get('ok'))} of {_n(c.get('total'))} records usable (image folder "
                     f"{spec.image_folder})")
        for reason, n in sorted(c.get("problems", {}).items()):
            ex = ", ".join(map(str, c.get("examples", {}).get(reason, [])[:5]))
            lines.append(f"    missing/bad: {reason}: {_n(n)}" + (f" (e.g. {ex})" if ex else ""))
    if report.ocr_vqa is not None:
        r = report.ocr_vqa
        lines.append(f"  ocr_vqa: {len(r['dead'])} dead links, {len(r.get('bad_images', {}))} bad images "
                     f"(undecodable / bomb / oversized), {len(r.get('unsafe_names', {}))} unsafe file names refused, "
                     f"{len(r['failed'])} failed fetches -> "
                     f"{len(r['missing_samples'])} records without image (listed in the report); "
                     f"re-encoded to JPEG: {r['reencoded_to_jpeg'] or 'none'}")
    if report.assembled is not None:
        a = report.assembled
        lines.append(f"  assembled {spec.assemble.output}: {_n(a['records'])} records; dropped {a['dropped'] or 'none'}; "
                     f"flagged {a['flagged'] or 'none'}")
    if report.failed:
        lines.append(f"  NOT DONE: {len(report.failed)} step(s) above failed or need a manual download; rerun after "
                     "fixing them (finished steps are not repeated)")
    if spec.note:
        lines.append(f"  note: {spec.note}")
    return "\n".join(lines)
