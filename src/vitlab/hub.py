"""Upload run artefacts to, and download them from, a Hugging Face Hub repository (the
classic-vs-differential project's `upload`, `download` and `train --upload`).

The repository comes from HF_REPOSITORY ("user/name", or its https://huggingface.co/... address; a
"datasets/" or "spaces/" prefix selects that repository type) and the token from HF_TOKEN, each read from the
environment first, then from a `.env` file in the working directory. The token is handed to huggingface_hub
and nowhere else: it is not printed, logged, or written into configs, checkpoints or reports. It is checked
before use (printable ASCII without spaces: a `\r` from a Windows file would otherwise reach an HTTP
header and its error message), and once read it is scrubbed, raw and in its escaped forms, from every error
vitlab raises, every log record (the libraries' too) and any traceback. `upload` never sends `.env` files or
any file holding the token; `download` refuses repository paths that would leave the target folder.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
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
    if token:
        remember_secret(token)
        check_token(token)
    if need_token and not token:
        raise VitlabError("HF_TOKEN is not set: export HF_TOKEN=<a write token from huggingface.co/settings/tokens>"
                          " (or put it in .env)")
    endpoint = settings.get("HF_ENDPOINT", HUB).rstrip("/")
    repo_id, repo_type = parse_repository(repo, endpoint)
    return HubTarget(repo_id, repo_type, token, endpoint)


# -- the token -------------------------------------------------------------------------------------------------
_SECRETS: set[str] = set()
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: what an HTTP header carries as is


def check_token(token: str) -> None:
    """One line (never the token) when HF_TOKEN holds what no token has: whitespace, control or non-ASCII."""
    if _TOKEN_CHARS.fullmatch(token):
        return
    bad = next(c for c in token if not _TOKEN_CHARS.fullmatch(c))
    kind = {"\r": "a carriage return (a Windows line ending?)", "\n": "a line break", "\t": "a tab",
            " ": "a space"}.get(bad, "a non-ASCII character" if ord(bad) > 127 else "a control character")
    raise VitlabError(f"HF_TOKEN holds characters a token cannot ({kind}); set it again to the token alone "
                      f"(letters, digits and _ from huggingface.co/settings/tokens)")


def remember_secret(token: str) -> None:
    """From now on `redact` removes `token` (and its escaped forms) from log records and tracebacks too."""
    if token and token not in _SECRETS:
        _SECRETS.add(token)
        _install_redaction()


def _forms(secret: str) -> set[str]:
    """The ways a secret shows up in messages: as is, stripped, repr-escaped (str and bytes), URL-quoted."""
    forms = {secret, secret.strip(), repr(secret)[1:-1], secret.encode("unicode_escape").decode("ascii"),
             repr(secret.encode("utf-8", "surrogateescape"))[2:-1], urllib.parse.quote(secret, safe=""),
             repr(secret.encode("latin-1", "replace"))[2:-1]}
    return {f for f in forms if len(f) >= 4}


def redact(text: str, secrets: set[str] | None = None) -> str:
    """`text` without any remembered secret, in any of its forms (longest first)."""
    if not isinstance(text, str):
        text = str(text)
    for secret in secrets if secrets is not None else list(_SECRETS):
        for form in sorted(_forms(secret), key=len, reverse=True):
            text = text.replace(form, "***")
    return text


_installed = False


def _install_redaction() -> None:
    """Scrub remembered secrets from every log record (any library's), warning and uncaught traceback."""
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return record
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
    excepthook = sys.excepthook

    def hook(kind, value, tb):
        import traceback
        try:
            sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))
        except Exception:
            excepthook(kind, value, tb)

    sys.excepthook = hook
    import warnings
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda *a, **k: redact(formatwarning(*a, **k))


# -- names ------------------------------------------------------------------------------------------------------
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")


def repo_path(text: str, what: str) -> str:
    """A path inside a repository ('' for its root), refused when it could leave a folder: '..' or '.'
    components, backslashes, control characters."""
    path = "" if text.strip("/") == "." else text.strip("/")  # '.': the repository's root
    parts = path.split("/") if path else []
    if any(p in ("", ".", "..") for p in parts) or "\\" in path or any(ord(c) < 32 or c == "\x7f" for c in path):
        raise VitlabError(f"{what} {text!r} is not a plain path inside the repository ('..', '.', empty parts, "
                          f"backslashes and control characters are refused)")
    return path


