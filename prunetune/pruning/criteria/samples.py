"""The training samples the criteria that score through the model are given (`base.Context`),
drawn from a trial's data with its seed."""

from __future__ import annotations

from prunetune.pruning.criteria.base import Context
from prunetune.pruning.criteria.nm import pattern


def drawn_context(model, example, data, spec, num_classes: int, device) -> Context:
    """The model, an example input and training batches (max(batch_size, 10 × classes) samples,
    drawn with `spec.seed`); for grasp, `samples_per_class` of each class (the first of each in
    the same draw), in class order, as two batches; for wanda, sparsegpt and taylor_filter, the
    first `calibration_samples` of that draw. Training images only, never validation or test."""
    import torch

    n = data.size("train")
    drawn = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
    order = drawn[:min(n, max(spec.train.batch_size, 10 * num_classes))]
    labels = data.y["train"].cpu()[drawn]
    per_class = spec.schedule.samples_per_class
    balanced = torch.cat([drawn[labels == c][:per_class] for c in range(num_classes)])

    def batches_of(index: torch.Tensor, size: int):
        def batches():
            for start in range(0, len(index), size):
                part = index[start:start + size].to(device)
                yield data.prepare(data.images_of("train", part)), data.y["train"][part]
        return batches

    calibration = drawn[:min(n, spec.schedule.calibration_samples)]
    return Context(model, example, batches_of(order, spec.train.batch_size), spec.schedule.synflow_iters,
                   pattern(spec.schedule), balanced=batches_of(balanced, max(1, (len(balanced) + 1) // 2)),
                   calibration=batches_of(calibration, spec.train.batch_size))
