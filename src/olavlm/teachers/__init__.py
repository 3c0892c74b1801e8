"""Frozen teacher encoders (depth, segmentation, generation) and the precomputed target cache."""

from olavlm.teachers.base import (TEACHERS, Teacher, TeacherSet, TeacherShapeError, build_teacher, build_teachers,
                                  register_teacher)

__all__ = ["TEACHERS", "Teacher", "TeacherSet", "TeacherShapeError", "build_teacher", "build_teachers",
           "register_teacher"]
