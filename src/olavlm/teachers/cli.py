"""`olavlm targets precompute CONFIG.yaml [--batch-size N] [--dtype DTYPE] [--workers N]
[--shard-size N] [--no-progress] [section.key=value ...]` and `olavlm targets verify CACHE|CONFIG [--deep]`.

Multi-GPU: ``torchrun --nproc_per_node 8 -m olavlm.cli targets precompute CONFIG.yaml`` (or
``accelerate launch -m olavlm.cli ...``): each rank encodes a disjoint share of the shards.
"""

from __future__ import annotations

import argparse

from olavlm.dtypes import SPELLINGS
from olavlm.teachers.precompute import DEFAULT_SHARD_SIZE


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="images per teacher call (default 32)")
    p.add_argument("--dtype", choices=SPELLINGS, default=None, metavar="DTYPE",
                   help=f"storage dtype of the targets, one of {', '.join(SPELLINGS)} (default: the training teacher dtype)")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding worker processes (default data.num_workers)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per shard file (default {DEFAULT_SHARD_SIZE}; keep it fixed when resuming)")
    p.add_argument("--no-progress", action="store_true", help="no storage estimate / progress bar output")


def register(sub) -> None:
    p = sub.add_parser("targets", help="precompute teacher targets into data.target_cache")
    tsub = p.add_subparsers(dest="targets_command", metavar="ACTION", required=True)
    pre = tsub.add_parser(
        "precompute", help="run the configured teachers over the dataset's images (resumable, multi-process)",
        description="Run the teachers of every task with predictor layers over the unique images of "
                    "data.train_file and write safetensors shards + index.json to data.target_cache. "
                    "Overrides: section.key=value (or --section.key=value), values parsed as YAML.")
    pre.add_argument("config", help="run recipe YAML (the same file training uses)")
    _add_flags(pre)
    pre.add_argument("overrides", nargs=argparse.REMAINDER, help="section.key=value ...")
    pre.set_defaults(func=run)
    ver = tsub.add_parser(
        "verify", help="check a target cache's index and shards (sizes, headers; --deep: sha256 of every shard)",
        description="Check a target cache folder: every shard its index uses is present with the recorded size, "
                    "a readable header from the same precompute run, and the rows the index says. --deep also "
                    "re-hashes every shard (sha256). Exit 0 when intact, 2 with one line naming the damage.")
    ver.add_argument("cache", help="target cache folder, or a run recipe YAML (its data.target_cache)")
    ver.add_argument("--deep", action="store_true", help="also re-hash every shard (reads the whole cache)")
    ver.set_defaults(func=run_verify)


def run_verify(args) -> int:
    from pathlib import Path

    from olavlm.teachers.cache import CacheError, TargetCache

    path = Path(args.cache)
    if path.is_file():
        from olavlm.config import load_config

        folder = load_config(path).data.target_cache
        if not folder:
            raise CacheError(f"{path}: data.target_cache is not set")
        path = Path(folder)
    cache = TargetCache.open(path, check=False)
    stats = cache.check_files(deep=args.deep)
    what = "sizes, headers and sha256" if args.deep else "sizes and headers (add --deep to re-hash the shards)"
    present = cache.index.get("present_shards")
    state = "complete" if cache.complete else f"INCOMPLETE ({present}/{len(cache.shards)} shards)"
    print(f"target cache {path}: OK, {stats['entries']} images in {stats['shards']} shard(s), {state}; checked {what}")
    return 0


def run(args) -> int:
    from olavlm.config import ConfigError, load_config
    from olavlm.teachers.precompute import precompute

    flags = argparse.ArgumentParser(add_help=False)
    _add_flags(flags)
    late, overrides = flags.parse_known_args(args.overrides or [], namespace=argparse.Namespace())
    for name, value in vars(late).items():  # flags given after CONFIG
        if value != flags.get_default(name):
            setattr(args, name, value)
    for item in overrides:
        key = item[2:] if item.startswith("--") else item
        if "=" not in key or "." not in key.split("=", 1)[0]:
            raise ConfigError(f"{item}: unknown argument; overrides look like section.key=value")
    cfg = load_config(args.config, overrides)
    summary = precompute(cfg, batch_size=args.batch_size, dtype=args.dtype, workers=args.workers,
                         shard_size=args.shard_size, progress=not args.no_progress)
    if summary["world_size"] > 1:
        import torch.distributed as dist

        if dist.is_initialized():  # precompute ended with a barrier
            dist.destroy_process_group()
    if summary.get("rank", 0) == 0 and summary.get("complete") is False:
        return 1
    return 0
