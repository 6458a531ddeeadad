"""Reading what vitlab does not trust: files in run directories (which may come from a download or another
user), YAML stored in checkpoints, and image files. Each reader refuses with one line (a VitlabError)
instead of following a symbolic link out of its folder, blocking on a FIFO or device, reading without bound,
or expanding a YAML alias bomb.

- `inside(root, path)`: `path` resolved (symbolic links followed) must stay under `root`.
- `regular(path, what)`: an existing regular file (not a folder, FIFO, device or socket), optionally not a
  symbolic link and at most `limit` bytes; `read_bytes` / `read_text` read one that way, without blocking.
- `load_yaml(text, what)`: yaml.safe_load with the text's size, nesting and alias-expanded node count bounded
  (and, with `unique_keys`, a repeated mapping key refused); `parse_yaml` the same leaving YAML's syntax errors
  to the caller.
- `open_image(path, channels)`: a PIL image in "RGB" or "L" with pixel count and file kind checked first, and
  16-bit / 32-bit / float images scaled to 8 bits (not clipped to white).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from .errors import VitlabError

MiB = 1 << 20
YAML_MAX_CHARS = 4 * MiB
YAML_MAX_DEPTH = 200  # levels of [ / { nesting; vitlab's own configs have 2
YAML_MAX_NODES = 200_000  # after alias expansion; a resolved config has a few hundred
IMAGE_MAX_PIXELS = 64_000_000  # 8000 x 8000; predict resizes to the model's input anyway
IMAGE_MAX_BYTES = 512 * MiB


def inside(root: str | Path, path: str | Path, what: str = "file") -> Path:
    """`path` with symbolic links resolved, refused unless it stays under `root` (also resolved)."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise VitlabError(f"{what} '{path}' leads outside '{root}' (a symbolic link or '..'); vitlab reads only "
                          f"inside it: remove the link or use a new run directory")
    return path_r


