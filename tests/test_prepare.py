"""`olavlm data prepare` against a loopback HTTP server (127.0.0.1 only) that also emulates the Hub.

The server serves small fixture archives/images generated here, supports Range, counts requests and
can inject faults per path (drop the connection mid-file, send wrong bytes once, 500 once, 404).
Hub files are served under ``/datasets/{repo}/resolve/{rev}/{file}`` with the headers
huggingface_hub reads (X-Repo-Commit, ETag = sha256 of the content, Content-Length).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
from PIL import Image

from olavlm.prepare import sources
from olavlm.prepare.archive import UnsafeArchive, list_members, safe_extract
from olavlm.prepare.download import InsufficientDisk, check_free_disk, download_http
from olavlm.prepare.ocr_vqa import fetch_ocr_vqa
from olavlm.prepare.runner import Options, prepare

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Server:
    """In-memory files over HTTP/1.0 on 127.0.0.1 with Range, request log and fault injection."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        # path -> faults for the next GETs ("drop", "corrupt", "500", "nolength")
        self.faults: dict[str, list[str]] = {}
        self.redirects: dict[str, str] = {}  # path -> Location of a 302 answer (HEAD and GET)
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def _serve(self, head: bool):
                path = urlparse(self.path).path
                rng = self.headers.get("Range")
                with server.lock:
                    server.log.append((self.command, path, rng))
                    fault = server.faults[path].pop(0) if (not head and server.faults.get(path)) else None
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.files.get(path)
                if body is None or fault == "404":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.send_header("X-Repo-Commit", COMMIT)  # what the hub sends for a missing entry
                    self.end_headers()
                    return
                if fault == "500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                if fault != "nolength":  # without it, HTTP/1.0 ends the body when the connection closes
                    self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Accept-Ranges", "bytes")
                if path.startswith("/datasets/"):
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
                self.end_headers()
                if head:
                    return
                data = body[start:]
                if fault == "corrupt":
                    data = bytes(b ^ 0xFF for b in data)
                if fault == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def gets(self, path: str | None = None) -> list:
        return [r for r in self.log if r[0] == "GET" and (path is None or r[1] == path)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def jpeg(color=(200, 30, 30), size=(12, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG")
    return out.getvalue()


def encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("P" if fmt == "GIF" else "RGBA", (9, 7), 3 if fmt == "GIF" else (0, 90, 200, 128)).save(out, format=fmt)
    return out.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def conv(i):
    return [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"caption {i}"}]


def hub_path(repo: str, filename: str) -> str:
    return f"/datasets/{repo}/resolve/main/{filename}"


def publish(server: Server, overrides: dict[str, bytes] | None = None) -> dict[str, sources.DatasetSpec]:
    """Serve fixtures for all three datasets (`overrides`: path -> other bytes); return the registry rewired to them."""
    f = server.files
    # LLaVA-Pretrain: json + images.zip without a root folder (shard folders at the top)
    pt = [{"id": f"{i:09d}", "image": f"0000{i % 2}/{i:09d}.jpg", "conversations": conv(i)} for i in range(4)]
    f[hub_path("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json")] = json.dumps(pt).encode()
    f[hub_path("liuhaotian/LLaVA-Pretrain", "images.zip")] = make_zip({r["image"]: jpeg() for r in pt})
    # LLaVA-665K: one record per image source, one text-only record, three OCR-VQA images
    images = ["coco/train2017/000000000009.jpg", "gqa/images/1.jpg", "textvqa/train_images/abc.jpg",
              "vg/VG_100K/1.jpg", "vg/VG_100K_2/2.jpg", "ocr_vqa/images/111.jpg", "ocr_vqa/images/222.jpg",
              "ocr_vqa/images/333.jpg"]
    recs = [{"id": f"r{i}", "image": im, "conversations": conv(i)} for i, im in enumerate(images)]
    recs.append({"id": "text0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    f[hub_path("liuhaotian/LLaVA-Instruct-150K", "llava_v1_5_mix665k.json")] = json.dumps(recs).encode()
    f["/coco/train2017.zip"] = make_zip({"train2017/000000000009.jpg": jpeg()})
    f["/gqa/images.zip"] = make_zip({"images/1.jpg": jpeg()})
    f["/textvqa/train_val_images.zip"] = make_zip({"train_images/abc.jpg": jpeg()})
    f["/vg/images.zip"] = make_zip({"VG_100K/1.jpg": jpeg()})
    f["/vg/images2.zip"] = make_zip({"VG_100K_2/2.jpg": jpeg()})
    f["/ocr/111.jpg"] = jpeg()
    f["/ocr/222.gif"] = encoded("GIF")  # GIF content behind a name the json calls .jpg
    # /ocr/333.jpg is not served: a dead link
    f["/ocr/dataset.json"] = json.dumps({k: {"imageURL": f"{server.base}/ocr/{k}.{ext}", "title": "t"} for k, ext in
                                         (("111", "jpg"), ("222", "gif"), ("333", "jpg"), ("444", "jpg"))}).encode()
    # ALLaVA: caption jsons with repo-relative image paths, 10 LAION chunks (nested folders), VFLAN zip
    laion = [{"id": f"allava_laion_cap_{i}", "image": f"allava_laion/images/{i}.jpeg", "conversations": conv(i),
              "url": "x"} for i in range(10)]
    vflan = [{"id": "allava_vflan_cap_0", "image": "allava_vflan/images/images_191task_1k/t+a_0.png",
              "conversations": conv(0)}]
    repo = sources.ALLAVA_REPO
    f[hub_path(repo, "allava_laion/ALLaVA-Caption-LAION-4V.json")] = json.dumps(laion).encode()
    f[hub_path(repo, "allava_vflan/ALLaVA-Caption-VFLAN-4V.json")] = json.dumps(vflan).encode()
    for i in range(10):
        f[hub_path(repo, f"allava_laion/image_chunks/images_{i}.zip")] = make_zip({f"deep/dir/{i}.jpeg": jpeg()})
    f[hub_path("Vision-Flan/vision-flan_191-task_1k", "image_191-task_1k.zip")] = make_zip(
        {"images_191task_1k/t+a_0.png": encoded("PNG")})
    f.update(overrides or {})

    def rewire(remote):
        if isinstance(remote, sources.HubFile):
            return remote
        if remote.url is None:  # OCR-VQA dataset.json (a manual download in the real registry)
            return dataclasses.replace(remote, url=f"{server.base}/ocr/dataset.json")
        u = urlparse(remote.url)
        path = {"images.cocodataset.org": "/coco", "downloads.cs.stanford.edu": "/gqa",
                "dl.fbaipublicfiles.com": "/textvqa", "cs.stanford.edu": "/vg"}[u.netloc] + "/" + u.path.rsplit("/")[-1]
        data = f[path]
        return dataclasses.replace(remote, url=server.base + path, size=len(data),
                                   checksum="md5:" + hashlib.md5(data).hexdigest())

    return {name: spec.map_remotes(rewire) for name, spec in sources.DATASETS.items()}


@pytest.fixture
def hub_online(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 for the session; these tests talk to a loopback 'hub'."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def run_cli(argv: list[str], specs, monkeypatch) -> int:
    """`olavlm data prepare ARGV` through the real command line, with the registry rewired."""
    from olavlm.cli import main
    from olavlm.prepare import cli

    monkeypatch.setattr(cli, "DATASETS", specs)
    return main(["data", "prepare", *argv])


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def test_full_prepare_all_datasets_then_second_run_downloads_nothing(server, hub_online, tmp_path, monkeypatch, capsys):
    specs = publish(server)
    root = tmp_path / "datasets"
    server.faults["/coco/train2017.zip"] = ["drop"]  # interrupted mid-file: must resume with Range
    server.faults["/gqa/images.zip"] = ["corrupt"]  # wrong bytes once: checksum mismatch, then refetched
    base = ["all", "--root", str(root), "--hub-endpoint", server.base, "--backoff", "0.01", "--workers", "2",
            "--no-progress"]
    assert run_cli(base, specs, monkeypatch) == 0
    out = capsys.readouterr().out

    # exact layout the jsons reference
    for rel in ["LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "LLaVA-Pretrain/images/00001/000000003.jpg",
                "llava_v1_5_mix665k.json", "coco/train2017/000000000009.jpg", "gqa/images/1.jpg",
                "textvqa/train_images/abc.jpg", "vg/VG_100K/1.jpg", "vg/VG_100K_2/2.jpg", "ocr_vqa/images/111.jpg",
                "allava/ALLaVA-Caption.json", "allava/allava_laion/images/7.jpeg",
                "allava/allava_vflan/images/images_191task_1k/t+a_0.png"]:
        assert (root / rel).is_file(), rel
    assert not (root / "text_vqa").exists()
    # resumed: the second GET of the interrupted file asked for the remaining bytes only
    coco = server.gets("/coco/train2017.zip")
    assert len(coco) == 2 and coco[0][2] is None and coco[1][2].startswith("bytes=") and coco[1][2] != "bytes=0-"
    assert len(server.gets("/gqa/images.zip")) == 2  # mismatch reported and retried
    # GIF served for a .jpg name ends up a real JPEG; the dead link is reported, not fatal
    gif_saved = root / "ocr_vqa/images/222.jpg"
    assert gif_saved.read_bytes()[:3] == b"\xff\xd8\xff"
    with Image.open(gif_saved) as im:
        assert im.format == "JPEG" and im.size == (9, 7)
    report = json.loads((root / "ocr_vqa/download_report.json").read_text())
    assert report["dead"] == {"333.jpg": "HTTP 404"} and report["missing_samples"] == ["r7"]
    assert report["reencoded_to_jpeg"] == {"GIF": 1} and report["fetched"] == 2
    assert not (root / "ocr_vqa/images/444.jpg").exists()  # not referenced by the 665K json: not fetched
    # assembled ALLaVA json: paths relative to datasets/allava, all 11 records
    allava = json.loads((root / "allava/ALLaVA-Caption.json").read_text())
    assert len(allava) == 11 and all((root / "allava" / r["image"]).is_file() for r in allava)
    # counts and data check in the printed report
    assert "records: 9 in llava_v1_5_mix665k.json (expected 665,298) DIFFERS" in out
    assert "missing/bad: missing_image: 1 (e.g. r7)" in out  # the dead OCR-VQA link, counted by data check
    assert "records: 4 in LLaVA-Pretrain/blip_laion_cc_sbu_558k.json" in out
    assert "data check: 4 of 4 records usable" in out and "data check: 11 of 11 records usable" in out

    # second run: no request at all, everything verified
    n = len(server.log)
    assert run_cli(base, specs, monkeypatch) == 0
    assert len(server.log) == n, server.log[n:]
    out2 = capsys.readouterr().out
    assert "[    done]" not in out2 and "[verified]" in out2


def test_dry_run_makes_no_request_and_writes_nothing(server, hub_online, tmp_path, monkeypatch, capsys):
    specs = publish(server)
    root = tmp_path / "d"
    assert run_cli(["llava-665k", "--root", str(root), "--dry-run", "--no-progress"], specs, monkeypatch) == 0
    assert server.log == [] and not root.exists()
    assert "[ planned] coco" in capsys.readouterr().out


def test_only_selects_sources_and_rejects_unknown(server, hub_online, tmp_path, monkeypatch):
    specs = publish(server)
    root = tmp_path / "d"
    assert run_cli(["llava-665k", "--root", str(root), "--only", "gqa", "--no-progress", "--no-check"], specs,
                   monkeypatch) == 0
    assert (root / "gqa/images/1.jpg").is_file() and not (root / "coco").exists()
    assert {p for _, p, _ in server.log} == {"/gqa/images.zip"}
    with pytest.raises(SystemExit, match="unknown source"):
        run_cli(["llava-665k", "--root", str(root), "--only", "cocoa"], specs, monkeypatch)
    with pytest.raises(SystemExit, match="DATASET:SOURCE"):
        run_cli(["all", "--root", str(root), "--only", "coco"], specs, monkeypatch)


def test_manual_file_and_unsafe_archive_are_reported_not_fatal(server, hub_online, tmp_path):
    specs = publish(server, {"/vg/images2.zip": make_zip({"../escape.jpg": jpeg()})})
    spec = specs["llava-665k"].map_remotes(
        lambda r: dataclasses.replace(r, url=None) if isinstance(r, sources.HttpFile) and r.url.endswith("dataset.json")
        else r)
    rep = prepare(spec, tmp_path / "d", only=["vg", "ocr_vqa"],
                  opts=Options(backoff=0.01, progress=False, check=False))
    status = {s.what: (s.status, s.detail) for s in rep.steps}
    assert status[".downloads/vg/images.zip"][0] == "done"
    assert status[".downloads/vg/images2.zip"][0] == "failed" and "outside" in status[".downloads/vg/images2.zip"][1]
    assert status["ocr_vqa/dataset.json"][0] == "manual" and "drive.google.com" in status["ocr_vqa/dataset.json"][1]
    assert not (tmp_path / "d" / "vg" / "escape.jpg").exists() and not (tmp_path / "d" / "escape.jpg").exists()


def test_hub_checksum_mismatch_is_retried(server, hub_online, tmp_path, caplog):
    specs = publish(server)
    path = hub_path("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json")
    server.faults[path] = ["corrupt"]
    rep = prepare(specs["llava-pretrain"], tmp_path, only=["annotations"],
                  opts=Options(backoff=0.01, progress=False, check=False, hub_endpoint=server.base))
    assert [s.status for s in rep.steps] == ["done"]
    assert len(server.gets(path)) == 2 and "verification failed (sha256" in caplog.text
    assert (tmp_path / "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json").read_bytes() == server.files[path]


# ------------------------------------------------------------------------------------------------
# units
# ------------------------------------------------------------------------------------------------


def test_download_resumes_after_drop_and_restarts_on_bad_checksum(server, tmp_path, caplog):
    data = bytes(range(256)) * 4096  # 1 MiB
    server.files["/f.bin"] = data
    server.faults["/f.bin"] = ["drop", "corrupt"]
    md5 = "md5:" + hashlib.md5(data).hexdigest()
    download_http(server.base + "/f.bin", tmp_path / "f.bin", size=len(data), checksum=md5, backoff=0.01,
                  progress=True)  # bars on: exercises the rewinds of the per-file bar
    assert (tmp_path / "f.bin").read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    ranges = [r for _, _, r in server.gets("/f.bin")]
    # 1: dropped half way; 2: resumed (Range) but wrong bytes -> md5 mismatch; 3: fresh full download
    assert ranges[0] is None and ranges[1] == f"bytes={len(data) // 2}-" and ranges[2] is None and len(ranges) == 3
    assert "verification failed (md5" in caplog.text


def test_download_404_is_permanent(server, tmp_path):
    from olavlm.prepare.download import DownloadError

    with pytest.raises(DownloadError, match="HTTP 404"):
        download_http(server.base + "/nope.zip", tmp_path / "x.zip", backoff=0.01, progress=False)
    assert len(server.gets()) == 1  # no retry of a 404


def test_zip_with_traversal_absolute_or_symlink_member_is_refused(tmp_path):
    dest = tmp_path / "out"
    for members in ({"ok.jpg": b"1", "../evil.jpg": b"2"}, {"/etc/evil": b"2"}, {"a/../../evil": b"2"}):
        z = tmp_path / "bad.zip"
        z.write_bytes(make_zip(members))
        with pytest.raises(UnsafeArchive):
            safe_extract(z, dest, progress=False)
        assert not (tmp_path / "evil.jpg").exists() and not (dest / "ok.jpg").exists()  # nothing written
    link = zipfile.ZipInfo("link")
    link.external_attr = (0o120777 << 16)
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        list_members(z)


def test_flatten_unpacks_flat_and_refuses_collisions(tmp_path):
    z = tmp_path / "a.zip"
    z.write_bytes(make_zip({"x/1.jpg": b"a", "y/z/2.jpg": b"b"}))
    assert safe_extract(z, tmp_path / "o", flatten=True, progress=False) == 2
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["1.jpg", "2.jpg"]
    z.write_bytes(make_zip({"x/1.jpg": b"a", "y/1.jpg": b"b"}))
    from olavlm.prepare.archive import ArchiveError

    with pytest.raises(ArchiveError, match="both flatten"):
        safe_extract(z, tmp_path / "o2", flatten=True, progress=False)


def test_ocr_vqa_reencodes_png_and_retries_transient_errors(server, tmp_path):
    server.files["/i/a.png"] = encoded("PNG")
    server.files["/i/b.jpg"] = raw = jpeg((1, 2, 3))
    server.faults["/i/b.jpg"] = ["500"]  # transient: retried
    (tmp_path / "ocr_vqa").mkdir()
    (tmp_path / "ocr_vqa/dataset.json").write_text(json.dumps(
        {"a": {"imageURL": server.base + "/i/a.png"}, "b": {"imageURL": server.base + "/i/b.jpg"}, "c": {}}))
    spec = sources.OcrVqaSpec(dataset_json="ocr_vqa/dataset.json", image_dir="ocr_vqa/images", referenced_by=None,
                              image_prefix="ocr_vqa/images/")
    rep = fetch_ocr_vqa(spec, tmp_path, workers=2, backoff=0.01, progress=False)
    assert rep["fetched"] == 2 and rep["reencoded_to_jpeg"] == {"PNG": 1} and list(rep["dead"]) == ["c.jpg"]
    assert (tmp_path / "ocr_vqa/images/b.jpg").read_bytes() == raw  # JPEG content kept byte for byte
    with Image.open(tmp_path / "ocr_vqa/images/a.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    n = len(server.log)
    assert fetch_ocr_vqa(spec, tmp_path, workers=2, backoff=0.01, progress=False)["already_present"] == 2
    assert len(server.log) == n


def test_free_disk_check(tmp_path):
    check_free_disk(tmp_path, 1)
    with pytest.raises(InsufficientDisk, match="free but about"):
        check_free_disk(tmp_path / "not/yet", 1 << 60)


def test_registry_is_consistent():
    for spec in sources.DATASETS.values():
        names = [s.name for s in spec.sources]
        assert len(names) == len(set(names))
        saves = [f.save_as for s in spec.sources for f in s.fetches]
        assert len(saves) == len(set(saves))
    assert sum(sources.LLAVA_665K_PER_SOURCE.values()) == sources.LLAVA_665K.expected_records == 665_298
    assert sources.LLAVA_PRETRAIN.expected_records == 558_128
    unpacked = {p for s in sources.LLAVA_665K.sources if not s.optional for f in s.fetches for p in f.expect}
    assert unpacked == {"coco/train2017", "gqa/images", "textvqa/train_images", "vg/VG_100K", "vg/VG_100K_2"}
    with pytest.raises(ValueError, match="must end with"):
        sources.Fetch(sources.HubFile("a/b", "x/y.json"), save_as="elsewhere/z.json")


def test_tar_archives_unpack_and_links_are_refused(tmp_path):
    import tarfile

    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        info = tarfile.TarInfo("train_images/a.jpg")
        data = jpeg()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    assert safe_extract(good, tmp_path / "o", progress=False) == 1
    assert (tmp_path / "o/train_images/a.jpg").read_bytes() == data
    for name, kind in (("../up.jpg", tarfile.REGTYPE), ("ln", tarfile.SYMTYPE)):
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w") as tf:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tf.addfile(info, io.BytesIO(b""))
        with pytest.raises(UnsafeArchive):
            safe_extract(bad, tmp_path / "o2", progress=False)
        assert not (tmp_path / "up.jpg").exists() and not (tmp_path / "o2" / "ln").exists()


def test_not_enough_disk_stops_before_any_download(server, tmp_path, monkeypatch, capsys):
    import collections

    from olavlm.prepare import download

    specs = publish(server)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    assert run_cli(["llava-665k", "--root", str(tmp_path), "--only", "coco", "gqa", "--no-progress"], specs,
                   monkeypatch) == 2
    assert server.log == []  # sizes come from the registry: not even a HEAD
    assert "not started" in capsys.readouterr().out


def test_size_announced_differently_fails_fast(server, tmp_path):
    from olavlm.prepare.download import DownloadError

    server.files["/f.bin"] = b"x" * 100
    with pytest.raises(DownloadError, match="changed upstream"):
        download_http(server.base + "/f.bin", tmp_path / "f.bin", size=99, backoff=0.01, progress=False)
    assert len(server.gets()) == 1


def test_mirror_zip_then_ocr_step_reencodes_present_gif_and_fetches_only_missing(server, hub_online, tmp_path):
    specs = publish(server, {hub_path("weizhiwang/llava_v15_instruction_images", "ocr_vqa_images_llava_v15.zip"):
                             make_zip({"ocr_vqa/images/111.jpg": jpeg(), "x/222.jpg": encoded("GIF")})})
    root = tmp_path / "d"
    rep = prepare(specs["llava-665k"], root, only=["ocr_vqa", "annotations", "ocr_vqa_mirror"],
                  opts=Options(backoff=0.01, progress=False, check=False, hub_endpoint=server.base))
    assert [s.source for s in rep.steps] == ["annotations", "ocr_vqa", "ocr_vqa_mirror", "ocr_vqa"]  # registry order
    assert rep.ocr_vqa["already_present"] == 2 and rep.ocr_vqa["reencoded_to_jpeg"] == {"GIF": 1}
    assert rep.ocr_vqa["fetched"] == 0 and list(rep.ocr_vqa["dead"]) == ["333.jpg"]
    assert (root / "ocr_vqa/images/222.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert not server.gets("/ocr/111.jpg") and not server.gets("/ocr/222.gif")


def test_allava_assemble_drops_unsafe_paths_and_flags_foreign_folders(tmp_path):
    from olavlm.prepare.allava import assemble

    part = [{"id": 1, "image": "a/images/1.jpg", "conversations": conv(1), "url": "u"},
            {"id": 2, "image": "../../etc/passwd", "conversations": conv(2)},
            {"id": 3, "image": "/abs.jpg", "conversations": conv(3)},
            {"id": 4, "conversations": conv(4)},
            {"id": 5, "image": "b/images/5.jpg", "conversations": conv(5)},
            {"id": 6, "image": "a/images/6.jpg", "conversations": "not a list"}]
    (tmp_path / "p.json").write_text(json.dumps(part))
    spec = sources.AssembleSpec(parts=(("p.json", "a/images"),), output="out/all.json", image_folder="out")
    stats = assemble(spec, tmp_path)
    out = json.loads((tmp_path / "out/all.json").read_text())
    assert [r["id"] for r in out] == [1, 5] and set(out[0]) == {"id", "image", "conversations"}
    assert stats["dropped"] == {"unsafe_path": 2, "no_image": 1, "bad_record": 1}
    assert stats["flagged"] == {"outside_expected_folder": 1} and stats["records"] == 2
    (tmp_path / "p.json").write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="line 1"):
        assemble(spec, tmp_path)


# ------------------------------------------------------------------------------------------------
# hostile sources
# ------------------------------------------------------------------------------------------------


def test_redirect_only_to_the_same_host_or_an_allow_listed_cdn(server, tmp_path):
    from olavlm.prepare.download import DownloadError, RedirectRefused, host_allowed, http_size

    port = server.httpd.server_address[1]
    server.files["/real.bin"] = data = b"r" * 1000
    server.redirects["/same.bin"] = "/real.bin"  # relative: same host
    server.redirects["/other.bin"] = f"http://localhost:{port}/real.bin"  # another host name
    server.redirects["/file.bin"] = "file:///etc/passwd"
    download_http(server.base + "/same.bin", tmp_path / "same.bin", size=1000, backoff=0.01, progress=False)
    assert (tmp_path / "same.bin").read_bytes() == data
    before = len(server.gets("/real.bin"))
    with pytest.raises(RedirectRefused, match="redirect to http://localhost:.* refused"):
        download_http(server.base + "/other.bin", tmp_path / "other.bin", backoff=0.01, progress=False)
    assert len(server.gets("/real.bin")) == before and len(server.gets("/other.bin")) == 1  # refused, not retried
    with pytest.raises(DownloadError):
        download_http(server.base + "/file.bin", tmp_path / "file.bin", backoff=0.01, progress=False)
    with pytest.raises(RedirectRefused):
        http_size(server.base + "/other.bin")
    # the source's allow-listed CDN is followed
    download_http(server.base + "/other.bin", tmp_path / "cdn.bin", backoff=0.01, progress=False,
                  allowed_hosts=("localhost",))
    assert (tmp_path / "cdn.bin").read_bytes() == data and http_size(server.base + "/other.bin",
                                                                        allowed_hosts=("localhost",)) == 1000
    assert host_allowed("img.cdn.example.org", "example.org", (".cdn.example.org",))
    assert not host_allowed("evilcdn.example.org", "example.org", (".cdn.example.org",))
    assert not host_allowed("cdn.example.org.evil", "example.org", ("cdn.example.org",))


def test_byte_cap_from_the_registry_without_content_length(server, tmp_path):
    from olavlm.prepare.download import DownloadError

    server.files["/big.bin"] = b"b" * (3 << 20)
    server.faults["/big.bin"] = ["nolength"]
    with pytest.raises(DownloadError, match="sent more than the 1000 bytes the registry expects"):
        download_http(server.base + "/big.bin", tmp_path / "big.bin", size=1000, backoff=0.01, progress=False)
    assert not (tmp_path / "big.bin").exists() and not (tmp_path / "big.bin.part").exists()
    server.files["/ok.bin"] = b"o" * 5000
    server.faults["/ok.bin"] = ["nolength"]
    download_http(server.base + "/ok.bin", tmp_path / "ok.bin", size=5000, backoff=0.01, progress=False)
    assert (tmp_path / "ok.bin").read_bytes() == server.files["/ok.bin"]


def _png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR of w x h and a tiny IDAT: a decompression bomb by its header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_ocr_vqa_hostile_names_bombs_and_undecodable_images(server, tmp_path, monkeypatch):
    from olavlm.prepare import ocr_vqa

    server.files["/i/ok.jpg"] = jpeg()
    server.files["/i/bomb.png"] = _png_header_only(100_000, 100_000)
    server.files["/i/big.png"] = _png_header_only(10_000, 10_000)  # 1e8 pixels: over the guard, under PIL's error
    server.files["/i/text.jpg"] = b"<html>not an image</html>"
    server.files["/i/huge.jpg"] = jpeg() + b"\0" * 4096
    server.faults["/i/huge.jpg"] = ["nolength"]
    monkeypatch.setattr(ocr_vqa, "MAX_IMAGE_BYTES", 2048)
    port = server.httpd.server_address[1]
    server.redirects["/i/moved.jpg"] = f"http://localhost:{port}/i/ok.jpg"
    (tmp_path / "ocr_vqa").mkdir()
    url = server.base + "/i/"
    (tmp_path / "ocr_vqa/dataset.json").write_text(json.dumps({
        "ok": {"imageURL": url + "ok.jpg"}, "bomb": {"imageURL": url + "bomb.png"},
        "big": {"imageURL": url + "big.png"},
        "text": {"imageURL": url + "text.jpg"}, "huge": {"imageURL": url + "huge.jpg"},
        "moved": {"imageURL": url + "moved.jpg"}, "local": {"imageURL": "file:///etc/passwd"},
        "../../escape": {"imageURL": url + "ok.jpg"}, "up": {"imageURL": url + "ok.jpg"}}))
    recs = [{"id": f"r{k}", "image": f"ocr_vqa/images/{k}.jpg", "conversations": conv(0)}
            for k in ("ok", "bomb", "big", "text", "huge", "moved", "local", "../../escape", "sub/../../up")]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    spec = sources.OcrVqaSpec(dataset_json="ocr_vqa/dataset.json", image_dir="ocr_vqa/images",
                              referenced_by="llava.json", image_prefix="ocr_vqa/images/")
    rep = fetch_ocr_vqa(spec, tmp_path, workers=2, retries=0, backoff=0.01, progress=False)
    assert rep["fetched"] == 1 and sorted(p.name for p in (tmp_path / "ocr_vqa/images").iterdir()) == ["ok.jpg"]
    assert set(rep["unsafe_names"]) == {"../../escape.jpg", "sub/../../up.jpg"}
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "up.jpg").exists()
    assert not any(tmp_path.glob("**/escape.jpg")) and not any(tmp_path.glob("**/up.jpg"))
    assert set(rep["bad_images"]) == {"bomb.jpg", "big.jpg", "text.jpg", "huge.jpg"}
    assert all("decompression bomb" in rep["bad_images"][n] for n in ("bomb.jpg", "big.jpg"))
    assert "not a decodable image" in rep["bad_images"]["text.jpg"] and "2048 bytes" in rep["bad_images"]["huge.jpg"]
    assert "refused" in rep["dead"]["moved.jpg"] and "not an http(s) URL" in rep["dead"]["local.jpg"]
    assert sorted(rep["missing_samples"]) == sorted(f"r{k}" for k in ("bomb", "big", "text", "huge", "moved", "local",
                                                                       "../../escape", "sub/../../up"))
    saved = json.loads((tmp_path / spec.report).read_text())
    assert saved["bad_images"] == rep["bad_images"] and saved["unsafe_names"] == rep["unsafe_names"]
    # a second run does not fetch bad images again (like dead links), unless asked
    n = len(server.gets("/i/bomb.png"))
    again = fetch_ocr_vqa(spec, tmp_path, workers=2, retries=0, backoff=0.01, progress=False)
    assert again["bad_images"] == rep["bad_images"] and len(server.gets("/i/bomb.png")) == n
    # the CDN of the source: allow-listed redirects are followed
    cdn = dataclasses.replace(spec, redirect_hosts=("localhost",))
    assert fetch_ocr_vqa(cdn, tmp_path, workers=2, retries=0, backoff=0.01, progress=False,
                         retry_dead=True)["fetched"] == 1  # moved.jpg


def test_unpack_size_limit_zip_and_tar(tmp_path):
    import tarfile

    from olavlm.prepare.archive import UNPACK_RATIO, UNPACK_SLACK, unpack_limit

    assert unpack_limit(1 << 20) == UNPACK_RATIO * (1 << 20) + UNPACK_SLACK < 1 << 30  # "1 MiB zip -> 1 GiB" refused
    zeros = b"\0" * (4 << 20)
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.bin", zeros)
        zf.writestr("b.bin", zeros)
    assert z.stat().st_size < 64 << 10
    with pytest.raises(UnsafeArchive, match="unpack to 8.0 MiB, more than the limit of 1.0 MiB"):
        safe_extract(z, tmp_path / "o", progress=False, max_bytes=1 << 20)
    assert not (tmp_path / "o" / "a.bin").exists()
    assert safe_extract(z, tmp_path / "o", progress=False) == 2  # 8 MiB is within the default's slack
    t = tmp_path / "bomb.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        info = tarfile.TarInfo("z.bin")
        info.size = len(zeros)
        tf.addfile(info, io.BytesIO(zeros))
    with pytest.raises(UnsafeArchive, match="more than the limit"):
        safe_extract(t, tmp_path / "t", progress=False, max_bytes=1 << 20)
    assert not any((tmp_path / "t").iterdir())


def test_unpack_name_clashes_are_reported(tmp_path):
    import warnings

    from olavlm.prepare.archive import ArchiveError

    z = tmp_path / "dup.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(z, "w") as zf:
            zf.writestr("img/1.jpg", b"first")
            zf.writestr("img/1.jpg", b"second")
    with pytest.raises(ArchiveError, match="'img/1.jpg' and 'img/1.jpg' are the same path"):
        safe_extract(z, tmp_path / "o", progress=False)
    z.write_bytes(make_zip({"a": b"file", "a/b.jpg": b"x"}))
    with pytest.raises(ArchiveError, match="'a' is a file but 'a/b.jpg' needs it as a folder"):
        safe_extract(z, tmp_path / "o", progress=False)
    first, second = tmp_path / "one.zip", tmp_path / "two.zip"
    first.write_bytes(make_zip({"x/1.jpg": b"from one"}))
    second.write_bytes(make_zip({"y/1.jpg": b"from archive two"}))
    assert safe_extract(first, tmp_path / "flat", flatten=True, progress=False) == 1
    assert safe_extract(first, tmp_path / "flat", flatten=True, progress=False) == 1  # a re-run is fine
    with pytest.raises(ArchiveError, match="would overwrite .*1.jpg, a different file of 8 bytes"):
        safe_extract(second, tmp_path / "flat", flatten=True, progress=False)
    assert (tmp_path / "flat" / "1.jpg").read_bytes() == b"from one"
    assert not list((tmp_path / "flat").glob("*.part"))
