"""Safe unpacking of zip and tar archives.

Every member is checked BEFORE anything is written: absolute paths, drive letters, ``..``
components, symbolic/hard links and device files make the whole archive refused
(:class:`UnsafeArchive`), so a hostile or broken archive cannot write outside its target folder.
The members' total unpacked size is bounded (:func:`unpack_limit`, default ``UNPACK_RATIO`` x the
archive + ``UNPACK_SLACK``; the registry can set another) before anything is written and again
while copying, so a decompression bomb is refused instead of filling the disk. Name clashes are
refused with both names: a member given twice, a path that is a file and a folder, two members
flattened to one name, or a member that would overwrite a different existing file (another
archive's). Each member is written to ``<name>.part`` and renamed, so a file left by an interrupted
unpack is always complete. Whether an archive was already unpacked is the caller's business
(done-markers in ``state.py``).
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm


class UnsafeArchive(ValueError):
    """The archive has a member that would escape the target folder or is a link/device."""


class ArchiveError(RuntimeError):
    """The archive cannot be read (truncated, unknown format) or has clashing member names."""


UNPACK_RATIO = 4  # unpacked bytes allowed per archive byte: the registry's archives hold compressed images
UNPACK_SLACK = 64 << 20  # plus this much, for small archives of text


def unpack_limit(archive_size: int) -> int:
    """Default bound on the total unpacked size of an archive of ``archive_size`` bytes."""
    return UNPACK_RATIO * archive_size + UNPACK_SLACK


def _human(n: int) -> str:
    from olavlm.prepare.download import human

    return human(n)


def _safe_name(name: str, archive: Path) -> PurePosixPath:
    """Validated relative path of one member."""
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise UnsafeArchive(f"{archive.name}: member {name!r} has an absolute path; refusing to unpack")
    if any(part == ".." for part in p.parts):
        raise UnsafeArchive(f"{archive.name}: member {name!r} points outside the target folder; refusing to unpack")
    return p


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    out = []
    for info in zf.infolist():
        rel = _safe_name(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchive(f"{archive.name}: member {info.filename!r} is a symbolic link; refusing to unpack")
        out.append((info, rel))
    return out


def _tar_members(tf: tarfile.TarFile, archive: Path) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    out = []
    for info in tf.getmembers():
        rel = _safe_name(info.name, archive)
        if info.issym() or info.islnk():
            raise UnsafeArchive(f"{archive.name}: member {info.name!r} is a link; refusing to unpack")
        if not (info.isfile() or info.isdir()):
            raise UnsafeArchive(f"{archive.name}: member {info.name!r} is not a regular file or folder")
        out.append((info, rel))
    return out


def _target(dest: Path, rel: PurePosixPath, flatten: bool) -> Path:
    out = dest / (rel.name if flatten else Path(*rel.parts))
    # belt and braces: the resolved target must stay inside dest
    if not out.resolve().is_relative_to(dest.resolve()):
        raise UnsafeArchive(f"member {str(rel)!r} resolves outside {dest}")
    return out


def list_members(archive: Path) -> list[str]:
    """Validated member names (raises UnsafeArchive/ArchiveError), without unpacking."""
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return [str(rel) for _, rel in _zip_members(zf, archive)]
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            return [str(rel) for _, rel in _tar_members(tf, archive)]
    raise ArchiveError(f"{archive}: not a zip or tar archive")


def safe_extract(archive: Path, dest: Path, *, flatten: bool = False, progress: bool = True,
                 max_bytes: int | None = None) -> int:
    """Unpack `archive` into `dest` and return the number of files written.

    ``flatten=True`` drops member folders (like ``unzip -j``); two members with the same file name
    then raise ArchiveError instead of silently overwriting each other. ``max_bytes`` bounds the
    total unpacked size (default :func:`unpack_limit` of the archive's size).
    """
    archive, dest = Path(archive), Path(dest)
    limit = unpack_limit(archive.stat().st_size) if max_bytes is None else int(max_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                plan = _plan(_zip_members(zf, archive), dest, flatten, lambda i: i.is_dir(), archive)
                sizes = [info.file_size for info, _ in plan]
                return _unpack(archive, plan, sizes, limit, zf.open, progress)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                plan = _plan(_tar_members(tf, archive), dest, flatten, lambda i: i.isdir(), archive)
                sizes = [info.size for info, _ in plan]
                return _unpack(archive, plan, sizes, limit, tf.extractfile, progress)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"{archive}: cannot be read ({e}); delete it to download it again") from None
    raise ArchiveError(f"{archive}: not a zip or tar archive; delete it to download it again")


def _unpack(archive: Path, plan: list, sizes: list[int], limit: int, open_member, progress: bool) -> int:
    """Copy every planned member (size limit checked on the declared sizes first, then on the bytes)."""
    declared = sum(sizes)
    if declared > limit:
        raise UnsafeArchive(f"{archive.name}: its members unpack to {_human(declared)}, more than the limit of "
                            f"{_human(limit)} for a {_human(archive.stat().st_size)} archive; refusing to unpack "
                            "(decompression bomb?)")
    for (info, target), size in zip(plan, sizes):  # clash with a file already there (another archive's)
        if target.is_file() and target.stat().st_size != size:
            raise ArchiveError(f"{archive.name}: member {info_name(info)!r} would overwrite {target}, a different "
                               f"file of {target.stat().st_size} bytes (two archives with the same file name?)")
    written = 0
    bar = tqdm(total=len(plan), unit="file", desc=f"unpack {archive.name}", leave=False, disable=not progress,
               position=1)
    with bar:
        for info, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            src = open_member(info)
            with src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > limit:
                        dst.close()
                        part.unlink()
                        raise UnsafeArchive(f"{archive.name}: unpacked more than the limit of {_human(limit)} "
                                            f"(at member {info_name(info)!r}); refusing to go on")
                    dst.write(block)
            os.replace(part, target)
            bar.update(1)
    return len(plan)


def info_name(info) -> str:
    return info.filename if isinstance(info, zipfile.ZipInfo) else info.name


def _plan(members, dest: Path, flatten: bool, is_dir, archive: Path) -> list:
    """(member, target path) for every file member; folders are created on demand."""
    plan, seen = [], {}
    for info, rel in members:
        if is_dir(info) or not rel.parts:
            continue
        target = _target(dest, rel, flatten)
        if target in seen:
            how = f"both flatten to {target.name!r}" if flatten else "are the same path (a member given twice)"
            raise ArchiveError(f"{archive.name}: members {seen[target]!r} and {str(rel)!r} {how}; refusing to "
                               "overwrite one with the other")
        seen[target] = str(rel)
        plan.append((info, target))
    for target, name in seen.items():  # "a" as a file and "a/b" needs "a" as a folder
        for parent in target.relative_to(dest).parents:
            if parent != Path(".") and dest / parent in seen:
                raise ArchiveError(f"{archive.name}: {seen[dest / parent]!r} is a file but {name!r} needs it as a "
                                   "folder; refusing to unpack")
    return plan
