"""The spec: pydantic models of every key (the one place where defaults live), loading (YAML,
`base:` deep-merge, `--set`), search entries, validation and the content hash.

Imports no torch, ray, optuna or mlflow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from prunetune import metrics, registry
from prunetune.errors import UserError
from prunetune.pruning import schedules

FINAL_METRICS = metrics.FINAL_METRICS  # objectives must name one
SEARCHABLE_SECTIONS = ("model", "data", "train", "schedule", "distill")
# Bumped when what a dense phase computes changes (2: every step's randomness seeded by its step,
# so a fractional rewind can replay it), so old cache entries are not reused.
DENSE_FORMAT = 2
SEARCH_KINDS = ("choice", "uniform", "loguniform", "int")


def _known(value: str, names) -> str:
    if value not in names:
        raise ValueError(f"unknown name {value!r}; valid: {', '.join(sorted(names))}")
    return value


class _Strict(BaseModel):
    # Unknown or mistyped keys are refused, never ignored; no silent type coercion of strings.
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSpec(_Strict):
    arch: str = "simple_cnn"
    weights: Optional[str] = None
    stem: Literal["auto", "imagenet", "small"] = "auto"
    freeze: list[str] = []

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return _known(v, registry.MODELS)


class DataSpec(_Strict):
    dataset: str = "digits"
    root: Optional[str] = None
    image_size: int = Field(32, ge=4, le=1024)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    # draws the split of data without a published one; `seed` (and replicates) never change it
    split_seed: int = 0
    augment: list[Literal["flip", "crop"]] = []

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return _known(v, registry.DATASETS)

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class TrainSpec(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5.0e-4, ge=0.0)
    lr_schedule: Literal["constant", "cosine", "step"] = "cosine"
    dense_epochs: int = Field(10, ge=0)
    finetune_epochs: float = Field(10, ge=0.0)
    # Equal budgets: every method trains this many epochs after the dense phase, finetune_epochs
    # being what its own steps leave (null: finetune_epochs as given).
    budget_epochs: float | None = Field(None, ge=0.0)
    amp: bool = False
    # Imbalanced data: weight the loss by inverse class frequency, or draw training batches with
    # every class equally likely (with replacement; an epoch is still one pass's worth of samples).
    class_balance: Literal["none", "weighted_loss", "balanced_sampler"] = "none"
    # Structured criteria: λ of the group-lasso penalty over the channel groups (0 = none).
    group_lasso: float = Field(0.0, ge=0.0)
    # CUDA only (ignored on a CPU): train with the model and its inputs in channels-last memory
    # format, and through torch.compile (the training forward; the stored model is not wrapped).
    # benchmarks/gpu_check.py measures whether each pays off.
    channels_last: bool = False
    compile: bool = False


class ScheduleSpec(_Strict):
    method: str = "oneshot"
    criterion: str = "l1_unstructured"
    scope: Literal["global", "layer"] = "global"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    step_size: float = Field(0.2, gt=0.0, lt=1.0)
    step_epochs: float = Field(1.0, ge=0.0)
    # lottery, and oneshot/iterative retraining other than finetune: the point of the dense phase
    # whose learning rate (and weights, for weight_rewind) retraining replays; fractional = a step
    rewind_epoch: float = Field(0.0, ge=0.0)
    layers: Union[str, list[str]] = "all"
    step_rule: Literal["fixed", "geometric"] = "fixed"  # iterative, lottery: targets k·p or 1 − (1 − p)^k
    # oneshot, iterative: after each prune, finetune (train on), or retrain dense_epochs − rewind_epoch
    # epochs on the dense learning-rate schedule replayed from rewind_epoch, starting from the
    # trained weights (lr_rewind), the weights at rewind_epoch (weight_rewind: the lottery ticket)
    # or a fresh initialisation (reinit: the ticket's control). lottery is iterative + weight_rewind.
    # finetune_final_lr: Renda et al.'s fine-tuning baseline, the same dense_epochs − rewind_epoch
    # epochs per round at the dense schedule's final learning rate.
    retrain: Literal["finetune", "lr_rewind", "weight_rewind", "reinit", "finetune_final_lr"] = "finetune"
    start_epoch: float = Field(0.0, ge=0.0)  # gradual: the ramp, in epochs after the dense phase
    end_epoch: float = Field(4.0, gt=0.0)
    redense_lr_factor: float = Field(0.1, gt=0.0)  # dsd, ist: lr factor of the re-dense training
    cycles: int = Field(2, ge=1)  # ist
    remove: bool = False  # structured criteria: physically remove the pruned channels after training
    # (l1_nm on a CUDA GPU of compute capability ≥ 8.0: export the semi-structured model)
    # the sanity check of Frankle et al. (2021): after each prune, permute each layer's mask
    mask_control: Literal["none", "shuffle"] = "none"
    synflow_iters: int = Field(100, ge=1)  # synflow: scoring rounds, density falling exponentially
    n_m: list[int] = Field(default_factory=lambda: [2, 4])  # l1_nm: N of every M input weights survive

    @field_validator("n_m")
    @classmethod
    def _n_m(cls, v: list[int]) -> list[int]:
        if len(v) != 2 or not 0 < v[0] < v[1]:
            raise ValueError(f"must be [N, M] with 0 < N < M, e.g. [2, 4] (got {v!r})")
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return _known(v, schedules.METHODS)

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        return _known(v, registry.CRITERIA)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        schedules.parse_layers(v)
        return v


class DistillSpec(_Strict):
    """Knowledge distillation: `model.arch` is trained as the student of `teacher` (an MLflow run
    id or a trial's checkpoint directory) with alpha · T² · KL(teacher ‖ student) + (1 − alpha) · CE."""

    teacher: str = Field(min_length=1)
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)

    @field_validator("teacher", mode="before")
    @classmethod
    def _text(cls, v):
        if not isinstance(v, str):
            raise ValueError(f"must be a run id or a directory, as text (got {v!r}); quote a run id in YAML")
        return v