def regular(path: str | Path, what: str = "file", limit: int | None = None,
            allow_symlink: bool = True) -> os.stat_result:
    """The stat of `path` after checking it is a regular file of at most `limit` bytes (FileNotFoundError when
    it does not exist)."""
    path = Path(path)
    if not allow_symlink and path.is_symlink():
        raise VitlabError(f"{what} '{path}' is a symbolic link; vitlab does not follow links in run directories: "
                          f"remove it or use a new run directory")
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise VitlabError(f"{what} '{path}' is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise VitlabError(f"{what} '{path}' is not a regular file (a FIFO, device or socket); pass a file")
    if limit is not None and st.st_size > limit:
        raise VitlabError(f"{what} '{path}' is {st.st_size / MiB:.1f} MiB, more than the {limit / MiB:.0f} MiB "
                          f"such a file can be; it is not one vitlab wrote")
    return st


def read_bytes(path: str | Path, what: str = "file", limit: int = 64 * MiB, allow_symlink: bool = True) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; opened without blocking and checked again once open
    (a file swapped for a FIFO or link in between is refused too)."""
    regular(path, what, limit, allow_symlink)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not allow_symlink:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == getattr(__import__("errno"), "ELOOP", None):
            raise VitlabError(f"{what} '{path}' is a symbolic link; vitlab does not follow links in run "
                              f"directories") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise VitlabError(f"{what} '{path}' is not a regular file; pass a file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise VitlabError(f"{what} '{path}' is larger than the {limit / MiB:.0f} MiB such a file can be")
    return data


def read_text(path: str | Path, what: str = "file", limit: int = 64 * MiB, allow_symlink: bool = True) -> str:
    """`read_bytes` decoded as UTF-8 (one line when it is not)."""
    try:
        return read_bytes(path, what, limit, allow_symlink).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VitlabError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); it is not one vitlab "
                          f"wrote") from None


def load_yaml(text: str, what: str = "stored config", max_nodes: int = YAML_MAX_NODES, unique_keys: bool = False):
    """yaml.safe_load of text vitlab did not write itself, refusing what would take unbounded time or memory:
    text over YAML_MAX_CHARS, nesting deeper than Python's recursion allows, and aliases that expand to more
    than `max_nodes` nodes (a "billion laughs" document is a few hundred bytes). `unique_keys`: a mapping that
    repeats a key is refused too (YAML would keep the last silently). Every refusal is one line."""
    try:
        return parse_yaml(text, what, max_nodes, unique_keys)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitlabError(f"{what} is not plain YAML vitlab can read ({first})") from None


def parse_yaml(text: str, what: str = "stored config", max_nodes: int = YAML_MAX_NODES, unique_keys: bool = False):
    """`load_yaml` with YAML's own errors (yaml.YAMLError: bad syntax, a foreign tag) left to the caller, for
    callers that word them themselves (a config file's line, an override read as a plain string); the bounds
    are still one-line VitlabErrors."""
    if len(text) > YAML_MAX_CHARS:
        raise VitlabError(f"{what} is {len(text)} characters, more than vitlab reads ({YAML_MAX_CHARS})")
    if text.count("[") + text.count("{") > YAML_MAX_DEPTH and _flow_depth(text) > YAML_MAX_DEPTH:
        raise VitlabError(f"{what} is nested too deeply to be a config (over {YAML_MAX_DEPTH} levels of [ or {{)")
    loader = (_UniqueKeyLoader if unique_keys else yaml.SafeLoader)(text)
    loader.what = what
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, max_nodes) > max_nodes:
            raise VitlabError(f"{what} expands to more than {max_nodes} values through YAML aliases (an alias "
                              f"bomb?); refusing to expand it")
        return loader.construct_document(node)
    except RecursionError:
        raise VitlabError(f"{what} is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _flow_depth(text: str) -> int:
    """The deepest nesting of YAML flow collections ([ and {) outside quotes and comments, stopping past
    YAML_MAX_DEPTH, in one linear pass (PyYAML takes seconds to reach its own recursion limit, ~450 levels).
    An apostrophe in a plain word hides the rest of its line (an undercount, harmless); brackets inside
    plain or block scalars count, which no config holds 200 deep."""
    depth = deepest = 0
    quote = None
    for line in text.splitlines():
        for i, ch in enumerate(line):
            if quote:
                if ch == quote and not (quote == '"' and i and line[i - 1] == "\\"):
                    quote = None
            elif ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
                if deepest > YAML_MAX_DEPTH:
                    return deepest
            elif ch in "]}":
                depth = max(depth - 1, 0)
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
                break
        if quote == "'":
            quote = None  # a single-quoted scalar may span lines, but an apostrophe in a word must not hide the rest
    return deepest


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a mapping that names a key twice (keys a `<<` merge brings may still be overridden)."""

    what = "YAML"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=False), key_node.start_mark.line + 1
                if key in seen:
                    where = f"lines {seen[key]} and {line}" if seen[key] != line else f"both on line {line}"
                    raise VitlabError(f"{self.what} names key {str(key)[:80]!r} twice ({where}); YAML would "
                                      f"silently keep only the last: delete one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict[int, int], cap: int) -> int:
    """Nodes in the document with every alias expanded (each shared node counted once per use), stopping past
    `cap`; memoised, so a bomb costs as much as its text."""
    if id(node) in memo:
        return memo[id(node)]
    n = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            n += _expanded_size(child, memo, cap)
            if n > cap:
                break
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            n += _expanded_size(key, memo, cap) + _expanded_size(value, memo, cap)
            if n > cap:
                break
    memo[id(node)] = n
    return n


def open_image(path: str | Path, channels: int):
    """A PIL image of `path` in "RGB" (channels == 3) or "L", decoded; one line for a folder, a FIFO or device,
    a missing or undecodable file, or more than IMAGE_MAX_PIXELS pixels (checked from the header, before
    decoding). 16-bit, 32-bit integer and floating-point images are scaled to 8 bits by their range."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        regular(path, "image", IMAGE_MAX_BYTES)
    except FileNotFoundError:
        raise VitlabError(f"image '{path}' not found") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked just below
            with Image.open(path) as im:
                w, h = im.size
                if w * h > IMAGE_MAX_PIXELS:
                    raise VitlabError(f"image '{path}' is {w}x{h} pixels, more than the {IMAGE_MAX_PIXELS:,} "
                                      f"vitlab decodes; downscale it first")
                im.load()
                return _to_8bit(im).convert("RGB" if channels == 3 else "L")
    except Image.DecompressionBombError:
        raise VitlabError(f"image '{path}' declares more pixels than vitlab decodes ({IMAGE_MAX_PIXELS:,}), "
                          f"a decompression bomb or a huge scan; downscale it first") from None
    except UnidentifiedImageError:
        raise VitlabError(f"'{path}' is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:  # e.g. a truncated file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VitlabError(f"image '{path}' cannot be decoded ({reason}); is the file complete?") from None


def _to_8bit(im):
    """Images with more than 8 bits per sample as 8-bit "L": integers by their bit depth (16-bit: /257),
    floats in [0, 1] as fractions, anything else by its own min..max; NaN and inf as 0."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    import numpy as np
    from PIL import Image

    a = np.asarray(im).astype(np.float64)
    a[~np.isfinite(a)] = 0.0
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode == "F":
        scaled = a if lo >= 0.0 and hi <= 1.0 else (a - lo) / (hi - lo or 1.0)
    elif lo >= 0 and hi <= 65535:
        scaled = a / 65535.0 if hi > 255 or im.mode.startswith("I;16") else a / 255.0
    else:
        scaled = (a - lo) / (hi - lo or 1.0)
    return Image.fromarray(np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8))
