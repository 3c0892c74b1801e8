"""Data-loading throughput (dataset + collate) and the memory of the record index.

Measured in one process run, on synthetic LLaVA-style data written to a temporary folder:

* ``loader``:  samples/s of ``DataLoader(LlavaDataset, batch_sampler, Collator, num_workers=W)``
  over COCO-like 640x480 JPEGs, image side 336 (CLIP-L/336 spec, ``pad`` geometry), template
  llava_llama_3 with the tiny byte-level tokenizer; also with the teachers' uint8 square (S=518).
* ``per_sample``: single-process cost split into tokenization and image work (ms / sample).
* ``index``: build time, array bytes and peak RSS growth of :class:`RecordIndex` on a synthetic
  665K-record JSON list (LLaVA-665K-like record mix; measured in a child process).

Result: benchmarks/results/data_loading.json. The ratio to the model's step rate is not computed
here (the demo model config lives elsewhere); compare ``loader.samples_per_s`` with the
training loop's samples/s on the same machine.

    python benchmarks/data_loading.py            # 512 images, 2 workers, 665,298-record index
    python benchmarks/data_loading.py --quick    # 48 images, 20,000-record index (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import bench_threads, summarize, write_result  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
WORDS = ("the a red blue green small large circle square triangle left right of is on near image shows "
         "photo man woman dog street table there are two three people car building sky tree").split()


def _sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS, rng.integers(lo, hi))) + "."


def make_record(rng, i: int, n_images: int) -> dict:
    """LLaVA-665K-like: ~94% image records, 1-6 rounds; the rest text-only, longer answers."""
    has_image = rng.random() < 0.94
    rounds = int(rng.integers(1, 7))
    conv = []
    for r in range(rounds):
        q = _sentence(rng, 4, 16)
        if r == 0 and has_image:
            q = "<image>\n" + q
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _sentence(rng, 2, 60 if has_image else 120)}]
    rec = {"id": f"{i:09d}", "conversations": conv}
    if has_image:
        rec["image"] = f"coco/train2017/{int(rng.integers(n_images)):012d}.jpg"
    return rec


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    (folder / "coco/train2017").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        base = (np.sin(xx / rng.uniform(20, 80)) + np.cos(yy / rng.uniform(20, 80))) * 60 + 128
        img = np.stack([base + rng.normal(0, 12, base.shape) for _ in range(3)], -1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"coco/train2017/{i:012d}.jpg",
                                                                   quality=90)


_WORKER_CLOCK = [0.0]  # in each worker: its CPU seconds when it last handed over a batch


def _start_worker_clock(worker_id: int) -> None:
    _WORKER_CLOCK[0] = time.process_time()


class StampedCollate:
    """The collator, run in the workers, plus ``worker_cpu_s``: the CPU seconds the worker process
    spent since its previous batch (reading, decoding, tokenizing, collating, handing over) -- the
    workers' CPU is not in the main process's ``process_time``."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        out = self.collate(samples)
        now = time.process_time()
        out["worker_cpu_s"], _WORKER_CLOCK[0] = now - _WORKER_CLOCK[0], now
        return out


def bench_loader(data: Path, images: Path, tokenizer, *, workers: int, batches: int, micro: int,
                 teacher_size: int | None) -> dict:
    from olavlm.config import DataConfig
    from olavlm.data.collate import Collator
    from olavlm.data.dataset import LlavaDataset
    from olavlm.data.images import ImageSpec
    from olavlm.data.sampler import build_batch_sampler

    cfg = DataConfig(train_file=str(data), image_folder=str(images), template="llava_llama_3", image_geometry="pad")
    ds = LlavaDataset(cfg, tokenizer, image_spec=ImageSpec(336, CLIP_MEAN, CLIP_STD), tokens_per_image=600,
                      teacher_image_size=teacher_size)
    sampler = build_batch_sampler("modality_length", ds.lengths, global_batch_size=micro, micro_batch_size=micro,
                                  world_size=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=StampedCollate(
        Collator(tokenizer.pad_token_id)), num_workers=workers, persistent_workers=False, prefetch_factor=4,
        worker_init_fn=_start_worker_clock)
    it = iter(loader)
    next(it)  # worker start-up + first batch are excluded
    t0, c0, n, times, cpu, worker_cpu = time.perf_counter(), time.process_time(), 0, [], [], 0.0
    for _ in range(batches):
        t, c = time.perf_counter(), time.process_time()
        batch = next(it)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        n += batch["input_ids"].shape[0]
        worker_cpu += float(batch["worker_cpu_s"]) if workers else 0.0
    wall, used = time.perf_counter() - t0, time.process_time() - c0
    del it
    # with a core per worker, W workers deliver W / (worker CPU seconds per sample) samples/s
    per_core = n / worker_cpu if workers and worker_cpu > 0 else n / max(used, 1e-9)
    return {"workers": workers, "micro_batch": micro, "batches": batches, "teacher_image_size": teacher_size,
            "samples_per_s": n / wall, "wall_s": wall, "main_process_cpu_s": used, "worker_cpu_s": worker_cpu,
            "samples_per_cpu_s": per_core, "samples_per_s_cpu": per_core * max(1, workers),
            "cpu_note": "main_process_cpu_s: the main process only; worker_cpu_s: the workers' CPU seconds for "
                        "the timed batches (stamped in the workers); samples_per_s_cpu: what the workers deliver "
                        "with a core each",
            "batch_wait_s": summarize(times, cpu)}


