"""Downloads and the image cache, against a real HTTP server on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labbuilder.catalog.files import find_image
from labbuilder.catalog.model import (
    ChecksumAlgorithm,
    CloudInitFlavour,
    DiskFormat,
    DownloadSource,
    ImageEntry,
)
from labbuilder.common.errors import ImageError
from labbuilder.common.filelock import file_lock
from labbuilder.common.paths import default_cache_dir
from labbuilder.images.cache import list_cached, prune, pull
from labbuilder.images.checksums import PublishedDigest, fetch_checksum, parse_checksum_file
from labbuilder.images.download import DownloadResult, download, part_path

IMAGE = random.Random(20240601).randbytes(3 * 1024 * 1024 + 12345)
IMAGE_SHA256 = hashlib.sha256(IMAGE).hexdigest()
OTHER = random.Random(7).randbytes(2 * 1024 * 1024)
OTHER_SHA256 = hashlib.sha256(OTHER).hexdigest()
SERVE_CHUNK = 64 * 1024


# --- the test server -------------------------------------------------------------------------


@dataclass
class Served:
    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    not_found: set[str] = field(default_factory=set)
    statuses: dict[str, list[int]] = field(default_factory=dict)  # answer these first, once each
    drop_after: dict[str, int] = field(default_factory=dict)  # cut after N bytes, once
    lie_extra: dict[str, int] = field(default_factory=dict)  # claim N more bytes than there are
    ignore_range: set[str] = field(default_factory=set)
    gate: tuple[str, str, int] | None = None  # pause path's body until n requests for other
    requests: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self, path: str) -> list[Served]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def bytes_sent(self, path: str) -> int:
        return sum(r.sent for r in self.served(path))


class Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?")[0]
        record = Served(path, self.headers.get("Range"), 200)
        with state.lock:
            state.requests.append(record)
            queued = state.statuses.get(path)
            forced = queued.pop(0) if queued else None
        if forced is not None or path in state.not_found or path not in state.files:
            record.status = forced or 404
            self.send_error(record.status)
            return
        data = state.files[path]
        claimed = len(data) + state.lie_extra.get(path, 0)
        start = 0
        if record.range and path not in state.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", record.range)
            assert match, record.range
            start = int(match.group(1))
            if start >= claimed:
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{claimed}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            record.status = 206
        self.send_response(record.status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(claimed - start))
        if record.status == 206:
            self.send_header("Content-Range", f"bytes {start}-{claimed - 1}/{claimed}")
        self.end_headers()
        with state.lock:
            limit = state.drop_after.pop(path, None)
        body = data[start:] if limit is None else data[start : start + limit]
        for offset in range(0, len(body), SERVE_CHUNK):
            self.wfile.write(body[offset : offset + SERVE_CHUNK])
            record.sent += len(body[offset : offset + SERVE_CHUNK])
            if offset == 0:
                self._wait_at_gate(path)
        # Returning early (dropped/lying) closes the connection: HTTP/1.0, one request each.

    def _wait_at_gate(self, path: str) -> None:
        state = self.server.state
        if state.gate is None or state.gate[0] != path:
            return
        _, other, count = state.gate
        deadline = time.monotonic() + 20
        while len(state.served(other)) < count and time.monotonic() < deadline:
            time.sleep(0.01)


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = ServerState()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up early is part of the tests


@contextmanager
def running_server() -> Iterator[ImageServer]:
    """The test server on 127.0.0.1, serving two images and a SHA256SUMS listing both."""
    srv = ImageServer()
    srv.state.files["/img/disk.qcow2"] = IMAGE
    srv.state.files["/img/other.qcow2"] = OTHER
    srv.state.files["/img/SHA256SUMS"] = (
        f"{OTHER_SHA256} *other.qcow2\n{IMAGE_SHA256} *disk.qcow2\n".encode()
    )
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with running_server() as srv:
        yield srv


def fetch(server: ImageServer, dest: Path, **kwargs: Any) -> DownloadResult:
    kwargs.setdefault("checksum", IMAGE_SHA256)
    kwargs.setdefault("retry_delay", 0)
    return download(server.url("/img/disk.qcow2"), dest, timeout=10, **kwargs)


def entry(
    server: ImageServer,
    path: str = "/img/disk.qcow2",
    name: str = "test-image",
    *,
    checksum: str | None = None,
) -> ImageEntry:
    return ImageEntry(
        name=name,
        description="test",
        os_family="debian",
        release="12",
        cloud_init=CloudInitFlavour.V2,
        default_user="debian",
        console="ttyS0",
        download=DownloadSource(
            url=server.url(path),
            checksum_url=None if checksum else server.url("/img/SHA256SUMS"),
            checksum=checksum,
            algorithm=ChecksumAlgorithm.SHA256,
            format=DiskFormat.QCOW2,
        ),
        build=None,
    )


# --- download --------------------------------------------------------------------------------


def test_download_success_reports_progress(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "disk.qcow2"
    seen: list[tuple[int, int | None]] = []
    result = fetch(server, dest, progress=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == IMAGE
    assert (result.bytes_downloaded, result.total_size) == (len(IMAGE), len(IMAGE))
    assert (result.digest, result.verified, result.resumed) == (IMAGE_SHA256, True, False)
    assert not part_path(dest).exists()
    assert seen[-1] == (len(IMAGE), len(IMAGE))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert len(server.state.served("/img/disk.qcow2")) == 1


def test_verified_file_already_in_place_transfers_nothing(
    server: ImageServer, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.qcow2"
    fetch(server, dest)
    again = fetch(server, dest)
    assert (again.bytes_downloaded, again.verified) == (0, True)
    assert len(server.state.served("/img/disk.qcow2")) == 1


def test_dropped_connection_is_resumed_within_one_call(server: ImageServer, tmp_path: Path) -> None:
    server.state.drop_after["/img/disk.qcow2"] = 1_000_000
    result = fetch(server, tmp_path / "disk.qcow2", retries=2)
    first, second = server.state.served("/img/disk.qcow2")
    assert (first.range, first.sent) == (None, 1_000_000)
    assert (second.range, second.status) == ("bytes=1000000-", 206)
    assert server.state.bytes_sent("/img/disk.qcow2") == len(IMAGE)
    assert result.resumed and result.digest == IMAGE_SHA256
    assert (tmp_path / "disk.qcow2").read_bytes() == IMAGE


def test_dropped_connection_leaves_part_that_next_call_resumes(
    server: ImageServer, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.qcow2"
    server.state.drop_after["/img/disk.qcow2"] = 700_000
    with pytest.raises(ImageError) as failed:
        fetch(server, dest, retries=0)
    assert f"expected {len(IMAGE)} bytes, got 700000 bytes" in failed.value.message
    assert "resume" in (failed.value.hint or "")
    assert not dest.exists() and part_path(dest).stat().st_size == 700_000

    result = fetch(server, dest)
    assert server.state.served("/img/disk.qcow2")[-1].range == "bytes=700000-"
    assert result.resumed and result.bytes_downloaded == len(IMAGE) - 700_000
    assert result.bytes_downloaded < len(IMAGE)
    assert dest.read_bytes() == IMAGE and not part_path(dest).exists()


def test_server_ignoring_range_restarts_from_zero(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "disk.qcow2"
    part_path(dest).write_bytes(b"x" * 5000)  # not even a prefix: must not survive
    server.state.ignore_range.add("/img/disk.qcow2")
    result = fetch(server, dest)
    assert server.state.served("/img/disk.qcow2")[0].range == "bytes=5000-"
    assert (result.resumed, result.bytes_downloaded) == (False, len(IMAGE))
    assert dest.read_bytes() == IMAGE


def test_complete_part_answered_with_416_is_verified_without_transfer(
    server: ImageServer, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.qcow2"
    part_path(dest).write_bytes(IMAGE)
    result = fetch(server, dest)
    assert server.state.served("/img/disk.qcow2")[0].status == 416
    assert (result.bytes_downloaded, result.resumed) == (0, True)
    assert dest.read_bytes() == IMAGE


def test_part_longer_than_the_file_is_discarded(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "disk.qcow2"
    part_path(dest).write_bytes(IMAGE + b"junk")
    result = fetch(server, dest)
    assert [r.status for r in server.state.served("/img/disk.qcow2")] == [416, 200]
    assert result.bytes_downloaded == len(IMAGE) and dest.read_bytes() == IMAGE


def test_stale_part_from_an_older_file_is_replaced_after_mismatch(
    server: ImageServer, tmp_path: Path
) -> None:
    dest = tmp_path / "disk.qcow2"
    part_path(dest).write_bytes(OTHER[:100_000])  # a prefix of some other version
    result = fetch(server, dest)
    assert [r.status for r in server.state.served("/img/disk.qcow2")] == [206, 200]
    assert (result.resumed, result.digest) == (False, IMAGE_SHA256)


def test_wrong_checksum_deletes_the_download(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "disk.qcow2"
    wrong = "0" * 64
    with pytest.raises(ImageError) as failed:
        fetch(server, dest, checksum=wrong)
    message = failed.value.message
    assert wrong in message and IMAGE_SHA256 in message and server.url("/") in message
    assert not dest.exists() and not part_path(dest).exists()


def test_404_names_url_and_status_and_is_not_retried(server: ImageServer, tmp_path: Path) -> None:
    server.state.not_found.add("/img/disk.qcow2")
    with pytest.raises(ImageError) as failed:
        fetch(server, tmp_path / "disk.qcow2", retries=3)
    assert server.url("/img/disk.qcow2") in failed.value.message
    assert "404" in failed.value.message
    assert len(server.state.served("/img/disk.qcow2")) == 1
    assert list(tmp_path.iterdir()) == []


def test_server_errors_are_retried(server: ImageServer, tmp_path: Path) -> None:
    server.state.statuses["/img/disk.qcow2"] = [503, 502]
    result = fetch(server, tmp_path / "disk.qcow2", retries=2)
    assert [r.status for r in server.state.served("/img/disk.qcow2")] == [503, 502, 200]
    assert result.digest == IMAGE_SHA256


def test_persistent_server_error_gives_up(server: ImageServer, tmp_path: Path) -> None:
    server.state.statuses["/img/disk.qcow2"] = [500, 500, 500]
    with pytest.raises(ImageError) as failed:
        fetch(server, tmp_path / "disk.qcow2", retries=2)
    assert "HTTP 500" in failed.value.message and "3 attempts" in failed.value.message


def test_truncated_body_names_expected_and_got(server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "disk.qcow2"
    server.state.lie_extra["/img/disk.qcow2"] = 1000
    with pytest.raises(ImageError) as failed:
        fetch(server, dest, retries=2)
    assert f"expected {len(IMAGE) + 1000} bytes, got {len(IMAGE)} bytes" in failed.value.message
    assert len(server.state.served("/img/disk.qcow2")) == 3  # retried, resuming
    assert server.state.bytes_sent("/img/disk.qcow2") == len(IMAGE)
    assert not dest.exists() and part_path(dest).stat().st_size == len(IMAGE)


def test_connection_refused_is_an_image_error(tmp_path: Path) -> None:
    srv = ImageServer()
    url = srv.url("/img/disk.qcow2")
    srv.server_close()  # nothing listens on that port any more
    with pytest.raises(ImageError, match="cannot connect") as failed:
        download(url, tmp_path / "d.qcow2", checksum=None, retries=1, retry_delay=0)
    assert url in failed.value.message


def test_file_url(tmp_path: Path) -> None:
    source = tmp_path / "src.qcow2"
    source.write_bytes(OTHER)
    result = download(source.as_uri(), tmp_path / "copy.qcow2", checksum=OTHER_SHA256)
    assert (tmp_path / "copy.qcow2").read_bytes() == OTHER and result.verified
    with pytest.raises(ImageError, match="missing"):
        download((tmp_path / "missing").as_uri(), tmp_path / "x", checksum=None, retries=5)


# --- checksum files --------------------------------------------------------------------------


def test_fetch_checksum(server: ImageServer) -> None:
    url = server.url("/img/SHA256SUMS")
    source = entry(server).download
    assert source is not None
    assert fetch_checksum(source) == PublishedDigest(IMAGE_SHA256, signed_by=None)
    missing = dataclasses.replace(source, url=server.url("/img/nope.img"))
    with pytest.raises(ImageError, match="does not list nope.img") as failed:
        fetch_checksum(missing)
    assert url in failed.value.message
    with pytest.raises(ImageError, match="not a sha512 digest"):
        fetch_checksum(dataclasses.replace(source, algorithm=ChecksumAlgorithm.SHA512))
    server.state.not_found.add("/img/SHA256SUMS")
    with pytest.raises(ImageError, match="404") as failed:
        fetch_checksum(source)
    assert f"the checksum file from {url}" in failed.value.message


@pytest.mark.parametrize(
    "line",
    [
        "{hex}  name.img",
        "{hex} *name.img",
        "{hex}  ./name.img",
        "SHA256 (name.img) = {hex}",
        "{HEX} *name.img",
    ],
)
def test_checksum_file_formats(line: str) -> None:
    text = "# comment\n" + "a" * 64 + "  other.img\n" + line.format(hex="ab" * 32, HEX="AB" * 32)
    assert parse_checksum_file(text, "name.img", ChecksumAlgorithm.SHA256) == "ab" * 32


def test_checksum_file_bsd_tag_must_match_algorithm() -> None:
    text = f"SHA512 (name.img) = {'c' * 64}\n"
    with pytest.raises(ImageError, match="sha512"):
        parse_checksum_file(text, "name.img", ChecksumAlgorithm.SHA256)


@given(
    names=st.lists(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,30}[A-Za-z0-9]", fullmatch=True),
        min_size=1,
        max_size=8,
        unique=True,
    ),
    data=st.data(),
)
def test_checksum_file_round_trip(names: list[str], data: st.DataObject) -> None:
    digests = {n: hashlib.sha512(n.encode()).hexdigest() for n in names}
    lines = [f"{digests[n]} {data.draw(st.sampled_from([' ', '*']))}{n}" for n in names]
    wanted = data.draw(st.sampled_from(names))
    assert (
        parse_checksum_file("\n".join(lines), wanted, ChecksumAlgorithm.SHA512) == digests[wanted]
    )


# --- the cache -------------------------------------------------------------------------------


def test_default_cache_dir() -> None:
    assert default_cache_dir({"LABBUILDER_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x"}) == Path("/c")
    assert default_cache_dir({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/labbuilder")
    assert default_cache_dir({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.cache/labbuilder"
    )


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def test_pull_then_pull_again_transfers_nothing(server: ImageServer, tmp_path: Path) -> None:
    first = pull(entry(server), tmp_path, retry_delay=0)
    assert first.bytes_downloaded == len(IMAGE) and first.verified
    assert first.path == tmp_path / "images" / f"test-image-{IMAGE_SHA256[:16]}.qcow2"
    sidecar = json.loads(sidecar_of(first.path).read_text())
    assert {"url", "digest", "algorithm", "size", "pulled_at"} <= sidecar.keys()
    assert sidecar["digest"] == IMAGE_SHA256 and sidecar["size"] == len(IMAGE)
    assert sidecar["signed_by"] is None and first.signed_by is None  # SHA256SUMS is not signed

    second = pull(entry(server), tmp_path, retry_delay=0)
    assert second.bytes_downloaded == 0 and second.path == first.path
    assert server.state.bytes_sent("/img/disk.qcow2") == len(IMAGE)
    assert [c.name for c in list_cached(tmp_path)] == ["test-image"]
    offline = pull(entry(server), tmp_path, offline=True)
    assert offline.bytes_downloaded == 0 and offline.path == first.path


def test_changed_upstream_image_is_added_beside_the_old_one(
    server: ImageServer, tmp_path: Path
) -> None:
    old = pull(entry(server), tmp_path, retry_delay=0)
    server.state.files["/img/disk.qcow2"] = OTHER
    server.state.files["/img/SHA256SUMS"] = f"{OTHER_SHA256}  disk.qcow2\n".encode()
    new = pull(entry(server), tmp_path, retry_delay=0)
    assert (new.bytes_downloaded, new.digest) == (len(OTHER), OTHER_SHA256)
    assert old.path.read_bytes() == IMAGE  # a lab's overlay on the old file is unharmed
    assert [c.digest for c in list_cached(tmp_path)] == [IMAGE_SHA256, OTHER_SHA256]
    assert pull(entry(server), tmp_path, offline=True).path == new.path

    assert prune(tmp_path, keep={"test-image", old.path.name}) == []
    assert prune(tmp_path, keep={"test-image"}) == [old.path, sidecar_of(old.path)]
    assert [c.path for c in list_cached(tmp_path)] == [new.path]


def test_unverified_image_by_location(tmp_path: Path) -> None:
    source = tmp_path / "mine.qcow2"
    source.write_bytes(b"QFI\xfb" + OTHER)
    image_entry = find_image(str(source), catalog={})
    first = pull(image_entry, tmp_path / "cache", retry_delay=0)
    assert not first.verified and first.name == source.as_uri()
    assert first.digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert first.path.name.startswith("mine-") and first.path.read_bytes() == source.read_bytes()
    stem = first.path.name.removesuffix(f"-{first.digest[:16]}.qcow2")
    assert {p.name for p in first.path.parent.iterdir()} == {
        first.path.name,
        first.path.name + ".json",
        stem + ".lock",
    }
    assert pull(image_entry, tmp_path / "cache").bytes_downloaded == 0


def test_pull_with_wrong_checksum_file_leaves_nothing(server: ImageServer, tmp_path: Path) -> None:
    server.state.files["/img/SHA256SUMS"] = f"{'f' * 64}  disk.qcow2\n".encode()
    with pytest.raises(ImageError, match="checksum mismatch"):
        pull(entry(server), tmp_path, retry_delay=0)
    assert list_cached(tmp_path) == []
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["test-image.lock"]
    with pytest.raises(ImageError, match="not in the cache"):
        pull(entry(server), tmp_path, offline=True)


def test_pull_with_pinned_checksum(server: ImageServer, tmp_path: Path) -> None:
    image = pull(entry(server, checksum=IMAGE_SHA256.upper()), tmp_path, retry_delay=0)
    assert image.digest == IMAGE_SHA256 and server.state.served("/img/SHA256SUMS") == []


def test_concurrent_pulls_in_threads_download_once(server: ImageServer, tmp_path: Path) -> None:
    server.state.gate = ("/img/disk.qcow2", "/img/SHA256SUMS", 2)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(pull(entry(server), tmp_path, retry_delay=0).bytes_downloaded)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(results) == [0, len(IMAGE)]
    assert len(server.state.served("/img/disk.qcow2")) == 1
    assert server.state.bytes_sent("/img/disk.qcow2") == len(IMAGE)


def _pull_in_process(image: ImageEntry, cache_dir: str, results: Any) -> None:
    results.put(pull(image, Path(cache_dir), retry_delay=0).bytes_downloaded)


def test_concurrent_pulls_in_processes_download_once(server: ImageServer, tmp_path: Path) -> None:
    server.state.gate = ("/img/disk.qcow2", "/img/SHA256SUMS", 2)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    image = entry(server)
    processes = [
        context.Process(target=_pull_in_process, args=(image, str(tmp_path), results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in processes) == [0, len(IMAGE)]
    assert len(server.state.served("/img/disk.qcow2")) == 1
    assert server.state.bytes_sent("/img/disk.qcow2") == len(IMAGE)
    [cached] = list_cached(tmp_path)
    assert cached.path.read_bytes() == IMAGE


def test_prune(server: ImageServer, tmp_path: Path) -> None:
    kept = pull(entry(server), tmp_path, retry_delay=0)
    other_entry = entry(server, "/img/other.qcow2", "other-image")
    dropped = pull(other_entry, tmp_path, retry_delay=0)
    images = tmp_path / "images"
    stale = images / "gone-0123456789abcdef.qcow2.part"
    stale.write_bytes(b"partial")
    kept_part = images / "test-image-fedcba9876543210.qcow2.part"
    kept_part.write_bytes(b"partial")
    busy = images / "busy.qcow2.part"
    busy.write_bytes(b"being written")
    orphan = images / "lost-0123456789abcdef.raw.json"
    orphan.write_text("{}")

    with file_lock(images / "busy.lock"):  # as a running pull of "busy" holds it
        removed = prune(tmp_path, keep={"test-image"})

    assert set(removed) == {dropped.path, sidecar_of(dropped.path), stale, kept_part, orphan}
    assert len(removed) == 5
    assert [c.name for c in list_cached(tmp_path)] == ["test-image"]
    assert kept.path.read_bytes() == IMAGE and busy.exists()
    assert not (images / "other-image.lock").exists() and (images / "test-image.lock").exists()
    assert prune(tmp_path, keep=set()) == [busy, kept.path, sidecar_of(kept.path)]
    assert list_cached(tmp_path) == [] and list(images.iterdir()) == []
    assert pull(other_entry, tmp_path, retry_delay=0).bytes_downloaded == len(OTHER)


def test_a_downloaded_qcow2_with_a_backing_file_is_never_used(
    server: ImageServer, tmp_path: Path
) -> None:
    """An image served with a backing file that names a file of this host is refused (exit 2)
    before any lab object uses it; a stand-alone qcow2 from the same server is accepted."""
    import subprocess

    from labbuilder.common.errors import ImageRefusedError
    from labbuilder.images.boot import resolve_base_image

    secret = tmp_path / "host-secret"
    secret.write_bytes(b"not for guests\n")
    made = tmp_path / "made"
    made.mkdir()
    for name, extra in (("chained", ["-b", str(secret), "-F", "raw"]), ("alone", [])):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(made / name), "64M"],
            check=True,
        )
        data = (made / name).read_bytes()
        server.state.files[f"/img/{name}.qcow2"] = data
        image = entry(server, f"/img/{name}.qcow2", name, checksum=hashlib.sha256(data).hexdigest())
        catalog = {name: image}
        if name == "chained":
            with pytest.raises(ImageRefusedError, match="backing file") as refused:
                resolve_base_image(name, cache_dir=tmp_path / "cache", catalog=catalog)
            assert refused.value.exit_code == 2
        else:
            assert resolve_base_image(name, cache_dir=tmp_path / "cache", catalog=catalog).disk
