"""An in-memory Hugging Face Hub behind huggingface_hub's own HTTP client (httpx2.MockTransport): the real
library code runs, only the network is replaced. It records every request and keeps committed files."""
from __future__ import annotations

import base64
import hashlib
import json
import re

import httpx2
import huggingface_hub
from huggingface_hub.utils import _http

COMMIT = "c" * 40


class FakeHub:
    """One repository; `repo_type="dataset"` serves it as a dataset repository (what `datasets` reads)."""

    def __init__(self, repo: str = "alice/vits", files: dict[str, bytes] | None = None, down: bool = False,
                 repo_type: str = "model", gated: bool = False):
        self.repo, self.files, self.down, self.gated = repo, dict(files or {}), down, gated
        self.kind = "datasets" if repo_type == "dataset" else "models"
        self.requests: list[httpx2.Request] = []
        self.commits: list[dict] = []
        self.cards: list[str] = []  # README.md texts sent for validation

    def install(self) -> "FakeHub":
        huggingface_hub.set_client_factory(lambda: httpx2.Client(
            transport=httpx2.MockTransport(self.handle), follow_redirects=True,
            event_hooks={"request": [_http.hf_request_event_hook]}))
        return self

    @staticmethod
    def uninstall() -> None:
        huggingface_hub.set_client_factory(_http.default_client_factory)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if self.down:
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        path = request.url.path
        if path == "/api/repos/create":  # create_repo(exist_ok=True): this one repository exists
            return httpx2.Response(409 if json.loads(request.content).get("name") else 400,
                                   json={"error": "You already created this model repo", "url":
                                         f"https://huggingface.co/{self.repo}"})
        if path == "/api/validate-yaml":  # a model card's front matter, checked before the commit
            self.cards.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        api = f"/api/{self.kind}/{self.repo}"
        files_at = f"/{self.repo}/" if self.kind == "models" else f"/datasets/{self.repo}/"
        if not path.startswith((api, files_at)):
            if path.startswith(f"/api/{self.kind}/") or re.match(r"^(/datasets)?/[^/]+/[^/]+/resolve/", path):
                return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"},
                                       json={"error": "Repository not found"})
            return httpx2.Response(404, json={"error": "not here"})
        if request.headers.get("authorization") not in (None, "Bearer hf_GOODTOKEN123"):
            return httpx2.Response(401, json={"error": "Invalid credentials in Authorization header"})
        if self.gated and request.headers.get("authorization") is None:
            return httpx2.Response(401, headers={"X-Error-Code": "GatedRepo"},
                                   json={"error": "Access to model is restricted; you must have access to it"})
        if path == f"{api}/preupload/main":
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if path == f"{api}/commit/main":
            lines = [json.loads(x) for x in request.content.decode().splitlines()]
            commit = {"summary": lines[0]["value"]["summary"], "files": {}}
            for line in lines[1:]:
                value = line["value"]
                commit["files"][value["path"]] = base64.b64decode(value["content"])
            self.files.update(commit["files"])
            self.commits.append(commit)
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{self.repo}/commit/{COMMIT}",
                                              "commitOid": COMMIT, "pullRequestUrl": None})
        if path in (api, f"{api}/revision/main", f"{api}/revision/{COMMIT}"):
            return httpx2.Response(200, json={"id": self.repo, "sha": COMMIT, "private": False,
                                              "siblings": [{"rfilename": p} for p in sorted(self.files)]})
        tree = re.match(rf"^{api}/tree/(main|{COMMIT})/?(.*)$", path)
        if tree:  # one folder's entries (`recursive=true`: everything below it)
            return httpx2.Response(200, json=self._tree(tree.group(2), request.url.params.get("recursive")))
        resolve = re.match(rf"^{files_at}resolve/(main|{COMMIT})/(.*)$", path)
        if resolve:
            name = resolve.group(2)
            if name not in self.files:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT},
                                       json={"error": "no entry"})
            body = self.files[name]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_sha(body)}"', "Content-Length": str(len(body))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body)
        return httpx2.Response(404, json={"error": f"unhandled {request.method} {path}"})


    def _tree(self, folder: str, recursive) -> list[dict]:
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        below = [p for p in sorted(self.files) if p.startswith(prefix)]
        if recursive in ("true", "True", "1"):
            dirs = sorted({"/".join(p.split("/")[:i]) for p in below for i in range(prefix.count("/") + 1,
                                                                                  p.count("/") + 1)})
            files = below
        else:
            dirs = sorted({prefix + p[len(prefix):].split("/")[0] for p in below if "/" in p[len(prefix):]})
            files = [p for p in below if "/" not in p[len(prefix):]]
        return ([{"type": "directory", "path": d, "oid": "0" * 40} for d in dirs]
                + [{"type": "file", "path": p, "size": len(self.files[p]), "oid": _sha(self.files[p])} for p in files])


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()
