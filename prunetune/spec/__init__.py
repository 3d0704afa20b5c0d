"""The spec: one YAML file naming a model, data, a training recipe and a pruning schedule whose
values may be searched.

- `schema`: the pydantic models of every key (the one place where defaults live), their rules and
  the content hashes; `validation`: a mapping to a `Spec`, or one line naming the key;
- `dotted`: dotted keys (`schedule.sparsity`) over nested mappings;
- `space`: search entries, and which searched keys a trial of a method uses;
- `loading`: YAML, `base:`, `--set` and the CLI's overrides, into a `LoadedSpec`.

Imports no torch, ray, optuna or mlflow.
"""

from prunetune.spec.dotted import del_dotted, flatten, get_dotted, set_dotted
from prunetune.spec.loading import LoadedSpec, check_with_layers, deep_merge, load, parse_set, yaml_load
from prunetune.spec.schema import (
                                   DENSE_FORMAT,
                                   AnalysisSpec,
                                   CkaSpec,
                                   DataSpec,
                                   DistillSpec,
                                   ModelSpec,
                                   Objective,
                                   ResourcesSpec,
                                   ScheduleSpec,
                                   SearchSpec,
                                   Spec,
                                   TrackingSpec,
                                   TrainSpec,
)
from prunetune.spec.space import (
                                   SEARCH_KINDS,
                                   SEARCHABLE_SECTIONS,
                                   SearchEntry,
                                   is_search_entry,
                                   keys_used,
                                   parse_search_entry,
)
from prunetune.spec.validation import defaults_yaml, format_validation_error, validate

__all__ = [
    "DENSE_FORMAT", "SEARCHABLE_SECTIONS", "SEARCH_KINDS",
    "AnalysisSpec", "CkaSpec", "DataSpec", "DistillSpec", "LoadedSpec", "ModelSpec", "Objective", "ResourcesSpec",
    "ScheduleSpec", "SearchEntry", "SearchSpec", "Spec", "TrackingSpec", "TrainSpec",
    "check_with_layers", "deep_merge", "defaults_yaml", "del_dotted", "flatten", "format_validation_error",
    "get_dotted", "is_search_entry", "keys_used", "load", "parse_search_entry", "parse_set", "set_dotted",
    "validate", "yaml_load",
]
