"""Which sparsity when: every schedule method as a pure function from the spec to a list of phases.

No torch here, so the arithmetic is tested by properties on its own. `trial.py` carries the phases
out: at the start of a phase it prunes (and rewinds or releases masks), then trains `epochs`.

A method is one function plus one registry entry in `METHODS`, with the schedule keys it uses (the
search space is conditional on them: a key is sampled only when the sampled method uses it).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence


@dataclass(frozen=True)
class Prune:
    """Prune to `target` sparsity (fraction of zero weights) over `layers` (None = all selected)."""

    target: float
    layers: tuple[str, ...] | None = None
    scope: str = "global"
    criterion: str | None = None  # instead of schedule.criterion (sparse training's random start)


@dataclass(frozen=True)
class Phase:
    """A stretch of training after the dense phase.

    At its start: `prune` (if any), then `rewind` the surviving weights to the rewind snapshot,
    `reinit` them (a fresh random initialisation), or `release_masks` (all weights trainable
    again; pruned ones restart at zero); `restart` starts a fresh optimiser. Then `epochs` of
    training (fractional: a part of an epoch). The learning rate at epoch t of the phase is the
    spec's schedule evaluated at `lr_offset + t` of a schedule `lr_horizon` epochs long, times
    `lr_factor`; with `final_lr`, it stays at the dense schedule's last value instead (Renda et
    al.'s fine-tuning).

    `shuffle`: after the prune, permute the mask of the layers it pruned (the control of Frankle
    et al. 2021); survivors start from the values their positions had before the prune (or the
    rewound / re-initialised ones). `ticket`: a weight-rewinding round that depends only on the
    rounds before it, so it is cached and shared (by the ticket and its controls).
    `mask_search`: a ticket round a control runs only to find the ticket's mask; its training is
    not the trial's (not reported, not counted in its epochs).
    """

    name: str
    epochs: float
    prune: Prune | None = None
    rewind: bool = False
    reinit: bool = False
    release_masks: bool = False
    restart: bool = False
    lr_offset: float = 0.0
    lr_horizon: float = 0.0
    lr_factor: float = 1.0
    final_lr: bool = False
    shuffle: bool = False
    ticket: bool = False
    mask_search: bool = False


def step_targets(sparsity: float, step_size: float, rule: str = "fixed", weights: int | None = None) -> list[float]:
    """The sparsity after each pruning step, the last clipped to `sparsity` exactly.

    fixed: step_size, 2·step_size, …; geometric: step_size of the surviving weights each step,
    1 − (1 − step_size)^k (the lottery-ticket papers' rate). `weights`: how many weights a round's
    increment is a fraction of (`round_weights`); a round that would remove less than one of them,
    and so less than one weight in every layer, merges with the round before it (which goes on to
    its target): with 0.87 in geometric steps of 0.01, round 204 (0.869999655 → 0.87) would cost
    a whole retraining round for nothing."""
    if sparsity <= 0:
        return []
    if rule == "geometric":
        count = math.ceil(math.log1p(-sparsity) / math.log1p(-step_size) - 1e-9)
        targets = [round(min(1 - (1 - step_size) ** k, sparsity), 12) for k in range(1, count + 1)]
    else:
        count = math.ceil(sparsity / step_size - 1e-9)
        targets = [round(min(k * step_size, sparsity), 12) for k in range(1, count + 1)]
    if weights is None:
        return targets
    merged: list[float] = []
    for t in targets:
        if merged and (t - merged[-1]) * weights < 1:
            merged[-1] = t
        else:
            merged.append(t)
    return merged


def round_weights(scope: str, layers) -> int | None:
    """What a round's increment of sparsity is a fraction of, where `layers` maps each selected
    layer to its number of weights: all of them with global scope (one threshold: a round may take
    its weights from any layer), the largest layer's with per-layer targets. None: sizes unknown."""
    if not isinstance(layers, Mapping) or not layers:
        return None
    return sum(layers.values()) if scope == "global" else max(layers.values())


def _one_lr_schedule(phases: list[Phase]) -> list[Phase]:
    """Give phases one learning-rate schedule spanning all of them, in order."""
    horizon = sum(p.epochs for p in phases)
    out, offset = [], 0.0
    for p in phases:
        out.append(replace(p, lr_offset=offset, lr_horizon=horizon))
        offset += p.epochs
    return out


def _retrain_round(name: str, s, train, target: float, retrain: str, **flags) -> Phase:
    """Prune to `target`, then retrain dense_epochs − rewind_epoch epochs (Renda et al. 2020):
    on the dense phase's learning-rate schedule replayed from rewind_epoch, from the trained
    weights (lr_rewind), the rewind snapshot (weight_rewind) or a fresh initialisation (reinit);
    or from the trained weights at the dense schedule's final learning rate (finetune_final_lr,
    Renda et al.'s fine-tuning baseline at the same budget)."""
    return Phase(name, train.dense_epochs - s.rewind_epoch, Prune(target, scope=s.scope),
                 rewind=retrain == "weight_rewind", reinit=retrain == "reinit", restart=True,
                 lr_offset=s.rewind_epoch, lr_horizon=train.dense_epochs,
                 final_lr=retrain == "finetune_final_lr", **flags)


def _retraining_rounds(s, train, targets: list[float], retrain: str) -> list[Phase]:
    """One retraining round per target. The ticket's rounds (weight_rewind) are cached and shared.
    Its controls (reinit; weight_rewind with a shuffled mask) train the ticket's own mask, as
    Frankle & Carbin (2019) and Frankle et al. (2021) do: the rounds before the last are the
    ticket's, run only to find its mask; the last prunes to the ticket's final mask, then
    re-initialises (or shuffles and rewinds) it and trains it once."""
    control = retrain == "reinit" or (retrain == "weight_rewind" and s.mask_control == "shuffle")
    rounds = []
    for i, target in enumerate(targets):
        if control and i < len(targets) - 1:
            rounds.append(_retrain_round(f"ticket{i + 1}", s, train, target, "weight_rewind",
                                         ticket=True, mask_search=True))
        else:
            rounds.append(_retrain_round(f"round{i + 1}", s, train, target, retrain,
                                         ticket=retrain == "weight_rewind" and not control))
    return rounds


def oneshot(s, train, layers: Sequence[str]) -> list[Phase]:
    if s.retrain != "finetune":
        return _retraining_rounds(s, train, [s.sparsity], s.retrain)
    return _one_lr_schedule([Phase("prune", train.finetune_epochs, Prune(s.sparsity, scope=s.scope))])


def iterative(s, train, layers: Sequence[str], retrain: str | None = None) -> list[Phase]:
    targets = step_targets(s.sparsity, s.step_size, s.step_rule, round_weights(s.scope, layers))
    retrain = retrain or s.retrain
    if retrain != "finetune":
        return _retraining_rounds(s, train, targets, retrain)
    phases = [Phase(f"step{i + 1}", s.step_epochs, Prune(t, scope=s.scope)) for i, t in enumerate(targets)]
    return _one_lr_schedule(phases + [Phase("finetune", train.finetune_epochs)])


def layerwise(s, train, layers: Sequence[str]) -> list[Phase]:
    phases = [Phase(f"layer:{name}", s.step_epochs, Prune(s.sparsity, (name,), "layer")) for name in layers]
    return _one_lr_schedule(phases + [Phase("finetune", train.finetune_epochs)])


def lottery(s, train, layers: Sequence[str]) -> list[Phase]:
    """Iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al.
    2020): iterative with retrain weight_rewind, whatever `retrain` says."""
    return iterative(s, train, layers, retrain="weight_rewind")


def gradual_targets(sparsity: float, steps: int) -> list[float]:
    """Zhu & Gupta's cubic ramp from 0 to `sparsity` over `steps` pruning events:
    s_k = sparsity · (1 − (1 − k/steps)³), k = 1 … steps (the last is `sparsity` exactly)."""
    return [round(sparsity * (1 - (1 - k / steps) ** 3), 12) for k in range(1, steps + 1)]


def gradual(s, train, layers: Sequence[str]) -> list[Phase]:
    # Pruning events every step_epochs from start_epoch + step_epochs to end_epoch (epochs after
    # the dense phase), each followed by step_epochs of training; the last by finetune_epochs.
    span = s.end_epoch - s.start_epoch
    steps = max(1, round(span / s.step_epochs)) if s.step_epochs > 0 else 1
    interval = span / steps
    targets = gradual_targets(s.sparsity, steps)
    phases = [Phase("before", s.start_epoch + interval)]
    phases += [Phase(f"ramp{k + 1}", interval if k + 1 < steps else train.finetune_epochs, Prune(t, scope=s.scope))
               for k, t in enumerate(targets)]
    return _one_lr_schedule(phases)


def _dsd_cycle(s, train, index: int) -> list[Phase]:
    return [Phase(f"sparse{index}", s.step_epochs, Prune(s.sparsity, scope=s.scope)),
            Phase(f"redense{index}", train.finetune_epochs, release_masks=True, lr_factor=s.redense_lr_factor)]


def dsd(s, train, layers: Sequence[str]) -> list[Phase]:
    """Dense-sparse-dense (Han et al. 2017): prune, train sparse, release the masks, train dense."""
    return _one_lr_schedule(_dsd_cycle(s, train, 1))


def ist(s, train, layers: Sequence[str]) -> list[Phase]:
    """Iterative sparse training: `cycles` dsd cycles, each pruning the re-densed weights afresh."""
    return _one_lr_schedule([p for c in range(1, s.cycles + 1) for p in _dsd_cycle(s, train, c)])


def sparse_training(s, train, layers: Sequence[str]) -> list[Phase]:
    """Sparse from scratch (rigl, set, static): a random mask at the start, allocated by
    schedule.scope, then finetune_epochs of sparse training, during which rigl and set move the
    mask (`dynamic.py`) and static keeps it (Evci et al. 2020's static baseline)."""
    return _one_lr_schedule([Phase("sparse", train.finetune_epochs,
                                   Prune(s.sparsity, scope=s.scope, criterion="random"))])


@dataclass(frozen=True)
class Method:
    """A schedule method: its plan, and its rules, which the spec asks instead of naming methods."""

    plan: Callable[..., list[Phase]]
    uses: frozenset[str]  # method-specific schedule keys this method reads (with retrain finetune)
    always_rewinds: bool = False  # retrains each round from the rewind point, whatever schedule.retrain says
    regrows: bool = False  # releases its masks: pruned weights train again from zero
    # prunes at several steps while training on (unless its retraining rewinds or re-initialises):
    # weights pruned at earlier steps have no value of their own for a shuffled mask to start from
    steps_train_on: bool = False
    check: Callable[..., str | None] = lambda schedule: None  # its own keys' rules: one line, or None
    # sparse from scratch: a random start mask (train.dense_epochs 0 and schedule.scope erk unless
    # set), moved while training by `regrowth` ("gradient": RigL, "random": SET; None: static)
    from_scratch: bool = False
    regrowth: str | None = None

    def rewinds(self, schedule) -> bool:
        """Whether a trial of it replays the dense phase from `schedule.rewind_epoch`."""
        return self.always_rewinds or ("retrain" in self.uses and schedule.retrain != "finetune")


def _gradual_check(schedule) -> str | None:
    if schedule.end_epoch <= schedule.start_epoch:
        return (f"schedule.end_epoch ({schedule.end_epoch:g}) must be after schedule.start_epoch "
                f"({schedule.start_epoch:g}) for method gradual")
    return None


# Schedule keys that only some methods read; every other schedule key applies to all methods.
METHOD_SPECIFIC_KEYS = frozenset({"step_size", "step_epochs", "rewind_epoch", "start_epoch", "end_epoch",
                                  "redense_lr_factor", "cycles", "step_rule", "retrain",
                                  "update_every", "drop_fraction", "update_until"})
_MOVES_MASK = frozenset({"update_every", "drop_fraction", "update_until"})

METHODS: dict[str, Method] = {
    "oneshot": Method(oneshot, frozenset({"retrain"})),
    "iterative": Method(iterative, frozenset({"step_size", "step_epochs", "step_rule", "retrain"}),
                        steps_train_on=True),
    "layerwise": Method(layerwise, frozenset({"step_epochs"})),
    "lottery": Method(lottery, frozenset({"step_size", "step_rule", "rewind_epoch"}), always_rewinds=True),
    "gradual": Method(gradual, frozenset({"start_epoch", "end_epoch", "step_epochs"}), steps_train_on=True,
                      check=_gradual_check),
    "dsd": Method(dsd, frozenset({"step_epochs", "redense_lr_factor"}), regrows=True),
    "ist": Method(ist, frozenset({"step_epochs", "redense_lr_factor", "cycles"}), regrows=True),
    "rigl": Method(sparse_training, _MOVES_MASK, from_scratch=True, regrowth="gradient"),
    "set": Method(sparse_training, _MOVES_MASK, from_scratch=True, regrowth="random"),
    "static": Method(sparse_training, frozenset(), from_scratch=True),
}


def plan(schedule, train, layers: Sequence[str] | Mapping[str, int]) -> list[Phase]:
    """The phases after the dense phase for `schedule.method`, over the selected `layers` (names,
    or a mapping of each name to its number of weights: a trial's, which merges near-empty
    rounds, see `step_targets`)."""
    phases = _within_budget(schedule, train, layers)
    if getattr(schedule, "mask_control", "none") == "shuffle":
        phases = _shuffle_last_prunes(phases, layers)
    return phases


def _shuffle_last_prunes(phases: list[Phase], layers: Sequence[str]) -> list[Phase]:
    """Mark the last prune of each layer (mask-search rounds aside) to shuffle: the control
    shuffles the mask the schedule ends with, not each step on the way to it."""
    out, covered = list(phases), set()
    for i in range(len(out) - 1, -1, -1):
        p = out[i]
        if p.prune is None or p.mask_search:
            continue
        pruned = set(p.prune.layers or layers)
        if pruned - covered:
            out[i] = replace(p, shuffle=True)
            covered |= pruned
    return out


def trained_epochs(phases: Sequence[Phase]) -> float:
    """The epochs a trial trains after its dense phase (mask-search rounds are not its training)."""
    return sum(p.epochs for p in phases if not p.mask_search)


# -- equal budgets (train.budget_epochs) -------------------------------------------------------

class BudgetError(ValueError):
    """A method's own steps take more than `train.budget_epochs` (one line naming the key)."""


class _Finetune:
    """`train` as a method sees it, with another `finetune_epochs` (any object, pydantic or not)."""

    def __init__(self, train, finetune_epochs: float):
        self._train, self.finetune_epochs = train, finetune_epochs

    def __getattr__(self, name):
        return getattr(self._train, name)


def _planned_epochs(phases: Sequence[Phase]) -> float:
    """Every phase's epochs, a control's mask-search rounds included: what the budget is measured
    against, so a control gets the remainder its ticket gets."""
    return sum(p.epochs for p in phases)


def _within_budget(schedule, train, layers: Sequence[str] | Mapping[str, int]) -> list[Phase]:
    """The method's phases; with `train.budget_epochs` N, its phases total exactly N epochs.

    Methods are linear in finetune_epochs, so planning with 0 and 1 tells any method's own epochs
    and how many of its phases take finetune_epochs (ist: one per cycle; dsd: its re-dense phase).
    The remainder of N is split over those; a plan without one (rewinding retraining) gets it as a
    final fine-tuning phase: a fresh optimiser, the spec's lr schedule over the remainder, or
    with finetune_final_lr the dense schedule's final rate (Renda et al.'s fine-tuning, made
    longer). A control (reinit, shuffle) counts the ticket's rounds that find its mask: it gets
    the ticket's remainder, so it trains its final mask exactly as long as the ticket does (its
    last round plus that remainder), as Frankle & Carbin's controls train like the ticket's last
    training run."""
    method = METHODS[schedule.method].plan
    budget = getattr(train, "budget_epochs", None)
    if budget is None:
        return method(schedule, train, layers)
    bare = method(schedule, _Finetune(train, 0.0), layers)
    own = _planned_epochs(bare)
    if own > budget + 1e-9:
        raise BudgetError(f"train.budget_epochs ({budget:g}) is less than the {own:g} epochs that "
                          f"{_method_name(schedule)} trains in its own steps ({_runs(bare)}), before "
                          "any fine-tuning; raise the budget or shorten the steps")
    takers = round(_planned_epochs(method(schedule, _Finetune(train, 1.0), layers)) - own)
    remainder = budget - own
    if takers:
        return method(schedule, _Finetune(train, remainder / takers), layers)
    if remainder <= 1e-9:
        return bare
    if bare[-1].final_lr:  # fine-tuning at the final rate goes on at it
        return bare + [Phase("finetune", remainder, final_lr=True)]
    return bare + [Phase("finetune", remainder, restart=True, lr_horizon=remainder)]


def _method_name(schedule) -> str:
    name = f"schedule.method {schedule.method}"
    if key_is_used(schedule.method, "retrain") and schedule.retrain != "finetune":
        name += f" with retrain {schedule.retrain}"
    return name


def _runs(phases: Sequence[Phase]) -> str:
    """The phases' epochs (a control's mask-search rounds too), equal neighbours grouped: '14 × 1',
    '1 + 4 × 1.5'."""
    runs: list[list] = []
    for p in phases:
        if p.epochs <= 0:
            continue
        if runs and runs[-1][1] == p.epochs:
            runs[-1][0] += 1
        else:
            runs.append([1, p.epochs])
    return " + ".join(f"{n} × {e:g}" if n > 1 else f"{e:g}" for n, e in runs) + " epochs"


def used_keys(method: str, retrain: str = "finetune") -> frozenset[str]:
    """The method-specific schedule keys that `method` reads, given `retrain`: retraining other
    than finetune replays the dense schedule from rewind_epoch instead of training step_epochs."""
    keys = METHODS[method].uses
    if "retrain" in keys and retrain != "finetune":
        keys = (keys - {"step_epochs"}) | {"rewind_epoch"}
    return keys


def key_is_used(method: str, key: str, retrain: str = "finetune") -> bool:
    """Whether `schedule.<key>` matters for `method` (and `retrain`)."""
    return key not in METHOD_SPECIFIC_KEYS or key in used_keys(method, retrain)


def parse_layers(layers: str | list[str]) -> tuple[str, int | list[str] | None]:
    """Parse `schedule.layers`: 'all', 'first:K', 'last:K' or a list of globs. Raises ValueError."""
    if isinstance(layers, list):
        if not layers or not all(isinstance(g, str) and g for g in layers):
            raise ValueError("a list of layers must hold one or more glob strings")
        return "globs", layers
    if layers == "all":
        return "all", None
    head, _, count = layers.partition(":")
    if head in ("first", "last") and count.isdigit() and int(count) >= 1:
        return head, int(count)
    raise ValueError("must be 'all', 'first:K', 'last:K' (K >= 1) or a list of globs over module names")


def stand_in_layers(layers: str | list[str]) -> list[str]:
    """Names standing for the layers `schedule.layers` selects, before a model is built: K for
    first:K / last:K; one for all or globs (a lower bound: a trial needs at least one)."""
    kind, arg = parse_layers(layers)
    return [f"layer{i + 1}" for i in range(arg if kind in ("first", "last") else 1)]


def select_layers(names: Sequence[str], layers: str | list[str]) -> list[str]:
    """The prunable layer names (in forward order) that `schedule.layers` selects."""
    kind, arg = parse_layers(layers)
    if kind == "all":
        return list(names)
    if kind == "first":
        return list(names[:arg])
    if kind == "last":
        return list(names[-arg:])
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in arg)]
