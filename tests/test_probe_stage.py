"""`train.stage: probe` on tiny models with two teachers (depth, seg): what trains, the loss, resume,
streamed `probe eval` (values, JSON, PNG) and memory that does not grow with the number of images."""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from olavlm.cli import main as cli_main
from olavlm.config import ConfigError, load_config
from olavlm.evaluation import probe_eval
from olavlm.evaluation.probe_stage import PROBES_FILE, ProbeResampler, load_probe_model
from olavlm.model.vlm import OlaVLM
from olavlm.teachers.targets import TargetSource
from olavlm.train.loop import model_inputs, train
from olavlm.devkit.smoke import smoke_overrides, write_smoke_dataset

PT = Path("configs/llama3_8b_clip336/pt.yaml")


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    """A saved base model (the 'trained' model to probe) and the probe-stage overrides."""
    root = tmp_path_factory.mktemp("probe_stage")
    base_ov = smoke_overrides(tiny_dir, PT, root)
    cfg = load_config(PT, base_ov)
    torch.manual_seed(0)
    final = root / "base" / "final"
    OlaVLM.from_config(cfg.model, with_predictors=False).save_pretrained(final, with_predictors=False)
    (final / "olavlm_run.json").write_text(json.dumps({"template": cfg.data.template, "image_geometry": "square"}))
    probe_ov = base_ov + ["--train.stage=probe", f"--train.init_from={root / 'base'}", "--model.tasks.gen.layers=[]",
                          "--train.learning_rate=1e-3", "--train.probe=small"]
    return root, probe_ov


def _cfg(setup, *extra):
    return load_config(PT, setup[1] + list(extra))


def test_only_the_probes_train_and_the_loss_is_the_sum_of_smooth_l1(setup):
    root, _ = setup
    cfg = _cfg(setup, f"--train.output_dir={root / 'one'}", "--train.max_steps=2")
    res = train(cfg, resume="none")
    counts = res.summary["trainable"]
    assert counts["probes"] > 0 and all(v == 0 for k, v in counts.items() if k != "probes")
    model = res.model
    base = OlaVLM.from_pretrained(root / "base" / "final", with_predictors=False)
    for (name, p), (_, q) in zip(model.base.state_dict().items(), base.state_dict().items()):
        assert torch.equal(p, q), name  # the probed model is untouched
    assert set(model.probes) == {"depth", "seg"} and len(model.probes["depth"]) == 4  # every layer of the tiny LLM
    # one batch: the loss against an independent computation from the frozen states
    from olavlm.train.loop import build_data, build_targets

    cfg.train.teacher_dtype = "float32"
    targets = build_targets(cfg, model)
    dataset, collator = build_data(cfg, model, targets)
    batch = collator([dataset[i] for i in range(3)])
    inputs = model_inputs(batch, torch.device("cpu"), targets)
    out = model(**inputs)
    states, layout = base.layer_states(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                       [1, 2, 3, 4])
    want = 0.0
    for task in ("depth", "seg"):
        for layer in (1, 2, 3, 4):
            probe = model.probes[task][str(layer)]
            pred = probe(states[layer][layout.image_sample], layout.attention_mask[layout.image_sample])
            want += float(F.smooth_l1_loss(pred, inputs["targets"][task]))
    assert float(out.loss) == pytest.approx(want, rel=1e-5)
    assert inputs["targets"]["depth"].shape[1:] == (64, 32)  # the tiny DA backbone's tokens


def test_depth_target_is_the_last_block_by_default(setup):
    root, _ = setup
    from olavlm.evaluation.probe_stage import probe_tasks

    cfg = _cfg(setup)
    assert probe_tasks(cfg, 64)["depth"]["teacher_kwargs"]["blocks"] == [-1]
    cfg = _cfg(setup, "--train.probe_depth_target=training")
    assert "blocks" not in probe_tasks(cfg, 64)["depth"]["teacher_kwargs"]
    from olavlm.teachers import build_teacher

    t = build_teacher("depth_anything", cfg.model.tasks["depth"].teacher_path, grid=8, blocks=[-1])
    assert t.blocks == [t.backbone.config.num_hidden_layers - 1]
    with pytest.raises(ConfigError, match="probes only"):
        train(_cfg(setup, "--train.unfreeze_vision_tower=true", f"--train.output_dir={root / 'bad'}"))
    with pytest.raises(ConfigError, match="probe_layers"):
        train(_cfg(setup, "--train.probe_layers=[9]", f"--train.output_dir={root / 'bad2'}"))


