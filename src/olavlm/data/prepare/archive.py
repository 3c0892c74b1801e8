"""Safe unpacking of zip and tar archives.

Every member is checked BEFORE anything is written: absolute paths, drive letters, ``..``
components, symbolic/hard links and device files make the whole archive refused
(:class:`UnsafeArchive`), so a hostile or broken archive cannot write outside its target folder.
Whether an archive was already unpacked is the caller's business (done-markers in ``state.py``).
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm


class UnsafeArchive(ValueError):
    """The archive has a member that would escape the target folder or is a link/device."""


class ArchiveError(RuntimeError):
    """The archive cannot be read (truncated, unknown format) or collides when flattened."""


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


def safe_extract(archive: Path, dest: Path, *, flatten: bool = False, progress: bool = True) -> int:
    """Unpack `archive` into `dest` and return the number of files written.

    ``flatten=True`` drops member folders (like ``unzip -j``); two members with the same file name
    then raise ArchiveError instead of silently overwriting each other.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = _zip_members(zf, archive)
                plan = _plan(members, dest, flatten, lambda i: i.is_dir(), archive)
                bar = tqdm(total=len(plan), unit="file", desc=f"unpack {archive.name}", leave=False,
                           disable=not progress, position=1)
                with bar:
                    for info, target in plan:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        bar.update(1)
                return len(plan)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = _tar_members(tf, archive)
                plan = _plan(members, dest, flatten, lambda i: i.isdir(), archive)
                bar = tqdm(total=len(plan), unit="file", desc=f"unpack {archive.name}", leave=False,
                           disable=not progress, position=1)
                with bar:
                    for info, target in plan:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        src = tf.extractfile(info)
                        assert src is not None  # regular file, checked above
                        with src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                        bar.update(1)
                return len(plan)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"{archive}: cannot be read ({e}); delete it to download it again") from None
    raise ArchiveError(f"{archive}: not a zip or tar archive; delete it to download it again")


def _plan(members, dest: Path, flatten: bool, is_dir, archive: Path) -> list:
    """(member, target path) for every file member; folders are created on demand."""
    plan, seen = [], {}
    for info, rel in members:
        if is_dir(info) or not rel.parts:
            continue
        target = _target(dest, rel, flatten)
        if flatten and target in seen:
            raise ArchiveError(
                f"{archive.name}: members {seen[target]!r} and {str(rel)!r} both flatten to {target.name!r}")
        seen[target] = str(rel)
        plan.append((info, target))
    return plan
