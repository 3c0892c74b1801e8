"""`olavlm export llava`: plain transformers (in a process where olavlm cannot be imported) sees
exactly olavlm's sequence: same ids, logits within 1e-5 (fp32), same greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.cli import main
from olavlm.constants import IMAGE_TOKEN_INDEX

TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tokenizers"

# runs with plain transformers only: any import of olavlm fails
HF_SCRIPT = textwrap.dedent('''
    import sys

    class _NoOlavlm:
        def find_spec(self, name, path=None, target=None):
            if name == "olavlm" or name.startswith("olavlm."):
                raise ImportError("olavlm must not be importable here")

    sys.meta_path.insert(0, _NoOlavlm())
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder, image, out = sys.argv[1:4]
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    img = {"type": "image", "path": image}
    text = lambda t: {"type": "text", "text": t}
    cases = {
        "image": [{"role": "user", "content": [img, text("What is in the image?")]}],
        "text": [{"role": "user", "content": [text("Describe the image in two lines.")]}],
        "two_turn": [{"role": "user", "content": [img, text("How many objects are there?")]},
                     {"role": "assistant", "content": [text("There are 3.")]},
                     {"role": "user", "content": [text("Only answer (A) or (B).")]}],
    }
    res = {}
    for name, messages in cases.items():
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        # the two-step path (lmms-eval, older examples): render the text, then call the processor
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [Image.open(image)] if any(i["type"] == "image" for m in messages for i in m["content"]) else None
        two_step = processor(text=prompt, images=images, return_tensors="pt")["input_ids"][0]
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
            gen = model.generate(**inputs, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
        res[name] = {"input_ids": inputs["input_ids"][0], "two_step": two_step, "logits": logits, "pixel_values": inputs.get("pixel_values"),
                     "new": gen.sequences[0, inputs["input_ids"].shape[1]:], "scores": torch.stack(gen.scores)[:, 0]}
    res["olavlm_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "olavlm")
    torch.save(res, out)
''')

CONVERSATIONS = {
    "image": [{"from": "human", "value": "<image>\nWhat is in the image?"}],
    "text": [{"from": "human", "value": "Describe the image in two lines."}],
    "two_turn": [{"from": "human", "value": "<image>\nHow many objects are there?"}, {"from": "gpt", "value": "There are 3."},
                 {"from": "human", "value": "Only answer (A) or (B)."}],
}


def _image(path: Path) -> Path:
    Image.fromarray((np.random.RandomState(5).rand(37, 52, 3) * 255).astype("uint8")).save(path)  # not square: padded
    return path


@pytest.fixture(scope="module")
def olavlm_ift(tiny_dir, tmp_path_factory):
    """A tiny olavlm IFT folder (llama + CLIP, 2 task tokens per task) as `olavlm train` writes it."""
    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM

    folder = tmp_path_factory.mktemp("olavlm") / "final"
    torch.manual_seed(0)
    model = OlaVLM.from_config(tiny_model_config(tiny_dir), with_predictors=False)
    model.save_pretrained(folder, with_predictors=False)
    (folder / "olavlm_run.json").write_text(json.dumps({"stage": "ift", "template": "llava_llama_3", "image_geometry": "pad"}))
    return folder


def run_plain_transformers(folder: Path, image: Path, tmp: Path) -> dict:
    script, out = tmp / "hf_side.py", tmp / "hf_side.pt"
    script.write_text(HF_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-s", str(script), str(folder), str(image), str(out)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def olavlm_side(folder: Path, image: Path) -> dict:
    from olavlm.data.images import load_image, pixel_values, to_square
    from olavlm.data.tokenize import encode_prompt, stop_token_ids
    from olavlm.model.vlm import OlaVLM

    model = OlaVLM.from_pretrained(folder, with_predictors=False, dtype="float32").eval()
    tok, spec = model.tokenizer, model.image_spec
    pv = pixel_values(to_square(load_image(image), "pad", spec), spec)[None]
    stops = stop_token_ids("llava_llama_3", tok)
    out = {}
    for name, conv in CONVERSATIONS.items():
        ids = torch.tensor([encode_prompt(conv, "llava_llama_3", tok)])
        images = pv if IMAGE_TOKEN_INDEX in ids else None
        with torch.no_grad():
            logits = model(ids, pixel_values=images, return_logits=True).logits[0]
            new = model.generate(ids, images, max_new_tokens=8, eos_token_id=stops)[0]
        out[name] = {"ids": ids[0], "logits": logits, "new": new, "pixel_values": pv}
    return out


@pytest.mark.parametrize("source", ["olavlm", "converted_reference", "converted_spare_rows"])
def test_plain_transformers_matches_olavlm(source, olavlm_ift, tiny_dir, tmp_path, capsys):
    if source.startswith("converted"):  # released layout -> olavlm -> LLaVA
        from olavlm.interop.reference import convert_reference
        from olavlm.interop.reference_config import ConvertOptions
        from olavlm.devkit.reference import make_tiny_reference

        spare = 9 if source == "converted_spare_rows" else 0  # like Phi-3: rows past the tokenizer, reused
        ref = make_tiny_reference(tiny_dir, tmp_path / "ref", stage="ift", spare_rows=spare)
        src = tmp_path / "converted"
        convert_reference(str(ref), src, ConvertOptions(vision_heads=4, dtype="float32"))
    else:
        src = olavlm_ift
    dst = tmp_path / "llava"
    assert main(["export", "llava", str(src), str(dst)]) == 0
    info = json.loads((dst / "olavlm_export.json").read_text())
    assert info["token_check"]["problems"] == [] and len(info["task_tokens"]) == 6  # 3 tasks x 2 tokens
    assert (dst / "preprocessor_config.json").is_file() and json.loads((dst / "preprocessor_config.json").read_text())["do_pad"]
    image = _image(tmp_path / "img.png")
    hf = run_plain_transformers(dst, image, tmp_path)
    ours = olavlm_side(src, image)
    assert hf["olavlm_modules"] == []
    task_ids, image_id = info["task_token_ids"], info["image_token_id"]
    if source == "converted_spare_rows":  # the new ids take spare rows: no resize, and those rows stay closed
        assert info["vocab_size"] == info["source_vocab_rows"] and max(task_ids) < info["vocab_size"]
        assert set(range(image_id, info["vocab_size"])) <= set(info["suppressed_ids"])
    for name in CONVERSATIONS:
        a, b = ours[name], hf[name]
        expanded = []
        for t in a["ids"].tolist():
            expanded += [image_id] * info["num_image_tokens"] + task_ids if t == IMAGE_TOKEN_INDEX else [t]
        assert b["input_ids"].tolist() == expanded, name  # the same sequence, task tokens right after the image
        assert b["two_step"].tolist() == expanded, name  # one BOS also when text and tokens are made separately
        vocab = a["logits"].shape[-1]
        assert (b["logits"][:, :vocab] - a["logits"]).abs().max().item() <= 1e-5, name
        assert b["new"].tolist() == a["new"].tolist(), name  # greedy generation, token for token
        assert torch.isinf(b["scores"][:, info["suppressed_ids"]]).all() and (b["scores"][:, info["suppressed_ids"]] < 0).all()
        if b["pixel_values"] is not None:
            torch.testing.assert_close(b["pixel_values"][0], a["pixel_values"][0], rtol=0, atol=1e-6)  # same pad-to-square


def test_task_token_rows_are_olavlm_pooled_tokens(olavlm_ift, tmp_path):
    from olavlm.interop.llava_export import export_llava
    from olavlm.devkit.reference import read_tensors
    from olavlm.model.vlm import OlaVLM

    info = export_llava(olavlm_ift, tmp_path / "llava")
    weights = read_tensors(tmp_path / "llava")
    model = OlaVLM.from_pretrained(olavlm_ift, with_predictors=False)
    rows = model.task_tokens.rows
    by_hand = torch.cat([rows[t].view(2, rows[t].shape[0] // 2, -1).mean(1) for t in ("gen", "depth", "seg")])
    emb = weights["model.language_model.embed_tokens.weight"]
    torch.testing.assert_close(emb[info["task_token_ids"]], by_hand)
    old = model.llm.get_input_embeddings().weight
    assert torch.equal(emb[: old.shape[0]], old)  # the text rows are untouched
    assert torch.equal(weights["model.multi_modal_projector.linear_1.weight"], model.projector[0].weight)


@pytest.mark.parametrize("template,tokenizer", [("llava_llama_3", "llama3"), ("llava_phi_3", "phi3"),
                                                ("vicuna_v1", "llama3")])
def test_chat_template_renders_like_olavlm(template, tokenizer):
    from transformers import AutoTokenizer

    from olavlm.data.templates import normalize_conversation, render_text
    from olavlm.interop.llava_template import PROBES, chat_template, image_text, to_hf_messages

    path = TOKENIZERS / tokenizer
    if not path.is_dir():
        pytest.skip(f"no tokenizer fixture at {path}")
    tok = AutoTokenizer.from_pretrained(path)
    tasks = ["<ola_gen_0>", "<ola_depth_0>"]
    tok.chat_template = chat_template(template, tasks, add_bos=False)
    convs = PROBES + [[{"from": "human", "value": "  two <image> images <image> here  "}, {"from": "gpt", "value": " spaced "},
                       {"from": "human", "value": "  keep my spaces  "}]]
    for conv in convs:
        n = sum(t["value"].count("<image>") for t in conv)
        want = render_text(normalize_conversation(conv, n, open_turn=True), template, tok, open_turn=True)
        got = tok.apply_chat_template(to_hf_messages(conv), tokenize=False, add_generation_prompt=True)
        assert got == want.replace("<image>\n", image_text(tasks)), conv


@pytest.mark.parametrize("tokenizer,template", [("llama3", "llava_llama_3"), ("phi3", "llava_phi_3"),
                                                ("phi3_bos", "llava_phi_3")])
@pytest.mark.parametrize("add_bos", ["auto", True, False])
def test_real_tokenizer_ids_match_olavlm(tokenizer, template, add_bos):
    """The exported template rendered as one string and tokenized by the exported tokenizer gives
    exactly olavlm's ids on every probe (image, text-only, two turns with history), for every BOS policy."""
    from transformers import AutoTokenizer, LlavaImageProcessorPil, LlavaProcessor

    from olavlm.data.tokenize import resolve_bos, tokenizer_adds_bos
    from olavlm.interop.llava_export import _add_tokens, check_token_ids
    from olavlm.interop.llava_template import PROBES, chat_template, to_hf_messages

    path = TOKENIZERS / tokenizer
    if not path.is_dir():
        pytest.skip(f"no tokenizer fixture at {path}")
    base, tok = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    names = [f"<ola_{t}_{j}>" for t in ("gen", "depth", "seg") for j in range(8)]
    image_id, task_ids = _add_tokens(tok, names)
    if tokenizer_adds_bos(base):
        tok.add_bos_token = False  # as the export does: the chat template decides on BOS
    bos = resolve_bos(add_bos, template, base)
    assert bos == (tokenizer_adds_bos(base) if add_bos == "auto" else add_bos)
    tpl = chat_template(template, names, add_bos=bos)
    images = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=images, tokenizer=tok, chat_template=tpl, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    assert len(task_ids) == 24 and task_ids == list(range(task_ids[0], task_ids[0] + 24))
    assert check_token_ids(proc, base, template, image_id, task_ids, 4, 28, add_bos=bos) == []
    text = proc.apply_chat_template(to_hf_messages(PROBES[1]), add_generation_prompt=True)
    ids = tok(text)["input_ids"]  # the rendered prompt through the tokenizer's default call: one BOS or none
    assert (ids[0] == base.bos_token_id) == bos and ids.count(base.bos_token_id) == int(bos)


