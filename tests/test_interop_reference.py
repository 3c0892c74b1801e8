"""`olavlm convert reference`: tiny checkpoints in the released layout -> olavlm folders.

Checks every tensor against the reference tensors by an explicit key table (written here, not the
converter's), the PT predictors against a direct computation of the reference resampler on the
reference tensors, and that chat / eval / probe / train.init_from work on the converted folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from olavlm.cli import main
from olavlm.constants import IMAGE_TOKEN_INDEX
from olavlm.interop.reference import convert_reference
from olavlm.interop.reference_config import ConvertOptions
from olavlm.devkit.reference import TINY_HEAD_ATTN, TINY_HEADS, make_tiny_reference
from olavlm.devkit.reference import read_tensors as read_all

K, P = 2, 64  # tiny task tokens per task, image tokens (8x8 CLIP grid)
OPTS = ConvertOptions(vision_heads=4, dtype="float32")  # the tiny CLIP has 4 heads (not hidden // 64)


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    out = {}
    for stage in ("pt", "ift"):
        out[f"ref-{stage}"] = make_tiny_reference(tiny_dir, root / f"ref-{stage}", stage=stage, num_task_tokens=K)
        out[stage] = root / f"conv-{stage}"
        convert_reference(str(out[f"ref-{stage}"]), out[stage], OPTS)
    return out


def expected_table(ref: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """reference key -> (part of the converted folder, key there); None part = dropped on purpose."""
    table = {}
    for key in ref:
        if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")):
            table[key] = ("llm", key)
        elif key.startswith("model.vision_tower.vision_tower.vision_model."):
            table[key] = ("vision", key[len("model.vision_tower.vision_tower.vision_model."):])
        elif key.startswith("model.mm_projector."):
            table[key] = ("extras", "projector." + key[len("model.mm_projector."):])
        elif key.startswith("model.special_"):
            table[key] = ("extras", "task_tokens.rows." + key.split("_")[1])
        elif key.endswith("_logit_scale"):
            table[key] = ("extras", "logit_scales." + key.split("_")[0])
        elif key.startswith("da_v2_head.") or ".linear_2." in key or ".linear_3." in key:
            table[key] = (None, None)
    inner = {"proj_in": "proj_in", "layers.0.0.norm1": "blocks.0.attn.norm_x", "layers.0.0.norm2": "blocks.0.attn.norm_q",
             "layers.0.0.to_q": "blocks.0.attn.to_q", "layers.0.0.to_kv": "blocks.0.attn.to_kv",
             "layers.0.0.to_out": "blocks.0.attn.to_out", "layers.0.1.0": "blocks.0.ff.0", "layers.0.1.1": "blocks.0.ff.1",
             "layers.0.1.3": "blocks.0.ff.3", "proj_out": "proj_out", "norm_out": "norm_out"}
    for task, spec in TINY_HEADS.items():
        for k, layer in enumerate(int(x) for x in spec["layers"].split("-")):
            for a, b in inner.items():
                for p in ("weight", "bias"):
                    key = f"image_{task}_heads.{k}.projector.{a}.{p}"
                    if key in ref:
                        table[key] = ("extras", f"predictors.{task}.{layer}.{b}.{p}")
            for j in (0, 2):
                for p in ("weight", "bias"):
                    key = f"image_{task}_heads.{k}.linear_1.{j}.{p}"
                    if key in ref:
                        table[key] = ("extras", f"predictors.{task}.{layer}.output_mlp.{j}.{p}")
    return table


@pytest.mark.parametrize("stage", ["pt", "ift"])
def test_every_tensor_lands_where_it_should(folders, stage):
    ref = read_all(folders[f"ref-{stage}"])
    conv = folders[stage]
    parts = {"llm": read_all(conv / "llm"), "vision": read_all(conv / "vision"), "extras": read_all(conv)}
    table = expected_table(ref)
    assert set(table) == set(ref), sorted(set(ref) - set(table))[:5]  # every reference tensor is accounted for
    used = {part: set() for part in parts}
    for key, (part, new) in table.items():
        if part is None:
            continue
        got = parts[part][new]
        want = ref[key].reshape(1) if key.endswith("_logit_scale") else ref[key]
        assert got.shape == want.shape, key
        assert torch.equal(got.float(), want.float()), key
        used[part].add(new)
    for part, tensors in parts.items():  # nothing else was written (no teacher, no unsupervised outputs)
        assert set(tensors) == used[part], (part, sorted(set(tensors) - used[part])[:5])
    record = json.loads((conv / "olavlm_conversion.json").read_text())
    assert record["stage"] == stage
    if stage == "pt":
        assert record["dropped"]["teachers"] == 2 and len(record["dropped"]["unsupervised_depth_outputs"]) == 16


def _prompt(tokenizer, question="Describe the image.") -> torch.Tensor:
    from olavlm.data.tokenize import encode_prompt

    return torch.tensor([encode_prompt([{"from": "human", "value": "<image>\n" + question}], "llava_llama_3", tokenizer)])


def _image(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.RandomState(3).rand(30, 50, 3) * 255).astype("uint8")).save(path)
    return path


def ref_resampler(t: dict, prefix: str, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The reference TaskTokenResampler (depth 1) on raw tensors: x (N, E) states, q (Q, E) queries."""
    w = lambda name: t[prefix + name]  # noqa: E731
    ln = lambda v, name: F.layer_norm(v, v.shape[-1:], w(name + ".weight"), w(name + ".bias"), eps=1e-5)  # noqa: E731
    h, dh = TINY_HEAD_ATTN["num_heads"], TINY_HEAD_ATTN["dim_head"]
    x = x @ w("proj_in.weight").T + w("proj_in.bias")
    q = q @ w("proj_in.weight").T + w("proj_in.bias")
    xn, qn = ln(x, "layers.0.0.norm1"), ln(q, "layers.0.0.norm2")
    query = (qn @ w("layers.0.0.to_q.weight").T).view(-1, h, dh).transpose(0, 1)
    kv = torch.cat([xn, qn]) @ w("layers.0.0.to_kv.weight").T
    k, v = (t_.view(-1, h, dh).transpose(0, 1) for t_ in kv.chunk(2, -1))
    scale = dh ** -0.25  # applied to both queries and keys
    attn = ((query * scale) @ (k * scale).transpose(1, 2)).float().softmax(-1)
    out = (attn @ v).transpose(0, 1).reshape(q.shape[0], h * dh) @ w("layers.0.0.to_out.weight").T
    q = q + out
    q = q + F.gelu(ln(q, "layers.0.1.0") @ w("layers.0.1.1.weight").T) @ w("layers.0.1.3.weight").T
    return ln(q @ w("proj_out.weight").T + w("proj_out.bias"), "norm_out")


