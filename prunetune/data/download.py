"""`data.download: true`: fetch into `data.root` the files a publisher serves with a checksum.

CIFAR-10/100: the python-pickle release torchvision uses (its URL and MD5), extracted so that
`data.root/cifar-10-batches-py/` (or `cifar-100-python/`) exists. MedMNIST: the `.npz` that
`data.root` names (`dermamnist.npz` is 28 px, `dermamnist_64.npz` 64 px; also `_128`, `_224`),
with the URLs and MD5s of the medmnist package. HAM10000 and the rest stay manual downloads.

Nothing is fetched when the files are there. Bytes go to a `.part` file beside the target, and a
rerun resumes it with an HTTP Range request; the MD5 is checked before anything is renamed into
place, and an archive is extracted into a temporary folder renamed into place, so `data.root`
never holds half a file or folder. `$PRUNETUNE_DOWNLOAD_MIRROR` (a base URL) replaces the
publisher's scheme and host: for a mirror, and for tests, which serve fixtures from a local server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from typing import Callable

from prunetune.errors import UserError

MIRROR_ENV = "PRUNETUNE_DOWNLOAD_MIRROR"
TIMEOUT_S = 60  # a silent connection for this long is an error (rerun to resume)
STATUS_S = 5.0  # seconds between the progress lines when output is not a terminal
CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """A tar.gz release that extracts to `folder`."""

    url: str
    md5: str
    folder: str


# The release torchvision.datasets.CIFAR10/CIFAR100 download (url, tgz_md5, base_folder).
CIFAR = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}

# MedMNIST v2/v3 (medmnist 3.0.2, medmnist/info.py: url, MD5, url_64, MD5_64, ...): the
# single-label 2D sets (ChestMNIST is multi-label; the 3D sets are not images), MD5 per size.
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
MEDMNIST_SIZES = (28, 64, 128, 224)
MEDMNIST_MD5 = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                  "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                   "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                 "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                       "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                    "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                    "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                   "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                    "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                    "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
    "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                    "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
    "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                    "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
}
DATASETS = ("cifar10", "cifar100", "medmnist")  # what data.download fetches
MEDMNIST_NAMES = ("<set>.npz (28 px), <set>_64.npz, <set>_128.npz or <set>_224.npz (e.g. dermamnist_64.npz), "
                  "<set> one of " + ", ".join(MEDMNIST_MD5))
# HAM10000's publisher serves its files behind a dataset page, without a stable URL and checksum
HAM10000_PAGE = "https://doi.org/10.7910/DVN/DBW86T"
HAM10000_FILES = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", "HAM10000_metadata.csv")
HAM10000_MANUAL = (f"download {', '.join(HAM10000_FILES)} from the Harvard Dataverse page {HAM10000_PAGE} "
                   "and unzip the images into data.root")


def problem(dataset: str, root: str | None) -> str | None:
    """Why `data.download: true` cannot fetch `dataset` into `root` (None: it can)."""
    if dataset not in DATASETS:
        return (f"data.download: true fetches {', '.join(DATASETS)} (files their publishers serve with a "
                f"checksum), not {dataset}; set data.download: false"
                + (f" and {HAM10000_MANUAL}" if dataset == "ham10000" else ""))
    if root is None:
        return f"data.download: {dataset} is fetched into data.root; set data.root"
    if dataset == "medmnist" and medmnist_file(Path(root).name) is None:
        return (f"data.root: with data.download, the file name says which MedMNIST set and size to fetch "
                f"(got {Path(root).name}); allowed: {MEDMNIST_NAMES}")
    return None


def medmnist_file(name: str) -> tuple[str, str] | None:
    """(URL, MD5) of a MedMNIST file name (`dermamnist.npz`, `dermamnist_64.npz`), or None."""
    stem, _, ext = name.partition(".")
    flag, _, size = stem.partition("_")
    sizes = {"": 0, **{str(s): i for i, s in enumerate(MEDMNIST_SIZES) if s != 28}}
    if ext != "npz" or flag not in MEDMNIST_MD5 or size not in sizes:
        return None
    return MEDMNIST_URL.format(file=name), MEDMNIST_MD5[flag][sizes[size]]


def fetch(data_spec, echo: Callable[[str], None] | None = None) -> None:
    """Fetch `data_spec`'s files into its root when `data_spec.download` is set and they are not
    there. UserError (one line naming data.download) on a refused dataset, a network error or a
    wrong MD5; a rerun resumes where a dropped connection left off."""
    if not getattr(data_spec, "download", False):
        return
    why = problem(data_spec.dataset, data_spec.root)
    if why:
        raise UserError(why)
    echo = echo or _stderr
    root = Path(data_spec.root)
    with _lock():
        if data_spec.dataset == "medmnist":
            if not root.is_file():
                _download(*medmnist_file(root.name), root, echo)
        else:
            _fetch_archive(CIFAR[data_spec.dataset], root, echo)


def _fetch_archive(archive: Archive, root: Path, echo: Callable[[str], None]) -> None:
    if (root / archive.folder).is_dir() or (root.name == archive.folder and root.is_dir()):
        return  # there, in data.root or as data.root itself
    tgz = root / Path(urllib.parse.urlparse(archive.url).path).name
    if not tgz.is_file():
        _download(archive.url, archive.md5, tgz, echo)
    elif _md5(tgz) != archive.md5:  # put here by hand
        raise UserError(f"data.download: {tgz} is not the published file (its MD5 is not {archive.md5}); "
                        "delete it and rerun to fetch it")
    _extract(tgz, archive.folder, root)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def mirrored(url: str) -> str:
    """`url` with its scheme and host replaced by `$PRUNETUNE_DOWNLOAD_MIRROR`, where set."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return mirror.rstrip("/") + urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))


