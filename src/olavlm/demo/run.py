"""`olavlm demo`: the whole OLA-VLM pipeline on ShapeWorld, on a laptop CPU.

Stages (each logged as ``[demo k/6] ...``):
  1. generate the world (cached: same spec -> reused);
  2. bootstrap the base tokenizer / LLM / vision tower (cached, see bootstrap.py);
  3. PT with ``configs/shapeworld/pt.yaml`` through ``olavlm.train.loop.train`` (NTP + the three
     embedding losses against the oracle teachers);
  4. IFT with ``configs/shapeworld/ift.yaml`` (NTP only, task tokens kept frozen);
  5. ``eval cvbench`` on the held-out cvbench.jsonl and ``probe`` (depth, seg, gen) on probe.json;
  6. report.md, report.json, loss.png, probe.png.
By default it trains two variants side by side: ``ola`` and ``baseline`` (identical, embedding losses
off: tasks keep their tokens but ``layers: []``); ``viral`` (the baseline's PT, then
``configs/shapeworld/viral_ift.yaml``: NTP + alignment in IFT) is a third on request. The recipes and
extra overrides of each come from :mod:`olavlm.methods`; a PT run two variants share (baseline and
viral) trains once. With ``seeds > 1`` everything after the bootstrap repeats per seed and the
report gives mean ± std.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from olavlm.demo.bootstrap import BootstrapSpec
from olavlm.world.generate import WorldSpec

log = logging.getLogger("olavlm.demo")
VARIANTS = ("ola", "baseline", "viral")  # the methods of olavlm.methods
DEFAULT_VARIANTS = ("ola", "baseline")  # `make demo` (time budget); viral on request
PROBE_TASKS = ("depth", "seg", "gen")


@dataclass
class DemoSettings:
    """Everything that sizes a demo run (``quick`` = the smoke-test size)."""

    world: WorldSpec = field(default_factory=WorldSpec)
    bootstrap: BootstrapSpec = field(default_factory=BootstrapSpec)
    pt_epochs: int = 2  # passes over pretrain.json
    ift_epochs: int = 3  # passes over instruct.json (2000 records / batch 8 x 3 = 750 steps)
    max_steps: int | None = None  # cap per stage (quick mode)
    batch_size: int = 8  # global = micro batch of PT and IFT (small batches: more steps in the budget)
    probe_steps: int = 100  # optimisation steps of each probe set
    # which final model is probed for which teacher: the PT model shows what the embedding losses
    # alone changed (its LLM is frozen); the IFT model is the one the paper probes
    probe_plan: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"pt": ("depth",),
                                                                            "ift": ("depth", "seg", "gen")})
    eval_batch_size: int = 32


def settings_for(quick: bool, seed: int) -> DemoSettings:
    if not quick:
        return DemoSettings(world=WorldSpec(seed=seed), bootstrap=BootstrapSpec(seed=seed))
    return DemoSettings(
        world=WorldSpec(seed=seed, n_pretrain=48, n_instruct=48, n_text_only=8, n_cvbench=16, n_probe=24),
        bootstrap=BootstrapSpec(seed=seed, llm_hidden=64, llm_steps=8, llm_batch=8, vision_steps=8, vision_batch=16),
        pt_epochs=1, ift_epochs=1, max_steps=3, batch_size=8, probe_steps=20,
        probe_plan={"ift": ("depth", "seg", "gen")},
    )


def default_config_dir() -> Path:
    """The demo recipes shipped inside the package (``configs/shapeworld`` in the source tree links here)."""
    here = Path(__file__).resolve().parent / "recipes"
    if not (here / "pt.yaml").is_file():
        raise FileNotFoundError(f"{here / 'pt.yaml'} is missing from the installed package; pass --config-dir "
                                "(a folder with pt.yaml / ift.yaml / viral_ift.yaml)")
    return here


def _stage(k: int, text: str) -> float:
    log.info("[demo %d/6] %s", k, text)
    return time.perf_counter()


def ensure_world(root: Path, spec: WorldSpec) -> Path:
    from olavlm.world.generate import generate_world

    meta = root / "world.json"
    if meta.is_file() and json.loads(meta.read_text()).get("spec") == json.loads(json.dumps(dataclasses.asdict(spec))):
        log.info("world: reusing %s", root)
        return root
    if root.exists():
        shutil.rmtree(root)
    world = generate_world(root, spec)
    log.info("world: %s", ", ".join(f"{k} {v}" for k, v in world.counts.items()))
    return root


def stage_config(config_file: Path, *, llm: Path, vision: Path, world: Path, data_file: str, run_dir: Path,
                 seed: int, epochs: int, batch: int, max_steps: int | None, init_from: Path | None,
                 extra: list[str] = ()):
    """The recipe with the demo's paths and sizes filled in (the same overrides `olavlm train` takes)."""
    from olavlm.config import load_config

    overrides = [f"model.llm={llm}", f"model.vision_tower={vision}", f"data.train_file={world / data_file}",
                 f"data.image_folder={world}", f"train.output_dir={run_dir}", f"train.seed={seed}",
                 f"train.epochs={epochs}", f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}",
                 f"train.max_steps={'null' if max_steps is None else max_steps}"]
    overrides += [f"model.tasks.{t}.teacher_path={world}" for t in PROBE_TASKS]
    if init_from is not None:
        overrides.append(f"train.init_from={init_from}")
    overrides += list(extra)  # the method's own (olavlm.methods.shapeworld_stage_overrides)
    return load_config(config_file, overrides)