class Objective(_Strict):
    metric: str
    mode: Literal["max", "min"]

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        return _known(v, FINAL_METRICS)


class SearchSpec(_Strict):
    sampler: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    # selection is on validation: choosing on test_* would bias the test score reported for the choice
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="val_acc", mode="max")], min_length=1)
    num_trials: int = Field(8, ge=1)
    early_stop: Literal["none", "asha"] = "none"
    replicates: int = Field(1, ge=1)


class ResourcesSpec(_Strict):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    max_concurrent: int = Field(2, ge=1)
    # a trial whose worker or node dies restarts from its last saved state, this many times
    # (not for its own errors: an exception in training or a non-finite loss fails it at once)
    max_retries: int = Field(2, ge=0)


class TrackingSpec(_Strict):
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifacts: str = "mlruns/artifacts"
    # the sweep's state and everything trials write for others (resume state, finished artifacts,
    # the dense-phase cache): a path, a shared (NFS) path, or a URI such as s3://bucket/prefix
    storage: str = Field("mlruns/tune", min_length=1)


class CkaSpec(_Strict):
    top: int = Field(3, ge=0)
    samples: int = Field(1024, ge=4)
    batch_size: int = Field(256, ge=4)


class AnalysisSpec(_Strict):
    cka: CkaSpec = CkaSpec()