def test_pt_predictors_reproduce_the_reference_computation(folders, tmp_path):
    from olavlm.data.images import load_image, pixel_values, to_square
    from olavlm.model.vlm import OlaVLM

    ref = {k: v.float() for k, v in read_all(folders["ref-pt"]).items()}
    model = OlaVLM.from_pretrained(folders["pt"]).eval()
    assert model.tokens_per_image == P + 3 * K and sorted(model.predictors) == ["depth", "gen", "seg"]
    ids = _prompt(model.tokenizer)
    spec = model.image_spec
    pv = pixel_values(to_square(load_image(_image(tmp_path / "a.png")), "square", spec), spec)[None]
    with torch.no_grad():
        states, layout = model.layer_states(ids, None, pv, layers=[1, 2, 3, 4])
        pred = model.predict(states, layout)
    sys_len = ids[0].tolist().index(IMAGE_TOKEN_INDEX)  # tokens before the image (reference NUM_SYS)
    order = ["gen", "depth", "seg"]  # aux_mode
    for task, spec_ in TINY_HEADS.items():
        for k, layer in enumerate(int(x) for x in spec_["layers"].split("-")):
            h = states[layer][0].float()
            own = sys_len + P + K * order.index(task)
            x = torch.cat([h[:sys_len + P], h[own:own + K], h[sys_len + P + 3 * K:]])  # other tasks' tokens dropped
            if task == "gen":
                q = h[own:own + K].mean(0, keepdim=True)  # the gen tokens' states, pooled to one query
            else:
                q = ref[f"model.special_{task}_tokens"]  # the depth/seg queries ARE the task-token rows
            out = ref_resampler(ref, f"image_{task}_heads.{k}.projector.", x, q)
            if task == "depth":  # linear_1 is the supervised output
                a = f"image_depth_heads.{k}.linear_1."
                out = F.relu(out @ ref[a + "0.weight"].T + ref[a + "0.bias"]) @ ref[a + "2.weight"].T + ref[a + "2.bias"]
            if task == "seg":  # (576, C) -> (C, 24, 24), token n <-> row n // 24
                out = out.T.reshape(out.shape[1], 8, 8)
            torch.testing.assert_close(pred[task][layer][0], out, rtol=1e-4, atol=1e-5)
    scales = model.logit_scales()
    for task in order:
        assert scales[task].item() == pytest.approx(ref[f"{task}_logit_scale"].item())