def run_stage(cfg) -> dict:
    """Train one stage through the same function as `olavlm train`; a finished identical run is reused."""
    from olavlm.train.loop import train

    run_dir = Path(cfg.train.output_dir)
    done = run_dir / "final" / "config.json"
    if done.is_file() and (run_dir / "config.yaml").is_file() and (run_dir / "config.yaml").read_text() == cfg.to_yaml():
        log.info("%s: reusing finished run %s", cfg.train.stage, run_dir)
        return {**json.loads((run_dir / "summary.json").read_text()), "reused": True}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return train(cfg, resume="none").summary


def _pt_dir(out: Path, variant: str, seed: int) -> Path:
    """The PT run of ``variant``: methods with the same PT recipe and overrides share one run folder."""
    from olavlm.methods import shapeworld_plan

    plan = shapeworld_plan(variant)
    owner = next(v for v in VARIANTS if (shapeworld_plan(v).pt_recipe, shapeworld_plan(v).pt_embedding_losses)
                 == (plan.pt_recipe, plan.pt_embedding_losses))
    return out / "runs" / f"seed{seed}" / owner / "pt"


def run_variant(out: Path, variant: str, seed: int, st: DemoSettings, boot, world: Path, config_dir: Path,
                progress: bool) -> dict:
    from olavlm.evaluation.cvbench import format_table, load_items, run_cvbench
    from olavlm.methods import shapeworld_plan, shapeworld_stage_overrides

    base = out / "runs" / f"seed{seed}" / variant
    pt_dir = _pt_dir(out, variant, seed)
    common = dict(llm=boot.llm, vision=boot.vision, world=world, seed=seed, batch=st.batch_size,
                  max_steps=st.max_steps)
    plan = shapeworld_plan(variant)
    pt_file, pt_extra = shapeworld_stage_overrides(variant, "pt", world)
    t0 = _stage(3, f"PT ({variant}, seed {seed}): NTP{' + depth/seg/gen embedding losses' if plan.pt_embedding_losses else ' only (embedding losses off)'}"
                   f"{'' if pt_dir.parent == base else f' = the {pt_dir.parent.name} PT run'}")
    pt_cfg = stage_config(config_dir / pt_file, data_file="pretrain.json", run_dir=pt_dir,
                          epochs=st.pt_epochs, init_from=None, extra=pt_extra, **common)
    pt = run_stage(pt_cfg)
    ift_file, ift_extra = shapeworld_stage_overrides(variant, "ift", world)
    t1 = _stage(4, f"IFT ({variant}, seed {seed}) with {ift_file} from {pt_dir} [PT took {time.perf_counter() - t0:.0f} s]")
    ift_cfg = stage_config(config_dir / ift_file, data_file="instruct.json", run_dir=base / "ift",
                           epochs=st.ift_epochs, init_from=pt_dir, extra=ift_extra, **common)
    ift = run_stage(ift_cfg)
    t2 = _stage(5, f"evaluate ({variant}, seed {seed}): CV-Bench format + probes "
                   f"[IFT took {time.perf_counter() - t1:.0f} s]")
    cvb = run_cvbench(base / "ift" / "final", world / "cvbench.jsonl", world, output=base / "cvbench.json",
                      batch_size=st.eval_batch_size, progress=progress)
    log.info("%s seed %d:\n%s", variant, seed, format_table(cvb))
    probes = probe_models(base, world, st, progress, pt_dir=pt_dir, extra_ift=plan.probe_tasks)
    n_choices = {it["idx"]: len(it["choices"]) for it in load_items(world / "cvbench.jsonl")}
    items = [{"task": p["task"], "answer": p["answer"], "prediction": p["prediction"], "correct": p["correct"],
              "n_choices": n_choices.get(p["idx"])} for p in cvb["per_item"]]
    return {"variant": variant, "seed": seed, "pt": pt, "ift": ift, "cvbench_items": items,
            "cvbench": {k: v for k, v in cvb.items() if k != "per_item"},
            "probe": probes, "seconds": {"pt": round(t1 - t0, 1), "ift": round(t2 - t1, 1),
                                         "eval": round(time.perf_counter() - t2, 1)},
            "recipes": {"pt": pt_file, "ift": ift_file},
            "metrics": {"pt": str((pt_dir / "metrics.jsonl").relative_to(out)),
                        "ift": str((base / "ift" / "metrics.jsonl").relative_to(out))}}