class Spec(_Strict):
    """A resolved spec: every key filled in; no search entries left."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    distill: Optional[DistillSpec] = None
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    analysis: AnalysisSpec = AnalysisSpec()

    @model_validator(mode="after")
    def _method_values(self):
        s = self.schedule
        if s.method == "lottery" and s.retrain not in ("finetune", "weight_rewind"):
            raise ValueError(f"schedule.retrain {s.retrain} does not apply to method lottery, which always "
                             "rewinds weights; use method iterative (or oneshot) with retrain "
                             f"{s.retrain} for that control")
        rewinds = s.method == "lottery" or (s.method in ("oneshot", "iterative") and s.retrain != "finetune")
        if rewinds and s.rewind_epoch > self.train.dense_epochs:
            what = "method lottery" if s.method == "lottery" else f"schedule.retrain {s.retrain}"
            raise ValueError(
                f"schedule.rewind_epoch ({s.rewind_epoch:g}) must not exceed train.dense_epochs "
                f"({self.train.dense_epochs}) for {what}")
        if s.method in ("dsd", "ist") and registry.is_structured(s.criterion):
            # A pruned channel has all of its group at zero (filters, batch norm, next layers'
            # inputs): every gradient of it is zero, so it could never regrow after the release.
            raise ValueError(f"schedule.method {s.method} re-grows pruned weights from zero, which a pruned "
                             f"channel cannot (its whole group is zero, so are its gradients); use "
                             f"l1_unstructured or random with {s.method}")
        if registry.is_pattern(s.criterion):
            n, m = s.n_m
            if abs(s.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"schedule.sparsity must be 1 − N/M = {1 - n / m:g} with criterion {s.criterion} "
                                 f"and schedule.n_m {s.n_m} (got {s.sparsity:g}): the N:M pattern fixes it")
        if s.mask_control == "shuffle" and (s.method == "gradual" or (
                s.method == "iterative" and s.retrain not in ("weight_rewind", "reinit"))):
            # the last prune's mask, shuffled, lands on weights pruned by earlier steps: they have
            # no value of their own to start from (a ticket's rounds rewind or re-initialise them)
            raise ValueError(f"schedule.mask_control shuffle needs a value for every weight it may keep, which "
                             f"method {s.method} with retrain {s.retrain} has not (weights pruned at earlier "
                             f"steps are zero); use oneshot, layerwise, dsd, ist, lottery, or iterative with "
                             f"retrain weight_rewind or reinit")
        if s.mask_control == "shuffle" and (registry.is_structured(s.criterion) or registry.is_pattern(s.criterion)):
            raise ValueError(f"schedule.mask_control shuffle permutes single weights, which would break "
                             f"criterion {s.criterion}'s pattern; use it with an unstructured criterion")
        if s.method == "gradual" and s.end_epoch <= s.start_epoch:
            raise ValueError(f"schedule.end_epoch ({s.end_epoch:g}) must be after schedule.start_epoch "
                             f"({s.start_epoch:g}) for method gradual")
        return self

    @model_validator(mode="after")
    def _budget(self, info: ValidationInfo):
        """The method's own steps must fit train.budget_epochs. Where they depend on the model's
        layers (layerwise over all or globs), stand-ins give a lower bound; a sweep validates
        again with the real layers (context `layers`: Spec → the names a trial prunes)."""
        if self.train.budget_epochs is not None:
            select = (info.context or {}).get("layers")
            layers = select(self) if select else schedules.stand_in_layers(self.schedule.layers)
            schedules.plan(self.schedule, self.train, layers)  # BudgetError is a ValueError
        return self

    # -- derived views -------------------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """Every key, dotted (`schedule.method`, `train.lr`, …): the params logged to MLflow."""
        return flatten(self.model_dump(mode="json"))

    def config_hash(self) -> str:
        """Content hash of what determines a trial's result (not tracking, resources, search)."""
        return _hash({k: v for k, v in self.model_dump(mode="json").items()
                      if k in ("seed", "model", "data", "train", "schedule", "distill")})

    def dense_hash(self) -> str:
        """Content hash of what determines the dense phase: trials with equal hashes share it."""
        d = self.model_dump(mode="json")
        # what trains after the dense phase does not change it
        train = {k: v for k, v in d["train"].items() if k not in ("finetune_epochs", "budget_epochs")}
        extra = {}
        if d["distill"]:
            extra["distill"] = d["distill"]  # the dense phase is distilled too
        if self.train.group_lasso > 0 and registry.is_structured(self.schedule.criterion):
            # the penalty acts from the first step on the channel groups of the selected layers
            # (the same groups for every structured criterion; none for an unstructured one)
            extra["penalty"] = {"groups": "channels", "layers": self.schedule.layers}
        return _hash({"format": DENSE_FORMAT, "seed": d["seed"], "model": d["model"], "data": d["data"],
                      "train": train, **extra})


    def ticket_hash(self, targets: list[float]) -> str:
        """Content hash of a lottery ticket's weight-rewinding rounds to `targets`: its dense
        phase and what prunes and rewinds (not the method, sparsity or control that asked)."""
        s = self.schedule
        return _hash({"dense": self.dense_hash(), "targets": targets, "criterion": s.criterion, "scope": s.scope,
                      "layers": s.layers, "rewind_epoch": s.rewind_epoch, "synflow_iters": s.synflow_iters,
                      "n_m": s.n_m})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# Search entries
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchEntry:
    """`{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}` or `{int: [lo, hi]}`."""

    kind: str
    args: tuple
    step: float | int | None = None

    def probe_values(self) -> list[Any]:
        """Values that validation tries: every choice, or both ends of a range."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]


def is_search_entry(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in SEARCH_KINDS)


def parse_search_entry(key: str, value: dict) -> SearchEntry:
    kinds = [k for k in SEARCH_KINDS if k in value]
    extra = sorted(set(value) - set(SEARCH_KINDS) - {"step"})
    allowed = "{choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} or {int: [lo, hi]} (optional step:)"
    if len(kinds) != 1 or extra:
        raise UserError(f"spec key {key}: a search entry is one of {allowed}; got {value!r}")
    kind = kinds[0]
    args, step = value[kind], value.get("step")
    if not isinstance(args, list) or not args:
        raise UserError(f"spec key {key}: {kind} takes a non-empty list; got {args!r}")
    if kind == "choice":
        if step is not None:
            raise UserError(f"spec key {key}: choice takes no step")
        return SearchEntry(kind, tuple(args))
    if len(args) != 2 or not all(_is_number(a) for a in args):
        raise UserError(f"spec key {key}: {kind} takes [lo, hi] numbers; got {args!r}")
    lo, hi = args
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise UserError(f"spec key {key}: int takes integer bounds; got {args!r}")
    if not lo < hi and not (kind == "int" and lo == hi):
        raise UserError(f"spec key {key}: {kind} needs lo < hi; got {args!r}")
    if kind == "loguniform":
        if lo <= 0:
            raise UserError(f"spec key {key}: loguniform needs lo > 0; got {args!r}")
        if step is not None:
            raise UserError(f"spec key {key}: loguniform takes no step")
    if step is not None and (not _is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int))):
        raise UserError(f"spec key {key}: step must be a positive {'integer' if kind == 'int' else 'number'}; got {step!r}")
    return SearchEntry(kind, (lo, hi), step)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _extract_search(raw: dict) -> dict[str, SearchEntry]:
    found: dict[str, SearchEntry] = {}

    def walk(node: Any, path: str, searchable: bool) -> None:
        if is_search_entry(node):
            if not searchable:
                raise UserError(f"spec key {path}: search entries are allowed only under "
                                f"{', '.join(SEARCHABLE_SECTIONS)}")
            found[path] = parse_search_entry(path, node)
        elif isinstance(node, dict):
            for k, v in node.items():
                sub = f"{path}.{k}" if path else str(k)
                walk(v, sub, searchable or (not path and k in SEARCHABLE_SECTIONS))

    walk(raw, "", False)
    return found


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

class _SpecLoader(yaml.SafeLoader):
    """A safe loader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?[0-9][0-9_]*\.[0-9_]*$|^[-+]?\.[0-9_]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"""),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"spec file {path}: not found")
    text = path.read_text()
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"spec file {path}:{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise UserError(f"spec file {path}: the file is empty; a spec needs at least `name:`")
    if not isinstance(data, dict):
        raise UserError(f"spec file {path}: must be a YAML mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not is_search_entry(v):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise UserError(f"spec file {path}: `base:` files form a cycle")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"spec file {path}: `base` must be a path or a list of paths")
    merged: dict = {}
    for b in bases:
        bpath = (path.parent / b)
        if not bpath.is_file():
            raise UserError(f"spec file {path}: base file {b} not found (looked for {bpath.resolve()})")
        merged = deep_merge(merged, _load_with_bases(bpath, seen + (path,)))
    return deep_merge(merged, data)


# Keys whose --set value is always text: an MLflow run id such as 0123…, or 1e05…, must not
# turn into a number.
_TEXT_KEYS = frozenset({"name", "distill.teacher", "model.weights", "data.root", "tracking.storage"})


def parse_set(item: str) -> tuple[str, Any]:
    """`a.b=value` → ('a.b', value parsed as a YAML scalar or flow collection)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. schedule.sparsity=0.8")
    if key in _TEXT_KEYS and text and not text.lstrip().startswith(("{", "[")):
        return key, text
    try:
        value = yaml_load(text) if text else None
    except yaml.YAMLError:
        value = text
    return key, value


