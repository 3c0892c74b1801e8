"""The one table of teachers: name -> where its class lives and how to read its target spec without weights.

``model.tasks.<t>.teacher`` names a row. The class module is imported only when the teacher is
built (importing olavlm loads no teacher); the spec function (``olavlm.teachers.specs``) reads the
teacher's JSON files only, for the pre-flight and the probe. A teacher defined outside this package
joins the table through :func:`register_teacher` (without a spec it is checked when it loads).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from olavlm.teachers import specs


@dataclass
class TeacherEntry:
    module: str  # the module that defines (and registers) the class
    class_name: str
    spec: Callable[[str | None, int, dict], specs.TargetSpec] | None = None  # (path, tower grid, kwargs) -> spec
    cls: type | None = None  # set by register_teacher once the module is imported


TEACHERS: dict[str, TeacherEntry] = {
    "depth_anything": TeacherEntry("olavlm.teachers.depth_anything", "DepthAnythingTeacher", specs.depth_anything),
    "oneformer": TeacherEntry("olavlm.teachers.oneformer", "OneFormerTeacher", specs.oneformer),
    "unclip": TeacherEntry("olavlm.teachers.unclip", "UnCLIPTeacher", specs.unclip),
    "dinov2": TeacherEntry("olavlm.teachers.dinov2", "Dinov2Teacher", specs.dinov2),
    "shapeworld_depth": TeacherEntry("olavlm.teachers.oracle", "ShapeWorldDepthTeacher", specs.oracle("tokens")),
    "shapeworld_seg": TeacherEntry("olavlm.teachers.oracle", "ShapeWorldSegTeacher", specs.oracle("grid")),
    "shapeworld_gen": TeacherEntry("olavlm.teachers.oracle", "ShapeWorldGenTeacher", specs.oracle("vector")),
    "shapeworld_patches": TeacherEntry("olavlm.teachers.oracle_patches", "ShapeWorldPatchTeacher",
                                       specs.oracle("tokens")),
}


def register_teacher(name: str, spec: Callable | None = None) -> Callable[[type], type]:
    """Class decorator: ``@register_teacher("depth_anything")``. A name in the table must be its
    class; a new name adds a row (``spec``: its weight-free spec function, if any)."""

    def wrap(cls: type) -> type:
        entry = TEACHERS.get(name)
        if entry is None:
            entry = TEACHERS[name] = TeacherEntry(cls.__module__, cls.__qualname__, spec)
        elif (entry.module, entry.class_name) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"teacher {name!r} registered twice ({entry.module}.{entry.class_name} and "
                             f"{cls.__module__}.{cls.__qualname__})")
        cls.name = name
        entry.cls = cls
        return cls

    return wrap


def teacher_class(name: str) -> type:
    """The class of teacher ``name`` (its module imported on first use)."""
    entry = TEACHERS.get(name)
    if entry is None:
        raise KeyError(f"unknown teacher {name!r}; registered: {sorted(TEACHERS)}")
    if entry.cls is None:  # importing the module runs its @register_teacher
        entry.cls = getattr(importlib.import_module(entry.module), entry.class_name)
    return entry.cls


def target_spec(name: str, path: str | None, *, grid: int, **kwargs) -> specs.TargetSpec | None:
    """The spec of teacher ``name`` at ``path``, or None when it has no weight-free spec.
    Raises :class:`olavlm.teachers.specs.SpecError` when the teacher's files are missing or inconsistent."""
    entry = TEACHERS.get(name)
    return None if entry is None or entry.spec is None else entry.spec(path, grid, kwargs)
