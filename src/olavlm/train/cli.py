"""`olavlm train CONFIG.yaml [--section.key=value ...] [--output-dir DIR] [--resume auto|PATH|none]
[--force] [--print-config] [--stop-after-steps N]` and `olavlm merge-lora RUN DST`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default=None, help="run directory (same as --train.output_dir=DIR)")
    p.add_argument("--resume", default="auto",
                   help="auto: newest intact checkpoint of the run dir, falling back past damaged ones (default); "
                        "PATH: that checkpoint (newer ones are moved aside to RUN_DIR/superseded/); none: start over")
    p.add_argument("--force", action="store_true",
                   help="train again from step 0 even if the run dir holds a finished run (its checkpoints and "
                        "final model are moved aside to RUN_DIR/superseded/, not deleted)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="leave with a checkpoint after N optimizer steps of this invocation (schedule unchanged)")


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train one stage (pt, vpt, ift) from a YAML recipe",
        description="Train one stage from a YAML recipe. Any field can be overridden with --section.key=value "
                    "(values parsed as YAML), e.g. --train.max_steps=2 --model.llm=tiny/llm-llama.")
    p.add_argument("config", help="recipe YAML (configs/...)")
    _add_flags(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key=value ...")
    p.set_defaults(func=run)
    m = sub.add_parser(
        "merge-lora", help="merge a LoRA run's adapters into a plain model folder",
        description="Fold the LoRA adapters of a run trained with train.lora (RUN or RUN/final) into the base "
                    "weights and write a plain olavlm model folder DST (loadable anywhere a model folder is).")
    m.add_argument("run", help="run directory (or its final/ adapter folder)")
    m.add_argument("dst", help="new folder for the merged model")
    m.set_defaults(func=run_merge)


def run_merge(args) -> int:
    print(f"merged model: {merge_lora(args.run, args.dst)}")
    return 0


def merge_lora(run: str | Path, dst: str | Path) -> Path:
    """``olavlm merge-lora RUN DST``: the run's adapter folder (RUN, RUN/final) merged into a plain
    olavlm model folder at ``dst`` (with the run's processor, or an old run's olavlm_run.json)."""
    import shutil

    from olavlm.data.processor import LEGACY_FILE, PROCESSOR_FILE
    from olavlm.model.lora import MARKER, LoraFolderError, is_adapter_folder, load_adapter_folder

    run = Path(run)
    src = next((p for p in (run / "final", run) if is_adapter_folder(p)), None)
    if src is None:
        raise LoraFolderError(f"{run}: no LoRA adapter folder here (expected {run}/final/{MARKER}); "
                              "only runs trained with train.lora have one")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise LoraFolderError(f"{dst}: exists and is not empty; pick a new folder")
    model = load_adapter_folder(src, merge=True)
    model.save_pretrained(dst, with_predictors=False)
    for name in (PROCESSOR_FILE, LEGACY_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def split_args(rest: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags given after CONFIG land in the remainder; separate them from the dotted overrides."""
    flags = argparse.ArgumentParser(add_help=False)
    _add_flags(flags)
    known, overrides = flags.parse_known_args(rest)
    for item in overrides:
        key = item[2:] if item.startswith("--") else item
        if "=" not in key or "." not in key.split("=", 1)[0]:
            from olavlm.config import ConfigError

            raise ConfigError(f"{item}: unknown argument; overrides look like --section.key=value")
    return known, overrides


def run(args) -> int:
    from olavlm.config import load_config

    late, overrides = split_args(args.overrides or [])
    for name in ("output_dir", "resume", "stop_after_steps", "force"):
        default = {"resume": "auto", "force": False}.get(name)
        if getattr(late, name) != default:
            setattr(args, name, getattr(late, name))
    print_config = args.print_config or late.print_config
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    if print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from olavlm.train.loop import train
    from olavlm.threads import configure_cpu_threads

    configure_cpu_threads(cfg.model.llm)
    result = train(cfg, resume=args.resume, stop_after_steps=args.stop_after_steps, force=args.force)
    if result.already_finished:
        print(f"{result.output_dir} already finished (step {result.summary.get('steps')}); final model: "
              f"{result.final_dir} (nothing trained; --force trains it again from step 0)")
    elif result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    else:
        print(f"stopped at step {result.summary['steps']}; continue with --resume auto")
    return 0
