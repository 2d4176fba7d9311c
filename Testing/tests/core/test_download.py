"""Model download against a real HTTP server on 127.0.0.1: resume, checksum, cache, offline."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from relsegcore import zoo
from relsegcore.download import download_model, fetch_models_index, install_from_index
from relsegcore.errors import Cancelled, InputError, ModelError
from relsegcore.progress import Progress

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB, several chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
PART = f"tiny.pt.{PAYLOAD_SHA[:12]}.part"


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    drops: list[int] = field(default_factory=list)  # body bytes to send before cutting, one per request
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class FileServer:
    """ThreadingHTTPServer serving ``state.files``, with Range support and connection drops."""

    def __init__(self) -> None:
        self.state = ServerState()
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                range_header = self.headers.get("Range")
                state.requests.append((self.path, range_header))
                body = state.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if range_header and state.honour_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                rest = body[start:]
                self.send_header("Content-Length", str(len(rest)))
                self.end_headers()
                if state.drops:
                    self.wfile.write(rest[: state.drops.pop(0)])
                    self.close_connection = True
                    return
                self.wfile.write(rest)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.running = True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def server():
    running = FileServer()
    running.state.files["/models/tiny.pt"] = PAYLOAD
    yield running
    running.stop()


def test_download_verifies_and_reports_progress(server, tmp_path):
    fractions = []
    path = download_model(
        server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path, Progress(lambda f, s: fractions.append(f))
    )
    assert path == tmp_path / "tiny.pt"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / PART).exists()
    assert fractions == sorted(fractions) and len(fractions) > 2 and fractions[-1] == 1.0


def test_wrong_checksum_raises_and_leaves_no_file(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ModelError) as raised:
        download_model(server.url("/models/tiny.pt"), wrong, tmp_path)
    assert wrong in str(raised.value) and PAYLOAD_SHA in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.state.drops = [100_000]
    with pytest.raises(ModelError, match="interrupted after 100000 bytes"):
        download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path, attempts=1)
    assert (tmp_path / PART).stat().st_size == 100_000
    assert not (tmp_path / "tiny.pt").exists()

    path = download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.state.requests[-1] == ("/models/tiny.pt", "bytes=100000-")
    assert not (tmp_path / PART).exists()


def test_drops_within_one_call_are_resumed(server, tmp_path):
    server.state.drops = [50_000, 70_000]
    path = download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path, attempts=3)
    assert path.read_bytes() == PAYLOAD
    assert [r for _, r in server.state.requests] == [None, "bytes=50000-", "bytes=120000-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.state.drops = [100_000]
    with pytest.raises(ModelError):
        download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path, attempts=1)
    server.state.honour_range = False
    path = download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path)
    assert server.state.requests[-1][1] == "bytes=100000-"  # asked, got a full 200 answer
    assert path.read_bytes() == PAYLOAD  # not the first 100000 bytes twice


def test_cached_file_is_used_offline(server, tmp_path):
    url = server.url("/models/tiny.pt")
    download_model(url, PAYLOAD_SHA, tmp_path)
    server.stop()
    assert download_model(url, PAYLOAD_SHA, tmp_path).read_bytes() == PAYLOAD


def test_corrupt_cache_is_fetched_again(server, tmp_path):
    (tmp_path / "tiny.pt").write_bytes(b"truncated")
    assert download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path).read_bytes() == PAYLOAD
    assert len(server.state.requests) == 1


def test_unreachable_and_missing_urls_are_model_errors(server, tmp_path):
    with pytest.raises(ModelError, match="HTTP 404"):
        download_model(server.url("/nothing.pt"), PAYLOAD_SHA, tmp_path)
    with pytest.raises(InputError, match="SHA-256"):
        download_model(server.url("/models/tiny.pt"), "abc", tmp_path)
    with pytest.raises(InputError, match="http, https and file"):
        download_model("ftp://example.org/x.pt", PAYLOAD_SHA, tmp_path)


def test_cancel_keeps_part_for_resume(server, tmp_path):
    def cancel_after_first_chunk() -> bool:
        return (tmp_path / PART).stat().st_size > 0

    with pytest.raises(Cancelled):
        download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path, Progress(None, cancel_after_first_chunk))
    assert 0 < (tmp_path / PART).stat().st_size < len(PAYLOAD)
    assert download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path).read_bytes() == PAYLOAD
    assert server.state.requests[-1][1] is not None


def tiny_card(**changes) -> dict:
    card = {"name": "tiny", "version": "1.2", "description": "test", "file": "whatever.pt", "sha256": PAYLOAD_SHA,
            "architecture": {}, "classes": ["background", "infection"]}
    return {**card, **changes}


def test_index_install_writes_weights_then_card(server, tmp_path):
    card = tiny_card()
    server.state.files["/models/tiny.json"] = json.dumps(card).encode()
    server.state.files["/index.json"] = json.dumps([
        {"name": "tiny", "version": "1.2", "url": "models/tiny.pt", "sha256": PAYLOAD_SHA.upper(),
         "description": "relative URL, card found beside the weights"},
    ]).encode()
    entries = fetch_models_index(server.url("/index.json"))
    assert entries[0]["url"] == server.url("/models/tiny.pt") and entries[0]["sha256"] == PAYLOAD_SHA

    weights = install_from_index(entries[0], tmp_path / "cache")
    assert weights == tmp_path / "cache" / "tiny.pt" and weights.read_bytes() == PAYLOAD
    written = json.loads((tmp_path / "cache" / "tiny.json").read_text())
    assert written["file"] == "tiny.pt" and written["version"] == "1.2"


def test_index_card_for_other_weights_is_refused(server, tmp_path):
    card = tiny_card(sha256="1" * 64)
    server.state.files["/models/tiny-card.json"] = json.dumps(card).encode()
    entry = {"name": "tiny", "version": "1", "url": server.url("/models/tiny.pt"), "sha256": PAYLOAD_SHA,
             "card_url": server.url("/models/tiny-card.json")}
    with pytest.raises(ModelError, match="does not describe"):
        install_from_index(entry, tmp_path)
    assert not (tmp_path / "tiny.json").exists()


def test_incomplete_card_is_refused(server, tmp_path):
    card = tiny_card()
    del card["classes"]
    server.state.files["/models/tiny.json"] = json.dumps(card).encode()
    entry = {"name": "tiny", "version": "1", "url": server.url("/models/tiny.pt"), "sha256": PAYLOAD_SHA}
    with pytest.raises(ModelError, match="incomplete.*classes"):
        install_from_index(entry, tmp_path)
    assert not (tmp_path / "tiny.json").exists()


def test_install_defaults_to_the_user_models_folder_zoo_searches(server, tmp_path, monkeypatch):
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path / "home"))
    server.state.files["/models/tiny.json"] = json.dumps(tiny_card()).encode()
    entry = {"name": "tiny", "version": "1.2", "url": server.url("/models/tiny.pt"), "sha256": PAYLOAD_SHA}
    weights = install_from_index(entry)
    assert weights == tmp_path / "home" / "models" / "tiny.pt"
    card = zoo.find_model("tiny")
    assert card.path == weights and card.sha256 == PAYLOAD_SHA


@pytest.mark.parametrize("body", [b"{not json", b'{"name": "x"}', b'[{"name": "x", "url": "y"}]'])
def test_bad_index_is_a_model_error(server, tmp_path, body):
    server.state.files["/index.json"] = body
    with pytest.raises(ModelError):
        fetch_models_index(server.url("/index.json"))


def test_index_entry_name_cannot_escape_cache(server, tmp_path):
    entry = {"name": "../evil", "version": "1", "url": server.url("/models/tiny.pt"), "sha256": PAYLOAD_SHA}
    with pytest.raises(ModelError, match="not a usable model file name"):
        install_from_index(entry, tmp_path / "cache")
    assert not (tmp_path / "evil.pt").exists()


def test_file_urls_work_for_local_mirrors(tmp_path):
    source = tmp_path / "mirror" / "tiny.pt"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    path = download_model(Path(source).as_uri(), PAYLOAD_SHA, tmp_path / "cache")
    assert path.read_bytes() == PAYLOAD


def test_part_file_the_server_cannot_continue_is_restarted(server, tmp_path):
    (tmp_path / PART).write_bytes(b"x" * (len(PAYLOAD) + 10))  # longer than the file: HTTP 416
    assert download_model(server.url("/models/tiny.pt"), PAYLOAD_SHA, tmp_path).read_bytes() == PAYLOAD
    assert [r for _, r in server.state.requests] == [f"bytes={len(PAYLOAD) + 10}-", None]


def test_installed_model_reinstalls_offline_and_keeps_its_name(server, tmp_path):
    server.state.files["/models/tiny.json"] = json.dumps(tiny_card()).encode()
    entry = {"name": "tiny", "version": "1.2", "url": server.url("/models/tiny.pt"), "sha256": PAYLOAD_SHA}
    install_from_index(entry, tmp_path)
    card_before = (tmp_path / "tiny.json").read_bytes()
    server.stop()
    assert install_from_index(entry, tmp_path).read_bytes() == PAYLOAD  # no network needed
    other = {**entry, "sha256": "2" * 64}
    with pytest.raises(ModelError, match="different model named 'tiny'"):
        install_from_index(other, tmp_path)
    assert (tmp_path / "tiny.json").read_bytes() == card_before


def test_relseg_models_install_from_an_index(server, tmp_path, monkeypatch, capsys):
    """A real tiny network served over HTTP, installed through the CLI into the registry, made default."""
    import torch

    from relsegcore.cli import main
    from relsegcore.models import DualEncoderUNet, NetworkConfig
    from relsegcore.registry import ModelRegistry

    network = DualEncoderUNet(NetworkConfig(base_channels=2, depth=2, max_channels=4))
    card = zoo.ModelCard(name="remote-net", version="2.0", description="served", file="", sha256="",
                         architecture={}, classes=["background", "infection"])
    weights = zoo.save_model(network, card, tmp_path / "published")
    server.state.files["/m/remote-net.pt"] = weights.read_bytes()
    server.state.files["/m/remote-net.json"] = weights.with_suffix(".json").read_bytes()
    server.state.files["/index.json"] = json.dumps(
        [{"name": "remote-net", "version": "2.0", "url": "m/remote-net.pt", "sha256": card.sha256}]
    ).encode()
    monkeypatch.setenv("RELSEG_HOME", str(tmp_path / "home"))

    assert main(["models", "install", "remote-net", "--index", server.url("/index.json"), "--default",
                 "--progress", "none"]) == 0
    assert "installed remote-net 2.0" in capsys.readouterr().out
    assert ModelRegistry().default() == "remote-net"
    loaded = zoo.load_model("remote-net", torch.device("cpu"))
    assert loaded.card.path == tmp_path / "home" / "models" / "remote-net.pt"
    assert main(["models", "install", "absent", "--index", server.url("/index.json")]) == 2
    assert "offers: remote-net" in capsys.readouterr().err
