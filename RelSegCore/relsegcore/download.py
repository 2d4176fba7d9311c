"""Model download: resumable, checksum-verified, cached, offline once cached.

A download streams into ``<file>.<sha256 prefix>.part`` beside the target. An interrupted download keeps
the ``.part`` file and the next call asks the server for the rest with a ``Range`` header
(a server that ignores it sends the whole file, and the download restarts). The file is
renamed into the cache only after its SHA-256 matches; a mismatch deletes it. A file already
in the cache with the right checksum is returned without touching the network.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import InputError, ModelError
from .fileutil import atomic_path, atomic_write_text, sha256_of
from .progress import Progress

CHUNK_BYTES = 1 << 16
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCHEMES = ("http", "https", "file")
_INDEX_FIELDS = ("name", "version", "url", "sha256")


def download_model(
    url: str,
    sha256: str,
    dest_dir: str | os.PathLike,
    progress: Progress | None = None,
    timeout: float = 30,
    *,
    filename: str | None = None,
    attempts: int = 3,
) -> Path:
    """Download ``url`` into ``dest_dir/filename`` (default: the URL's file name); return its path.

    ``attempts`` bounds how often a dropped connection is resumed within this call; after
    that the ``.part`` file stays and the next call resumes it.
    """
    sha256 = _checked_sha256(sha256)
    target = Path(dest_dir) / (filename or _filename_from_url(url))
    if target.is_file():
        if sha256_of(target) == sha256:
            return target
        target.unlink()  # stale or corrupt cache entry: fetch it again
    _checked_scheme(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{sha256[:12]}.part")  # never resumes another file's bytes
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            _fetch_into(url, part, progress, timeout)
            break
        except _Interrupted as interrupted:
            if attempt >= attempts:
                raise ModelError(
                    f"download of {target.name} was interrupted after {interrupted.received} bytes "
                    f"({interrupted.reason}); run it again to resume"
                ) from None
    _verify_and_install(part, target, sha256)
    return target


def fetch_models_index(url: str, timeout: float = 30) -> list[dict]:
    """Read a models index: a JSON list of ``{name, version, url, sha256, card_url?, description}``.

    Relative ``url`` and ``card_url`` entries are resolved against the index's own URL.
    """
    entries = _fetch_json(url, "the models index", timeout)
    if not isinstance(entries, list):
        raise ModelError(f"the models index {url} is not a JSON list of models")
    return [_checked_entry(entry, url) for entry in entries]


def install_from_index(
    entry: dict,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    timeout: float = 30,
) -> Path:
    """Download an index entry's weights and model card into ``cache_dir`` (default: the user's models).

    Files are saved as ``<name>.pt`` and ``<name>.json``; the card is written last, so a model
    only becomes visible to ``zoo.list_models`` once both are complete. Returns the weights path.
    """
    entry = _checked_entry(entry, "")
    if cache_dir is None:
        from .registry import default_home

        cache_dir = default_home() / "models"
    cache_dir = Path(cache_dir)
    name = _safe_name(entry["name"])
    card_path = cache_dir / f"{name}.json"
    installed = _installed_sha256(card_path)
    if installed not in (None, entry["sha256"]):
        raise ModelError(
            f"a different model named {name!r} is already installed ({card_path}); remove it first "
            "so that a name never silently changes meaning"
        )
    weights = download_model(
        entry["url"], entry["sha256"], cache_dir, progress, timeout, filename=f"{name}.pt"
    )
    if installed is None:  # with the card already in place, installing again needs no network
        card_url = entry.get("card_url") or _sibling_card_url(entry["url"])
        card = _fetch_card(card_url, timeout)
        if str(card.get("sha256", "")).lower() != entry["sha256"]:
            raise ModelError(
                f"the model card at {card_url} does not describe the downloaded weights "
                f"(card sha256 {card.get('sha256')!r}, index sha256 {entry['sha256']})"
            )
        card["file"] = weights.name
        card["name"] = name
        _check_card_readable(card, card_url)
        atomic_write_text(card_path, json.dumps(card, indent=2) + "\n")
    return weights


def _installed_sha256(card_path: Path) -> str | None:
    """The weights checksum an already installed card names, or None when there is no usable card."""
    try:
        return str(json.loads(card_path.read_text(encoding="utf-8"))["sha256"]).lower()
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _Interrupted(Exception):
    def __init__(self, received: int, reason: str):
        super().__init__(reason)
        self.received = received
        self.reason = reason


def _fetch_into(url: str, part: Path, progress: Progress | None, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (or restart it when the server ignores ``Range``)."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:  # our .part is not a prefix the server recognises
            part.unlink()
            return _fetch_into(url, part, progress, timeout)
        raise ModelError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise ModelError(f"cannot download {url}: {_reason(error)}") from None
    with response:
        resumed = offset > 0 and _resumes_at(response, offset)
        if offset and response.status == 206 and not resumed:  # a range we did not ask for: start over
            part.unlink()
            response.close()
            return _fetch_into(url, part, progress, timeout)
        start = offset if resumed else 0
        total = _expected_total(response, start)
        received = start
        try:
            with open(part, "ab" if resumed else "wb") as handle:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    handle.write(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress.update(received / total if total else 0.0, f"Downloading {part.stem}")
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, http.client.HTTPException) as error:  # socket.timeout is an OSError
            raise _Interrupted(received, _reason(error)) from None
    if total is not None and received < total:
        raise _Interrupted(received, f"the server closed the connection at {received} of {total} bytes")


def _resumes_at(response, offset: int) -> bool:
    """True when the server answered our ``Range`` with the bytes starting at ``offset``."""
    if response.status != 206:
        return False
    match = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == offset


def _expected_total(response, start: int) -> int | None:
    length = response.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def _verify_and_install(part: Path, target: Path, sha256: str) -> None:
    actual = sha256_of(part)
    if actual != sha256:
        part.unlink()
        raise ModelError(f"checksum mismatch for {target.name}: expected sha256 {sha256}, got {actual}")
    with atomic_path(target) as tmp:
        os.replace(part, tmp)


def _fetch_json(url: str, what: str, timeout: float):
    """The JSON document at ``url``; a ModelError naming ``what`` when unreachable or not JSON."""
    _checked_scheme(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise ModelError(f"cannot read {what} {url}: {_reason(error)}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{what} {url} is not valid JSON: {error}") from None


def _fetch_card(card_url: str, timeout: float) -> dict:
    card = _fetch_json(card_url, "the model card", timeout)
    if not isinstance(card, dict):
        raise ModelError(f"the model card {card_url} is not a JSON object")
    return card


def _check_card_readable(card: dict, card_url: str) -> None:
    """Refuse a card that ``zoo`` could not read, before it lands beside the weights."""
    from .zoo import ModelCard

    try:
        ModelCard.from_dict(card)
    except (TypeError, ModelError) as error:
        raise ModelError(f"the model card at {card_url} is incomplete: {error}") from None


def _checked_entry(entry: object, index_url: str) -> dict:
    if not isinstance(entry, dict) or any(not isinstance(entry.get(key), str) for key in _INDEX_FIELDS):
        raise ModelError(f"a models index entry lacks one of {', '.join(_INDEX_FIELDS)}: {entry!r}")
    checked = dict(entry)
    checked["sha256"] = _checked_sha256(entry["sha256"], error=ModelError)
    checked["url"] = urllib.parse.urljoin(index_url, entry["url"])
    if entry.get("card_url"):
        checked["card_url"] = urllib.parse.urljoin(index_url, entry["card_url"])
    return checked


def _checked_sha256(sha256: str, error: type[Exception] = InputError) -> str:
    value = str(sha256).strip().lower()
    if not _SHA256.match(value):
        raise error(f"{sha256!r} is not a SHA-256 checksum (64 hexadecimal digits)")
    return value


def _checked_scheme(url: str) -> None:
    if urllib.parse.urlsplit(url).scheme not in _SCHEMES:
        raise InputError(f"cannot download {url!r}: only http, https and file URLs are supported")


def _filename_from_url(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not name:
        raise InputError(f"cannot tell a file name from the URL {url!r}; pass filename=")
    return _safe_name(name)


def _safe_name(name: str) -> str:
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ModelError(f"{name!r} is not a usable model file name")
    return name


def _sibling_card_url(weights_url: str) -> str:
    parts = urllib.parse.urlsplit(weights_url)
    card_path = re.sub(r"\.pt$", "", parts.path) + ".json"
    return urllib.parse.urlunsplit(parts._replace(path=card_path))


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return str(error.reason)
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


__all__ = ["download_model", "fetch_models_index", "install_from_index"]