def parse_repository(repo: str, endpoint: str = HUB) -> tuple[str, str]:
    """'user/name', 'datasets/user/name' or a Hub address -> (repo_id, repo_type)."""
    path = repo.strip().removesuffix("/")
    for prefix in (endpoint + "/", HUB + "/"):
        path = path.removeprefix(prefix)
    parts = path.split("/")
    repo_type = "model"
    if parts[0] in ("datasets", "spaces") and len(parts) == 3:
        repo_type, parts = parts[0][:-1], parts[1:]
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) and ".." not in p for p in parts):
        raise VitlabError(f"HF_REPOSITORY={repo!r} is not a repository: use user/name or "
                          f"https://huggingface.co/user/name")
    return "/".join(parts), repo_type


@contextmanager
def hub_errors(target: HubTarget) -> Iterator[None]:
    """Turn huggingface_hub / network failures into one VitlabError line (without the token)."""
    from huggingface_hub import errors as hf_errors

    def clean(text: str) -> str:
        return redact(text, {target.token} | _SECRETS if target.token else None)

    where = f"{target.repo_type} repository {target.repo_id}"
    retries: list[str] = []
    try:
        with quiet_retries(retries):
            yield
    except VitlabError:
        raise
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
            *transport_errors()) as exc:  # network only: a local disk error must not read as "unreachable"
        reason = clean(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
        tries = f", {len(retries) + 1} tries" if retries else ""
        raise VitlabError(f"cannot reach the Hugging Face Hub at {target.endpoint} ({reason}{tries}): check the "
                          f"network or HF_ENDPOINT") from None
    except (ValueError, TypeError, KeyError) as exc:  # the client refusing a name, header or answer
        reason = clean(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitlabError(f"the Hub client refused the request for {where} ({reason})") from None


_RETRY_WORDS = ("thrown while requesting", "Retrying in", "[Retry ", "Rate limited")


@contextmanager
def quiet_retries(retries: list[str]) -> Iterator[None]:
    """huggingface_hub logs every retry of a failed request as a warning of its own (on a refused connection:
    an error and a "Retrying in 8s [Retry 4/5]" line each time, 11 lines before vitlab's one). Here they are
    kept in `retries` instead, and the final error says how many tries there were."""
    try:
        from huggingface_hub.utils import _http
        logger = _http.logger
    except (ImportError, AttributeError):  # another huggingface_hub layout: its messages are left as they are
        yield
        return

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno <= logging.WARNING and any(w in message for w in _RETRY_WORDS):
            if "[Retry " in message:  # one per retry ("Retrying in 1s [Retry 1/5].")
                retries.append(redact(message))
            return False
        return True

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def transport_errors() -> tuple[type[BaseException], ...]:
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
    remote = repo_path(remote_dir, "the remote folder")
    name = path.resolve().name if path.name == ".." else path.name  # '.': its files go into remote_dir itself
    dest = "/".join(p for p in (remote, name) if p)
    scanned: dict[Path, Scanned] = {}
    if path.is_file():
        why = _private(path, target.token, scanned)
        if why:
            raise VitlabError(f"not uploading '{local_path}': {why}")
        _check_regular(path)
        return upload_files({dest: path}, target, f"vitlab: upload {dest}", scanned)
    files, skipped = _folder_files(path, target.token, scanned)
    if skipped:
        print(f"vitlab: not uploading {', '.join(skipped[:5])}" + (f" (+{len(skipped) - 5})" if len(skipped) > 5
              else "") + ": secrets (.env or HF_TOKEN inside) or links leaving the folder", file=sys.stderr)
    if not files:
        raise VitlabError(f"'{local_path}' holds no file to upload" + (" (every file was held back)" if skipped
                                                                       else ""))
    return upload_files({f"{dest}/{rel}": f for rel, f in files.items()}, target, f"vitlab: upload {dest}/",
                        scanned)


_NEVER_UPLOADED = (".git", ".lock")  # git's folder (as huggingface_hub's upload_folder) and a run's lock


#: A file's identity and state: (device, inode, size, mtime_ns, ctime_ns). Any write changes ctime, which no
#: user call can set back; within one timestamp tick it may not (coarse kernel clocks), hence RACY_NS below.
Scanned = tuple[int, int, int, int, int]
RACY_NS = 2_000_000_000  # a file changed this close before its scan began is scanned again at the commit


def _signature(file: Path) -> Scanned | None:
    try:
        st = os.stat(file)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _private(file: Path, token: str | None, scanned: dict[Path, Scanned] | None = None) -> str | None:
    """Why `file` must not leave this machine: a .env file, or one holding the token; None if it may.

    With `scanned`, a file found clean is recorded there with the signature it had before its scan, if the
    signature was the same after it and the file had not been changed in the RACY_NS before; a later call
    with the same dict skips the reading when the signature is still that (the file was not written since,
    so it still holds no token). A multi-GB checkpoint is then read once by the folder's listing, not again
    at the commit gate."""
    if file.name == ".env" or file.name.startswith(".env."):
        return "it is a .env file (it holds HF_TOKEN and other secrets)"
    if not token:
        return None
    key = Path(os.path.abspath(file))
    before = _signature(file)
    if scanned is not None and before is not None and scanned.get(key) == before:
        return None
    started = time.time_ns()
    if _holds(file, token.encode("utf-8", "surrogateescape")):
        return "it holds HF_TOKEN"
    if scanned is not None and before is not None and _signature(file) == before \
            and before[4] < started - RACY_NS and before[3] < started - RACY_NS:
        scanned[key] = before
    return None


def _holds(file: Path, secret: bytes) -> bool:
    """Whether `file` contains `secret` (read in blocks, overlapping by the secret's length)."""
    tail = b""
    try:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                if secret in tail + block:
                    return True
                tail = block[-len(secret):]
    except OSError:
        return True  # unreadable here: the upload would fail on it anyway; hold it back
    return False


def _check_regular(file: Path) -> None:
    from .untrusted import regular

    regular(file, "file to upload")


def _folder_files(folder: Path, token: str | None, scanned: dict[Path, Scanned] | None = None
                  ) -> tuple[dict[str, Path], list[str]]:
    """{path below `folder`: file} to upload, and the files held back (secrets, links leaving the folder,
    FIFOs and devices); the files found clean are recorded in `scanned` (see `_private`)."""
    import stat as st

    root, files, skipped = folder.resolve(), {}, []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in _NEVER_UPLOADED and not (here / d).is_symlink())
        for fname in sorted(filenames):
            f = here / fname
            rel = f.relative_to(folder).as_posix()
            if fname in _NEVER_UPLOADED:
                continue
            try:
                real = f.resolve()
                mode = os.stat(f).st_mode
            except OSError:  # a dangling link
                skipped.append(rel)
                continue
            if not st.S_ISREG(mode) or (root not in real.parents) or _private(f, token, scanned):
                skipped.append(rel)
                continue
            files[rel] = f
    return files, skipped


def upload_files(files: dict[str, Path], target: HubTarget | None = None, message: str = "vitlab: upload run",
                 scanned: dict[Path, Scanned] | None = None) -> list[str]:
    """One commit of `{path in repo: local file}`; returns the repository paths. Every file is checked for
    the token here (`train --upload` comes only this way); one that `scanned` shows unchanged since an earlier
    scan found it clean is not read again."""
    from huggingface_hub import CommitOperationAdd

    target = target or hub_target(need_token=True)
    scanned = {} if scanned is None else scanned
    held = [dest for dest, src in files.items() if _private(Path(src), target.token, scanned)]
    if held:
        raise VitlabError(f"not uploading {', '.join(held[:3])}: it holds HF_TOKEN or is a .env file")
    ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for dest, src in files.items()]
    with hub_errors(target):
        _api(target).create_commit(repo_id=target.repo_id, repo_type=target.repo_type, operations=ops,
                                   commit_message=message)
    return list(files)


