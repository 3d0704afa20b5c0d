"""What a trial's reports carry through Tune (`sweep.protocol`): no Ray here."""

from __future__ import annotations

import math

from prunetune.spec.schema import Objective
from prunetune.sweep.protocol import FINAL_FLAG, NODE_KEY, PACKED_KEY, pack, tune_metrics, unpack


def test_tune_sees_only_the_numbers_it_reads_and_the_driver_gets_every_one_back():
    keep = tune_metrics([Objective(metric="test_balanced_acc", mode="max")])
    assert keep == {"epoch", "val_acc", "test_balanced_acc"}
    report = {"epoch": 3, "val_acc": 0.5, "test_balanced_acc": 0.4, "test_acc": 0.45, "nonzero_params": 120,
              "test_recall_class7": 0.25, "train_loss": math.nan, FINAL_FLAG: True, NODE_KEY: "10.0.0.2"}
    packed = pack(report, keep)
    # Tune counts statistics of every number it sees: only the kept ones, the flag and strings stay
    numbers = {k for k, v in packed.items() if isinstance(v, (int, float))}
    assert numbers == {"epoch", "val_acc", "test_balanced_acc", FINAL_FLAG}
    assert isinstance(packed[PACKED_KEY], str) and packed[NODE_KEY] == "10.0.0.2"
    back = unpack(packed)
    assert PACKED_KEY not in back and set(back) == set(report)
    assert math.isnan(back.pop("train_loss")) and back == {k: v for k, v in report.items() if k != "train_loss"}
    assert isinstance(back["nonzero_params"], int)
    import numpy as np

    assert unpack(pack({"test_acc": np.float32(0.5), "n": np.int64(3)}, keep)) == {"test_acc": 0.5, "n": 3}


def test_a_report_with_nothing_to_pack_is_left_as_it_is():
    keep = tune_metrics([Objective(metric="val_acc", mode="max")])
    report = {"epoch": 0, "val_acc": 0.1, FINAL_FLAG: True, NODE_KEY: "n"}
    assert pack(report, keep) is report and PACKED_KEY not in report
    assert unpack(report) == report and unpack(None) == {}
