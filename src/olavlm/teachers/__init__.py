"""Frozen teacher encoders (depth, segmentation, generation) and the precomputed target cache."""

from olavlm.teachers.base import TEACHERS, Teacher, TeacherSet, build_teacher, register_teacher

__all__ = ["TEACHERS", "Teacher", "TeacherSet", "build_teacher", "register_teacher"]
