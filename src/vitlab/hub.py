"""Upload run artefacts to, and download them from, a Hugging Face Hub repository (the
classic-vs-differential project's `upload`, `download` and `train --upload`).

The repository comes from HF_REPOSITORY ("user/name", or its https://huggingface.co/... address; a
"datasets/" or "spaces/" prefix selects that repository type) and the token from HF_TOKEN, each read from the
environment first, then from a `.env` file in the working directory. The token is handed to huggingface_hub
and nowhere else: it is not printed, logged, or written into configs, checkpoints or reports, and every error
message is scrubbed of it.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from .errors import VitlabError

HUB = "https://huggingface.co"


@dataclass(frozen=True)
class HubTarget:
    repo_id: str
    repo_type: str = "model"
    token: str | None = field(default=None, repr=False)
    endpoint: str = HUB


def read_settings(environ: Mapping[str, str] | None = None, dotenv: str | Path = ".env") -> dict[str, str]:
    """HF_REPOSITORY / HF_TOKEN / HF_ENDPOINT: the environment wins over `.env`."""
    from dotenv import dotenv_values

    environ = os.environ if environ is None else environ
    file_values = dotenv_values(dotenv) if Path(dotenv).is_file() else {}
    keys = ("HF_REPOSITORY", "HF_TOKEN", "HF_ENDPOINT")
    return {k: v for k in keys if (v := environ.get(k) or file_values.get(k))}


def hub_target(need_token: bool, environ: Mapping[str, str] | None = None,
               dotenv: str | Path = ".env") -> HubTarget:
    settings = read_settings(environ, dotenv)
    repo = settings.get("HF_REPOSITORY")
    if not repo:
        raise VitlabError("HF_REPOSITORY is not set: export HF_REPOSITORY=user/name (or put it in .env)")
    token = settings.get("HF_TOKEN")
    if need_token and not token:
        raise VitlabError("HF_TOKEN is not set: export HF_TOKEN=<a write token from huggingface.co/settings/tokens>"
                          " (or put it in .env)")
    endpoint = settings.get("HF_ENDPOINT", HUB).rstrip("/")
    repo_id, repo_type = parse_repository(repo, endpoint)
    return HubTarget(repo_id, repo_type, token, endpoint)


def parse_repository(repo: str, endpoint: str = HUB) -> tuple[str, str]:
    """'user/name', 'datasets/user/name' or a Hub address -> (repo_id, repo_type)."""
    path = repo.strip().removesuffix("/")
    for prefix in (endpoint + "/", HUB + "/"):
        path = path.removeprefix(prefix)
    parts = path.split("/")
    repo_type = "model"
    if parts[0] in ("datasets", "spaces") and len(parts) == 3:
        repo_type, parts = parts[0][:-1], parts[1:]
    if len(parts) != 2 or not all(parts):
        raise VitlabError(f"HF_REPOSITORY={repo!r} is not a repository: use user/name or "
                          f"https://huggingface.co/user/name")
    return "/".join(parts), repo_type


@contextmanager
def hub_errors(target: HubTarget) -> Iterator[None]:
    """Turn huggingface_hub / network failures into one VitlabError line (without the token)."""
    from huggingface_hub import errors as hf_errors

    def clean(text: str) -> str:
        return text.replace(target.token, "***") if target.token else text

    where = f"{target.repo_type} repository {target.repo_id}"
    try:
        yield
    except hf_errors.RepositoryNotFoundError as exc:  # the Hub answers 401 for bad tokens and hidden repos alike
        if exc.response is not None and exc.response.status_code == 401:
            raise VitlabError(f"the Hub refused access to {where} (HTTP 401): HF_TOKEN is invalid or cannot see "
                              f"the repository; check HF_TOKEN and HF_REPOSITORY") from None
        raise VitlabError(f"{where} was not found on {target.endpoint}, or HF_TOKEN cannot see it: check "
                          f"HF_REPOSITORY and the token's access") from None
    except hf_errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status in (401, 403):
            raise VitlabError(f"the Hub refused access to {where} (HTTP {status}): HF_TOKEN must be a valid token "
                              f"with write access") from None
        first = clean(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
        raise VitlabError(f"the Hub answered HTTP {status} for {where}: {first}") from None
    except (ConnectionError, TimeoutError, socket.gaierror, hf_errors.OfflineModeIsEnabled,
            *_transport_errors()) as exc:  # network only: a local disk error must not read as "unreachable"
        reason = clean(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
        raise VitlabError(f"cannot reach the Hugging Face Hub at {target.endpoint} ({reason}): check the network "
                          f"or HF_ENDPOINT") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection errors (huggingface_hub >= 1 uses httpx2 or httpx; older, requests)."""
    errors: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _api(target: HubTarget):
    from huggingface_hub import HfApi

    return HfApi(endpoint=target.endpoint, token=target.token)


def upload(local_path: str | Path, remote_dir: str, target: HubTarget | None = None) -> list[str]:
    """Put a file or a directory into `remote_dir` of the repository (as remote_dir/<its name>); returns the
    paths written in the repository."""
    target = target or hub_target(need_token=True)
    path = Path(local_path)
    if not path.exists():
        raise VitlabError(f"'{local_path}' does not exist; nothing to upload")
    dest = "/".join(p for p in (remote_dir.strip("/"), path.name) if p and p != ".")
    api = _api(target)
    with hub_errors(target):
        if path.is_file():
            api.upload_file(path_or_fileobj=str(path), path_in_repo=dest, repo_id=target.repo_id,
                            repo_type=target.repo_type, commit_message=f"vitlab: upload {dest}")
            return [dest]
        files = sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file())
        api.upload_folder(folder_path=str(path), path_in_repo=dest, repo_id=target.repo_id,
                          repo_type=target.repo_type, commit_message=f"vitlab: upload {dest}/")
        return [f"{dest}/{f}" for f in files]


def upload_files(files: dict[str, Path], target: HubTarget | None = None,
                 message: str = "vitlab: upload run") -> list[str]:
    """One commit of `{path in repo: local file}`; returns the repository paths."""
    from huggingface_hub import CommitOperationAdd

    target = target or hub_target(need_token=True)
    ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for dest, src in files.items()]
    with hub_errors(target):
        _api(target).create_commit(repo_id=target.repo_id, repo_type=target.repo_type, operations=ops,
                                   commit_message=message)
    return list(files)


def download(remote_path: str, local_dir: str | Path, target: HubTarget | None = None) -> list[Path]:
    """Fetch a file, or every file under a directory, of the repository into `local_dir` (as
    local_dir/<its name>, keeping the layout below it); returns the local files."""
    target = target or hub_target(need_token=False)
    remote = remote_path.strip("/")
    api = _api(target)
    with hub_errors(target):
        files = api.list_repo_files(target.repo_id, repo_type=target.repo_type)
        wanted = [remote] if remote in files else [f for f in files if f.startswith(remote + "/") or not remote]
        if not wanted:
            raise VitlabError(f"'{remote_path}' is not in {target.repo_type} repository {target.repo_id} "
                              f"({len(files)} files there)")
        parent = remote.rpartition("/")[0]  # kept layout: paths below the requested item's folder
        out, written = Path(local_dir), []
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".download-") as tmp:  # same disk: moves are renames
            for name in wanted:
                got = Path(api.hf_hub_download(target.repo_id, name, repo_type=target.repo_type, local_dir=tmp))
                dest = out / (name[len(parent) + 1:] if parent else name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(got), dest)
                written.append(dest)
    return written
