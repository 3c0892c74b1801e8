"""Where a run's embedding targets come from: one :class:`TargetSource` per run.

Three modes, chosen by the data config (no extra field; :func:`target_mode`):

    live        no ``data.target_cache``: the teachers encode every batch's teacher images
    cache       ``data.target_cache`` + ``data.cache_miss: error``: precomputed targets only, no
                teacher loads; every image of the data file must be in the cache
    cache+live  ``data.target_cache`` + ``data.cache_miss: online``: cached targets, the live
                teachers encode the images the cache lacks (the gaps)

:meth:`TargetSource.for_run` verifies the cache once, before any training step: integrity
(:meth:`TargetCache.open`), every task's teacher (name, path, kwargs, class, input side; with live
teachers their full fingerprints), target shapes == the predictors' output shapes, the image
geometry and teacher square side the cache was written with == the run's, and coverage of the
data file's images. Each mismatch is one line naming the cache and the field.

Per micro-batch :meth:`TargetSource.batch_targets` gives the model ``targets`` {task: (N,
*shape)} and ``target_mask`` bool (N,): one flag per image, shared by every task (a cache entry and
a live encode both hold all of the run's tasks). A False image adds nothing to the auxiliary
losses. With every image present the losses equal those without a mask.

Gaps are counted, never silent: per micro-batch ``targets/filled_live`` (cache+live: images the
live teachers encoded) or ``targets/masked`` (cache: images without a target, e.g. unreadable when
the cache was built but readable now) go into the logged counters (``metrics.jsonl``, summed over
ranks); :meth:`TargetSource.summary` gives this invocation's totals for ``summary.json``.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, Literal, get_args

import torch

from olavlm.teachers.cache import CacheError, TargetCache, config_fingerprints, dtype_name, geometry_fingerprint

log = logging.getLogger(__name__)

Mode = Literal["live", "cache", "cache+live"]
MODES: tuple[str, ...] = get_args(Mode)
FILLED, MASKED = "targets/filled_live", "targets/masked"  # the counters a batch adds


def target_mode(data_cfg) -> Mode:
    """The mode ``data.target_cache`` and ``data.cache_miss`` select (see the module docstring)."""
    if not data_cfg.target_cache:
        return "live"
    return "cache+live" if data_cfg.cache_miss == "online" else "cache"


def teacher_dtype(run_cfg) -> torch.dtype:
    """The dtype teachers run in (training, precompute, planning): ``train.teacher_dtype``, else
    bf16 when ``train.bf16``, else fp32."""
    from olavlm.dtypes import torch_dtype

    if run_cfg.train.teacher_dtype:
        return torch_dtype(run_cfg.train.teacher_dtype, "train.teacher_dtype")
    return torch.bfloat16 if run_cfg.train.bf16 else torch.float32


class TargetSource:
    """The run's targets: live teachers, a target cache, or both (see the module docstring)."""

    def __init__(self, mode: Mode, shapes: dict[str, tuple[int, ...]], *, teachers=None,
                 cache: TargetCache | None = None, teacher_image_size: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"target mode must be one of {MODES}, got {mode!r}")
        if (mode != "cache") != (teachers is not None) or (mode != "live") != (cache is not None):
            raise ValueError(f"target mode {mode!r} needs {'teachers' if mode != 'cache' else 'no teachers'} and "
                             f"{'a cache' if mode != 'live' else 'no cache'}")
        self.mode = mode
        self.shapes = {t: tuple(s) for t, s in shapes.items()}  # per-image target shape per task
        self.teachers = teachers  # TeacherSet (live, cache+live) or None
        self.cache = cache
        self.teacher_image_size = teacher_image_size  # side of the uint8 square the data carries; None = none
        self.pending: dict[str, int] = {}  # counters since the last take_counts()
        self.totals = {FILLED: 0, MASKED: 0}  # over the logged intervals of this invocation (all ranks)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def for_run(cls, cfg, model, *, device=None, loading: Callable[[], Any] = nullcontext) -> "TargetSource | None":
        """The source of ``cfg``'s run for ``model`` (its ``target_shapes``, ``cfg``, ``geometry``,
        ``image_spec``); None when the model predicts nothing. The cache is checked before any
        teacher loads; teachers load inside ``loading()`` (e.g. unpartitioned under ZeRO-3)."""
        shapes = dict(model.target_shapes)
        if not shapes:
            return None
        mode = target_mode(cfg.data)
        cache = TargetCache.open(cfg.data.target_cache) if mode != "live" else None
        if cache is not None:
            side = cfg.data.teacher_image_size or _spec_side(model, shapes)
            verify_cache(cache, cfg, model, side=side)
        teachers = None
        if mode != "cache":
            from olavlm.teachers import build_teachers

            with loading():
                teachers = build_teachers(model.cfg, grid=model.geometry.grid, device=device, dtype=teacher_dtype(cfg),
                                          expected=shapes, tasks=list(shapes))
        side = int(cfg.data.teacher_image_size or teachers.input_size) if teachers is not None else None
        if cache is not None and teachers is not None:  # what the loaded teachers say, over the config's word
            verify_cache(cache, cfg, model, side=side, teachers=teachers)
        source = cls(mode, shapes, teachers=teachers, cache=cache, teacher_image_size=side)
        if cache is not None:
            source._check_coverage(cfg.data.train_file)
        log.info("targets: %s%s", mode, f" ({cache.root})" if cache is not None else "")
        return source

    @classmethod
    def live(cls, teachers, *, teacher_image_size: int | None = None) -> "TargetSource":
        """Live targets from already built ``teachers`` (e.g. the probe evaluation)."""
        return cls("live", teachers.target_shapes, teachers=teachers,
                   teacher_image_size=int(teacher_image_size or teachers.input_size))

    def _check_coverage(self, train_file: str) -> None:
        """cache: every image of the data file has targets (else a CacheError naming them);
        cache+live: the gaps are counted and announced."""
        from olavlm.data.records import image_paths  # the keys precompute cached (malformed records skipped)

        keys = image_paths(train_file)
        unreadable = sum(k in self.cache.unreadable for k in keys)
        if unreadable:
            log.info("targets: %d image(s) of %s were unreadable when the cache was built: the dataset applies "
                     "data.on_bad_sample to them (one readable now has no target: counted as %s)", unreadable,
                     train_file, MASKED if self.mode == "cache" else FILLED)
        if self.mode == "cache":
            self.cache.check_coverage(keys)
            return
        gaps = [k for k in self.cache.missing(keys) if k not in self.cache.unreadable]
        if gaps:
            log.warning("targets: the cache %s lacks %d of the %d images of %s; the live teachers encode them "
                        "(counted as %s in metrics.jsonl)", self.cache.root, len(gaps), len(keys), train_file, FILLED)

    # -- what the data layer needs ---------------------------------------------------------------
    @property
    def lookup(self):
        """The dataset's ``target_lookup`` (the cache's ``get``) or None (live)."""
        return self.cache.get if self.cache is not None else None

    @property
    def collate_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """The collator's ``target_shapes`` (zero rows for a batch whose images all miss) or None (live)."""
        return dict(self.shapes) if self.cache is not None else None

    # -- per micro-batch -------------------------------------------------------------------------
    def batch_targets(self, batch: dict, device) -> dict[str, Any]:
        """``{"targets": {task: (N, *shape)}, "target_mask": bool (N,)}`` on ``device`` for one
        collated micro-batch; one teacher call per task for the images that need it."""
        if self.cache is None:
            if "images" not in batch:
                raise ValueError("live targets need the batch's teacher images (dataset built without "
                                 "teacher_image_size)")
            images = batch["images"].to(device, non_blocking=True)
            targets = self.teachers.encode(images, batch["image_keys"])
            return {"targets": targets, "target_mask": torch.ones(images.shape[0], dtype=torch.bool, device=device)}
        if "targets" not in batch:
            raise ValueError("cached targets missing from the batch (dataset built without target_lookup)")
        targets = {k: v.to(device, non_blocking=True) for k, v in batch["targets"].items()}
        mask = batch["target_mask"]
        gaps = torch.nonzero(~mask).flatten()
        if self.teachers is not None:
            if len(gaps):
                keys = [batch["image_keys"][i] for i in gaps.tolist()]
                fresh = self.teachers.encode(batch["images"][gaps].to(device, non_blocking=True), keys)
                for task, value in fresh.items():
                    targets[task][gaps.to(device)] = value.to(targets[task].dtype)
                mask = torch.ones_like(mask)
            self._count(FILLED, len(gaps))
        else:
            self._count(MASKED, len(gaps))
        return {"targets": targets, "target_mask": mask.to(device, non_blocking=True)}

    def _count(self, key: str, n: int) -> None:
        self.pending[key] = self.pending.get(key, 0) + int(n)

    def take_counts(self) -> dict[str, int]:
        """The gap counters added since the last call (for the step's metrics), then cleared."""
        out, self.pending = self.pending, {}
        return out

    def add_logged(self, values: dict[str, float]) -> None:
        """Fold a logged interval's counters (summed over ranks) into this invocation's totals."""
        for key in self.totals:
            self.totals[key] += int(values.get(key, 0))

    def summary(self) -> dict[str, Any]:
        """What summary.json records: the mode, the cache, and the gap totals of this invocation."""
        out: dict[str, Any] = {"mode": self.mode, "cache": str(self.cache.root) if self.cache is not None else None}
        if self.mode == "cache+live":
            out["filled_live"] = self.totals[FILLED]
        elif self.mode == "cache":
            out["masked"] = self.totals[MASKED]
        return out

    def report(self) -> None:
        """One log line at the end of a run when images were filled live or had no target."""
        if self.totals[FILLED]:
            log.warning("targets: %d image(s) missing from the cache %s were encoded by the live teachers",
                        self.totals[FILLED], self.cache.root)
        if self.totals[MASKED]:
            log.warning("targets: %d image(s) had no target in the cache %s and were left out of the embedding "
                        "losses", self.totals[MASKED], self.cache.root)


