"""The models a sweep's trials may build, built once on the driver before any trial starts: a
factory's model must give the data's logits (`models.check_output`), a layerwise schedule's steps
(which depend on the model's layers) must fit `train.budget_epochs`, and weights no criterion
prunes are named in a note. Bad input fails here, once, not in every trial that draws it.
torch is imported only when a model is built: a sweep that needs no check keeps it out of the
driver (about 0.45 GB resident for the sweep's whole life)."""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING

from prunetune import plugins, registry
from prunetune.data import Dataset, load_dataset
from prunetune.errors import UserError
from prunetune.pruning import allocation, schedules
from prunetune.spec import LoadedSpec, Spec, check_with_layers

if TYPE_CHECKING:
    import torch

MAX_COMBINATIONS = 32  # beyond this many, each searched model/data value is tried alone


class LayerSelection:
    """Spec → the layers a trial of it prunes, from the model built on this machine (no weights
    loaded, no training; once per model and image size). A sweep's driver checks with it, before
    any trial starts, what depends on the layers (`spec.check_with_layers`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._built: dict[str, tuple[torch.nn.Module, list[str]]] = {}
        self.notes: list[str] = []  # one line per built model with weights no criterion prunes

    def __call__(self, spec: Spec) -> list[str]:
        model, layers = self.build(spec)
        criterion = registry.criterion(spec.schedule.criterion)
        return criterion.layers(model, schedules.select_layers(layers, spec.schedule.layers), spec.schedule)

    def build(self, spec: Spec) -> tuple[torch.nn.Module, list[str]]:
        """The model of `spec` (a factory's checked: `models.check_output`) and its prunable layers."""
        from prunetune.models import build_model, prunable_layers, unpruned_weights

        size, channels = spec.data.image_size, self.dataset.in_channels
        key = json.dumps([spec.model.model_dump(mode="json"), size])
        if key not in self._built:
            model = build_model(spec.model.model_copy(update={"weights": None}), len(self.dataset.classes),
                                channels, size)
            self._built[key] = model, prunable_layers(model, channels, size)
            skipped = unpruned_weights(*self._built[key])
            if skipped:
                count, example = sum(map(len, skipped.values())), next(iter(skipped.values()))[0]
                self.notes.append(
                    f"note: model.arch {spec.model.arch}: {count} weight tensors are not pruned (in modules "
                    f"of type {', '.join(sorted(skipped))}; e.g. {example}): criteria prune the weights of "
                    "Conv2d and Linear layers that keep torch's own forward and that an eval-mode forward calls")
        return self._built[key]


def variants(loaded: LoadedSpec, keys: tuple[str, ...] = ("model.", "data.")) -> list[Spec]:
    """The fixed spec and the specs of the searched values of `keys` (prefixes; default the model
    and the data): every combination (of choices, and of both ends of ranges) where there are at
    most MAX_COMBINATIONS, else each value alone with the others at their first."""
    keys = [k for k in loaded.space if k.startswith(keys)]
    base = {k: e.probe_values()[0] for k, e in loaded.space.items()}
    values = [loaded.space[k].probe_values() for k in keys]
    if len(list(itertools.islice(itertools.product(*values), MAX_COMBINATIONS + 1))) <= MAX_COMBINATIONS:
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    else:
        combos = [{k: v} for k, vs in zip(keys, values) for v in vs]
    return [loaded.fixed_spec()] + [loaded.resolve(dict(base, **c)) for c in combos]


def check_models(loaded: LoadedSpec, dataset: Dataset) -> list[str]:
    """Build each model a trial may build (`variants`) on the data it would get (`dataset` is the
    fixed spec's; other data specs are loaded), where the model is a factory's or a budget is
    set, or layers are named (`schedule.layer_sparsity`). Raises UserError naming the key; returns
    the notes on weights no criterion prunes."""
    loaded_specs = variants(loaded)
    budget = any(s.train.budget_epochs is not None for s in loaded_specs) or "train.budget_epochs" in loaded.space
    globs = any(s.schedule.layer_sparsity for s in loaded_specs)
    if not budget and not globs and not any(plugins.is_ref(s.model.arch) for s in loaded_specs):
        return []
    fixed_data = json.dumps(loaded.fixed_spec().data.model_dump(mode="json"))
    selections = {fixed_data: LayerSelection(dataset)}
    for spec in loaded_specs:
        data = json.dumps(spec.data.model_dump(mode="json"))
        if data not in selections:  # a searched data value: its own classes and channels
            selections[data] = LayerSelection(load_dataset(spec.data))
        selections[data].build(spec)
    if budget:
        check_with_layers(loaded, selections[fixed_data])
    for spec in loaded_specs if globs else []:  # schedule.layer_sparsity names layers the trials prune
        problem = allocation.check_globs(spec.schedule.layer_sparsity,
                                         selections[json.dumps(spec.data.model_dump(mode="json"))](spec))
        if problem:
            raise UserError(problem)
    return [note for s in selections.values() for note in s.notes]


def check_weights(loaded: LoadedSpec, fetch: bool, echo=None) -> list[str]:
    """torchvision's weight names in model.weights (each value a trial may take): an unknown name
    is a UserError listing the arch's names. With `fetch` (a sweep, before Ray and its trials),
    a file missing from torchvision's cache is downloaded into it, so trials on this machine
    read it there (UserError naming the file where that fails, e.g. offline); without (validate,
    --dry-run), a note says it will be. A file already cached is hashed once here: a note where
    it is not torchvision's (`pretrained.hash_note`). Returns the notes."""
    from prunetune import pretrained

    notes, seen = [], set()
    for spec in variants(loaded, ("model.",)):
        arch, name = spec.model.arch, spec.model.weights
        if not pretrained.is_name(name) or (arch, name) in seen:
            continue
        seen.add((arch, name))
        weights = pretrained.resolve(arch, name)
        if pretrained.cached_file(weights).is_file():
            notes += [n for n in [pretrained.hash_note(arch, name)] if n]  # a download was checked as it came
        elif fetch:
            pretrained.fetch(arch, name, echo)
        else:
            notes.append(f"note: model.weights {name} ({pretrained.torchvision_arch(arch)}) is not in torchvision's "
                         f"cache yet: a sweep downloads {weights.url} to {pretrained.cached_file(weights)}")
    return notes


ROUND_KEYS = ("schedule.method", "schedule.sparsity", "schedule.step_size", "schedule.step_rule", "schedule.scope",
              "schedule.layers", "model.", "data.")


def merged_rounds(loaded: LoadedSpec, dataset: Dataset) -> list[str]:
    """What `--dry-run` says of pruning rounds that merge (`schedules.step_targets`: a round that
    would remove less than one weight in every layer joins the one before), for the spec and the
    searched values that set the rounds (`variants`; a range by its ends). Builds the models only
    where a method prunes in rounds."""
    lines, selection = [], LayerSelection(dataset)
    for spec in variants(loaded, ROUND_KEYS):
        s = spec.schedule
        if not schedules.key_is_used(s.method, "step_size") or spec.data != loaded.fixed_spec().data:
            continue
        model, _ = selection.build(spec)
        modules = dict(model.named_modules())
        sizes = {n: modules[n].weight.numel() for n in selection(spec)}
        raw = schedules.step_targets(s.sparsity, s.step_size, s.step_rule)
        merged = schedules.step_targets(s.sparsity, s.step_size, s.step_rule, schedules.round_weights(s.scope, sizes))
        line = (f"  rounds: {s.method} to sparsity {s.sparsity:g} in {s.step_rule} steps of {s.step_size:g}: "
                f"{len(merged)}, not {len(raw)}: {len(raw) - len(merged)} would remove less than one weight in "
                f"every layer and merge with the round before (the last round now "
                f"{merged[-2] if len(merged) > 1 else 0:.9g} → {merged[-1]:g})")
        if len(merged) < len(raw) and line not in lines:
            lines.append(line)
    return lines
