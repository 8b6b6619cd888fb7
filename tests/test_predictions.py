"""cxr.evaluation.predictions.write_val_predictions: the RUN/val_predictions.parquet of docs/run-dir.md,
checked against a frame built by hand with pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr.evaluation.predictions import write_val_predictions
from cxrbase.labels import LABELS


def test_val_predictions_have_key_then_one_column_per_label(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.random((5, len(LABELS)))
    keys = [f"0000000{i}_000" for i in range(5)]
    path = write_val_predictions(tmp_path, keys, probs, LABELS)
    assert path == tmp_path / "val_predictions.parquet"
    expected = pd.DataFrame({"key": keys, **{label: probs[:, i] for i, label in enumerate(LABELS)}})
    pd.testing.assert_frame_equal(pd.read_parquet(path), expected)


def test_val_predictions_of_a_one_score_model_name_the_column_0(tmp_path):
    probs = np.array([[0.25], [0.75]])
    path = write_val_predictions(tmp_path, ["a", "b"], probs, LABELS)
    pd.testing.assert_frame_equal(pd.read_parquet(path), pd.DataFrame({"key": ["a", "b"], "0": [0.25, 0.75]}))
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temp file left