def _spec_side(model, shapes) -> int | None:
    """The teachers' square side from their JSON files (weight-free), or None when a teacher has no
    spec or its files are absent (a cache-only run need not have the teachers)."""
    from olavlm.teachers.registry import target_spec
    from olavlm.teachers.specs import SpecError

    sides = []
    for task in shapes:
        tc = model.cfg.tasks[task]
        try:
            spec = target_spec(tc.teacher, tc.teacher_path, grid=model.geometry.grid, **dict(tc.teacher_kwargs))
        except (SpecError, OSError, ValueError):
            return None
        if spec is None:
            return None
        sides.append(spec.input_size)
    return max(sides, default=None)


def _expected_fingerprints(cfg, model, shapes, teachers) -> dict[str, dict]:
    """{task: what the cache's fingerprint must hold}: the config's teacher fields plus the class
    the registry names, or the loaded teachers' full fingerprints."""
    from olavlm.teachers.registry import TEACHERS

    fps = config_fingerprints(model.cfg, model.geometry.grid, shapes)
    for task, fp in fps.items():
        if teachers is not None:
            fp.update(teachers[task].fingerprint())
        elif fp["teacher"] in TEACHERS:
            fp["class"] = TEACHERS[fp["teacher"]].class_name
    return fps


def verify_cache(cache: TargetCache, cfg, model, *, side: int | None, teachers=None) -> None:
    """Raise :class:`CacheError`, one line per mismatch naming the cache and the field, when
    ``cache`` was not written for this run: tasks and teachers, target shapes, geometry, the
    teacher square ``side`` (skipped when unknown) and, with live teachers, their dtype."""
    shapes = dict(model.target_shapes)
    spec = model.image_spec
    if side is not None:
        geometry = geometry_fingerprint(cfg.data.image_geometry, spec, side)
    else:  # the square side is unknown without the teachers' files: the tower side of the geometry only
        geometry = {k: v for k, v in geometry_fingerprint(cfg.data.image_geometry, spec, spec.size).items()
                    if k not in ("square_side", "teacher_image_size")}
    problems = cache.mismatches(list(shapes), _expected_fingerprints(cfg, model, shapes, teachers), shapes=shapes,
                                geometry=geometry)
    if teachers is not None:
        run_dtype = dtype_name(teacher_dtype(cfg))
        if cache.index.get("compute_dtype", run_dtype) != run_dtype:
            problems.append(f"compute_dtype: cache targets were computed in {cache.index['compute_dtype']}, the live "
                            f"teachers run in {run_dtype} (train.teacher_dtype / train.bf16)")
    if problems:
        lines = [f"data.target_cache: {cache.root}: {p}" for p in problems]
        lines[-1] += "; rebuild it with `olavlm targets precompute` into a new folder"
        raise CacheError("\n".join(lines))