@dataclass
class LoadedSpec:
    """A spec file as loaded: the merged raw mapping and its search space, validated."""

    path: Path | None
    raw: dict
    space: dict[str, SearchEntry]

    def fixed_spec(self) -> Spec:
        """The spec with each search entry at its first probe value (for display and checks)."""
        return self.resolve({k: e.probe_values()[0] for k, e in self.space.items()})

    def resolve(self, params: dict[str, Any]) -> Spec:
        """Replace search entries by `params` (dotted keys); entries not given take the default."""
        raw = copy.deepcopy(self.raw)
        for key in self.space:
            if key in params:
                set_dotted(raw, key, params[key])
            else:
                _del_dotted(raw, key)
        return validate(raw)

    def rewind_points(self) -> list[float]:
        """The `schedule.rewind_epoch` values this spec's trials may ask for, where they are a
        finite set (fixed, or a choice): a dense phase saves the fractional ones as it passes."""
        entry = self.space.get("schedule.rewind_epoch")
        if entry is None:
            value = self.raw.get("schedule", {}).get("rewind_epoch")
            return [value] if _is_number(value) else []
        return [v for v in entry.args if _is_number(v)] if entry.kind == "choice" else []

    def trial_spec(self) -> Spec:
        """The one spec a `prunetune trial` runs: every searched key that matters must be fixed."""
        method = self.raw.get("schedule", {}).get("method", ScheduleSpec().method)
        retrain = self.raw.get("schedule", {}).get("retrain", ScheduleSpec().retrain)
        if "schedule.method" in self.space or ("schedule.retrain" in self.space
                                               and schedules.key_is_used(method, "retrain")):
            missing = list(self.space)
        else:
            missing = [k for k in self.space if not k.startswith("schedule.")
                       or schedules.key_is_used(method, k.split(".", 1)[1], retrain)]
        if missing:
            raise UserError("prunetune trial needs fixed values for the searched keys "
                            f"{', '.join(missing)}; give them with --set KEY=VALUE")
        return self.resolve({})