def _download(url: str, md5: str, target: Path, echo: Callable[[str], None]) -> None:
    """`url` into `target` through `target.part`, resumed if that exists, MD5-checked, renamed."""
    part = target.with_name(target.name + ".part")
    made = not target.parent.exists()  # made here: removed again if nothing is kept in it
    _fetch_into(mirrored(url), part, target, echo)
    digest = _md5(part)
    if digest != md5:
        part.unlink()
        if made:
            with contextlib.suppress(OSError):
                target.parent.rmdir()
        raise UserError(f"data.download: {url} arrived with MD5 {digest}, expected {md5}; the partial file "
                        f"was deleted, rerun to fetch it again or put {target.name} in {target.parent} by hand")
    os.replace(part, target)
    echo(f"downloaded {target} (MD5 checked)")


def _fetch_into(url: str, part: Path, target: Path, echo: Callable[[str], None]) -> None:
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if have and response.status != 206:
                have = 0  # the server ignored Range: start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            echo(f"downloading {url} → {target}" + (f" ({total / 1e6:.1f} MB)" if total else "")
                 + (f", resuming at {have / 1e6:.1f} MB" if have else ""))
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "ab" if have else "wb") as f, _Bar(total, have, echo) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.advance(len(chunk))
            if total is not None and part.stat().st_size < total:
                raise IncompleteRead(b"", total - part.stat().st_size)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left past the .part: the MD5 check decides
            return
        raise UserError(_offline(url, target, f"HTTP {exc.code} {exc.reason}")) from None
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(_offline(url, target, f"{type(exc).__name__}: {reason}")) from None


def _offline(url: str, target: Path, reason: str) -> str:
    kept = " (what arrived is kept; a rerun resumes it)" if target.with_name(target.name + ".part").is_file() else ""
    return (f"data.download: could not fetch {url} ({reason}){kept}; rerun when online, or put "
            f"{target.name} in {target.parent} by hand")


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _extract(tgz: Path, folder: str, root: Path) -> None:
    """`folder` out of `tgz` into `root`, through a temporary folder beside it renamed into place.
    tarfile's "data" filter refuses absolute paths, `..`, links out of the folder and devices."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder}."))
    try:
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"data.download: {tgz} could not be extracted ({exc}); delete it and rerun") from None
        if not (tmp / folder).is_dir():
            raise UserError(f"data.download: {tgz} holds no {folder}/; delete it and rerun")
        os.replace(tmp / folder, root / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _lock():
    """One download at a time among this user's processes on this machine (trials that read
    data.root where the driver did not fetch it): the second finds the files there. The lock
    file lives in the temporary folder, so nothing is left in data.root."""
    import fcntl

    path = Path(tempfile.gettempdir()) / f"prunetune-download-{os.getuid()}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Bar:
    """A download's progress: rich's bar on a terminal, else a line every STATUS_S seconds."""

    def __init__(self, total: int | None, done: int, echo: Callable[[str], None]):
        self.total, self.done, self.echo = total, done, echo
        self.last = time.monotonic()
        self.rich = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            self.rich = Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self.rich.start()
            self.task = self.rich.add_task("download", total=self.total, completed=self.done)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.rich is not None:
            self.rich.update(self.task, completed=self.done)
        elif time.monotonic() - self.last >= STATUS_S:
            self.last = time.monotonic()
            of = f" of {self.total / 1e6:.1f} MB ({100 * self.done / self.total:.0f}%)" if self.total else " MB"
            self.echo(f"  {self.done / 1e6:.1f}{of}")

    def __exit__(self, *exc):
        if self.rich is not None:
            self.rich.stop()