def test_paper_probe_shape_and_parameter_count():
    d, c, q = 48, 16, 9
    probe = ProbeResampler(d, (c, 3, 3), "grid")  # default: the paper's probe, D = output channels
    inner = 4 * 32
    block = 2 * 2 * c + c * inner + c * 2 * inner + inner * c + 2 * c + 2 * c * c  # attn LNs, q, kv, out; ff
    want = q * c + (d * c + c) + block + (c * c + c) + 2 * c
    assert sum(p.numel() for p in probe.parameters()) == want
    assert abs(float(probe.latents.std()) - 1 / math.sqrt(c)) < 0.15
    out = probe(torch.randn(2, 7, d), torch.ones(2, 7, dtype=torch.bool))
    assert out.shape == (2, c, 3, 3)
    vec = ProbeResampler(d, (1, c), "vector")
    assert vec(torch.randn(2, 5, d), torch.ones(2, 5, dtype=torch.bool)).shape == (2, 1, c)


def test_probe_stage_resumes_to_the_same_probes(setup):
    root, _ = setup
    full = _cfg(setup, f"--train.output_dir={root / 'full'}", "--train.max_steps=4", "--train.save_every=2")
    train(full, resume="none")
    split = _cfg(setup, f"--train.output_dir={root / 'split'}", "--train.max_steps=4", "--train.save_every=2")
    first = train(split, resume="none", stop_after_steps=2)
    assert first.final_dir is None
    second = train(split, resume="auto")
    assert second.summary["steps"] == 4
    a = load_file(str(root / "full" / "final" / PROBES_FILE))
    b = load_file(str(root / "split" / "final" / PROBES_FILE))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _held_out(root: Path, n: int) -> Path:
    write_smoke_dataset(root, num_images=n, text_only=1, seed=n)
    return root / "train.json"


