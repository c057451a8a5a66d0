"""Models from the Hugging Face hub, one command away: `llavao1-edge pull REPO[:QUANT]`, then offline.

    model = pull("ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0")   # a CachedModel: .text and .mmproj paths
    find_cached(ModelRef.parse("ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0"))   # never the network
    cached_models(), remove(ModelRef.parse("ggml-org/SmolVLM-256M-Instruct-GGUF"))

Files are chosen by llama.cpp's rules for `-hf REPO:QUANT`: the first model GGUF whose path matches
`QUANT[.-]` (case-insensitive; without QUANT: Q4_K_M, then Q8_0, then the first model file), and the mmproj
in its folder (or one above) closest in bits to its quantization. Two routes of the hub, plain urllib
(docs/dependencies.md says why not huggingface_hub):

    GET {endpoint}/api/models/{repo}/tree/main?recursive=true   names, sizes, sha256 (lfs.oid), X-Repo-Commit
    GET {endpoint}/{repo}/resolve/{commit}/{file}                the bytes; `Range` continues a partial file

The cache has the hub's own layout, which llama.cpp's `-hf` and huggingface_hub also read:
`models--ORG--NAME/blobs/<sha256>`, `snapshots/<commit>/<file>` (a relative link to the blob), `refs/main`,
plus `llavao1-edge.json`, what each `pull REPO:QUANT` chose, so that opening it again needs no network.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")  # llama.cpp's order when no quantization is asked for
NOT_TEXT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")  # GGUFs that are no text model
RECORD = "llavao1-edge.json"  # in models--ORG--NAME/: what each pull chose
CHUNK = 1 << 20
ENV_TRUE = ("1", "true", "yes", "on")
_REPO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")  # one side of ORG/NAME, as the hub allows
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SPLIT = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$", re.I)  # llama-gguf-split part names
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)

try:  # one downloader per partial file; the lock goes with the process, so a crash leaves none behind
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None


class HubError(ValueError):
    """A hub or cache problem; the message is one line naming the repository or file and what to do."""


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class ModelRef:
    repo: str  # ORG/NAME
    quant: str | None = None  # Q4_K_M, Q8_0, F16 ...; None: llama.cpp's default choice

    @classmethod
    def parse(cls, text: str | ModelRef) -> ModelRef:
        if isinstance(text, ModelRef):
            return text
        repo, colon, quant = text.strip().partition(":")
        sides = repo.split("/")
        if (len(sides) != 2 or not all(_REPO.fullmatch(s) and "--" not in s and ".." not in s for s in sides)
                or (colon and not _QUANT.fullmatch(quant))):
            raise HubError(f"{text!r} is not a Hugging Face model: expected ORG/NAME or ORG/NAME:QUANT "
                           "(e.g. ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0)")
        return cls(repo, quant or None)

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo

    @property
    def folder_name(self) -> str:
        return "models--" + self.repo.replace("/", "--")

    def matches(self, path: str) -> bool:
        """llama.cpp's test for the text file of a quantization: `QUANT[.-]` anywhere, any case."""
        return self.quant is not None and re.search(re.escape(self.quant) + "[.-]", path, re.I) is not None


@dataclass(frozen=True)
class RepoFile:
    path: str  # inside the repository, '/'-separated
    size: int
    sha256: str = ""  # the hub's lfs.oid, what the download must hash to ("" for files not stored with LFS)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """--cache-dir, else $LLAVAO1_CACHE, else the platform's cache folder + llavao1-edge/."""
    chosen = cache_dir or os.environ.get("LLAVAO1_CACHE")
    if chosen:
        return Path(chosen).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
    return base / "llavao1-edge"


def offline_mode(flag: bool | None = None) -> bool:
    """--offline, else HF_HUB_OFFLINE (the hub libraries' variable) or LLAVAO1_OFFLINE."""
    if flag is not None:
        return flag
    return any(os.environ.get(v, "").strip().lower() in ENV_TRUE for v in ("HF_HUB_OFFLINE", "LLAVAO1_OFFLINE"))


# --------------------------------------------------------------------------------------------
# choosing the files, as llama.cpp does (common/download.cpp)


def quant_tag(path: str) -> tuple[str, int, int]:
    """(QUANT upper-cased or "", split part, parts): "d/M-Q4_K_M-00001-of-00002.gguf" -> ("Q4_K_M", 1, 2)."""
    stem = path.removesuffix(".gguf")
    part = parts = 1
    if m := _SPLIT.match(stem):
        stem, part, parts = m.group(1), int(m.group(2)), int(m.group(3))
    tag = _TAG.search(stem)
    return (tag.group(1).upper() if tag else "", part, parts)


