"""Top-k accuracy metric, shipped inside ascl-hf so it loads by local path with no Hub access.

A prediction is a ranked list of class indices (best first); it counts as correct when the
reference is among its first `k` entries. With k = 1 this is plain accuracy.

    >>> metric = evaluate.load(str(Path(ascl_hf.__file__).parent / "metrics" / "top_k_accuracy"))
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[0, 0], k=2)
    {'top_k_accuracy': 0.5}
"""

import datasets
import evaluate

_DESCRIPTION = """
Top-k accuracy is the proportion of examples whose true class is among the k highest-ranked
predicted classes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): for each example, class indices ranked from most to
        least likely, shape (num_examples, num_ranked) with num_ranked >= 1.
    references (`list` of `int`): true class indices, shape (num_examples,).
    k (`int`): how many ranked classes count. Defaults to 5. A ranked list shorter than k (fewer
        classes than k) is used whole.
Returns:
    top_k_accuracy (`float`): in [0, 1].
Examples:
    >>> metric.compute(predictions=[[0, 1], [2, 1]], references=[1, 0], k=2)
    {'top_k_accuracy': 0.5}
"""

_CITATION = """
@inproceedings{krizhevsky2012imagenet,
  title={ImageNet Classification with Deep Convolutional Neural Networks},
  author={Krizhevsky, Alex and Sutskever, Ilya and Hinton, Geoffrey E.},
  booktitle={NeurIPS},
  year={2012}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=5):
        if k < 1:
            raise ValueError(f"top_k_accuracy needs k >= 1, got k={k}.")
        correct = sum(reference in ranked[:k] for ranked, reference in zip(predictions, references))
        return {"top_k_accuracy": float(correct / len(references)) if references else 0.0}
