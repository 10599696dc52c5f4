"""Writing results: atomic files, manifests with provenance, cache location, hashing.

Every artifact dpolens writes is safetensors, JSON, JSONL or parquet, written to a temporary
file in the same folder and renamed into place, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

DEFAULT_CACHE = Path.home() / ".cache" / "dpolens"
MARKER = ".dpolens-stage.json"  # a pipeline stage's key and state, in its folder


class DpolensError(Exception):
    """An error caused by input or environment; the CLI prints it as one line and exits 2."""


class InputFileError(DpolensError):
    """An input file that is missing, unreadable or not what it should be (YAML, JSON, safetensors)."""


class OutputLocationError(DpolensError):
    """An output path that is in the way (a file where a folder goes, or the reverse) or not writable."""


class ResumeMismatchError(DpolensError):
    """Partial results in an output folder were made by another model or with other settings."""


def check_output(path: str | Path, is_file: bool = False) -> None:
    """Refuse, before any compute, an output that cannot be written: a folder where a file goes,
    a file where a folder goes (or on its parent path), or a location that is not writable."""
    p = Path(path)
    if p.exists() and p.is_dir() == is_file:
        kind = "a folder" if p.is_dir() else "a file"
        raise OutputLocationError(f"output {p} is {kind}; a {'file' if is_file else 'folder'} goes there")
    parent = p if p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputLocationError(f"output {p} cannot be made: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputLocationError(f"output {p} cannot be written: {parent} is not writable")


def check_not_input(target: str | Path, *inputs: str | Path | None) -> None:
    """Refuse an output folder that is, or holds, one of the inputs: replacing the model being
    trained or edited would destroy it and leave later comparisons reading the new weights as the old."""
    t = Path(target).resolve()
    for inp in inputs:
        if inp and Path(inp).exists():
            i = Path(inp).resolve()
            if i == t or t in i.parents:
                raise OutputLocationError(f"output {target} would replace the input model {inp}; choose another --out")


def remove_if_no_files(path: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Remove folder `path` if it holds no files (besides those named in `ignore`): what a refused
    command created, never results that a resume could use."""
    import shutil

    p = Path(path)
    if p.is_dir() and not any(f.is_file() and f.name not in ignore for f in p.rglob("*")):
        shutil.rmtree(p, ignore_errors=True)


def check_resume(path: str | Path, identity: dict, what: str, resuming: bool = True) -> None:
    """Record `identity` (what shapes the partial results in `what`) at `path`; when `resuming` (there
    are partial results), refuse if the recorded one differs: a resume under another model or other
    settings would mix two runs."""
    old = read_json(path) if resuming else None
    if resuming and not isinstance(old, dict):
        raise ResumeMismatchError(f"{what} has no record of the model and settings that made it ({path}): "
                                  "remove it or use another --out to start over")
    if resuming and old != json.loads(json.dumps(identity, default=_json_default)):
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        diff = [k for k in diff if k != "key"] or diff  # a `key` hashing the others differs with them
        raise ResumeMismatchError(f"{what} was made with another {' and '.join(diff) or 'identity'}: "
                                  "remove it or use another --out to start over")
    write_json(path, identity)


def read_yaml(source: str | Path, what: str, is_text: bool = False) -> Any:
    """Parse YAML from a file (or, with `is_text`, from a string); a syntax error names `what`."""
    import yaml

    if not is_text:
        p = Path(source)
        if not p.is_file():
            raise InputFileError(f"{what} not found: {p}" if not p.exists() else f"{what} {p} is a folder")
        try:
            source = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputFileError(f"{what} {p} is not UTF-8 text") from None
        what = f"{what} {p}"
    try:
        return yaml.safe_load(source)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise InputFileError(f"{what} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def read_safetensors(path: str | Path, what: str) -> tuple[dict, dict]:
    """All tensors and the metadata of a safetensors file; any other file is refused in one line."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{what} not found: {p}")
    try:
        with safe_open(str(p), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise InputFileError(f"{what} {p} is not a readable safetensors file ({e})") from None


def cache_dir() -> Path:
    """Where fetched assets live: `$DPOLENS_CACHE`, default `~/.cache/dpolens`."""
    return Path(os.environ.get("DPOLENS_CACHE", DEFAULT_CACHE)).expanduser()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _write_dir(path: str | Path, fill) -> None:
    """`fill(tmp)` writes a folder beside `path`, renamed into place once written: a kill never leaves a
    half-written folder."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # as a plain mkdir would (mkdtemp makes it private)
    old = path.with_name(f".{path.name}.old")
    try:
        fill(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)  # set aside, removed once the new folder is in place
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model_dir(path: str | Path, model, tokenizer) -> None:
    """`save_pretrained` of a model and its tokenizer, written atomically (`_write_dir`)."""
    _write_dir(path, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def copy_dir(src: str | Path, path: str | Path) -> None:
    """A copy of the folder `src` at `path`, byte for byte, written atomically (`_write_dir`)."""
    import shutil

    _write_dir(path, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON at `path`, or None when there is no such file (an optional artifact)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path} is not valid JSON (truncated or damaged?): {e}") from None


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append whole lines and flush: a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_complete(path: str | Path) -> list[dict]:
    """Read the complete lines of a JSONL file that may end in a torn line (after a kill)."""
    path = Path(path)
    if not path.exists():
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return rows


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fingerprint(obj: Any, h) -> None:
    """Feed `obj` to hash `h` by value: tensors by their bytes, containers item by item (what the
    evaluation and computation caches key on)."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            fingerprint(str(k), h)
            fingerprint(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for x in obj:
            fingerprint(x, h)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_revision() -> str | None:
    """The git revision of the dpolens checkout, when it is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here, capture_output=True, text=True, timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    names = ["dpolens", "torch", "transformers", "trl", "safetensors", "numpy", "scikit-learn"]
    versions = {"python": platform.python_version()}
    for n in names:
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance(**extra: Any) -> dict:
    """What every manifest records beside the stage's own fields."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "versions": package_versions(),
        **extra,
    }


def write_manifest(out_dir: str | Path, stage: str, config: Any, **extra: Any) -> dict:
    """Write `out_dir/manifest.json`: the stage, its resolved config and provenance."""
    from dataclasses import asdict, is_dataclass

    cfg = asdict(config) if is_dataclass(config) else config
    manifest = {"stage": stage, "config": cfg, **provenance(**extra)}
    write_json(Path(out_dir) / "manifest.json", manifest)
    return manifest