def ensure_repo(target: HubTarget, private: bool = False) -> None:
    """Create the repository when it does not exist (`vitlab push`); an existing one is left as it is."""
    with hub_errors(target):
        _api(target).create_repo(target.repo_id, repo_type=target.repo_type, private=private, exist_ok=True)


def download(remote_path: str, local_dir: str | Path, target: HubTarget | None = None) -> list[Path]:
    """Fetch a file, or every file under a directory, of the repository into `local_dir` (as
    local_dir/<its name>, keeping the layout below it); returns the local files."""
    target = target or hub_target(need_token=False)
    remote = repo_path(remote_path, "the remote path")
    api = _api(target)
    with hub_errors(target):
        files = api.list_repo_files(target.repo_id, repo_type=target.repo_type)
        wanted = [remote] if remote in files else [f for f in files if f.startswith(remote + "/") or not remote]
        if not wanted:
            raise VitlabError(f"'{remote_path}' is not in {target.repo_type} repository {target.repo_id} "
                              f"({len(files)} files there)")
        for name in wanted:  # a hostile listing: refused before anything is fetched
            repo_path(name, f"{target.repo_type} repository {target.repo_id} lists a path")
        parent = remote.rpartition("/")[0]  # kept layout: paths below the requested item's folder
        out, written = Path(local_dir), []
        out.mkdir(parents=True, exist_ok=True)
        from .untrusted import inside
        for name in wanted:
            inside(out, out / (name[len(parent) + 1:] if parent else name), "download target")
        with tempfile.TemporaryDirectory(dir=out, prefix=".download-") as tmp:  # same disk: moves are renames
            for name in wanted:
                got = Path(api.hf_hub_download(target.repo_id, name, repo_type=target.repo_type, local_dir=tmp))
                dest = out / (name[len(parent) + 1:] if parent else name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(got), dest)
                written.append(dest)
    return written
