"""`olavlm data prepare cv-bench` / `mmstar` against the loopback hub of test_prepare: layout, resume."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image
from test_prepare import Server, hub_path  # noqa: F401  (the loopback hub)

from olavlm.prepare import sources
from olavlm.prepare.runner import Options, prepare
from olavlm.evaluation import cvbench, mmstar

REV = sources.CVBENCH_REVISION


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def hub_online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6, 5), color).save(out, format="PNG")
    return out.getvalue()


def cv_records():
    files = ["img/2D/count/ade20k_1.png", "img/2D/count/ade20k_1.png", "img/3D/depth/omni3d_2.png"]
    return [{"idx": i, "type": "2D" if "2D" in f else "3D", "task": "Count" if "2D" in f else "Depth",
             "source": "ADE20K" if "2D" in f else "Omni3D", "answer": "(A)", "prompt": f"q{i}\n(A) x\n(B) y",
             "filename": f} for i, f in enumerate(files)]


def publish_cvbench(server, records, missing=()):
    base = f"/datasets/{sources.CVBENCH_REPO}/resolve/{REV}/"
    server.files[base + "test.jsonl"] = "".join(json.dumps(r) + "\n" for r in records).encode()
    for r in records:
        if r["filename"] not in missing:
            server.files[base + r["filename"]] = png((len(r["filename"]) * 7 % 255, 10, 10))
    return base


def opts(server):
    return Options(backoff=0.01, retries=1, progress=False, hub_endpoint=server.base, workers=2)


def test_cvbench_prepare_lays_out_the_jsonl_and_images_then_resumes(server, hub_online, tmp_path):
    base = publish_cvbench(server, cv_records())
    root = tmp_path / "datasets"
    rep = prepare(sources.CV_BENCH, root, opts=opts(server))
    assert not rep.failed, rep.steps
    assert rep.records == 3  # counted by the CV-Bench reader (expected 2,638 on the real file)
    items = cvbench.load_items(root / "CV-Bench/test.jsonl")
    for it in items:  # every image where the evaluation looks for it, with the hub's bytes
        assert (root / "CV-Bench" / it["filename"]).read_bytes() == server.files[base + it["filename"]]
    # a second run makes no GET at all
    n = len(server.gets())
    rep = prepare(sources.CV_BENCH, root, opts=opts(server))
    assert not rep.failed and len(server.gets()) == n
    # an interrupted run (one image missing) fetches only that image
    (root / "CV-Bench/img/3D/depth/omni3d_2.png").unlink()
    prepare(sources.CV_BENCH, root, opts=opts(server))
    got = [g[1] for g in server.gets()[n:]]
    assert [p for p in got if p.endswith(".png")] == [base + "img/3D/depth/omni3d_2.png"]


def test_cvbench_missing_and_unsafe_files_are_reported(server, hub_online, tmp_path):
    recs = cv_records() + [{**cv_records()[0], "idx": 9, "filename": "../escape.png"}]
    publish_cvbench(server, recs, missing=("img/3D/depth/omni3d_2.png",))
    root = tmp_path / "datasets"
    rep = prepare(sources.CV_BENCH, root, opts=opts(server))
    (step,) = rep.failed
    assert step.source == "test" and "NOT fetched: 2" in step.detail and "omni3d_2.png" in step.detail
    assert not (tmp_path / "escape.png").exists()
    assert (root / "CV-Bench/img/2D/count/ade20k_1.png").is_file()  # the others were fetched


def test_mmstar_prepare_and_read(server, hub_online, tmp_path):
    b64 = base64.b64encode(png((1, 2, 3)) * 40).decode()
    tsv = ("index\tquestion\tanswer\tcategory\tl2_category\timage\n"
           f"0\tq0\tA\tmath\tgeometry\t{b64}\n1\tq1\tB\tmath\tgeometry\t0\n")
    server.files[hub_path("Lin-Chen/MMStar", "MMStar.tsv")] = tsv.encode()
    root = tmp_path / "datasets"
    rep = prepare(sources.MMSTAR, root, opts=opts(server))
    assert not rep.failed and rep.records == 2
    assert [it["answer"] for it in mmstar.load_items(root / "MMStar/MMStar.tsv")] == ["A", "B"]


def test_all_still_means_the_training_datasets(monkeypatch):
    from olavlm.prepare import cli

    seen = []
    monkeypatch.setattr("olavlm.prepare.runner.prepare", lambda spec, root, **kw: seen.append(spec.name) or
                        __import__("olavlm.prepare.runner", fromlist=["Report"]).Report(dataset=spec.name))
    args = cli.argparse.Namespace(name="all", only=None, workers=1, retries=0, backoff=0, timeout=1, hub_endpoint=None,
                                  delete_archives=False, retry_dead=False, dry_run=True, no_progress=True,
                                  no_check=True, root="x")
    cli.run(args)
    assert seen == ["llava-pretrain", "llava-665k", "allava-caption"]
    assert {"cv-bench", "mmstar"} <= set(sources.DATASETS)