def test_probe_eval_values_json_and_png(setup, capsys):
    root, _ = setup
    run = root / "ev"
    train(_cfg(setup, f"--train.output_dir={run}", "--train.max_steps=2"), resume="none")
    data = _held_out(root / "held", 6)
    out = root / "pe"
    assert cli_main(["probe", "eval", "--probes", str(run), str(run), "--names", "pt", "ift", "--data", str(data),
                     "--image-folder", str(root / "held" / "images"), "--output", str(out), "--device", "cpu",
                     "--batch-size", "4"]) == 0
    res = json.loads((out / "probe_eval.json").read_text())["models"]
    assert set(res) == {"pt", "ift"} and set(res["pt"]) == {"depth", "seg"}
    for task in ("depth", "seg"):
        assert (out / f"probe_{task}.png").stat().st_size > 1000
    # independent computation: all predictions and targets in memory, plain formulas
    model = load_probe_model(run, device="cpu")
    cfg = probe_eval._run_config(run / "final", str(data), str(root / "held" / "images"))
    from olavlm.data.collate import Collator
    from olavlm.data.dataset import LlavaDataset
    from olavlm.teachers import build_teachers

    teachers = build_teachers(model.cfg, grid=model.geometry.grid, dtype=torch.float32)
    ds = LlavaDataset(cfg.data, model.tokenizer, image_spec=model.image_spec, tokens_per_image=model.tokens_per_image,
                      teacher_image_size=teachers.input_size, seed=cfg.train.seed)
    batch = Collator(model.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    inputs = model_inputs(batch, torch.device("cpu"), TargetSource.live(teachers))
    with torch.no_grad():
        preds, _ = model.predict(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    for task in ("depth", "seg"):
        t = inputs["targets"][task].flatten(1).double()
        m = t.mean(0, keepdim=True)
        assert res["pt"][task]["n_images"] == 6
        const = F.cosine_similarity(m.expand_as(t), t, dim=1).mean()
        assert res["pt"][task]["constant_cosine"] == pytest.approx(float(const), abs=1e-5)
        for layer in (1, 4):
            p = preds[task][layer].flatten(1).double()
            cos = F.cosine_similarity(p, t, dim=1)
            got = res["pt"][task]["layers"][str(layer)]
            assert got["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
            assert got["cosine_std"] == pytest.approx(float(cos.std()), abs=1e-4)
            assert got["centred_cosine"] == pytest.approx(float(F.cosine_similarity(p - m, t - m, dim=1).mean()),
                                                          abs=1e-5)
    assert res["pt"] == res["ift"]
    assert "pt / depth (6 images" in capsys.readouterr().out


def _storages() -> dict[int, int]:
    """{storage address: bytes} of every live plain tensor (parameters are nn.Parameter, not counted)."""
    out = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor:
            try:
                st = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            out[st.data_ptr()] = st.nbytes()
    return out


def _own_python_bytes(code: str) -> int:
    """Traced Python memory allocated directly (innermost frame) by the olavlm files under ``code``:
    the loop's own structures (lists, dicts, floats, tensor objects), not the libraries' caches."""
    return sum(t.size for t in tracemalloc.take_snapshot().traces if code in t.traceback[0].filename)


def _peaks(fn, code: str) -> tuple[int, int]:
    """(peak bytes of tensors created during ``fn``, peak own Python bytes), sampled after every
    batch / step; tensors alive before (weights, earlier runs) are not counted."""
    gc.collect()
    before = set(_storages())
    peaks = [0, 0]
    tracemalloc.start(1)

    def sample():
        gc.collect()  # unreachable cycles of the last batch are not "kept": count only what is still referenced
        peaks[0] = max(peaks[0], sum(n for ptr, n in _storages().items() if ptr not in before))
        peaks[1] = max(peaks[1], _own_python_bytes(code))

    try:
        fn(sample)
    finally:
        tracemalloc.stop()
    return peaks[0], peaks[1]


def _repeated(root: Path, copies: int) -> Path:
    """The same 4 image records ``copies`` times: batches look alike, only the number of images grows."""
    base = [r for r in json.loads(_held_out(root, 4).read_text()) if "image" in r]
    conv = base[0]["conversations"]  # one conversation for all: every batch has the same shapes
    records = [dict(r, id=f"{r['id']}-{c}", conversations=conv) for c in range(copies) for r in base]
    (root / "repeated.json").write_text(json.dumps(records))
    return root / "repeated.json"


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_images(setup, monkeypatch):
    root, _ = setup
    run = root / "mem"
    train(_cfg(setup, f"--train.output_dir={run}", "--train.max_steps=1"), resume="none")
    model = load_probe_model(run, device="cpu")
    from olavlm.teachers import build_teachers

    teachers = build_teachers(model.cfg, grid=model.geometry.grid, dtype=torch.float32)
    from olavlm.data.collate import Collator
    from olavlm.data.dataset import LlavaDataset

    def eval_peaks(n):
        data = _repeated(root / f"mem{n}", n)
        cfg = probe_eval._run_config(run / "final", str(data), str(root / f"mem{n}" / "images"))
        ds = LlavaDataset(cfg.data, model.tokenizer, image_spec=model.image_spec,
                          tokens_per_image=model.tokens_per_image, teacher_image_size=teachers.input_size)
        make = lambda: torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=Collator(model.tokenizer.pad_token_id))
        return _peaks(lambda s: probe_eval.stream_scores(model, TargetSource.live(teachers), make, torch.device("cpu"), progress=False,
                                                         on_batch=s), "olavlm/evaluation/probe_eval.py")

    eval_peaks(10)  # warm-up: torch's and transformers' own small per-shape caches fill here, not in the runs compared
    small, big = eval_peaks(1), eval_peaks(10)  # ten times more images, streamed
    assert big[0] <= 1.1 * small[0] and big[1] <= 1.1 * small[1], (small, big)

    # the probe stage itself: one epoch over 8 vs 80 images, sampled at every training step
    from olavlm.evaluation.probe_stage import ProbeModel

    def train_peaks(n):
        data = _repeated(root / f"trainmem{n}", n)
        cfg = _cfg(setup, f"--train.output_dir={root / f'tm{n}'}", "--train.max_steps=null", "--train.epochs=1",
                   "--train.global_batch_size=4", "--train.micro_batch_size=4",
                   f"--data.train_file={data}", f"--data.image_folder={root / f'trainmem{n}' / 'images'}")
        real = ProbeModel.forward

        def run(sample):
            def forward(self, *a, **k):
                out = real(self, *a, **k)
                sample()
                return out
            monkeypatch.setattr(ProbeModel, "forward", forward)
            try:
                train(cfg, resume="none")
            finally:
                monkeypatch.setattr(ProbeModel, "forward", real)
        return _peaks(run, "olavlm/train/")

    train_peaks(2)  # warm-up, as above
    # two steps at least: from the first optimizer step on, gradients and AdamW moments exist
    small, big = train_peaks(2), train_peaks(20)
    assert big[0] <= 1.1 * small[0] and big[1] <= 1.1 * small[1], (small, big)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_probe_stage_on_two_processes(setup, tmp_path, engine):
    """torchrun, two CPU processes (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 train the probes and the ranks agree."""
    from test_train_dist import _assert_agree, _ranks, _torchrun

    _, overrides = setup
    extra = ["--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.max_steps=2"]
    if engine != "ddp":
        extra.append(f"--train.deepspeed=configs/deepspeed/{engine}.json")
    out = tmp_path / engine
    _torchrun(PT, out, overrides + extra)
    a, b = _ranks(out)
    _assert_agree(a, b)
    assert all(k.startswith("probes.") for k in a["trainable"])
    assert a["summary"]["world_size"] == 2 and a["summary"]["steps"] == 2
    assert (out / "final" / PROBES_FILE).is_file()


def test_probe_stage_reads_a_target_cache(setup):
    """Cached targets: a PT cache serves the probes with the training depth target; the last-block
    target (other teacher settings) is refused by the cache check, not silently mixed."""
    from olavlm.teachers.precompute import precompute
    from olavlm.train.loop import build_data, build_targets

    root, _ = setup
    cache = root / "cache"
    pt = load_config(PT, _pt_overrides(setup) + [f"--data.target_cache={cache}"])
    precompute(pt, batch_size=4, progress=False, device="cpu", dtype=torch.float32)
    cfg = _cfg(setup, f"--data.target_cache={cache}", "--train.probe_depth_target=training",
               f"--train.output_dir={root / 'cached'}", "--train.max_steps=2")
    res = train(cfg, resume="none")
    assert res.summary["finished"]
    # the cached targets are the live teachers' targets for the same images
    model = res.model
    dataset, collator = build_data(cfg, model, build_targets(cfg, model))
    batch = collator([dataset[i] for i in range(2)])
    live_cfg = _cfg(setup, "--train.probe_depth_target=training")
    live_cfg.train.teacher_dtype = "float32"
    live_source = build_targets(live_cfg, model)
    live_ds, live_col = build_data(live_cfg, model, live_source)
    live = model_inputs(live_col([live_ds[i] for i in range(2)]), torch.device("cpu"), live_source)["targets"]
    for task in ("depth", "seg"):
        torch.testing.assert_close(batch["targets"][task].float(), live[task].float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="teacher_kwargs"):
        train(_cfg(setup, f"--data.target_cache={cache}", f"--train.output_dir={root / 'cached2'}",
                   "--train.max_steps=1"), resume="none")


def _pt_overrides(setup):
    """The PT recipe's overrides of the fixture (without the probe-stage ones)."""
    return [o for o in setup[1] if not o.startswith(("--train.stage", "--train.init_from", "--train.probe"))]