def quant_bits(path: str) -> int:
    """Q4_K_M -> 4, Q8_0 -> 8, F16/BF16 -> 16; 0 when the name has no quantization tag."""
    digits = re.search(r"\d+", quant_tag(path)[0])
    return int(digits.group()) if digits else 0


def is_text_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.endswith(".gguf") and not any(k in name for k in NOT_TEXT_MODELS)


def choose_mmproj(files: list[RepoFile], model_path: str) -> RepoFile | None:
    """A .gguf with "mmproj" in its path, in the model's folder or one above it (the deepest first), then the
    one closest in bits to the model's quantization (the first of equals)."""
    model_dir, bits = model_path.split("/")[:-1], quant_bits(model_path)
    best, best_key = None, None
    for f in files:
        folder = f.path.split("/")[:-1]
        if not f.path.endswith(".gguf") or "mmproj" not in f.path or folder != model_dir[:len(folder)]:
            continue
        key = (-len(folder), abs(quant_bits(f.path) - bits))
        if best_key is None or key < best_key:
            best, best_key = f, key
    return best


def choose_files(ref: ModelRef, files: list[RepoFile]) -> tuple[RepoFile, RepoFile]:
    """The text model and the projector `ref` names in a repository's file list."""
    models = [f for f in files if is_text_model(f.path) and quant_tag(f.path)[1] == 1]  # split parts 2.. never match
    quants = ", ".join(dict.fromkeys(quant_tag(f.path)[0] or f.path for f in models))
    if not models:
        raise HubError(f"{ref.repo} has no GGUF model file (llavao1-edge runs llama.cpp's GGUF files; look for a "
                       "repository named ...-GGUF)")
    wanted = [ref] if ref.quant else [ModelRef(ref.repo, q) for q in DEFAULT_QUANTS]
    text = next((f for r in wanted for f in models if r.matches(f.path)), None)
    if text is None and ref.quant:
        raise HubError(f"{ref.repo} has no {ref.quant} file; its quantizations: {quants}")
    text = text or models[0]
    parts = quant_tag(text.path)[2]
    if parts > 1:
        raise HubError(f"{ref.repo}: {text.path} is split into {parts} files, which pull does not support; pick "
                       f"another quantization ({quants}) or merge the parts with llama-gguf-split --merge and pass "
                       "--model and --mmproj")
    mmproj = choose_mmproj(files, text.path)
    if mmproj is None:
        raise HubError(f"{ref.repo} has no mmproj (vision projector) GGUF for {text.path}: it is a text-only model, "
                       "or its projector is in another repository (then download both and pass --model and --mmproj)")
    return text, mmproj


# --------------------------------------------------------------------------------------------
# the hub's HTTP routes


