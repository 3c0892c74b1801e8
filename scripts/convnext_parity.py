"""Parity of the olavlm ConvNeXt tower (transformers ConvNextModel) against timm's own ConvNeXt.

Needs timm (not a dependency of olavlm). Builds a timm ConvNeXt (``convnext_xxlarge`` by default,
``--tiny`` for a small one), optionally with real weights read from an open_clip / OLA-VLM
checkpoint (``--weights``, the same reader as ``olavlm convert open-clip``), converts its state
dict with ``convnext_state_dict_from_open_clip``, and compares in eval mode on a fixed-seed input:
the stem output, each stage output, the flattened (N, H*W, C) features and the pooled head.norm
output, with the LayerNorm eps as olavlm sets it (the timm value) and as transformers builds it
(1e-6). Prints a table and writes JSON (``--out``). The full-size model needs ~10 GB of memory in
float32 (timm + two converted copies).

    python scripts/convnext_parity.py --tiny                       # seconds, random weights
    python scripts/convnext_parity.py --device cuda --dtype bfloat16
    python scripts/convnext_parity.py --weights laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup
"""

from __future__ import annotations

import argparse
import copy
import json
import sys


def _require_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        sys.exit("convnext_parity: timm is not installed (pip install timm); it is the reference this script "
                 "compares against")


def _timm_model(args):
    """timm's ConvNeXt: shaped like --weights when given (then loaded strictly), else --tiny / --model."""
    import timm
    import torch
    from timm.models.convnext import ConvNeXt

    if args.weights:
        from olavlm.model.convnext import _source_files, convnext_config_from_state, read_trunk_tensors

        files, _ = _source_files(args.weights)
        state, prefix, _ = read_trunk_tensors(files, args.prefix)
        cfg = convnext_config_from_state(state, prefix)
        model = ConvNeXt(depths=tuple(cfg.depths), dims=tuple(cfg.hidden_sizes), patch_size=cfg.patch_size,
                         norm_eps=args.norm_eps or cfg.norm_eps, num_classes=0)
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
        return model.eval()
    if args.tiny:
        model = ConvNeXt(depths=(2, 2, 3, 2), dims=(16, 32, 48, 64), norm_eps=args.norm_eps or 1e-5, num_classes=0)
    else:
        model = timm.create_model(args.model, pretrained=False, num_classes=0)
    torch.manual_seed(0)
    with torch.no_grad():  # random layer scale of a useful size (timm initialises it to 1e-6)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 1.0)
    return model.eval()


def _hf_model(timm_model, image_size: int, norm_eps: float):
    from transformers import ConvNextModel

    from olavlm.model.convnext import apply_norm_eps, convnext_config_from_state, convnext_state_dict_from_open_clip

    state = {k: v.float() for k, v in timm_model.state_dict().items()}
    config = convnext_config_from_state(state, "", image_size=image_size, norm_eps=norm_eps)
    hf = ConvNextModel(config)
    hf.load_state_dict(convnext_state_dict_from_open_clip(state, "", config=config), strict=True)
    exact = hf.eval()
    apply_norm_eps(exact, norm_eps)
    default = copy.deepcopy(exact)
    apply_norm_eps(default, 1e-6)
    return exact, default, len(state)


def _err(a, b) -> dict[str, float]:
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / b.abs().max().clamp_min(1e-12)),
            "mean_abs": float(diff.mean())}


def compare(args) -> dict:
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    timm_model = _timm_model(args)
    eps = {m.eps for m in timm_model.modules() if isinstance(m, torch.nn.LayerNorm)}
    if len(eps) != 1:
        sys.exit(f"convnext_parity: the timm model mixes LayerNorm eps {sorted(eps)}")
    exact, default, n_keys = _hf_model(timm_model, args.image_size, eps.pop())
    models = {"timm": timm_model, "olavlm": exact, "hf_eps_1e-6": default}
    for m in models.values():
        m.to(args.device, dtype)
    torch.manual_seed(args.seed)
    x = torch.randn(1, 3, args.image_size, args.image_size).to(args.device, dtype)
    with torch.no_grad():
        t_stages, h = [], timm_model.stem(x)
        t_stem = h
        for stage in timm_model.stages:
            h = stage(h)
            t_stages.append(h)
        t_feats = timm_model.norm_pre(h)
        t_pooled = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        report = {"keys": n_keys, "dtype": args.dtype, "device": args.device, "image_size": args.image_size,
                  "norm_eps": exact.config.norm_eps}
        for name in ("olavlm", "hf_eps_1e-6"):
            out = models[name](pixel_values=x, output_hidden_states=True)
            rows = {"stem": _err(out.hidden_states[0], t_stem)}
            rows.update({f"stage{i}": _err(out.hidden_states[i + 1], t) for i, t in enumerate(t_stages)})
            flat = out.last_hidden_state.flatten(2).transpose(1, 2)
            rows["features"] = _err(flat, t_feats.flatten(2).transpose(1, 2))
            rows["pooled"] = _err(out.pooler_output, t_pooled)
            report[name] = rows
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnext_xxlarge", help="timm model name (default convnext_xxlarge)")
    p.add_argument("--tiny", action="store_true", help="a small timm ConvNeXt instead (fast)")
    p.add_argument("--weights", default=None, help="open_clip / OLA-VLM checkpoint (hub id, folder or file)")
    p.add_argument("--prefix", default=None, help="trunk key prefix in --weights (default: detected)")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--norm-eps", type=float, default=None,
                   help="LayerNorm eps of the timm model built for --weights / --tiny (default: timm's for the "
                        "shape; --tiny 1e-5); the converted model uses the timm model's own eps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    _require_timm()
    report = compare(args)
    print(f"{report['keys']} tensors converted; {args.dtype} on {args.device}, {args.image_size} px, "
          f"LayerNorm eps {report['norm_eps']:g}")
    print(f"{'output':<10} {'olavlm max_abs':>15} {'max_rel':>10} {'eps 1e-6 max_abs':>17} {'max_rel':>10}")
    for row in report["olavlm"]:
        a, b = report["olavlm"][row], report["hf_eps_1e-6"][row]
        print(f"{row:<10} {a['max_abs']:>15.3e} {a['max_rel']:>10.2e} {b['max_abs']:>17.3e} {b['max_rel']:>10.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
