"""`data.download: true`: the publishers' files fetched into data.root from a local HTTP server
that serves fixture archives in the publishers' exact layout (no test touches the network).

A fixture cannot have the publisher's MD5, so the tests that fetch one put the fixture's MD5 in
the checksum table (monkeypatch, or a one-line patch in the CLI's process); one test checks that
the real table is what torchvision's own source says."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from prunetune import spec
from prunetune.data import download, load_dataset
from prunetune.errors import UserError

import procs
from conftest import digits_raw, error_lines, write_cifar10, write_medmnist

CIFAR10_PATH = "/~kriz/cifar-10-python.tar.gz"
DERMA_PATH = "/records/10519652/files/dermamnist.npz"


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET of the server's files, honouring `Range: bytes=N-` unless told to ignore it; can cut
    the connection once after `drop_after` bytes."""

    def do_GET(self):
        srv = self.server
        path, wanted = urllib.parse.urlsplit(self.path).path, self.headers.get("Range")
        srv.seen.append((path, wanted))
        body = srv.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted and not srv.ignore_range else 0
        if start >= len(body) > 0:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload, srv.drop_after = (body[start:start + srv.drop_after], None) if srv.drop_after else (body[start:], None)
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local server at $PRUNETUNE_DOWNLOAD_MIRROR: `server.files[path] = bytes`; `server.seen`
    lists (path, Range header) of each request."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.seen, srv.ignore_range, srv.drop_after = {}, [], False, None
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(download.MIRROR_ENV, srv.url)
    yield srv
    srv.shutdown()
    srv.server_close()


def cifar10_archive(tmp_path: Path) -> bytes:
    """cifar-10-python.tar.gz as published: cifar-10-batches-py/ with the pickled batches."""
    src = write_cifar10(tmp_path / "fixture-src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def cifar10(tmp_path, server, monkeypatch) -> bytes:
    """The fixture archive served at the publisher's path, its MD5 in the table (a fixture
    cannot have the publisher's)."""
    data = cifar10_archive(tmp_path)
    server.files[CIFAR10_PATH] = data
    monkeypatch.setitem(download.CIFAR, "cifar10", download.Archive(download.CIFAR["cifar10"].url, md5(data),
                                                                    "cifar-10-batches-py"))
    return data


def cifar_spec(root: Path) -> spec.DataSpec:
    return spec.DataSpec(dataset="cifar10", root=str(root), download=True, image_size=8)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_the_table_has_the_release_torchvision_uses():
    from torchvision.datasets import CIFAR10, CIFAR100

    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        entry = download.CIFAR[name]
        assert (entry.url, entry.md5, entry.folder) == (cls.url, cls.tgz_md5, cls.base_folder)
    assert download.medmnist_file("dermamnist_64.npz") == (
        "https://zenodo.org/records/10519652/files/dermamnist_64.npz?download=1", "b70a2f5635c6199aeaa28c31d7202e1f")


def test_cifar_is_downloaded_extracted_and_read(tmp_path, server, cifar10):
    root = tmp_path / "data"
    lines = []
    ds = load_dataset(cifar_spec(root), echo=lines.append)
    assert ds.images.shape == (140, 3, 8, 8) and (ds.split == "test").sum() == 40
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert leftovers(root) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no .part, no temporary folder
    assert server.seen == [(CIFAR10_PATH, None)]
    assert lines[0].startswith(f"downloading {server.url}{CIFAR10_PATH} → ") and "MB" in lines[0]
    assert lines[-1].startswith("downloaded ") and "MD5" in lines[-1]


def test_nothing_is_fetched_when_the_files_are_there(tmp_path, server, cifar10):
    root = write_cifar10(tmp_path / "data")
    lines = []
    load_dataset(cifar_spec(root), echo=lines.append)
    assert server.seen == [] and lines == []


def test_an_archive_put_there_by_hand_is_extracted_without_a_request(tmp_path, server, cifar10):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(cifar10)
    load_dataset(cifar_spec(root), echo=lambda _: None)
    assert server.seen == [] and (root / "cifar-10-batches-py" / "test_batch").is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "cifar-10-python.tar.gz").write_bytes(cifar10[:-1] + b"x")  # not the published file
    with pytest.raises(UserError, match="data.download: .* is not the published file"):
        load_dataset(cifar_spec(other), echo=lambda _: None)
    assert leftovers(other) == ["cifar-10-python.tar.gz"]