def bench_per_sample(data: Path, images: Path, tokenizer, n: int) -> dict:
    from olavlm.data.images import ImageSpec, load_image, pixel_values, to_square
    from olavlm.data.records import RecordIndex, record_images
    from olavlm.data.tokenize import encode_conversation

    idx = RecordIndex.build(data)
    spec = ImageSpec(336, CLIP_MEAN, CLIP_STD)
    recs = [idx[i] for i in range(min(n, len(idx)))]
    t0 = time.perf_counter()
    for r in recs:
        encode_conversation(r["conversations"], "llava_llama_3", tokenizer, num_images=len(record_images(r)))
    tok_ms = (time.perf_counter() - t0) / len(recs) * 1e3
    keys = [k for r in recs for k in record_images(r)]
    t0 = time.perf_counter()
    for k in keys:
        pixel_values(to_square(load_image(images / k), "pad", spec), spec)
    img_ms = (time.perf_counter() - t0) / max(1, len(keys)) * 1e3
    return {"records": len(recs), "tokenize_ms_per_record": tok_ms, "image_ms_per_image": img_ms}


_INDEX_CHILD = """
import json, sys, time
from olavlm.data.records import RecordIndex

def status(key):  # kB from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
t0 = time.perf_counter()
idx = RecordIndex.build(sys.argv[1])
dt = time.perf_counter() - t0
peak, after = status("VmHWM"), status("VmRSS")
step = max(1, len(idx) // 2000)
t0 = time.perf_counter(); n = len([idx[i] for i in range(0, len(idx), step)]); rd = time.perf_counter() - t0
print(json.dumps({"records": len(idx), "build_s": dt, "index_bytes": idx.nbytes,
                  "peak_rss_growth_mb": (peak - base) / 1024, "rss_growth_after_mb": (after - base) / 1024,
                  "read_record_us": rd / n * 1e6}))
"""


INDEX_POOL = 4096  # distinct records of the index file, repeated with fresh ids (generating 665K takes minutes)


def bench_index(folder: Path, records: int) -> dict:
    rng = np.random.default_rng(1)
    path = folder / "index_bench.json"
    pool = [json.dumps(make_record(rng, 0, 100_000)).split('"000000000"', 1) for _ in range(INDEX_POOL)]
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(records):
            head, tail = pool[i % INDEX_POOL]
            f.write(("" if i == 0 else ",\n") + f'{head}"{i:09d}"{tail}')
        f.write("\n]\n")
    out = subprocess.run([sys.executable, "-c", _INDEX_CHILD, str(path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    result["file_mb"] = path.stat().st_size / 2**20
    path.unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--index-records", type=int, default=None, help="records of the index benchmark (665,298)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: OMP_NUM_THREADS, else 1; recorded in the result)")
    args = ap.parse_args(argv)
    bench_threads(args.threads)
    n_images = 48 if args.quick else 512
    n_records = 4 * n_images
    batches = 4 if args.quick else 40
    index_records = args.index_records or (20_000 if args.quick else 665_298)

    from olavlm.devkit.tiny import CORPUS, train_tokenizer
    tokenizer = train_tokenizer(CORPUS + [" ".join(WORDS)])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", n_images)
        rng = np.random.default_rng(0)
        data = tmp / "data.json"
        data.write_text(json.dumps([make_record(rng, i, n_images) for i in range(n_records)]))
        config = {"images": n_images, "records": n_records, "image_source": "640x480 JPEG q90", "image_size": 336,
                  "geometry": "pad", "template": "llava_llama_3", "tokenizer": "tiny byte-level BPE (vocab 512)",
                  "cpu_count": os.cpu_count()}
        loader = bench_loader(data, tmp / "images", tokenizer, workers=args.workers, batches=batches,
                              micro=args.micro_batch, teacher_size=None)
        loader_teacher = bench_loader(data, tmp / "images", tokenizer, workers=args.workers, batches=batches,
                                      micro=args.micro_batch, teacher_size=518)
        per_sample = bench_per_sample(data, tmp / "images", tokenizer, 200 if args.quick else 500)
        index = bench_index(tmp, index_records)
    path = write_result("data_loading", {"config": config, "loader": loader, "loader_with_teacher_images": loader_teacher,
                                         "per_sample": per_sample, "index": index})
    print(f"loader: {loader['samples_per_s']:.1f} samples/s ({args.workers} workers); with 518-px teacher images: "
          f"{loader_teacher['samples_per_s']:.1f} samples/s")
    print(f"per sample: tokenize {per_sample['tokenize_ms_per_record']:.2f} ms, image "
          f"{per_sample['image_ms_per_image']:.2f} ms")
    print(f"index: {index['records']} records ({index['file_mb']:.0f} MB file) in {index['build_s']:.1f} s, "
          f"{index['index_bytes'] / 2**20:.1f} MB arrays, RSS +{index['rss_growth_after_mb']:.0f} MB after, "
          f"peak +{index['peak_rss_growth_mb']:.0f} MB")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