def test_token_mismatch_stops_the_export_unless_allowed(olavlm_ift, tmp_path, monkeypatch):
    from olavlm.interop import InteropError, llava_export

    monkeypatch.setattr(llava_export, "check_token_ids", lambda *a, **k: ["probe 0: position 3: export ['x'] vs olavlm ['y']"])
    with pytest.raises(InteropError, match="tokenizes differently from olavlm .probe 0: position 3"):
        llava_export.export_llava(olavlm_ift, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    info = llava_export.export_llava(olavlm_ift, tmp_path / "b", allow_token_mismatch=True)
    assert info["token_check"]["problems"]


@pytest.mark.parametrize("add_bos", [True, False])
def test_export_follows_the_recorded_bos_policy(olavlm_ift, tmp_path, add_bos):
    import shutil

    from transformers import AutoProcessor

    from olavlm.interop.llava_export import export_llava

    src = tmp_path / "final"
    shutil.copytree(olavlm_ift, src)
    run = json.loads((src / "olavlm_run.json").read_text())
    (src / "olavlm_run.json").write_text(json.dumps({**run, "add_bos": add_bos}))  # as training records it
    info = export_llava(src, tmp_path / "llava")
    assert info["add_bos"] is add_bos and info["token_check"]["problems"] == []
    proc = AutoProcessor.from_pretrained(tmp_path / "llava")
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                    add_generation_prompt=True)
    ids = proc.tokenizer(text)["input_ids"]
    assert ids.count(proc.tokenizer.bos_token_id) == int(add_bos) and (ids[0] == proc.tokenizer.bos_token_id) == add_bos