def test_two_readers_at_once_fetch_once(tmp_path, server, cifar10):
    """Trials on one machine that read data.root themselves wait for one download."""
    root, errors = tmp_path / "data", []

    def read():
        try:
            load_dataset(cifar_spec(root), echo=lambda _: None)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and server.seen == [(CIFAR10_PATH, None)]
    assert leftovers(root) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_a_half_part_file_is_resumed_with_a_range_request(tmp_path, server, cifar10):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz.part").write_bytes(cifar10[:len(cifar10) // 2])
    lines = []
    load_dataset(cifar_spec(root), echo=lines.append)
    assert server.seen == [(CIFAR10_PATH, f"bytes={len(cifar10) // 2}-")]
    assert "resuming at" in lines[0]
    assert (root / "cifar-10-python.tar.gz").read_bytes() == cifar10


def test_a_server_that_ignores_range_is_read_from_the_start(tmp_path, server, cifar10):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz.part").write_bytes(cifar10[:1000])
    server.ignore_range = True
    load_dataset(cifar_spec(root), echo=lambda _: None)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == cifar10


def test_a_dropped_connection_leaves_only_the_part_and_a_rerun_completes(tmp_path, server, cifar10):
    root = tmp_path / "data"
    server.drop_after = 50_000
    with pytest.raises(UserError, match="data.download: could not fetch .*rerun") as err:
        load_dataset(cifar_spec(root), echo=lambda _: None)
    assert "\n" not in str(err.value)
    assert leftovers(root) == ["cifar-10-python.tar.gz.part"]
    assert (root / "cifar-10-python.tar.gz.part").stat().st_size == 50_000
    load_dataset(cifar_spec(root), echo=lambda _: None)
    assert server.seen[-1] == (CIFAR10_PATH, "bytes=50000-")
    assert leftovers(root) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_an_archive_with_a_path_out_of_root_is_refused(tmp_path, server, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    server.files[CIFAR10_PATH] = buf.getvalue()
    monkeypatch.setitem(download.CIFAR, "cifar10", download.Archive(download.CIFAR["cifar10"].url,
                                                                    md5(buf.getvalue()), "cifar-10-batches-py"))
    root = tmp_path / "data"
    with pytest.raises(UserError, match="could not be extracted"):
        load_dataset(cifar_spec(root), echo=lambda _: None)
    assert not (tmp_path / "evil.txt").exists() and "cifar-10-batches-py" not in leftovers(root)
    assert not [p for p in leftovers(root) if p.startswith(".")]  # no temporary folder left


def test_medmnist_by_file_name(tmp_path, server, monkeypatch):
    data = write_medmnist(tmp_path / "fixture.npz").read_bytes()
    server.files[DERMA_PATH.replace(".npz", "_64.npz")] = data
    # the fixture's MD5 in place of the publisher's (for the 64 px file: the second of the four)
    monkeypatch.setitem(download.MEDMNIST_MD5, "dermamnist", ("0" * 32, md5(data), "0" * 32, "0" * 32))
    root = tmp_path / "data" / "dermamnist_64.npz"
    ds = load_dataset(spec.DataSpec(dataset="medmnist", root=str(root), download=True, image_size=8),
                      echo=lambda _: None)
    assert len(ds.labels) == 92 and root.read_bytes() == data
    assert leftovers(root.parent) == ["dermamnist_64.npz"]
    assert server.seen == [(DERMA_PATH.replace(".npz", "_64.npz"), None)]


def test_a_wrong_md5_deletes_the_part_and_says_so(tmp_path, server):
    server.files[DERMA_PATH] = write_medmnist(tmp_path / "fixture.npz").read_bytes()  # not the publisher's file
    root = tmp_path / "data" / "dermamnist.npz"
    with pytest.raises(UserError, match=r"data.download: .*dermamnist.npz.* MD5 .*expected 0744692d") as err:
        load_dataset(spec.DataSpec(dataset="medmnist", root=str(root), download=True), echo=lambda _: None)
    assert "\n" not in str(err.value)
    assert not root.parent.exists()


@pytest.mark.parametrize("dataset,root,needles", [
    ("ham10000", "data/HAM", ["data.download", "cifar10, cifar100, medmnist", "https://doi.org/10.7910/DVN/DBW86T",
                              "HAM10000_images_part_1.zip", "HAM10000_metadata.csv"]),
    ("imagefolder", "data/x", ["data.download", "cifar10, cifar100, medmnist"]),
    ("digits", None, ["data.download", "cifar10, cifar100, medmnist"]),
    ("medmnist", "data/derma.npz", ["data.root", "dermamnist_64.npz", "pathmnist", "organsmnist"]),
    ("medmnist", "data/chestmnist.npz", ["data.root", "derma"]),
    ("cifar10", None, ["data.download", "data.root"]),
])
def test_what_cannot_be_downloaded_is_refused_with_one_line(dataset, root, needles):
    with pytest.raises(UserError) as err:
        spec.validate({"name": "a", "data": {"dataset": dataset, "root": root, "download": True}})
    assert "\n" not in str(err.value)
    for needle in needles:
        assert needle in str(err.value)


def test_the_ham10000_error_names_its_page_and_files(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset(spec.DataSpec(dataset="ham10000", root=str(tmp_path)))
    for needle in ("https://doi.org/10.7910/DVN/DBW86T", "Harvard Dataverse", "HAM10000_images_part_1.zip",
                   "HAM10000_images_part_2.zip", "HAM10000_metadata.csv"):
        assert needle in str(err.value)


def test_download_is_a_param_only_when_set_and_never_part_of_a_hash():
    off = spec.validate(digits_raw(data__dataset="cifar10", data__root="/x"))
    on = spec.validate(digits_raw(data__dataset="cifar10", data__root="/x", data__download=True))
    assert "data.download" not in off.trial_params() and on.trial_params()["data.download"] is True
    # the dense hash of this spec before data.download existed: cached dense phases still match (the
    # config hash, a tag, moves with every new schedule key, e.g. rigl's update_every)
    assert off.dense_hash() == "45c510d53b03c143"
    assert (on.dense_hash(), on.config_hash()) == (off.dense_hash(), off.config_hash())


# -- as a user meets it: the CLI in its own process --------------------------------------------------

def run_cli(args, cwd, mirror: str, md5_of: dict | None = None, timeout=600):
    """`prunetune ARGS` with downloads from `mirror`; `md5_of`: MedMNIST table entries to put in
    place of the publisher's (a fixture cannot have its MD5)."""
    patch = "".join(f"download.MEDMNIST_MD5[{k!r}] = {v!r}\n" for k, v in (md5_of or {}).items())
    code = f"from prunetune.data import download\n{patch}from prunetune.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, download.MIRROR_ENV: mirror})


SWEEP = """
    name: fetched
    data: {dataset: medmnist, root: data/dermamnist.npz, download: true, image_size: 8}
    train: {batch_size: 64, lr: 0.05, dense_epochs: 1, finetune_epochs: 1}
    schedule: {method: oneshot, sparsity: 0.5}
    search: {num_trials: 1}
    resources: {cpus_per_trial: 1, max_concurrent: 1}
    """


def test_offline_and_wrong_md5_exit_2_with_one_line_and_write_nothing(tmp_path, server):
    (tmp_path / "s.yaml").write_text(textwrap.dedent(SWEEP))
    dead = f"http://127.0.0.1:{procs.free_port()}"  # nothing listens there
    r = run_cli(["sweep", "s.yaml"], tmp_path, dead)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = error_lines(r.stderr)
    assert "data.download" in line and f"{dead}{DERMA_PATH}" in line and "by hand" in line, line
    server.files[DERMA_PATH] = write_medmnist(tmp_path / "fixture.npz").read_bytes()
    r = run_cli(["sweep", "s.yaml"], tmp_path, server.url)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = error_lines(r.stderr)
    assert "data.download" in line and "MD5" in line, line
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_sweep_downloads_then_runs(tmp_path, server):
    (tmp_path / "s.yaml").write_text(textwrap.dedent(SWEEP))
    data = write_medmnist(tmp_path / "fixture.npz").read_bytes()
    server.files[DERMA_PATH] = data
    r = run_cli(["sweep", "s.yaml"], tmp_path, server.url, {"dermamnist": (md5(data), "", "", "")})
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert f"downloading {server.url}{DERMA_PATH}" in out and "1/1 done" in out, out[-3000:]
    assert out.index("downloading ") < out.index("starting Ray")
    assert (tmp_path / "data" / "dermamnist.npz").read_bytes() == data
    assert server.seen == [(DERMA_PATH, None)]  # once, on the driver: the trial reads the driver's data
    assert np.load(tmp_path / "data" / "dermamnist.npz")["train_images"].shape[0] == 60