def get_dotted(d: dict, key: str, default: Any = None) -> Any:
    for p in key.split("."):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _del_dotted(d: dict, key: str) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.get(p, {})
    d.pop(parts[-1], None)


def format_validation_error(exc: ValidationError) -> str:
    errs = exc.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        parent = loc.rsplit(".", 1)[0] if "." in loc else None
        model = _model_at(parent)
        allowed = ", ".join(model.model_fields) if model else ""
        msg = f"unknown key; allowed here: {allowed}"
    elif first["type"] == "missing":
        msg = "is required"
    elif "input" in first and first["type"] not in ("value_error",):
        msg = f"{msg} (got {first['input']!r})"
    where = f"spec key {loc}: " if loc else "spec: "
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return f"{where}{msg}{more}"


def _model_at(dotted: str | None):
    model: Any = Spec
    for part in (dotted.split(".") if dotted else []):
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def validate(raw: dict) -> Spec:
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None


def _check_space(raw: dict, space: dict[str, SearchEntry], unused_is_error: bool = True,
                 layers: Callable[[Spec], list[str]] | None = None) -> None:
    """Validate every searched value (each choice, both ends of each range), per method; `layers`:
    the layers a trial of a spec prunes, where known (see `check_with_layers`)."""
    method_entry = space.get("schedule.method")
    if method_entry is not None:
        for m in method_entry.probe_values():
            if m not in schedules.METHODS:
                raise UserError(f"spec key schedule.method: unknown name {m!r}; valid: "
                                f"{', '.join(sorted(schedules.METHODS))}")
        methods = list(method_entry.probe_values())
    else:
        methods = [raw.get("schedule", {}).get("method", ScheduleSpec().method)]
        if methods[0] not in schedules.METHODS:
            return  # validating the spec names the key and the valid methods

    retrain_entry = space.get("schedule.retrain")
    retrains = (list(retrain_entry.probe_values()) if retrain_entry is not None
                else [raw.get("schedule", {}).get("retrain", ScheduleSpec().retrain)])
    for key in space:
        section, _, leaf = key.partition(".")
        if section == "schedule" and leaf in schedules.METHOD_SPECIFIC_KEYS:
            if unused_is_error and not any(schedules.key_is_used(m, leaf, r) for m in methods for r in retrains):
                raise UserError(f"spec key {key}: searched, but schedule.method "
                                f"({', '.join(map(str, methods))}) never uses it"
                                + (f" with schedule.retrain {', '.join(retrains)}" if leaf == "rewind_epoch" else ""))

    # Each method (and retraining) with the searched keys it uses, as a trial would get them.
    for method in methods:
        uses_retrain = schedules.key_is_used(method, "retrain")
        for retrain in (retrains if uses_retrain else ["finetune"]):
            used = {k: e for k, e in space.items() if k not in ("schedule.method", "schedule.retrain")
                    and (not k.startswith("schedule.") or schedules.key_is_used(method, k.split(".", 1)[1], retrain))}
            base = {k: e.probe_values()[0] for k, e in used.items()}
            if method_entry is not None:
                base["schedule.method"] = method
            if retrain_entry is not None and uses_retrain:
                base["schedule.retrain"] = retrain
            for key, value in [(None, None)] + [(k, v) for k, e in used.items() for v in e.probe_values()]:
                params = base if key is None else dict(base, **{key: value})
                raw_try = copy.deepcopy(raw)
                for k in space:
                    _del_dotted(raw_try, k)
                for k, v in params.items():
                    set_dotted(raw_try, k, v)
                try:
                    Spec.model_validate(raw_try, context={"layers": layers})
                except ValidationError as exc:
                    what = f" [searched value {value!r} of {key}]" if key else f" [schedule.method {method}]"
                    raise UserError(f"{format_validation_error(exc)}{what}") from None


