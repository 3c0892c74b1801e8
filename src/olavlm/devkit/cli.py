"""`olavlm make-tiny`: tiny random checkpoints for CPU smoke runs."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("make-tiny", help="write tiny random checkpoints (tokenizer, LLMs, vision towers, teachers)")
    p.add_argument("--output", required=True, help="folder to write into")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from olavlm.devkit.tiny import make_tiny

    written = make_tiny(args.output, seed=args.seed)
    width = max(len(k) for k in written)
    print(f"wrote {len(written)} tiny checkpoints under {args.output}:")
    for name, path in written.items():
        print(f"  {name:<{width}}  {path}")
    return 0