@dataclass
class Hub:
    """The hub's routes over urllib. The token goes only to the endpoint's host, never to a CDN it redirects to."""

    endpoint: str = field(default_factory=lambda: (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"))
    token: str | None = field(default_factory=lambda: os.environ.get("HF_TOKEN") or None)
    timeout_s: float = 30.0  # per connection attempt and per read

    def open(self, url: str, headers: dict[str, str] | None = None, *, repo: str = ""):
        req = urllib.request.Request(url, headers={"User-Agent": "llavao1-edge", **(headers or {})})
        if self.token and urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(self.endpoint).netloc:
            req.add_unredirected_header("Authorization", f"Bearer {self.token}")  # dropped on any redirect
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            hint = e.headers.get("X-Error-Message") or e.reason
            if e.code in (401, 404) and repo and e.headers.get("X-Error-Code", "RepoNotFound") == "RepoNotFound":
                # the hub answers 401 for a repository that does not exist, as for a private one
                raise HubError(f"{repo}: no such repository on {self.endpoint} (or it is private/gated: set "
                               "HF_TOKEN)") from None
            if e.code in (401, 403):
                raise HubError(f"{repo or url}: access refused ({e.code}: {hint}); for a gated repository accept "
                               "its terms on the hub and set HF_TOKEN") from None
            raise HubError(f"{url}: HTTP {e.code} {hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise HubError(f"cannot reach {self.endpoint} ({reason}); a model that was pulled before opens without "
                           "the network") from None

    def listing(self, repo: str) -> tuple[str, list[RepoFile]]:
        """The commit `main` points at, and every file of the repository (all pages of the tree)."""
        url: str | None = f"{self.endpoint}/api/models/{repo}/tree/main?recursive=true"
        commit, files = None, []
        while url:
            with self.open(url, repo=repo) as resp:
                commit = commit or resp.headers.get("X-Repo-Commit")
                entries = _read_json(resp, url)
                after = re.search(r'<([^>]+)>\s*;\s*rel="next"', resp.headers.get("Link", ""))
            if not isinstance(entries, list):
                raise HubError(f"{url}: the hub answered something other than a file list")
            files += [f for e in entries if (f := _repo_file(e)) is not None]
            url = after.group(1) if after else None
        if not commit:  # not every server sends the header: ask for the revision
            url = f"{self.endpoint}/api/models/{repo}/revision/main"
            with self.open(url, repo=repo) as resp:
                info = _read_json(resp, url)
            commit = info.get("sha") if isinstance(info, dict) else None
        if not re.fullmatch(r"[0-9a-f]{40}", str(commit)):
            raise HubError(f"{repo}: the hub gave no usable commit for main ({commit!r})")
        return str(commit), files

    def file_url(self, repo: str, commit: str, path: str) -> str:
        return f"{self.endpoint}/{repo}/resolve/{commit}/{urllib.parse.quote(path)}"


def _read_json(resp, url: str):
    try:
        return json.loads(resp.read())
    except (ValueError, OSError, http.client.HTTPException) as e:
        raise HubError(f"{url}: unreadable answer from the hub ({e})") from None


def _repo_file(entry) -> RepoFile | None:
    """A file entry of the tree route; folders, and paths that would leave the snapshot folder, are skipped."""
    if not isinstance(entry, dict) or entry.get("type") != "file" or not isinstance(entry.get("path"), str):
        return None
    path = entry["path"]
    if "\\" in path or path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
        return None
    sha = (entry.get("lfs") or {}).get("oid", "")
    return RepoFile(path, int(entry.get("size") or 0), sha if re.fullmatch(r"[0-9a-f]{64}", str(sha)) else "")


# --------------------------------------------------------------------------------------------
# the download: resumable, verified, renamed into place


def download(hub: Hub, url: str, blob: Path, want: RepoFile, *, progress: bool = False,
             say: Callable[[str], None] | None = _say) -> None:
    """Stream `url` into BLOB.incomplete, continuing what an earlier run left there (a `Range` request; a 200
    answer starts again), check the size and sha256 (hashing what was there first), then rename it to `blob`."""
    from tqdm import tqdm

    part = blob.with_name(blob.name + ".incomplete")
    digest = hashlib.sha256()
    with open(part, "ab") as out:
        if fcntl is not None:
            try:
                fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise HubError(f"{want.path}: another llavao1-edge is downloading it into {blob.parent} now") from None
        have = out.tell()
        if have > want.size:  # not from this file: start again
            out.truncate(0)
            out.seek(0)
            have = 0
        with open(part, "rb") as earlier:  # a resumed file hashes from its first byte
            while chunk := earlier.read(CHUNK):
                digest.update(chunk)
        if have < want.size:
            resp = hub.open(url, {"Range": f"bytes={have}-"} if have else {})
            with resp, tqdm(total=want.size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=want.path.rsplit("/", 1)[-1], file=sys.stderr, disable=not progress) as bar:
                if have and resp.status != 206:  # the server ignored the Range: from zero
                    out.truncate(0)
                    out.seek(0)
                    digest, have = hashlib.sha256(), 0
                    bar.reset()
                try:
                    while chunk := resp.read1(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:
                    out.flush()
                    raise HubError(f"{want.path}: the download stopped at {out.tell():,} of {want.size:,} bytes "
                                   f"({e or type(e).__name__}); it can be resumed: run the same command again") from None
                except KeyboardInterrupt:
                    out.flush()
                    if say:
                        say(f"{want.path}: stopped at {out.tell():,} of {want.size:,} bytes; the partial file is "
                            "kept and can be resumed: run the same command again")
                    raise
        got = out.tell()
    if got < want.size:
        raise HubError(f"{want.path}: the download stopped at {got:,} of {want.size:,} bytes (the connection closed "
                       "early); it can be resumed: run the same command again")
    if got > want.size or digest.hexdigest() != want.sha256:
        part.unlink()
        found = f"{got:,} bytes, not {want.size:,}" if got > want.size else f"sha256 {digest.hexdigest()}"
        raise HubError(f"{want.path}: sha256 mismatch: the download has {found}, the hub lists sha256 {want.sha256}; "
                       "the file was deleted: run the command again to download it anew")
    os.replace(part, blob)


def _link(link: Path, blob: Path) -> None:
    """snapshots/<commit>/<file> -> the blob: a relative symbolic link as the hub's cache has; a hard link or a
    copy where the file system (or Windows without developer mode) refuses one."""
    if link.is_file() and link.stat().st_size == blob.stat().st_size:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)  # a dangling link or a partial copy
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:
        try:
            os.link(blob, link)
        except OSError:
            shutil.copyfile(blob, link)


# --------------------------------------------------------------------------------------------
# the cache


@dataclass
class CachedModel:
    """A pulled model: its two files under snapshots/<commit>/ of its repository's folder in the cache."""

    repo: str
    quant: str  # the text file's quantization tag: the key of its record
    commit: str
    folder: Path  # <cache>/models--ORG--NAME
    files: dict[str, RepoFile]  # "text", "mmproj"

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.repo, self.quant)

    def path(self, role: str) -> Path:
        return self.folder / "snapshots" / self.commit / self.files[role].path

    @property
    def text(self) -> Path:
        return self.path("text")

    @property
    def mmproj(self) -> Path:
        return self.path("mmproj")

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def present(self) -> bool:
        """Both files there at their listed sizes (hashing gigabytes on every open would cost seconds)."""
        return all(self.path(r).is_file() and self.path(r).stat().st_size == f.size for r, f in self.files.items())

    def to_json(self) -> dict:
        return {"ref": str(self.ref), "repo": self.repo, "quant": self.quant, "commit": self.commit,
                "size_bytes": self.size_bytes, "present": self.present(),
                "files": {r: {"file": f.path, "path": str(self.path(r)), "size": f.size, "sha256": f.sha256}
                          for r, f in self.files.items()}}


def _read_record(folder: Path) -> dict:
    path = folder / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"quants": {}}
    except (OSError, ValueError) as e:
        raise HubError(f"{path}: unreadable ({e}); delete it and pull again") from None
    if not isinstance(record, dict) or not isinstance(record.get("quants"), dict):
        raise HubError(f"{path}: not a llavao1-edge record; delete it and pull again")
    return record


