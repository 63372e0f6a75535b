"""Accuracy metric, shipped inside ascl-hf so it loads by local path with no Hub access.

It follows the layout of the Hub's `evaluate-metric/accuracy` module (an `evaluate.Metric` with
`_info` and `_compute`) so `evaluate.load(<path to this folder>)` gives the same interface:

    >>> metric = evaluate.load(str(Path(ascl_hf.__file__).parent / "metrics" / "accuracy"))
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

import datasets
import evaluate

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
accuracy = (number of predictions equal to their reference) / (number of predictions).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices, shape (num_examples,).
    references (`list` of `int`): true class indices, shape (num_examples,).
    normalize (`bool`): if False, return the number of correct predictions instead of the
        proportion. Defaults to True.
    sample_weight (`list` of `float`): per-example weights. Defaults to None (all 1).
Returns:
    accuracy (`float` or `int`): in [0, 1] when normalize is True, else a count.
Examples:
    >>> metric.compute(references=[0, 1, 2, 0], predictions=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        # Plain Python rather than sklearn: the module then has no import evaluate must check.
        weights = [1.0] * len(predictions) if sample_weight is None else list(sample_weight)
        pairs = zip(predictions, references, weights)
        correct = sum(weight for prediction, reference, weight in pairs if prediction == reference)
        if not normalize:
            return {"accuracy": correct}
        total = sum(weights)
        return {"accuracy": float(correct / total) if total else 0.0}
