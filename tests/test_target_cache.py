"""Target cache: precompute -> read round trip, equality with online teachers, resume, ranks, verify."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.config import RunConfig, from_dict
from olavlm.teachers import build_teachers
from olavlm.teachers.cache import CacheError, TargetCache, config_fingerprints, geometry_fingerprint
from olavlm.teachers.precompute import precompute, teacher_image_size

GRID = 8
N_GOOD = 7


def _conv():
    return [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A shape."}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """7 images of various aspect ratios and modes, one corrupt file, one missing file, one duplicate."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(N_GOOD):
        w, h = 40 + 12 * i, 72 - 4 * i
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"sub/{i}.jpg" if i % 2 else f"{i}.png"
        img = Image.fromarray(arr)
        (img.convert("L") if i == 3 else img).save(folder / name)
        records.append({"id": str(i), "image": name, "conversations": _conv()})
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    records += [{"id": "c", "image": "corrupt.jpg", "conversations": _conv()},
                {"id": "m", "image": "missing.png", "conversations": _conv()},
                {"id": "dup", "image": "0.png", "conversations": _conv()},
                {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    (root / "data.json").write_text(json.dumps(records))
    return root


def make_cfg(tiny_dir, dataset, cache, geometry="pad") -> RunConfig:
    t = tiny_dir / "teachers"
    return from_dict(RunConfig, {
        "model": {"llm": str(tiny_dir / "llm-llama"), "vision_tower": str(tiny_dir / "vision-clip"), "tasks": {
            "gen": {"teacher": "unclip", "teacher_path": str(t / "teacher-gen"), "layers": [2],
                    "predictor": {"dim": 32, "out_dim": 24}},
            "depth": {"teacher": "depth_anything", "teacher_path": str(t / "teacher-depth"), "layers": [1, 3],
                      "predictor": {"out_dim": 32}},
            "seg": {"teacher": "oneformer", "teacher_path": str(t / "teacher-seg"), "layers": [2],
                    "predictor": {"dim": 32, "out_dim": 32}}}},
        "data": {"train_file": str(dataset / "data.json"), "image_folder": str(dataset / "images"),
                 "image_geometry": geometry, "target_cache": str(cache), "num_workers": 0},
        "train": {"bf16": True}})


@pytest.fixture(scope="module")
def teachers(tiny_dir, dataset, tmp_path_factory):
    cfg = make_cfg(tiny_dir, dataset, tmp_path_factory.mktemp("unused"))
    return build_teachers(cfg.model, GRID, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def built(tiny_dir, dataset, teachers, tmp_path_factory):
    """One uninterrupted precompute (3 shards of 4), the reference for the other tests."""
    cfg = make_cfg(tiny_dir, dataset, tmp_path_factory.mktemp("cache") / "full")
    summary = precompute(cfg, batch_size=3, shard_size=4, teachers=teachers, progress=False, device="cpu")
    return cfg, summary, TargetCache.open(cfg.data.target_cache)


def all_targets(cache: TargetCache) -> dict:
    return {k: cache.get(k) for k in sorted(cache.entries)}


def test_round_trip_index_and_unreadable(built, dataset):
    cfg, summary, cache = built
    assert summary["images"] == N_GOOD + 2 and summary["shards"] == 3 and summary["complete"]
    assert summary["encoded"] == N_GOOD and summary["unreadable"] == 2
    assert len(cache) == N_GOOD and cache.complete and cache.dtype == torch.bfloat16
    assert set(cache.unreadable) == {"corrupt.jpg", "missing.png"}
    assert cache.unreadable["missing.png"].startswith("missing_image")
    assert cache.unreadable["corrupt.jpg"].startswith("unreadable_image")
    assert cache.shapes == {"gen": (1, 24), "depth": (64, 32), "seg": (32, 8, 8)}
    got = cache.get("sub/1.jpg")
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
        "gen": ((1, 24), torch.bfloat16), "depth": ((64, 32), torch.bfloat16), "seg": ((32, 8, 8), torch.bfloat16)}
    assert cache.missing(["0.png", "missing.png", "new.png", "new.png"]) == ["missing.png", "new.png"]
    with pytest.raises(KeyError, match="unreadable"):
        cache.get("missing.png")
    # keyed by content hash too
    digest = hashlib.sha1((dataset / "images" / "sub/1.jpg").read_bytes()).hexdigest()
    assert cache.sha1("sub/1.jpg") == digest
    torch.testing.assert_close(cache.get_by_hash(digest)["depth"], got["depth"], rtol=0, atol=0)
    with pytest.raises(CacheError, match="lacks 1 image"):
        cache.check_coverage(["0.png", "nope.png", "corrupt.jpg"])
    cache.check_coverage(["0.png", "corrupt.jpg"])  # unreadable files are the dataset's bad samples


def test_cached_equals_online_targets_through_the_dataset(built, teachers, tiny_dir):
    """The images the training dataset gives online teachers produce the cached targets."""
    from olavlm.data.dataset import LlavaDataset
    from olavlm.model.io import load_tokenizer
    from olavlm.model.vision import vision_geometry

    cfg, _, cache = built
    geo = vision_geometry(cfg.model)
    ds = LlavaDataset(cfg.data, load_tokenizer(cfg.model), image_spec=geo.spec, tokens_per_image=geo.num_tokens + 24,
                      teacher_image_size=teacher_image_size(cfg, teachers), target_lookup=cache.get)
    checked = 0
    for i in range(N_GOOD):
        sample = ds[i]
        online = teachers.encode(sample["images"], sample["image_keys"])
        for task, value in online.items():
            cached = sample["targets"][0][task]
            # same computation in the same dtype: equal up to bf16 rounding of batch-size effects
            torch.testing.assert_close(cached.float(), value[0].float(), rtol=2 ** -7, atol=2e-2)
            checked += 1
    assert checked == 3 * N_GOOD


def test_resume_after_interruption(built, tiny_dir, dataset, teachers, tmp_path):
    cfg = make_cfg(tiny_dir, dataset, tmp_path / "cache")

    class Stop(Exception):
        pass

    def stop_after_first(shard):
        raise Stop(shard)

    with pytest.raises(Stop):
        precompute(cfg, batch_size=3, shard_size=4, teachers=teachers, progress=False, device="cpu",
                   on_shard_written=stop_after_first)
    first = tmp_path / "cache" / "shard-00000.safetensors"
    assert first.is_file() and not (tmp_path / "cache" / "shard-00001.safetensors").exists()
    assert not (tmp_path / "cache" / "index.json").exists()
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    written = []
    summary = precompute(cfg, batch_size=3, shard_size=4, teachers=teachers, progress=False, device="cpu",
                         on_shard_written=written.append)
    assert summary["shards_skipped"] == 1 and written == [1, 2]
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp  # not recomputed
    resumed, reference = TargetCache.open(tmp_path / "cache"), built[2]
    assert resumed.entries == reference.entries and resumed.unreadable == reference.unreadable
    for key, value in all_targets(reference).items():
        for task in value:
            assert torch.equal(resumed.get(key)[task], value[task])


def test_ranks_take_disjoint_shards(built, tiny_dir, dataset, teachers, tmp_path):
    cfg = make_cfg(tiny_dir, dataset, tmp_path / "cache")
    s1 = precompute(cfg, batch_size=4, shard_size=4, teachers=teachers, progress=False, device="cpu",
                    rank=1, world_size=2)
    assert s1["shards_written"] == 1 and not (tmp_path / "cache" / "index.json").exists()
    s0 = precompute(cfg, batch_size=4, shard_size=4, teachers=teachers, progress=False, device="cpu",
                    rank=0, world_size=2)
    assert s0["shards_written"] == 2 and s0["complete"]
    cache, reference = TargetCache.open(tmp_path / "cache"), built[2]
    assert cache.entries == reference.entries
    for key, value in all_targets(reference).items():
        torch.testing.assert_close(cache.get(key)["seg"], value["seg"], rtol=0, atol=0)


def test_verify_and_foreign_cache_folder(built, tiny_dir, dataset, teachers):
    cfg, _, cache = built
    geo_ok = cache.geometry
    cache.verify(["gen", "depth", "seg"], config_fingerprints(cfg.model, GRID),
                 shapes={"gen": (1, 24), "depth": (64, 32), "seg": (32, 8, 8)}, geometry=geo_ok)
    cache.verify(["depth"], teachers.fingerprints())  # full fingerprints of the loaded teachers
    other = make_cfg(tiny_dir, dataset, cfg.data.target_cache)
    other.model.tasks["depth"].teacher_kwargs = {"blocks": [3]}
    with pytest.raises(CacheError, match=r"depth\.teacher_kwargs"):
        cache.verify(["depth"], config_fingerprints(other.model, GRID))
    with pytest.raises(CacheError, match="grid"):
        cache.verify(["gen"], config_fingerprints(cfg.model, 4))
    with pytest.raises(CacheError, match=r"depth: cache targets have shape \(64, 32\), the predictor outputs"):
        cache.verify(["depth"], shapes={"depth": (576, 1024)})
    with pytest.raises(CacheError, match="'extra': not in the cache"):
        cache.verify(["extra"])
    from olavlm.data.images import ImageSpec

    spec = ImageSpec(size=64, mean=tuple(geo_ok["mean"]), std=tuple(geo_ok["std"]))
    with pytest.raises(CacheError, match="geometry.image_geometry"):
        cache.verify([], geometry=geometry_fingerprint("square", spec, geo_ok["teacher_image_size"]))
    # precomputing a different configuration into the same folder is refused, not mixed
    sq = make_cfg(tiny_dir, dataset, cfg.data.target_cache, geometry="square")
    with pytest.raises(CacheError, match="different teachers / geometry / dtype"):
        precompute(sq, batch_size=4, shard_size=4, teachers=teachers, progress=False, device="cpu")


def test_pickled_into_workers(built):
    _, _, cache = built
    cache.get("0.png")  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._handles == {}

    class Keys(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return clone.get(["0.png", "sub/5.jpg"][i])["depth"]

    loader = torch.utils.data.DataLoader(Keys(), batch_size=2, num_workers=1)
    (batch,) = list(loader)
    torch.testing.assert_close(batch[1], cache.get("sub/5.jpg")["depth"], rtol=0, atol=0)


def test_open_errors(tmp_path):
    with pytest.raises(CacheError, match="not a target cache"):
        TargetCache.open(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CacheError, match="format"):
        TargetCache.open(tmp_path)


def test_cli_precompute(tiny_dir, dataset, tmp_path, capsys):
    import yaml

    from olavlm.cli import main

    cfg = make_cfg(tiny_dir, dataset, tmp_path / "unused")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "cli-cache"
    rc = main(["targets", "precompute", str(tmp_path / "run.yaml"), "--batch-size", "8", "--dtype", "fp32",
               "--shard-size", "16", f"data.target_cache={out}", "model.tasks.seg.layers=[]"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "estimated" in printed and "2 unreadable" in printed
    cache = TargetCache.open(out)
    assert cache.dtype == torch.float32 and cache.tasks == ["gen", "depth"] and len(cache) == N_GOOD


def test_training_step_cached_equals_online(tiny_dir, dataset, tmp_path):
    """A PT forward/backward with cached targets gives the losses and gradients of online teachers."""
    import dataclasses

    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM
    from olavlm.teachers.targets import TargetSource
    from olavlm.train.loop import build_data, model_inputs

    base = make_cfg(tiny_dir, dataset, tmp_path / "cache")
    model_cfg = tiny_model_config(tiny_dir)
    for task in ("gen", "depth", "seg"):
        src = base.model.tasks[task]
        model_cfg.tasks[task].teacher, model_cfg.tasks[task].teacher_path = src.teacher, src.teacher_path
    model_cfg.tasks["gen"].predictor.out_dim = 24
    model_cfg.tasks["depth"].predictor.out_dim = 32
    model_cfg.tasks["seg"].predictor.out_dim = 32
    cfg = dataclasses.replace(base, model=model_cfg, train=dataclasses.replace(base.train, bf16=False))
    torch.manual_seed(0)
    model = OlaVLM.from_config(cfg.model, with_predictors=True)
    model.train()
    teachers = build_teachers(cfg.model, model.geometry.grid, dtype=torch.float32, expected=model.target_shapes)
    precompute(cfg, batch_size=4, shard_size=4, dtype="fp32", teachers=teachers, progress=False, device="cpu")

    def step(online: bool):
        run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, target_cache=None if online else
                                                                 cfg.data.target_cache))
        source = (TargetSource.live(teachers) if online else
                  TargetSource("cache", model.target_shapes, cache=TargetCache.open(run.data.target_cache)))
        ds, collate = build_data(run, model, source)
        batch = collate([ds[i] for i in range(4)])
        assert ("targets" in batch) != online
        inputs = model_inputs(batch, torch.device("cpu"), source)
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.metrics, grads

    online_metrics, online_grads = step(True)
    cached_metrics, cached_grads = step(False)
    assert any(k.startswith("loss/depth") for k in online_metrics)
    assert online_metrics.keys() == cached_metrics.keys()
    for key in online_metrics:
        torch.testing.assert_close(cached_metrics[key], online_metrics[key], rtol=1e-5, atol=1e-6)
    assert online_grads.keys() == cached_grads.keys() and any("predictor" in n for n in online_grads)
    for name in online_grads:
        torch.testing.assert_close(cached_grads[name], online_grads[name], rtol=1e-4, atol=1e-6)


def test_teacher_dtype_rule_and_storage_estimate():
    from olavlm.teachers.base import resolve_dtype
    from olavlm.teachers.precompute import human_bytes
    from olavlm.teachers.targets import teacher_dtype

    cfg = RunConfig()
    assert teacher_dtype(cfg) == torch.bfloat16  # train.bf16 defaults to True
    cfg.train.bf16 = False
    assert teacher_dtype(cfg) == torch.float32
    cfg.train.teacher_dtype = "float16"
    assert teacher_dtype(cfg) == torch.float16 and resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")
    # the paper's teachers in bf16 over LLaVA-558K: 576x1024 + 1536x24x24 + 1024 values per image
    per_image = (576 * 1024 + 1536 * 24 * 24 + 1024) * 2
    assert human_bytes(per_image) == "2.95 MB" and human_bytes(per_image * 558_128) == "1.65 TB"


@pytest.mark.slow
def test_torchrun_two_ranks_share_the_shards(built, tiny_dir, dataset, tmp_path):
    """`torchrun --nproc_per_node 2 -m olavlm.cli targets precompute` (gloo on CPU): both ranks write
    disjoint shards, rank 0 writes a complete index equal to the single-process cache."""
    import os
    import re
    import socket
    import subprocess
    import sys

    import yaml

    cfg = make_cfg(tiny_dir, dataset, tmp_path / "unused")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist-cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "olavlm.cli", "targets", "precompute", str(tmp_path / "run.yaml"),
           "--shard-size", "2", "--batch-size", "2", "--no-progress", f"data.target_cache={out}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    written = {int(r): int(n) for r, n in re.findall(r"targets rank (\d)/2: (\d+) shard\(s\) written", proc.stderr)}
    assert written == {0: 3, 1: 2}  # 9 images in shards of 2 -> 5 shards, round-robin over 2 ranks
    cache, reference = TargetCache.open(out), built[2]
    assert cache.complete and cache.unreadable.keys() == reference.unreadable.keys()
    assert {k: v[2] for k, v in cache.entries.items()} == {k: v[2] for k, v in reference.entries.items()}
    for key, value in all_targets(reference).items():
        for task, target in value.items():  # other batch composition: equal up to bf16 rounding
            torch.testing.assert_close(cache.get(key)[task].float(), target.float(), rtol=2 ** -7, atol=2e-2)


# ------------------------------------------------------------------------------------------ integrity


@pytest.fixture
def damaged(built, tmp_path):
    """A private copy of the reference cache to damage."""
    import shutil

    shutil.copytree(built[0].data.target_cache, tmp_path / "copy")
    return tmp_path / "copy"


def _edit_index(root, fn):
    index = json.loads((root / "index.json").read_text())
    fn(index)
    (root / "index.json").write_text(json.dumps(index))


def test_index_records_shard_sizes_and_sha256(built):
    root = built[2].root
    files = built[2].index["shard_files"]
    assert sorted(files) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    for name, info in files.items():
        data = (root / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert built[2].check_files(deep=True) == {"shards": 3, "entries": N_GOOD, "hashed": 3}


def test_edited_index_is_refused_at_open(damaged):
    entries = TargetCache.open(damaged, check=False).entries
    a, b = [k for k, v in entries.items() if v[0] == 0][:2]

    def swap(index):
        ea, eb = index["entries"][a], index["entries"][b]
        ea[1], eb[1] = eb[1], ea[1]

    _edit_index(damaged, swap)
    with pytest.raises(CacheError, match=f"entry '{a}' points at row .* which holds '{b}'"):
        TargetCache.open(damaged)
    _edit_index(damaged, swap)  # back to intact
    TargetCache.open(damaged)
    _edit_index(damaged, lambda index: index["entries"][a].__setitem__(1, 99))
    with pytest.raises(CacheError, match="points at row 99 of shard-00000.safetensors, which has 4 rows"):
        TargetCache.open(damaged)
    _edit_index(damaged, lambda index: index["entries"][a].__setitem__(0, 7))
    with pytest.raises(CacheError, match="is not \\[shard, row, sha1\\] within the 3 shard"):
        TargetCache.open(damaged)


def test_truncated_shard_is_refused_at_open(damaged):
    shard = damaged / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CacheError, match="shard-00001.safetensors: .* bytes, the index recorded"):
        TargetCache.open(damaged)
    _edit_index(damaged, lambda index: index.pop("shard_files"))  # an index without sizes: the header check
    with pytest.raises(CacheError, match="not a readable target shard"):
        TargetCache.open(damaged)
    shard.unlink()
    with pytest.raises(CacheError, match="shard used by 3 cache entries is missing"):
        TargetCache.open(damaged)


def test_same_named_shard_of_another_cache(damaged, tiny_dir, dataset, teachers, tmp_path):
    """A cache of the same configuration over the images in another order: same run digest, other rows."""
    import shutil

    records = json.loads((dataset / "data.json").read_text())[::-1]
    other_data = tmp_path / "other"
    other_data.mkdir()
    (other_data / "data.json").write_text(json.dumps(records))
    shutil.copytree(dataset / "images", other_data / "images")
    other = make_cfg(tiny_dir, other_data, tmp_path / "other-cache")
    precompute(other, batch_size=4, shard_size=4, teachers=teachers, progress=False, device="cpu")
    foreign = tmp_path / "other-cache" / "shard-00000.safetensors"
    shutil.copyfile(foreign, damaged / "shard-00000.safetensors")
    with pytest.raises(CacheError, match="shard-00000.safetensors"):
        TargetCache.open(damaged)
    size = foreign.stat().st_size  # even with a doctored size, the rows give it away
    _edit_index(damaged, lambda index: index["shard_files"]["shard-00000.safetensors"].__setitem__("size", size))
    with pytest.raises(CacheError, match="holds|rows"):
        TargetCache.open(damaged)


def test_deep_verify_rehashes_and_cli(damaged, capsys):
    from olavlm.cli import main

    assert main(["targets", "verify", str(damaged), "--deep"]) == 0
    assert "OK, 7 images in 3 shard(s), complete; checked sizes, headers and sha256" in capsys.readouterr().out
    shard = damaged / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the tensor data: same size, readable header
    shard.write_bytes(bytes(data))
    TargetCache.open(damaged)  # the fast check cannot see it
    assert main(["targets", "verify", str(damaged)]) == 0
    capsys.readouterr()
    assert main(["targets", "verify", str(damaged), "--deep"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("olavlm: error: ")
    assert "shard-00000.safetensors: sha256 differs" in err
    assert main(["targets", "verify", str(damaged.parent / "nowhere")]) == 2
    assert "not a target cache" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["online", "error"])
def test_image_edited_after_precompute(built, teachers, dataset, tmp_path, mode):
    """The dataset passes the sha1 of the bytes it read: an edited image is a miss (online) or an error."""
    import dataclasses
    import shutil

    from olavlm.data.dataset import LlavaDataset
    from olavlm.model.io import load_tokenizer
    from olavlm.model.vision import vision_geometry

    cfg, _, cache = built
    shutil.copytree(dataset / "images", tmp_path / "images")
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(tmp_path / "images" / "sub/1.jpg")  # edited
    data = dataclasses.replace(cfg.data, image_folder=str(tmp_path / "images"), cache_miss=mode)
    geo = vision_geometry(cfg.model)
    ds = LlavaDataset(data, load_tokenizer(cfg.model), image_spec=geo.spec, tokens_per_image=geo.num_tokens + 24,
                      teacher_image_size=teacher_image_size(cfg, teachers), target_lookup=cache.get)
    assert ds[0]["targets"][0] is not None  # an unchanged image still hits the cache
    torch.testing.assert_close(ds[0]["targets"][0]["depth"], cache.get("0.png")["depth"], rtol=0, atol=0)
    if mode == "online":
        assert ds[1]["image_keys"] == ["sub/1.jpg"] and ds[1]["targets"] == [None]
    else:
        with pytest.raises(CacheError, match="image 'sub/1.jpg' changed after its targets were cached"):
            ds[1]
    with pytest.raises(KeyError, match="changed"):
        cache.get("sub/1.jpg", sha1="0" * 40)
