"""What every node of a cluster must see before a sweep spends compute: the storage (written by the
driver, read back by the node, and the other way round), the same data files, and the same
prunetune. `expectations` runs on the driver; `problems` runs on each node (a Ray task of
`sweep/preflight.py`) and says, in words a user can act on, what is wrong there. No ray here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import prunetune
from prunetune import plugins
from prunetune.errors import UserError
from prunetune.storage import Storage


def code_fingerprint() -> str:
    """prunetune's version and a hash of its source files: two nodes running different code
    (another checkout, an older install) differ here even when the version string is the same."""
    root = Path(prunetune.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return f"{prunetune.__version__}+{digest.hexdigest()[:12]}"


def files_fingerprint(root: str) -> tuple[int, str] | None:
    """(number of files, hash of their relative paths and sizes) under `root` (a folder or one
    file); None when it does not exist. Sizes, not modification times: a copy made without
    keeping times is the same data."""
    path = Path(root)
    if path.is_file():
        files = [(path.name, path.stat().st_size)]
    elif path.is_dir():
        files = []
        for folder, _, names in os.walk(path):
            for name in names:
                f = Path(folder) / name
                files.append((str(f.relative_to(path)), f.stat().st_size))
        files.sort()
    else:
        return None
    digest = hashlib.sha256(repr(files).encode()).hexdigest()[:16]
    return len(files), digest


def expectations(paths: dict[str, str], user_code: list[tuple[str, str]] = ()) -> dict:
    """What the driver sees: `paths` is {spec key: local path} of the files trials read
    (data.root, model.weights); `user_code` the (key, `package.module:factory`) every node must
    import."""
    return {"code": code_fingerprint(), "files": {key: (path, files_fingerprint(path)) for key, path in paths.items()},
            "user_code": [(key, ref, plugins.source_digest(ref)) for key, ref in user_code]}


def problems(storage_uri: str, probe: str, node: str, expected: dict) -> list[str]:
    """Run on a node: what it cannot do that a trial needs. Reads the driver's token from
    `probe/driver` in the storage and writes its own as `probe/<node>` for the driver to read."""
    found = []
    code = code_fingerprint()
    if code != expected["code"]:
        found.append(f"runs prunetune {code}, the driver {expected['code']} (prunetune: install the same "
                     "version and code on every node)")
    try:
        storage = Storage(storage_uri)
        token = storage.read_text(f"{probe}/driver")
        storage.write_text(f"{probe}/{node}", token)
    except FileNotFoundError:
        found.append(f"does not see what the driver wrote to {storage_uri} (tracking.storage: a path on "
                     "one machine is not shared; use a shared filesystem path every node mounts, or a "
                     "URI such as s3://bucket/prefix)")
    except Exception as exc:  # noqa: BLE001 - any filesystem's own error types
        found.append(f"cannot use {storage_uri} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}) "
                     "(tracking.storage: make it reachable from every node, with credentials there)")
    for key, ref, digest in expected.get("user_code", []):
        try:
            plugins.load_factory(key, ref, hint=plugins.SHIPPED)
        except UserError as exc:
            found.append(str(exc))
            continue
        if plugins.source_digest(ref) != digest:
            where = ", ".join(map(str, plugins.units(ref))) or "an installed package"
            found.append(f"imports other code for {key} {ref} than the driver ({where}); remove or update "
                         "the copy there that shadows the driver's")
    for key, (path, fingerprint) in expected["files"].items():
        here = files_fingerprint(path)
        if here is None:
            found.append(f"has no {path} ({key}: put the same files at that path on every node, or on a "
                         "shared filesystem)")
        elif here != tuple(fingerprint):
            found.append(f"has other files at {path} than the driver ({here[0]} files there, {fingerprint[0]} "
                         f"on the driver; {key}: copy the same files to every node)")
    return found
