"""Classification accuracy as a local `evaluate` metric module.

`evaluate.load("accuracy")` downloads its script from the Hugging Face Hub,
so it fails offline. This module computes the same quantity and loads from
its file path with no network access:

    metric = evaluate.load(hf_lot.results.ACCURACY_METRIC_PATH)
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    # {'accuracy': 0.666...}
"""

import datasets
import evaluate

_DESCRIPTION = """
Accuracy is the fraction of predictions that equal their reference label:
(number of correct predictions) / (number of predictions). With `normalize=False`
it returns the number of correct predictions instead. `sample_weight` weights
each example, and the weighted accuracy is sum(weight * correct) / sum(weight).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids, one per prediction.
    normalize (bool): return a fraction (True, default) or a count of correct predictions (False).
    sample_weight (list of float, optional): weight of each example, default 1.
Returns:
    accuracy (float): fraction (or weighted count) of correct predictions, 0.0 for an empty input.
Example:
    >>> metric = evaluate.load("hf_lot/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""

_CITATION = ""


class Accuracy(evaluate.Metric):
    """Fraction of predicted class ids that equal the reference class ids."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if len(predictions) != len(references):
            raise ValueError(
                f"accuracy needs one reference per prediction, got {len(predictions)} predictions and "
                f"{len(references)} references."
            )
        if sample_weight is None:
            weights = [1.0] * len(predictions)
        else:
            weights = [float(weight) for weight in sample_weight]
            if len(weights) != len(predictions):
                raise ValueError(
                    f"sample_weight has {len(weights)} entries for {len(predictions)} predictions. "
                    "Pass one weight per prediction."
                )

        correct = sum(weight for weight, p, r in zip(weights, predictions, references) if int(p) == int(r))
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(weights)
        return {"accuracy": float(correct / total) if total > 0 else 0.0}
