import math

import pytest
import torch
import torch.nn.functional as F

from ascl_hf.loss import byol_soft_loss, moco_soft_loss, neighbor_weights
from reference_loss import reference_byol, reference_moco

RELATIONS = ["ascl", "ahcl", "hard", "none"]


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("num_neighbors", [1, 3, 5])
@pytest.mark.parametrize("n, m, d", [(4, 8, 3), (7, 33, 16), (16, 64, 8)])
def test_moco_loss_matches_reference(relation, num_neighbors, n, m, d):
    query, key, queue = unit(n, d), unit(n, d), unit(m, d)
    # Keys close to queue rows give confident, non-trivial targets.
    key = F.normalize(key + 2 * queue[:n], dim=1)
    kwargs = dict(relation=relation, num_neighbors=num_neighbors, temperature=0.1, target_temperature=0.05)
    result = moco_soft_loss(query, key, queue, **kwargs)
    expected_loss, expected_confidence, expected_max_weight = reference_moco(query, key, queue, **kwargs)
    assert result.loss.dtype == torch.float32
    torch.testing.assert_close(result.loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.max_neighbor_weight.double(), expected_max_weight, rtol=1e-5, atol=1e-5)
    if relation == "none":
        assert result.confidence is None  # the baseline computes no neighbour distribution
    else:
        torch.testing.assert_close(result.confidence.double(), expected_confidence, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("num_neighbors", [1, 3, 5])
@pytest.mark.parametrize("n, d", [(6, 4), (12, 16)])
def test_byol_loss_matches_reference(relation, num_neighbors, n, d):
    prediction, key = unit(n, d), unit(n, d)
    kwargs = dict(relation=relation, num_neighbors=num_neighbors, target_temperature=0.05)
    result = byol_soft_loss(prediction, key, **kwargs)
    expected_loss, expected_confidence = reference_byol(prediction, key, **kwargs)
    torch.testing.assert_close(result.loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.confidence.double(), expected_confidence, rtol=1e-5, atol=1e-5)


def test_byol_offset_selects_own_rows_of_a_gathered_batch():
    """A process holding rows 4..7 of a gathered batch of 8 gets exactly those rows' terms."""
    prediction, key = unit(8, 5), unit(8, 5)
    kwargs = dict(relation="ascl", num_neighbors=2, target_temperature=0.05)
    whole = byol_soft_loss(prediction, key, **kwargs)
    first = byol_soft_loss(prediction[:4], key, positive_offset=0, **kwargs)
    second = byol_soft_loss(prediction[4:], key, positive_offset=4, **kwargs)
    torch.testing.assert_close((first.loss + second.loss) / 2, whole.loss)


def test_relation_none_is_infonce():
    query, key, queue = unit(5, 8), unit(5, 8), unit(20, 8)
    result = moco_soft_loss(query, key, queue, relation="none", num_neighbors=1, temperature=0.2,
                            target_temperature=0.05)
    logits = torch.cat([(query * key).sum(1, keepdim=True), query @ queue.T], 1) / 0.2
    infonce = F.cross_entropy(logits.float(), torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(result.loss, infonce)


def test_identical_queue_rows_give_zero_confidence_and_ascl_equals_none():
    query, key = unit(6, 8), unit(6, 8)
    queue = unit(1, 8).expand(30, 8).clone()
    kwargs = dict(num_neighbors=1, temperature=0.1, target_temperature=0.05)
    ascl = moco_soft_loss(query, key, queue, relation="ascl", **kwargs)
    none = moco_soft_loss(query, key, queue, relation="none", **kwargs)
    torch.testing.assert_close(ascl.confidence, torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(ascl.loss, none.loss, rtol=1e-5, atol=1e-5)
    assert ascl.max_neighbor_weight.item() == pytest.approx(0.0, abs=1e-6)


def test_one_hot_neighbor_distribution_is_finite_with_full_confidence():
    """Entropy 0 (a key equal to one queue row, tiny τ') must not give NaN; confidence is 1, weight is 1."""
    queue = unit(10, 4)
    key = queue[:3].clone()
    weights, confidence = neighbor_weights(key @ queue.T, relation="ascl", num_neighbors=1, target_temperature=1e-4)
    assert torch.isfinite(weights).all() and torch.isfinite(confidence).all()
    torch.testing.assert_close(confidence, torch.ones(3, dtype=confidence.dtype))
    torch.testing.assert_close(weights[torch.arange(3), torch.arange(3)], torch.ones(3, dtype=weights.dtype))


def test_half_precision_inputs_compute_in_float32():
    query, key, queue = (t.to(torch.bfloat16) for t in (unit(4, 8), unit(4, 8), unit(16, 8)))
    result = moco_soft_loss(query, key, queue, relation="ascl", num_neighbors=1, temperature=0.1,
                            target_temperature=0.05)
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    expected, _, _ = reference_moco(query, key, queue, "ascl", 1, 0.1, 0.05)
    torch.testing.assert_close(result.loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_query_only():
    query = unit(4, 8).float().requires_grad_()
    key = unit(4, 8).float().requires_grad_()
    queue = unit(16, 8).float().requires_grad_()
    moco_soft_loss(query, key, queue, relation="ascl", num_neighbors=2, temperature=0.1,
                   target_temperature=0.05).loss.backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    # key enters the logits (positive), but targets are computed without gradient
    assert queue.grad is not None  # queue is a constant in training (a cloned buffer); gradient is harmless


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="relation"):
        neighbor_weights(torch.zeros(2, 3), relation="soft", num_neighbors=1, target_temperature=0.1)
    with pytest.raises(ValueError, match="num_neighbors=5"):
        neighbor_weights(torch.zeros(2, 3), relation="hard", num_neighbors=5, target_temperature=0.1)
    with pytest.raises(ValueError, match="Shape mismatch"):
        moco_soft_loss(unit(2, 3), unit(2, 4), unit(5, 3), relation="none", num_neighbors=1, temperature=0.1,
                       target_temperature=0.1)


def test_uniform_similarities_give_zero_confidence():
    _, confidence = neighbor_weights(torch.zeros(3, 7), relation="ascl", num_neighbors=1, target_temperature=0.05)
    torch.testing.assert_close(confidence, torch.zeros(3), atol=1e-6, rtol=0)
    assert math.isclose(float(neighbor_weights(torch.zeros(1, 1), relation="none", num_neighbors=1,
                                               target_temperature=0.05)[1]), 1.0)
