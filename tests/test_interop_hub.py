"""The Hub side of interop against a loopback HTTP server (127.0.0.1 only): `olavlm export llava
--push-to-hub REPO` (huggingface_hub's commit API: create repo, validate the model card, preupload,
commit) and `olavlm convert reference HUB_ID` (snapshot download: revision, tree, resolve).

The server asks for every file in "regular" mode (content inline in the commit), so the whole
upload runs through huggingface_hub and every byte is checked here; the LFS / Xet transfer that
the real Hub uses for large files is not exercised.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest

from olavlm.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, fail_create: bool = False, files: dict[str, bytes] | None = None):
        self.files = files or {}  # served as the model repo shi-labs/tiny-ola
        self.requests: list[tuple[str, str]] = []
        self.repos: list[dict] = []
        self.commits: list[list[dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urlparse(self.path).path
                server.requests.append(("POST", path))
                if path == "/api/repos/create":
                    if fail_create:
                        return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
                    server.repos.append(json.loads(body))
                    return self._reply(200, {"url": f"{server.base}/org/tiny-ola"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/models/org/tiny-ola/preupload/main":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
                if path == "/api/models/org/tiny-ola/commit/main":
                    server.commits.append([json.loads(line) for line in body.decode().splitlines() if line.strip()])
                    return self._reply(200, {"commitUrl": f"{server.base}/org/tiny-ola/commit/{COMMIT}",
                                             "commitOid": COMMIT, "success": True})
                self._reply(404, {"error": f"not emulated: {path}"})

            def _file(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                server.requests.append((self.command, path))
                repo, files = "shi-labs/tiny-ola", server.files
                if path.startswith(f"/api/models/{repo}/revision/"):
                    return self._reply(200, {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})
                if path.startswith(f"/api/models/{repo}/tree/"):
                    return self._reply(200, [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                             for f, b in files.items()])
                name = path.split(f"/{repo}/resolve/{COMMIT}/", 1)[-1]
                if path.startswith(f"/{repo}/resolve/") and name in files:
                    body = files[name]
                    self.send_response(200)
                    for k, v in (("X-Repo-Commit", COMMIT), ("ETag", f'"{hashlib.sha256(body).hexdigest()}"'),
                                 ("Content-Length", str(len(body)))):
                        self.send_header(k, v)
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)
                    return
                self._reply(404, {"error": "not emulated"})

            def do_GET(self):
                self._file(head=False)

            def do_HEAD(self):
                self._file(head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub_online(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 for the session; these tests talk to a loopback 'hub'."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def olavlm_ift(tiny_dir, tmp_path_factory):
    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM

    folder = tmp_path_factory.mktemp("hub") / "final"
    OlaVLM.from_config(tiny_model_config(tiny_dir), with_predictors=False).save_pretrained(folder, with_predictors=False)
    (folder / "olavlm_run.json").write_text(json.dumps({"stage": "ift", "template": "llava_llama_3", "image_geometry": "pad"}))
    return folder


def test_export_pushes_every_file(olavlm_ift, tmp_path, hub_online, capsys):
    server = HubServer()
    try:
        dst = tmp_path / "llava"
        rc = main(["export", "llava", str(olavlm_ift), str(dst), "--push-to-hub", "org/tiny-ola", "--private",
                   "--hub-endpoint", server.base, "--token", "hf_loopback"])
        out = capsys.readouterr().out
    finally:
        server.close()
    assert rc == 0 and f"pushed {dst} to org/tiny-ola: {server.base}/org/tiny-ola/commit/{COMMIT}" in out
    assert server.repos == [{"name": "tiny-ola", "organization": "org", "visibility": "private", "type": "model"}]
    (commit,) = server.commits
    header = commit[0]
    assert header["key"] == "header" and "olavlm" in header["value"]["summary"]
    uploaded = {e["value"]["path"]: base64.b64decode(e["value"]["content"]) for e in commit[1:] if e["key"] == "file"}
    local = {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert uploaded == local  # every file, byte for byte (weights, config, processor, template, card)
    assert {"model.safetensors", "config.json", "chat_template.jinja", "README.md"} <= set(uploaded)


def test_hub_refusal_is_one_line(olavlm_ift, tmp_path, hub_online, capsys):
    server = HubServer(fail_create=True)
    try:
        rc = main(["export", "llava", str(olavlm_ift), str(tmp_path / "llava"), "--push-to-hub", "org/tiny-ola",
                   "--hub-endpoint", server.base, "--token", "hf_loopback"])
    finally:
        server.close()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("olavlm: error: --push-to-hub org/tiny-ola: upload failed") and "403" in err
    assert (tmp_path / "llava" / "model.safetensors").is_file()  # the export itself is kept


def test_convert_reference_from_a_hub_id(tiny_dir, tmp_path, hub_online, monkeypatch, capsys):
    from huggingface_hub import constants

    from olavlm.devkit.reference import make_tiny_reference, read_tensors

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    ref = make_tiny_reference(tiny_dir, tmp_path / "ref", stage="pt")
    files = {str(p.relative_to(ref)): p.read_bytes() for p in ref.rglob("*") if p.is_file()}
    files["README.md"] = files["images/demo.png"] = b"not needed for a conversion"
    server = HubServer(files=files)
    try:
        rc = main(["convert", "reference", "shi-labs/tiny-ola", str(tmp_path / "from-hub"), "--vision-heads", "4",
                   "--hub-endpoint", server.base])
    finally:
        server.close()
    assert rc == 0, capsys.readouterr().err
    assert main(["convert", "reference", str(ref), str(tmp_path / "local"), "--vision-heads", "4"]) == 0
    for part in ("", "llm", "vision"):
        hub, local = read_tensors(tmp_path / "from-hub" / part), read_tensors(tmp_path / "local" / part)
        assert hub.keys() == local.keys() and all(hub[k].equal(local[k]) for k in hub)
    fetched = {p.rsplit("/", 1)[-1] for m, p in server.requests if "/resolve/" in p}
    assert "config.json" in fetched and not fetched & {"README.md", "demo.png"}  # config, tokenizer, weights only
