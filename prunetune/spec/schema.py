"""The spec's schema: pydantic models of every key (the one place where defaults live), the
validation that turns pydantic's errors into one line naming the key, and the content hashes
that name equal work. Imports no torch, ray, optuna or mlflow."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from prunetune import metrics, plugins, pretrained, registry
from prunetune.pruning import schedules
from prunetune.spec.dotted import flatten

# Bumped when what a dense phase computes changes (2: every step's randomness seeded by its step,
# so a fractional rewind can replay it), so old cache entries are not reused.
DENSE_FORMAT = 2


def _known(value: str, names) -> str:
    if value not in names:
        raise ValueError(f"unknown name {value!r}; valid: {', '.join(sorted(names))}")
    return value


class _Strict(BaseModel):
    # Unknown or mistyped keys are refused, never ignored; no silent type coercion of strings.
    model_config = ConfigDict(extra="forbid", strict=True)


def _known_or_code(value: str, names, torchvision: bool = False) -> str:
    """A registered name, or a reference to user code (`package.module:factory`; for models also
    `torchvision:<name>`, checked against torchvision when the model is built)."""
    if not plugins.is_ref(value):
        try:
            return _known(value, names)
        except ValueError as exc:
            raise ValueError(f"{exc}; or your own 'package.module:factory'"
                             + (" or 'torchvision:<name>'" if torchvision else "")) from None
    if plugins.is_torchvision(value):
        if not torchvision or not re.fullmatch(r"[A-Za-z_]\w*", value.removeprefix(plugins.TORCHVISION)):
            raise ValueError(f"{value!r}: torchvision models are named 'torchvision:<name>' in model.arch, e.g. "
                             "torchvision:mobilenet_v2" if torchvision else f"{value!r} is a model, not a dataset")
        return value
    plugins.parse(value)  # ValueError naming the syntax
    return value


def _plain_kwargs(v: dict) -> dict:
    bad = [k for k in v if not re.fullmatch(r"[A-Za-z_]\w*", str(k))]
    if bad:
        raise ValueError(f"keyword names must be Python identifiers (got {bad[0]!r})")
    return v


Kwargs = Annotated[dict[str, Any], AfterValidator(_plain_kwargs)]  # a factory's keywords (searchable)


class ModelSpec(_Strict):
    # a built-in name, your own `package.module:factory` (called as factory(num_classes,
    # in_channels, image_size, **kwargs), returning an nn.Module) or `torchvision:<name>`
    arch: str = "simple_cnn"
    kwargs: Kwargs = {}  # passed to a factory (or a torchvision builder)
    weights: Optional[str] = None  # torchvision's weight name (IMAGENET1K_V1, DEFAULT) or a state_dict's path
    stem: Literal["auto", "imagenet", "small"] = "auto"  # the built-in archs' first layers
    freeze: list[str] = []

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return _known_or_code(v, registry.MODELS, torchvision=True)

    @model_validator(mode="after")
    def _plugin_keys(self):
        if self.kwargs and not plugins.is_ref(self.arch):
            raise ValueError(f"model.kwargs: only a factory takes keywords ('package.module:factory' or "
                             f"'torchvision:<name>'); the built-in {self.arch} takes none")
        if self.stem != "auto" and plugins.is_ref(self.arch):
            raise ValueError(f"model.stem: applies to the built-in archs; {self.arch} builds its own first layers")
        return self

    @field_validator("weights")
    @classmethod
    def _weight_name_for_torchvision(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        problem = pretrained.name_problem(info.data.get("arch", ""), v)
        if problem:
            raise ValueError(problem)
        return v


class DataSpec(_Strict):
    # a built-in layout, or your own `package.module:factory` (called as factory(**kwargs); see
    # prunetune/data/plugin.py for what it returns)
    dataset: str = "digits"
    kwargs: Kwargs = {}  # passed to a dataset factory
    root: Optional[str] = None
    image_size: int = Field(32, ge=4, le=1024)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    # draws the split of data without a published one; `seed` (and replicates) never change it
    split_seed: int = 0
    augment: list[Literal["flip", "crop"]] = []
    # fetch the publisher's checksummed files into root first (cifar10/100, medmnist; data/download.py)
    download: bool = False

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        return _known_or_code(v, registry.DATASETS)

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if plugins.is_ref(self.dataset) and self.root is not None:
            raise ValueError(f"data.root: a dataset factory ({self.dataset}) reads no root; pass its paths "
                             "in data.kwargs")
        if self.kwargs and not plugins.is_ref(self.dataset):
            raise ValueError(f"data.kwargs: only a dataset factory ('package.module:factory') takes keywords; "
                             f"the built-in {self.dataset} takes none")
        if self.download:
            from prunetune.data.download import problem  # imports numpy: only where asked

            why = problem(self.dataset, self.root)
            if why:
                raise ValueError(why)
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
    # how much of each layer (pruning/allocation.py): one threshold over the selected layers,
    # each layer alike (or as layer_sparsity says), Erdős–Rényi-Kernel densities, LAMP scores
    scope: Literal["global", "layer", "erk", "lamp"] = "global"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    # {"<module glob>": target} per layer (scope layer; values searchable); other layers take sparsity
    layer_sparsity: dict[str, float] = Field(default_factory=dict)
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
    samples_per_class: int = Field(25, ge=1)  # grasp: training images of each class it scores on (its authors' 25)
    # N of every M consecutive input weights survive: l1_nm (default [2, 4]), and wanda or
    # sparsegpt where set (unstructured where null)
    n_m: Optional[list[int]] = None
    calibration_samples: int = Field(128, ge=1)  # wanda, sparsegpt: training images they score on
    # rigl, set: every update_every optimiser steps, until update_until of the sparse training,
    # each layer drops drop_fraction (decayed by a cosine) of its active weights and grows as many
    update_every: int = Field(100, ge=1)
    drop_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    update_until: float = Field(0.75, gt=0.0, le=1.0)

    @field_validator("n_m")
    @classmethod
    def _n_m(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or not 0 < v[0] < v[1]):
            raise ValueError(f"must be [N, M] with 0 < N < M, e.g. [2, 4] (got {v!r})")
        return v

    @field_validator("layer_sparsity")
    @classmethod
    def _layer_targets(cls, v: dict[str, float]) -> dict[str, float]:
        for glob, value in v.items():
            if not 0 <= value < 1:
                raise ValueError(f"{glob!r}: {value!r} is outside [0, 1)")
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
        return _known(v, metrics.final_metrics())


class SearchSpec(_Strict):
    sampler: str = "tpe"  # a name in registry.SAMPLERS
    # selection is on validation: choosing on test_* would bias the test score reported for the choice
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="val_acc", mode="max")], min_length=1)
    num_trials: int = Field(8, ge=1)
    early_stop: Literal["none", "asha"] = "none"
    replicates: int = Field(1, ge=1)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        return _known(v, registry.SAMPLERS)


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


TRIAL_SECTIONS = {"seed", "model", "data", "train", "schedule", "distill"}  # what a trial's result depends on
ROOTED = {"cifar10", "cifar100", "ham10000", "imagefolder", "medmnist"}  # datasets read from data.root


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

    @model_validator(mode="before")
    @classmethod
    def _from_scratch_defaults(cls, raw):
        """rigl, set and static train sparse from initialisation: train.dense_epochs 0 and
        schedule.scope erk, unless the spec sets them."""
        schedule, train = (raw.get("schedule", {}), raw.get("train", {})) if isinstance(raw, dict) else (None, None)
        method = schedules.METHODS.get(schedule.get("method")) if isinstance(schedule, dict) else None
        if method is None or not method.from_scratch or not isinstance(train, dict):
            return raw
        return {**raw, "train": {"dense_epochs": 0, **train}, "schedule": {"scope": "erk", **schedule}}

    @model_validator(mode="after")
    def _method_values(self):
        s = self.schedule
        method = schedules.METHODS[s.method]
        if method.from_scratch and (s.criterion != "l1_unstructured" or s.n_m is not None):
            key, got = ("schedule.n_m", f", n_m {s.n_m}") if s.n_m is not None else ("schedule.criterion", "")
            raise ValueError(f"{key}: method {s.method} starts from a random mask and drops the smallest magnitudes, "
                             f"unstructured; leave schedule.criterion at l1_unstructured and schedule.n_m unset "
                             f"(got criterion {s.criterion}{got})")
        if method.always_rewinds and s.retrain not in ("finetune", "weight_rewind"):
            raise ValueError(f"schedule.retrain {s.retrain} does not apply to method {s.method}, which always "
                             "rewinds weights; use method iterative (or oneshot) with retrain "
                             f"{s.retrain} for that control")
        if method.rewinds(s) and s.rewind_epoch > self.train.dense_epochs:
            what = f"method {s.method}" if method.always_rewinds else f"schedule.retrain {s.retrain}"
            raise ValueError(
                f"schedule.rewind_epoch ({s.rewind_epoch:g}) must not exceed train.dense_epochs "
                f"({self.train.dense_epochs}) for {what}")
        if s.layer_sparsity and (s.scope != "layer" or s.sparsity <= 0):
            raise ValueError("schedule.layer_sparsity sets per-layer targets: use it with schedule.scope layer "
                             "and a schedule.sparsity above 0 (the target of the layers no glob names, and "
                             f"what the schedule's steps move towards); got scope {s.scope}, sparsity {s.sparsity:g}")
        problem = registry.criterion(s.criterion).check(s) or method.check(s)  # the criterion's, the method's rules
        if problem:
            raise ValueError(problem)
        if s.mask_control == "shuffle" and method.steps_train_on and s.retrain not in ("weight_rewind", "reinit"):
            # the last prune's mask, shuffled, lands on weights pruned by earlier steps: they have
            # no value of their own to start from (a ticket's rounds rewind or re-initialise them)
            raise ValueError(f"schedule.mask_control shuffle needs a value for every weight it may keep, which "
                             f"method {s.method} with retrain {s.retrain} has not (weights pruned at earlier "
                             f"steps are zero); use oneshot, layerwise, dsd, ist, lottery, or iterative with "
                             f"retrain weight_rewind or reinit")
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
        """Every key, dotted (`schedule.method`, `train.lr`, …)."""
        return flatten(self.model_dump(mode="json"))

    def trial_params(self) -> dict[str, Any]:
        """A trial run's MLflow params: its keys of TRIAL_SECTIONS, dotted, less what it does not
        read: a null or empty value, a method-specific schedule key its method ignores, a key only
        other criteria read, `data.root` for a dataset read from no folder, `data.download: false`
        (config.yaml has all)."""
        s = self.schedule
        criterion = registry.criterion(s.criterion)
        own, specific = criterion.reads | criterion.acts_on, registry.criterion_keys()
        used = {}
        for key, value in flatten(self.model_dump(mode="json", include=TRIAL_SECTIONS)).items():
            if value is None or value == {} or value == [] or (key == "data.download" and not value):
                continue
            if key.startswith("schedule.") and not schedules.key_is_used(s.method, key.split(".")[1], s.retrain):
                continue
            if (key in specific and key not in own) or (key == "data.root" and self.data.dataset not in ROOTED):
                continue
            used[key] = value
        return used

    def config_hash(self) -> str:
        """Content hash of what determines a trial's result (not tracking, resources, search)."""
        d = self.model_dump(mode="json")
        return _hash({k: _data_identity(d["data"]) if k == "data" else v for k, v in d.items()
                      if k in ("seed", "model", "data", "train", "schedule", "distill")})

    def dense_hash(self) -> str:
        """Content hash of what determines the dense phase: trials with equal hashes share it."""
        d = self.model_dump(mode="json")
        # what trains after the dense phase does not change it
        train = {k: v for k, v in d["train"].items() if k not in ("finetune_epochs", "budget_epochs")}
        extra = dict(registry.criterion(self.schedule.criterion).dense_key(self))  # e.g. a group-lasso penalty
        if d["distill"]:
            extra["distill"] = d["distill"]  # the dense phase is distilled too
        code = {ref: plugins.source_digest(ref) for ref in (self.model.arch, self.data.dataset)
                if plugins.is_user_code(ref)}
        if code:
            extra["code"] = code  # the user's model or data code: an edit trains a new dense phase
        if pretrained.is_name(self.model.weights):  # the file the name stands for (DEFAULT moves with torchvision)
            d["model"]["weights"] = pretrained.url(self.model.arch, self.model.weights)
        return _hash({"format": DENSE_FORMAT, "seed": d["seed"], "model": d["model"], "data": _data_identity(d["data"]),
                      "train": train, **extra})

    def ticket_hash(self, targets: list[float]) -> str:
        """Content hash of a lottery ticket's weight-rewinding rounds to `targets`: its dense
        phase and what prunes and rewinds (not the method, sparsity or control that asked)."""
        s = self.schedule
        return _hash({"dense": self.dense_hash(), "targets": targets, "criterion": s.criterion, "scope": s.scope,
                      "layers": s.layers, "rewind_epoch": s.rewind_epoch, "synflow_iters": s.synflow_iters,
                      "n_m": s.n_m if s.n_m is not None else [2, 4],  # as before n_m was optional
                      **({"samples_per_class": s.samples_per_class} if s.criterion == "grasp" else {})})


def _data_identity(data: dict) -> dict:
    """The data keys that say which data a trial reads: not whether it was fetched (data.download),
    so fetching neither changes a hash nor misses the dense-phase cache."""
    return {k: v for k, v in data.items() if k != "download"}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
