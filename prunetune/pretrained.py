"""`model.weights` by torchvision's names (`IMAGENET1K_V1`, `DEFAULT`, `DenseNet169_Weights.IMAGENET1K_V1`):
resolved with torchvision's weights enum of the arch, fetched by torch.hub into torchvision's
cache (`$TORCH_HOME/hub/checkpoints/<the URL's file name>`) with its hash check.

A value written as torchvision writes names (capitals, digits and `_`, optionally after
`<Enum>_Weights.`) is a name; anything else is a path to a state_dict (write `./DEFAULT` for a
file of that name). Names apply to the built-in archs that are torchvision's models and to
`torchvision:<name>`.

The hash: torch.hub checks a download's SHA-256 against the prefix in the file's name
(`densenet169-b2777c0a.pth`) and keeps the file only when it matches; a file already in the
cache is read as it is, as torchvision reads it (a trial does not hash it again). The driver
hashes it once before the trials (`hash_note`): a file that does not match (put there by hand,
or another file under that name) gets a note, not an error, since it may be what the user meant.

The first part (names, archs) imports no torch: the spec's validation uses it. Resolving and
fetching import torchvision."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlparse

from prunetune import plugins
from prunetune.errors import UserError

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

NAME = re.compile(r"(?:[A-Za-z][A-Za-z0-9_]*_Weights\.)?[A-Z][A-Z0-9_]*")
# the built-in archs built by torchvision's builder of the same name (their weights load)
TORCHVISION_ARCHS = ("vgg11", "vgg16", "densenet121", "densenet169", "resnet18", "resnet50")


def is_name(value: str | None) -> bool:
    """A torchvision weight name, not a path."""
    return bool(value) and NAME.fullmatch(value) is not None


def torchvision_arch(arch: str) -> str | None:
    """torchvision's name of the model `arch` builds, or None (simple_cnn, the user's factory)."""
    if plugins.is_torchvision(arch):
        return arch.removeprefix(plugins.TORCHVISION)
    return arch if arch in TORCHVISION_ARCHS else None


def name_problem(arch: str, value: str | None) -> str | None:
    """Why `value` cannot be a weight name for `arch` (an arch torchvision does not build), or None
    (the text to follow the key model.weights)."""
    if not is_name(value) or torchvision_arch(arch) is not None:
        return None
    return (f"{value} is a torchvision weight name; names apply to torchvision's archs "
            f"({', '.join(TORCHVISION_ARCHS)}, torchvision:<name>), not {arch}; give {arch} a path to a "
            "state_dict (.pth)")


# -- with torchvision ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def resolve(arch: str, value: str) -> WeightsEnum:
    """The member of the arch's weights enum that `value` names (DEFAULT: the one torchvision
    recommends). UserError naming model.weights and the allowed names otherwise."""
    import torchvision.models as tvm

    model = torchvision_arch(arch)
    problem = name_problem(arch, value)
    if problem:
        raise UserError(f"model.weights: {problem}")
    try:
        enum = tvm.get_model_weights(model)
    except (KeyError, ValueError):
        raise UserError(f"model.weights: torchvision publishes no weights for {model}; give a path to a "
                        "state_dict (.pth)") from None
    allowed = ", ".join(enum.__members__)
    prefix, _, name = value.rpartition(".")
    if prefix and prefix != enum.__name__:
        raise UserError(f"model.weights: {value} names {prefix}, not {model}'s {enum.__name__}; "
                        f"allowed: {allowed} (or {enum.__name__}.<name>), or a path to a state_dict (.pth)")
    if name not in enum.__members__:
        raise UserError(f"model.weights: {value} is not a weight name of torchvision's {model}; allowed: "
                        f"{allowed} (or {enum.__name__}.<name>), or a path to a state_dict (.pth)")
    return enum[name]


def cached_file(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps the file: $TORCH_HOME/hub/checkpoints/<the URL's file name>."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def url(arch: str, value: str) -> str:
    """The URL of the weights `value` names (DEFAULT resolved): what a cache key records."""
    return resolve(arch, value).url


def fetch(arch: str, value: str, echo: Callable[[str], None] | None = None) -> Path:
    """The weights' file in torchvision's cache, downloaded there by torch.hub when missing (its
    hash checked against the prefix in its name, as `get_state_dict(check_hash=True)` checks it;
    a progress bar on stderr). UserError naming model.weights and the expected file when it
    cannot be downloaded."""
    import torch.hub

    weights = resolve(arch, value)
    path = cached_file(weights)
    if path.is_file():
        return path
    if echo:
        echo(f"downloading torchvision's {torchvision_arch(arch)} weights {weights.name} to {path}…")
    match = torch.hub.HASH_REGEX.search(path.name)
    with _download_errors(arch, value, weights, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None,
                                       progress=echo is not None)
    return path


def hash_note(arch: str, value: str) -> str | None:
    """A note where the cached file's SHA-256 does not start with the digits in its name (the
    file torchvision publishes does); None where it does, or the name carries no digits."""
    import hashlib

    import torch.hub

    path = cached_file(resolve(arch, value))
    match = torch.hub.HASH_REGEX.search(path.name)
    if match is None or not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest().startswith(match.group(1)):
        return None
    return (f"note: model.weights {value}: {path} is not the file torchvision publishes (its SHA-256 starts "
            f"{digest.hexdigest()[:len(match.group(1))]}, not {match.group(1)}); it is used as it is (delete it to "
            "download torchvision's)")


def state_dict(arch: str, value: str) -> dict:
    """The state_dict of the weights `value` names, by torchvision's loader (`get_state_dict`,
    hash-checked), from its cache: downloaded there first where missing (a node of a cluster
    without the file fetches its own copy)."""
    weights = resolve(arch, value)
    path = fetch(arch, value)
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file in the cache
        raise UserError(f"model.weights: torchvision's cache file {path} is not a readable state_dict "
                        f"({type(exc).__name__}); delete it to download it again") from None


class _download_errors:
    """A failed download as one line: offline (or the server unreachable), a wrong hash, a cache
    folder that cannot be written."""

    def __init__(self, arch: str, value: str, weights: WeightsEnum, path: Path):
        self.what, self.weights, self.path = f"{value} ({torchvision_arch(arch)})", weights, path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        import urllib.error

        if exc is None or not isinstance(exc, (OSError, RuntimeError)):
            return False
        reason = str(getattr(exc, "reason", "") or exc).strip().splitlines()
        reason = reason[0][:200] if reason else type(exc).__name__
        if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
            raise UserError(f"model.weights: {self.what} is not in torchvision's cache and cannot be downloaded "
                            f"({reason}): expected the file {self.path}; put {self.weights.url} there by hand "
                            "($TORCH_HOME/hub/checkpoints), or give a path to a state_dict (.pth)") from None
        if isinstance(exc, RuntimeError) and "hash" in str(exc):
            raise UserError(f"model.weights: the download of {self.weights.url} does not match its hash "
                            f"({reason}); nothing was kept at {self.path}: try again") from None
        if isinstance(exc, OSError):
            raise UserError(f"model.weights: cannot write torchvision's cache file {self.path} ({reason}); set "
                            "TORCH_HOME to a folder you can write") from None
        return False  # any other RuntimeError: not the user's input
