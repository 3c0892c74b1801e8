"""The training loop on tiny models: exact resume, config errors before any data is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from olavlm.cli import main as cli_main
from olavlm.config import ConfigError, load_config
from olavlm.train import checkpoint as ckpt
from olavlm.train.loop import train
from olavlm.devkit.smoke import smoke_overrides, write_smoke_dataset

PT = Path("configs/llama3_8b_clip336/pt.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def pt_overrides(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    data = write_smoke_dataset(root / "data12", num_images=10, text_only=2, seed=1)
    return root, smoke_overrides(tiny_dir, PT, root) + [
        f"--data.train_file={data}", f"--data.image_folder={data.parent / 'images'}",
        "--train.global_batch_size=4", "--train.micro_batch_size=2",  # accumulation 2, 3 steps per epoch
        "--train.max_steps=10", "--train.save_every=3", "--train.keep_last=2", "--train.report_to=[tensorboard]"]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "olavlm.safetensors"))


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resume_is_exact(pt_overrides):
    root, overrides = pt_overrides
    straight = load_config(PT, overrides + [f"--train.output_dir={root / 'straight'}"])
    res = train(straight, resume="none")
    assert res.summary["steps"] == 10 and res.summary["epochs_completed"] == 3 and res.final_dir is not None
    assert [p.name for p in ckpt.list_checkpoints(root / "straight")] == ["step-00000006", "step-00000009"]

    split = load_config(PT, overrides + [f"--train.output_dir={root / 'split'}"])
    first = train(split, resume="auto", stop_after_steps=5)  # stops mid-epoch (epoch 1, step 2 of 3)
    assert first.final_dir is None and first.summary["steps"] == 5
    assert not (root / "split" / "final").exists()
    assert ckpt.list_checkpoints(root / "split")[-1].name == "step-00000005"
    state = ckpt.TrainState.from_json((root / "split" / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert (state.epoch, state.step_in_epoch, state.samples) == (1, 2, 20)
    second = train(split, resume="auto")
    assert second.summary["steps"] == 10 and second.summary["samples"] == 40

    a, b = _final_weights(root / "straight"), _final_weights(root / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    la, lb = _losses(root / "straight"), _losses(root / "split")
    assert sorted(lb) == list(range(1, 11))  # the resumed run's log continues where the checkpoint was
    assert la == lb


def test_config_errors_name_the_field_before_data_is_read(pt_overrides, tmp_path, capsys):
    _, overrides = pt_overrides
    no_data = overrides + [f"--data.train_file={tmp_path / 'absent.json'}", f"--train.output_dir={tmp_path / 'r'}"]
    cases = {
        "model.tasks.depth.layers": ["--model.tasks.depth.layers=[2, 9]"],  # tiny LLM has 4 layers
        "train.global_batch_size": ["--train.global_batch_size=3"],
        "train.learning_rte": ["--train.learning_rte=0.1"],
        "train.init_from": ["--train.init_from=/nowhere"],  # PT starts from model.llm
        "train.report_to": ["--train.report_to=[mlflow]"],
        "train.deepspeed": ["--train.deepspeed=/nowhere/zero2.json"],
        "train.save_every": ["--train.save_every=-1"],
        "train.adam_betas": ["--train.adam_betas=[0.9]"],
    }
    for field, extra in cases.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            train(load_config(PT, no_data + extra), resume="none")
    ift = Path("configs/llama3_8b_clip336/ift.yaml")
    with pytest.raises(ConfigError, match=r"train\.init_from"):
        train(load_config(ift, no_data + [f"--train.init_from={tmp_path / 'missing-run'}"]), resume="none")
    assert not (tmp_path / "r").exists()  # nothing written either
    capsys.readouterr()
    assert cli_main(["train", str(PT), "--bogus"]) == 2  # the CLI prints user errors as one line
    assert capsys.readouterr().err.startswith("olavlm: error: --bogus: unknown argument")


def test_target_cache_matches_online_teachers(tiny_dir, tmp_path, monkeypatch):
    """PT with a partial target cache + data.cache_miss=online reproduces the online-teacher run;
    with cache_miss=error the gap is reported before training."""
    from olavlm.teachers.cache import CacheError
    from olavlm.teachers.precompute import precompute

    data = write_smoke_dataset(tmp_path / "data", num_images=6, text_only=0, seed=2)
    base = smoke_overrides(tiny_dir, PT, tmp_path) + [
        f"--data.train_file={data}", f"--data.image_folder={data.parent / 'images'}", "--train.max_steps=3"]
    online = train(load_config(PT, base + [f"--train.output_dir={tmp_path / 'online'}"]), resume="none")

    subset = tmp_path / "subset.json"  # the cache covers 4 of the 6 images
    subset.write_text(json.dumps(json.loads(data.read_text())[:4]))
    cache = tmp_path / "cache"
    precompute(load_config(PT, base + [f"--data.train_file={subset}", f"--data.target_cache={cache}"]),
               progress=False, device="cpu", rank=0, world_size=1, workers=0)
    cached = base + [f"--data.target_cache={cache}", f"--train.output_dir={tmp_path / 'cached'}"]
    with pytest.raises(CacheError, match="lacks 2 image"):
        train(load_config(PT, cached + ["--data.cache_miss=error"]), resume="none")
    assert not (tmp_path / "cached" / "metrics.jsonl").exists()
    from olavlm.teachers.cache import TargetCache

    hits, real_get = [], TargetCache.get
    monkeypatch.setattr(TargetCache, "get", lambda self, key, *a, **k: hits.append(key) or real_get(self, key, *a, **k))
    mixed = train(load_config(PT, cached + ["--data.cache_miss=online"]), resume="none")
    assert len(hits) == 6 and len(set(hits)) == 6  # every image was looked up; 2 missed and went to the teachers
    assert mixed.summary["steps"] == 3
    # the 2 gaps are counted: per logged step in metrics.jsonl (summed over ranks) and in summary.json
    rows = [json.loads(line) for line in (mixed.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["targets/filled_live"] for r in rows) == 2
    assert mixed.summary["targets"] == {"mode": "cache+live", "cache": str(cache), "filled_live": 2}
    assert online.summary["targets"] == {"mode": "live", "cache": None}
    a, b = _losses(online.output_dir), _losses(mixed.output_dir)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) for k in a), (a, b)
    wa, wb = _final_weights(online.output_dir), _final_weights(mixed.output_dir)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)
    # a complete cache: no teacher is loaded at all
    full = tmp_path / "full-cache"
    precompute(load_config(PT, base + [f"--data.target_cache={full}"]), progress=False, device="cpu", rank=0,
               world_size=1, workers=0)
    import olavlm.teachers as teachers_pkg

    monkeypatch.setattr(teachers_pkg, "build_teachers", lambda *a, **k: pytest.fail("teachers loaded"))
    cached_only = train(load_config(PT, base + [f"--data.target_cache={full}", "--data.cache_miss=error",
                                                f"--train.output_dir={tmp_path / 'full'}"]), resume="none")
    c = _losses(cached_only.output_dir)
    assert cached_only.summary["targets"] == {"mode": "cache", "cache": str(full), "masked": 0}
    assert all(abs(a[k] - c[k]) <= 1e-4 * abs(a[k]) for k in a), (a, c)
