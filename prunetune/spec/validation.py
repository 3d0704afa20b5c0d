"""From a mapping to a `Spec`, or one line naming the key that is wrong; and the defaults file.
The models themselves, with their rules, are `schema.py`."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from prunetune.errors import UserError
from prunetune.spec.schema import Spec


def format_validation_error(exc: ValidationError) -> str:
    """pydantic's first error as one line naming the dotted key and what is allowed there."""
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
    """A resolved spec from a mapping with no search entries; UserError naming the key otherwise."""
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None


def defaults_yaml() -> str:
    """Every key with its default, as conf/defaults.yaml holds it."""
    d = Spec(name="prunetune").model_dump(mode="json")
    return yaml.safe_dump(d, sort_keys=False)
