"""Pruning criteria, one module per family, each a `base.Criterion`: its rules (torch-free, so the
spec applies them), its torch side (torch imported where it is used), its metric names and its
mask arithmetic. `registry.CRITERIA` names each by a "module:attr" string.

- `magnitude`: l1_unstructured (|w|), random;
- `at_init`: snip, grasp (training batches), synflow (data-free);
- `nm`: l1_nm, N of every M consecutive input weights;
- `channel`: l1_filter, l2_filter, taylor_filter, whole channels with their groups (`structured.py`);
- `data_aware`: wanda; `second_order`: sparsegpt (calibration data, layer after layer);
- `samples`: the training samples those that score through the model are given (`base.Context`).

A new criterion is one module here and one line in `registry.CRITERIA`; the contract tests
(`tests/test_contracts.py`) cover it unedited.
"""