def _write_record(folder: Path, record: dict) -> None:
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, folder / RECORD)  # a reader never sees half a record


def _models(folder: Path, record: dict) -> dict[str, CachedModel]:
    try:
        return {key: CachedModel(record["repo"], key, e["commit"], folder,
                                 {r: RepoFile(**e[r]) for r in ("text", "mmproj")})
                for key, e in record["quants"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise HubError(f"{folder / RECORD}: a damaged record ({e!r}); delete it and pull again") from None


def _keys(ref: ModelRef, record: dict) -> list[str]:
    """The record's entries `ref` names: its quant's (as pull chose it), or without one, the default pull's."""
    quants = record["quants"]
    if ref.quant is None:
        return [record["default"]] if record.get("default") in quants else []
    if ref.quant.upper() in quants:
        return [ref.quant.upper()]
    return [k for k, e in quants.items() if ref.matches(e["text"]["path"])][:1]


def find_cached(ref: ModelRef | str, cache_dir: str | os.PathLike | None = None) -> CachedModel | None:
    """What an earlier `pull ref` stored, when both its files are still there; reads only the cache."""
    ref = ModelRef.parse(ref)
    folder = cache_root(cache_dir) / ref.folder_name
    record = _read_record(folder)
    keys = _keys(ref, record)
    model = _models(folder, record)[keys[0]] if keys else None
    return model if model is not None and model.present() else None


def pull(ref: ModelRef | str, cache_dir: str | os.PathLike | None = None, *, offline: bool | None = None,
         progress: bool | None = None, say: Callable[[str], None] | None = _say, hub: Hub | None = None) -> CachedModel:
    """The model `ref` names, from the cache when an earlier pull stored it (no network call), else
    downloaded from the hub (the chosen files named through `say`; a progress bar on stderr when `progress`,
    by default when stderr is a terminal). Offline (`offline`, HF_HUB_OFFLINE, LLAVAO1_OFFLINE) a model
    that is not in the cache is a HubError."""
    ref = ModelRef.parse(ref)
    root = cache_root(cache_dir)
    if (cached := find_cached(ref, root)) is not None:
        return cached
    if offline_mode(offline):
        there = ", ".join(str(m.ref) for m in cached_models(root) if m.repo == ref.repo and m.present())
        raise HubError(f"{ref} is not in the cache ({root}) and offline mode is on (--offline, HF_HUB_OFFLINE or "
                       f"LLAVAO1_OFFLINE){'; pulled from it: ' + there if there else ''}; pull it with the network: "
                       f"llavao1-edge pull {ref}")
    hub = hub or Hub()
    commit, files = hub.listing(ref.repo)
    text, mmproj = choose_files(ref, files)
    folder = root / ref.folder_name
    if say:
        for role, f in (("text model", text), ("projector ", mmproj)):
            say(f"{ref.repo}: {role} {f.path} ({_size(f.size)})")
    for f in (text, mmproj):
        if not f.sha256:
            raise HubError(f"{ref.repo}: {f.path} has no sha256 in the hub's file list (it is not stored with "
                           "LFS), so its download cannot be verified")
        blob = folder / "blobs" / f.sha256
        if not (blob.is_file() and blob.stat().st_size == f.size):  # another quantization may have it already
            blob.parent.mkdir(parents=True, exist_ok=True)
            download(hub, hub.file_url(ref.repo, commit, f.path), blob, f,
                     progress=sys.stderr.isatty() if progress is None else progress, say=say)
        _link(folder / "snapshots" / commit / f.path, blob)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit, encoding="utf-8")
    record = _read_record(folder)
    key = quant_tag(text.path)[0] or text.path.rsplit("/", 1)[-1].removesuffix(".gguf")
    record["repo"] = ref.repo
    record["quants"][key] = {"commit": commit, "text": vars(text), "mmproj": vars(mmproj)}
    if ref.quant is None:
        record["default"] = key  # what `REPO` alone chose, so that it also resolves offline
    _write_record(folder, record)
    return CachedModel(ref.repo, key, commit, folder, {"text": text, "mmproj": mmproj})


def cached_models(cache_dir: str | os.PathLike | None = None) -> list[CachedModel]:
    """Every model pulled into the cache, by repository and quantization."""
    root = cache_root(cache_dir)
    found = []
    for path in sorted(root.glob(f"models--*/{RECORD}")):
        record = _read_record(path.parent)
        found += sorted(_models(path.parent, record).values(), key=lambda m: m.quant)
    return found


def remove(ref: ModelRef | str, cache_dir: str | os.PathLike | None = None) -> tuple[list[CachedModel], int]:
    """Remove what `pull ref` stored (without QUANT: every quantization of the repository): its snapshot links,
    the blobs no other pulled model of the repository uses, and its record. Returns (removed, bytes freed)."""
    ref = ModelRef.parse(ref)
    root = cache_root(cache_dir)
    folder = root / ref.folder_name
    record = _read_record(folder)
    models = _models(folder, record)
    keys = list(models) if ref.quant is None else _keys(ref, record)
    if not keys:
        raise HubError(f"{ref} is not in the cache ({root}); `llavao1-edge list` shows what is")
    kept = [m for k, m in models.items() if k not in keys]
    kept_links = {m.path(r) for m in kept for r in m.files}
    kept_blobs = {f.sha256 for m in kept for f in m.files.values()}
    freed = 0
    for key in keys:
        del record["quants"][key]
        for role, f in models[key].files.items():
            if models[key].path(role) not in kept_links:
                models[key].path(role).unlink(missing_ok=True)
            blob = folder / "blobs" / f.sha256
            if f.sha256 not in kept_blobs and blob.exists():
                freed += blob.stat().st_size
                blob.unlink()
    if record.get("default") not in record["quants"]:
        record.pop("default", None)
    if record["quants"]:
        _write_record(folder, record)
    else:
        (folder / RECORD).unlink()
        _prune(folder / "snapshots")
        if not (folder / "snapshots").exists():  # refs/main would name a snapshot that is gone
            (folder / "refs" / "main").unlink(missing_ok=True)
            _prune(folder)
    return [models[k] for k in keys], freed


def _prune(top: Path) -> None:
    """Remove the empty folders under `top`, deepest first, and `top` if it ends up empty."""
    for folder, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        if not os.listdir(folder):
            os.rmdir(folder)