def probe_models(base: Path, world: Path, st: DemoSettings, progress: bool, *, pt_dir: Path | None = None,
                 extra_ift: tuple[str, ...] = ()) -> dict:
    """Probe results {stage: {task: train_probes result}} for the configured stages' final models
    (``extra_ift``: the method's own tasks, probed on its IFT model too)."""
    import json as _json

    from olavlm.evaluation.probe import ProbeSpec, collect_states, parse_layers, resolve_teacher, train_probes
    from olavlm.evaluation.runner import load_eval_model
    from olavlm.teachers.base import build_teacher

    records = _json.loads((world / "probe.json").read_text())
    out = {}
    for stage, tasks in st.probe_plan.items():
        tasks = tuple(tasks) + (tuple(t for t in extra_ift if t not in tasks) if stage == "ift" else ())
        em = load_eval_model((pt_dir or base / "pt") / "final" if stage == "pt" else base / stage / "final")
        layers = parse_layers("all", em.model.llm.config.num_hidden_layers)
        teachers = {}
        for task in tasks:
            name, path, kwargs = resolve_teacher(em.model.cfg, task, str(world), None)
            teachers[task] = build_teacher(name, path, grid=em.model.geometry.grid, **kwargs).eval()
        states, mask, targets = collect_states(em, records, world, layers, teachers, progress=progress)
        out[stage] = {}
        for task, teacher in teachers.items():
            res = train_probes(states, mask, targets[task], teacher.layout, ProbeSpec(steps=st.probe_steps))
            res["layers"] = {str(k): v for k, v in res["layers"].items()}
            out[stage][task] = res
            log.info("probe %s/%s centred cosine per layer: %s", stage, task,
                     " ".join(f"L{k}={v['centred_cosine']:.3f}" for k, v in res["layers"].items()))
    return out


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def _portable(path: Path) -> str:
    """``path`` relative to the working directory when inside it, else its last two parts."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(*path.resolve().parts[-2:]))


def variant_groups(variants: tuple[str, ...], seeds: range) -> list[tuple[int, tuple[str, ...]]]:
    """(seed, variants) units that can train independently: variants sharing a PT run stay together,
    in the order given, so the shared run trains once (``viral`` reuses the baseline's PT)."""
    groups: dict[tuple[int, Path], list[str]] = {}
    for s in seeds:
        for v in variants:
            groups.setdefault((s, _pt_dir(Path("."), v, s)), []).append(v)
    return [(s, tuple(vs)) for (s, _), vs in groups.items()]


def default_jobs(n_groups: int) -> int:
    """Parallel training processes: one per independent group, at most one per core (each runs
    single-threaded; processes, unlike intra-op threads, do not stall each other when cores are shared)."""
    return max(1, min(n_groups, os.cpu_count() or 1))


def _run_group(out: Path, seed: int, variants: tuple[str, ...], st: DemoSettings, boot, world: Path,
               config_dir: Path, progress: bool, threads: int | None = None, log_level: int | None = None) -> list[dict]:
    """Train + evaluate ``variants`` of one seed in order (also the body of a worker process)."""
    if threads is not None:  # a spawned worker: same thread count and log level as the parent, no bars
        import torch

        os.environ["TQDM_DISABLE"] = "1"  # two workers' progress bars would interleave; the stage logs remain
        torch.set_num_threads(threads)
        logging.basicConfig(level=log_level or logging.INFO,
                            format=f"%(asctime)s %(levelname)s [{'+'.join(variants)} seed {seed}] %(message)s")
    return [run_variant(out, v, seed, st, boot, world, config_dir, progress) for v in variants]


def _run_groups(out: Path, groups, st: DemoSettings, boot, world: Path, config_dir: Path, progress: bool,
                jobs: int) -> list[dict]:
    if jobs <= 1 or len(groups) <= 1:
        return [r for s, vs in groups for r in _run_group(out, s, vs, st, boot, world, config_dir, progress)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    log.info("training %d groups in %d processes (%s); progress bars off", len(groups), jobs,
             ", ".join(f"{'+'.join(vs)} seed {s}" for s, vs in groups))
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_group, out, s, vs, st, boot, world, config_dir, False, torch.get_num_threads(),
                               level) for s, vs in groups]
        return [r for f in futures for r in f.result()]