def test_ift_sequence_holds_the_pooled_task_tokens_after_the_image(folders):
    from olavlm.model.vlm import OlaVLM

    ref = read_all(folders["ref-ift"])
    model = OlaVLM.from_pretrained(folders["ift"], with_predictors=False).eval()
    expected = torch.cat([ref["model.special_gen_tokens"],  # gen: the K rows as they are
                          ref["model.special_depth_tokens"].view(K, P // K, -1).mean(1),  # depth/seg: K means
                          ref["model.special_seg_tokens"].view(K, P // K, -1).mean(1)])
    torch.testing.assert_close(model.task_tokens.all_sequence_tokens(), expected)
    ids = _prompt(model.tokenizer)
    pv = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        layout = model.build_layout(ids)
        embeds = model.embed(layout, pv)
    start = int(layout.image_start[0]) + P
    torch.testing.assert_close(embeds[0, start:start + 3 * K], expected)


def test_raw_task_token_format_inserts_every_row(folders, tiny_dir, tmp_path):
    from olavlm.model.vlm import OlaVLM

    src = make_tiny_reference(tiny_dir, tmp_path / "ref-emb", stage="ift", num_task_tokens=K, task_token_format="emb")
    convert_reference(str(src), tmp_path / "conv-emb", OPTS)
    ref = read_all(src)
    model = OlaVLM.from_pretrained(tmp_path / "conv-emb").eval()
    assert model.tokens_per_image == P + K + 2 * P  # 576 + 576 + 8 at full size
    expected = torch.cat([ref["model.special_gen_tokens"], ref["model.special_depth_tokens"],
                          ref["model.special_seg_tokens"]])
    torch.testing.assert_close(model.task_tokens.all_sequence_tokens(), expected)


def test_chat_answers_from_the_converted_ift_model(folders, tmp_path, capsys):
    from olavlm.data.images import load_image, pixel_values, to_square
    from olavlm.data.tokenize import stop_token_ids
    from olavlm.model.vlm import OlaVLM

    img = _image(tmp_path / "b.png")
    assert main(["chat", "--model", str(folders["ift"]), "--image", str(img), "--prompt", "What is it?",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    answer = capsys.readouterr().out.strip()
    model = OlaVLM.from_pretrained(folders["ift"], with_predictors=False).eval()  # the same answer, by hand
    spec = model.image_spec
    pv = pixel_values(to_square(load_image(img), "pad", spec), spec)[None]  # IFT: image_aspect_ratio pad
    stops = stop_token_ids("llava_llama_3", model.tokenizer)
    new = model.generate(_prompt(model.tokenizer, "What is it?"), pv, max_new_tokens=6, eos_token_id=stops)[0].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert answer == model.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert answer  # the random tiny model says something


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [str(_image(folder / f"{i}.png").relative_to(folder.parent)) for i in range(n)]


def test_converted_ift_folder_serves_eval_and_probe(folders, tiny_dir, tmp_path):
    from olavlm.evaluation.cvbench import run_cvbench
    from olavlm.evaluation.probe import ProbeSpec, run_probe

    files = _images(tmp_path / "img", 8)
    items = [{"idx": i, "type": "2D", "task": "Count", "source": "COCO", "answer": "(A)", "question": "How many?",
              "choices": ["1", "2"], "filename": f} for i, f in enumerate(files[:2])]
    (tmp_path / "cv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    res = run_cvbench(folders["ift"], tmp_path / "cv.jsonl", max_new_tokens=2, device="cpu", progress=False)
    assert res["n"] == 2
    recs = [{"id": str(i), "image": f, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                          {"from": "gpt", "value": "ok"}]} for i, f in enumerate(files)]
    (tmp_path / "probe.json").write_text(json.dumps(recs))
    res = run_probe(folders["ift"], tmp_path / "probe.json", "depth", teacher_path=str(tiny_dir / "teachers" / "teacher-depth"),
                    layers="1,4", spec=ProbeSpec(steps=3), device="cpu", progress=False)
    assert sorted(res["layers"]) == ["1", "4"] and res["n_train"] + res["n_test"] == 8


REAL_K = 8  # num_task_tokens of the released checkpoints and of every recipe under configs/


@pytest.fixture(scope="module")
def real_k_pt(tiny_dir, tmp_path_factory):
    """Converted tiny PT checkpoints with the released models' architecture fields (K = 8), per tower."""
    root = tmp_path_factory.mktemp("interop-k8")
    out = {}
    for vision in ("clip", "convnext"):
        src = make_tiny_reference(tiny_dir, root / f"ref-{vision}", stage="pt", num_task_tokens=REAL_K, vision=vision)
        out[vision] = root / f"conv-{vision}"
        convert_reference(str(src), out[vision], OPTS)
    return out


def _chained_recipes(tower: str) -> list[Path]:
    recipes = []
    for llm in ("llama3_8b", "phi3_mini"):
        recipes += sorted(Path(f"configs/{llm}_{tower}").glob("*.yaml"))
    return recipes


@pytest.mark.parametrize("vision,tower", [("clip", "clip336"), ("convnext", "convnext")])
def test_every_chained_recipe_accepts_a_converted_pt_folder(real_k_pt, vision, tower):
    """Each recipe with train.init_from (VPT, IFT, VPT->IFT) agrees with what `convert reference`
    writes for a released PT checkpoint on every architecture field it sets."""
    from olavlm.config import explicit_fields, load_config
    from olavlm.model import io

    saved, _ = io.read_config(real_k_pt[vision])
    assert (saved.vision_type, saved.vision_feature_layer, saved.num_task_tokens, saved.task_order) == (
        vision, -2 if vision == "clip" else -1, REAL_K, ["gen", "depth", "seg"])
    checked = 0
    for recipe in _chained_recipes(tower):
        cfg = load_config(str(recipe))
        if not cfg.train.init_from:
            continue
        set_here = {f for f in explicit_fields(cfg) if f.startswith("model.")}
        assert {"model.num_task_tokens", "model.vision_type", "model.vision_feature_layer"} <= set_here, recipe
        runtime, _ = io.reconcile_init_from(saved, cfg.model, explicit_fields(cfg), str(real_k_pt[vision]))
        assert runtime == {"dtype": "bfloat16", "attn_implementation": "sdpa"}, recipe
        checked += 1
    assert checked == (8 if tower == "clip336" else 6)  # vpt, ift, vpt_ift (+ viral_ift with CLIP) of both LLMs


@pytest.mark.parametrize("vision,tower", [("clip", "clip336"), ("convnext", "convnext")])
def test_converted_pt_folder_is_an_ift_init_from(real_k_pt, tiny_dir, tmp_path, vision, tower):
    from olavlm.config import load_config
    from olavlm.train.loop import train
    from olavlm.devkit.smoke import smoke_overrides

    recipe = f"configs/llama3_8b_{tower}/ift.yaml"  # as written: num_task_tokens 8, the released value
    pt = real_k_pt[vision]
    overrides = [o for o in smoke_overrides(tiny_dir, recipe, tmp_path, max_steps=1) if "init_from" not in o]
    res = train(load_config(recipe, overrides + [f"--train.init_from={pt}"]), resume="none")
    assert json.loads((res.final_dir / "olavlm_processor.json").read_text())["run"]["init_from"] == str(pt)
    assert res.model.tokens_per_image == P + 3 * REAL_K and not res.model.predictors
    final = read_all(res.final_dir)
    torch.testing.assert_close(final["task_tokens.rows.depth"], read_all(pt)["task_tokens.rows.depth"])