def check_with_layers(loaded: LoadedSpec, layers: Callable[[Spec], list[str]]) -> None:
    """Validate every searched value again, now with `layers(spec)` the layers a trial of it would
    prune (known once the model is built): what depends on them (a layerwise schedule under
    train.budget_epochs) is checked before any trial starts. Raises UserError."""
    _check_space(loaded.raw, loaded.space, layers=layers)


def _check_structured(raw: dict, space: dict[str, SearchEntry]) -> None:
    """`schedule.remove` and `train.group_lasso` act on channel groups: with a fixed unstructured
    criterion they would silently do nothing. (With a searched criterion they apply to the trials
    that sample a structured one.)"""
    if "schedule.criterion" in space:
        return
    criterion = raw.get("schedule", {}).get("criterion", ScheduleSpec().criterion)
    if registry.is_structured(criterion):
        return
    structured = ", ".join(registry.structured_criteria())
    if raw.get("schedule", {}).get("remove") is True and not registry.is_pattern(criterion):
        raise UserError(f"spec key schedule.remove: needs a structured schedule.criterion ({structured}); "
                        f"got {criterion!r}")
    lasso = raw.get("train", {}).get("group_lasso", 0)
    if "train.group_lasso" in space or (lasso and lasso != 0):
        raise UserError(f"spec key train.group_lasso: needs a structured schedule.criterion ({structured}); "
                        f"got {criterion!r}")


def _check_objectives(spec: Spec, space: dict[str, SearchEntry]) -> None:
    """An objective must be a metric every trial reports."""
    for o in spec.search.objectives:
        why = metrics.unavailable(o.metric, spec, space)
        if why:
            raise UserError(f"search.objectives: {o.metric} is reported only with {why}")


# Files a trial reads, made absolute at load (relative to the working directory): Ray workers,
# whose working directories differ, and the nodes of a cluster then read the same path.
_PATH_KEYS = ("data.root", "model.weights")


def _absolute_paths(raw: dict) -> None:
    for key in _PATH_KEYS:
        value = get_dotted(raw, key)
        if isinstance(value, str) and value and "://" not in value:
            set_dotted(raw, key, str(Path(value).expanduser().absolute()))


def load(path: str | Path | None, overrides: list[str] = (), raw: dict | None = None,
         for_trial: bool = False) -> LoadedSpec:
    """Load a spec file (or a raw mapping), apply `base:` and `--set` overrides, and validate it.

    A searched key that no possible method uses is an error for a sweep; `for_trial` allows it,
    since `--set schedule.method=...` legitimately leaves other methods' searched keys unused.

    Raises UserError with one line naming the key or file and what is allowed.
    """
    if raw is None:
        p = Path(path)
        raw = _load_with_bases(p)
    else:
        p = None
        raw = copy.deepcopy(raw)
        raw.pop("base", None)
    for item in overrides:
        key, value = parse_set(item)
        set_dotted(raw, key, value)
    _absolute_paths(raw)
    space = _extract_search(raw)
    _check_space(raw, space, unused_is_error=not for_trial)
    _check_structured(raw, space)
    loaded = LoadedSpec(p, raw, space)
    fixed = loaded.fixed_spec()  # full validation with searched keys at a representative value
    if not for_trial:  # one trial selects nothing
        _check_objectives(fixed, space)
    return loaded


def defaults_yaml() -> str:
    """Every key with its default, as conf/defaults.yaml holds it."""
    d = Spec(name="prunetune").model_dump(mode="json")
    return yaml.safe_dump(d, sort_keys=False)