def run_demo(output_dir: str | Path = "runs/demo", *, seed: int = 0, quick: bool = False, seeds: int = 1,
             variants: tuple[str, ...] = DEFAULT_VARIANTS, config_dir: str | Path | None = None, progress: bool = True,
             jobs: int | None = None) -> dict:
    """Run the demo; returns the report dict (also written to ``output_dir/report.json``).

    ``jobs``: training processes for the independent (seed, variant) groups; None = one per group,
    at most one per core (:func:`default_jobs`). Results do not depend on it.
    """
    import torch

    from olavlm.demo.bootstrap import bootstrap
    from olavlm.demo.report import write_report

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"--variants: expected some of {', '.join(VARIANTS)}, got {', '.join(variants) or 'none'}")
    start, load_start = time.perf_counter(), _load()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = settings_for(quick, seed)
    cfg_dir = Path(config_dir) if config_dir else default_config_dir()
    t = _stage(1, f"generate ShapeWorld (seed {seed}) -> {out / 'world'}")
    world = ensure_world(out / "world", st.world)
    gen_s = time.perf_counter() - t
    t = _stage(2, f"bootstrap base tokenizer / LLM / vision tower -> {out / 'bootstrap'}")
    boot = bootstrap(world, out / "bootstrap", st.bootstrap)
    boot_s = time.perf_counter() - t
    groups = variant_groups(variants, range(seed, seed + seeds))
    jobs = default_jobs(len(groups)) if jobs is None else jobs
    t = time.perf_counter()
    runs = _run_groups(out, groups, st, boot, world, cfg_dir, progress, jobs)
    train_s = time.perf_counter() - t
    _stage(6, f"report -> {out / 'report.md'}")
    trained = [r for r in runs if not r["ift"].get("reused")] or runs
    per_model = sum(sum(r["seconds"].values()) for r in trained) / len(trained)  # reused runs took ~0 s
    info = {"seed": seed, "seeds": list(range(seed, seed + seeds)), "quick": quick, "variants": list(variants),
            "settings": dataclasses.asdict(st), "config_dir": _portable(cfg_dir), "threads": torch.get_num_threads(),
            "jobs": jobs,
            "load_start": load_start, "load_end": _load(),
            "bootstrap": {k: v for k, v in boot.info.items() if k != "key"} | {"cached": boot.cached},
            "seconds": {"generate": round(gen_s, 1), "bootstrap": round(boot_s, 1), "per_model": round(per_model, 1),
                        "models": round(train_s, 1), "total": round(time.perf_counter() - start, 1)}}
    report = write_report(out, info, runs)
    log.info("demo finished in %.0f s: %s", time.perf_counter() - start, out / "report.md")
    return report
