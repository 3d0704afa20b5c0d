"""Metric names: which are measured on the test split, the one line a sweep prints when it
selects on one, and what a sweep's top table shows beside its objectives."""

from prunetune import metrics


def test_test_split_metrics_are_recognised():
    assert all(metrics.is_test_metric(m) for m in ("test_acc", "test_macro_f1", "test_acc_drop",
                                                   "dense_test_acc", "teacher_test_acc"))
    assert not any(metrics.is_test_metric(m) for m in ("val_acc", "nonzero_params", "sparsity", "trial_seconds"))


def test_selection_note_is_one_line_naming_the_test_metrics():
    assert metrics.selection_note(["val_acc"]) is None
    assert metrics.selection_note(["val_acc", "nonzero_params"]) is None
    assert metrics.selection_note(["test_acc"]) == (
        "note: search.objectives selects on test_acc, a test-split metric: the chosen trials' test scores "
        "are optimistically biased; select on val_acc")
    two = metrics.selection_note(["test_macro_f1", "nonzero_params", "test_acc_drop"])
    assert "\n" not in two and "test_macro_f1, test_acc_drop, test-split metrics" in two
    assert "nonzero_params" not in two


def test_the_top_table_reports_test_acc_beside_the_objectives():
    assert metrics.shown_metrics(["val_acc"]) == ["val_acc", "test_acc"]
    assert metrics.shown_metrics(["val_acc", "nonzero_params"]) == ["val_acc", "nonzero_params", "test_acc"]
    assert metrics.shown_metrics(["test_acc", "nonzero_params"]) == ["test_acc", "nonzero_params"]
