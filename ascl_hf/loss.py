"""The ASCL objectives as pure functions of L2-normalised tensors.

Legend: n = batch size, m = queue size (or other keys of the batch for BYOL), d = embedding dim.

Soft targets (no gradient), from the teacher key k_i and its candidate neighbours c_j:
    p_ij = softmax_j(k_i · c_j / τ')          neighbour distribution
    conf_i = 1 - H(p_i) / log m               confidence, 0 for uniform p_i, 1 for one-hot
    w_ij = min(1, K conf_i p_ij)              "ascl"
         = conf_i on the top-K j, else 0      "ahcl"
         = 1 on the top-K j, else 0           "hard"
         = 0                                  "none"
The positive gets weight 1 and each target row is normalised to sum to 1.
All arithmetic runs in float32 whatever the input dtype, since bf16 log-softmax over 65k logits is coarse.
"""

import math
from dataclasses import dataclass

import torch

from .configuration_ascl import RELATIONS


@dataclass
class SoftLossOutput:
    """Result of an ASCL objective; every field is a scalar tensor.

    Attributes:
        loss: the objective, averaged over the batch (differentiable w.r.t. the query/prediction).
        confidence: mean confidence conf_i of the neighbour distributions; None for relation "none", which
            needs no neighbour distribution (computing it would cost the baseline a second (n, m) pass).
        max_neighbor_weight: mean over rows of the largest normalised target weight given to a non-positive.
    """

    loss: torch.Tensor
    confidence: torch.Tensor | None
    max_neighbor_weight: torch.Tensor


def neighbor_weights(
    similarity: torch.Tensor, *, relation: str, num_neighbors: int, target_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-normalised target weights of the candidate neighbours.

    Args:
        similarity: (n, m) cosine similarities between each key and its m candidates.
    Returns:
        weights (n, m) in [0, 1] and confidence (n,) in [0, 1].
    """
    if relation not in RELATIONS:
        raise ValueError(f"relation={relation!r} is invalid: must be one of {', '.join(RELATIONS)}.")
    num_candidates = similarity.shape[1]
    if relation != "none" and not 1 <= num_neighbors <= num_candidates:
        raise ValueError(
            f"num_neighbors={num_neighbors} is invalid with {num_candidates} candidates: it must lie in "
            f"[1, {num_candidates}] (raise queue_size / batch size or lower num_neighbors)."
        )
    # In-place steps on two (n, m) buffers: at m = 65536 every fresh (n, m) tensor is a 32 MB allocation.
    log_probabilities = similarity / target_temperature  # (n, m)
    log_probabilities -= torch.logsumexp(log_probabilities, dim=1, keepdim=True)
    probabilities = log_probabilities.exp()  # (n, m)
    entropy = -(probabilities * log_probabilities).sum(dim=1)  # (n,)
    if num_candidates > 1:
        confidence = (1.0 - entropy / math.log(num_candidates)).clamp(0.0, 1.0)
    else:  # a single candidate is certain
        confidence = torch.ones_like(entropy)

    if relation == "none":
        return torch.zeros_like(similarity), confidence
    if relation == "ascl":
        return probabilities.mul_(num_neighbors * confidence[:, None]).clamp_(max=1.0), confidence
    top_indices = similarity.topk(num_neighbors, dim=1).indices  # (n, K)
    top_values = confidence[:, None].expand_as(top_indices) if relation == "ahcl" else torch.ones_like(top_indices)
    weights = torch.zeros_like(similarity).scatter_(1, top_indices, top_values.to(similarity.dtype))
    return weights, confidence


def moco_soft_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor,
    *,
    relation: str,
    num_neighbors: int,
    temperature: float,
    target_temperature: float,
) -> SoftLossOutput:
    """ASCL in the MoCo framework: soft cross-entropy over [positive key, queue].

    Args:
        query: (n, d) L2-normalised projections of the strong view (carries the gradient).
        key: (n, d) L2-normalised momentum-encoder projections of the weak view.
        queue: (m, d) L2-normalised keys of past batches, as they stood before this batch is enqueued.
    """
    if query.shape != key.shape or query.shape[1] != queue.shape[1]:
        raise ValueError(
            f"Shape mismatch: query {tuple(query.shape)} and key {tuple(key.shape)} must be (n, d) and "
            f"queue {tuple(queue.shape)} must be (m, d)."
        )
    # Written without the (n, 1 + m) target and logit matrices, which cost a full pass each at m = 65536:
    # with y = [1, w] / (1 + Σw) and lse = logsumexp([l_pos, l_neg]),  -Σ_j y_j log softmax(l)_j
    # = lse − (l_pos + w · l_neg) / (1 + Σw).
    scaled_query = query.float() / temperature
    key, queue = key.float(), queue.float()
    positive_logits = (scaled_query * key).sum(dim=1)  # (n,)
    negative_logits = scaled_query @ queue.T  # (n, m)
    log_normaliser = torch.logaddexp(positive_logits, torch.logsumexp(negative_logits, dim=1))  # (n,)

    if relation == "none":  # plain MoCo v2: InfoNCE, no neighbour distribution to compute
        loss = (log_normaliser - positive_logits).mean()
        return SoftLossOutput(loss, None, loss.new_zeros(()))
    with torch.no_grad():
        weights, confidence = neighbor_weights(
            key @ queue.T,
            relation=relation,
            num_neighbors=num_neighbors,
            target_temperature=target_temperature,
        )  # (n, m), (n,)
        target_mass = 1.0 + weights.sum(dim=1)  # (n,)
    target_logit = (positive_logits + (weights * negative_logits).sum(dim=1)) / target_mass
    loss = (log_normaliser - target_logit).mean()
    return SoftLossOutput(loss, confidence.mean(), (weights.max(dim=1).values / target_mass).mean())


def byol_soft_loss(
    prediction: torch.Tensor,
    key: torch.Tensor,
    *,
    relation: str,
    num_neighbors: int,
    target_temperature: float,
    positive_offset: int = 0,
) -> SoftLossOutput:
    """ASCL in the BYOL framework: regress the prediction onto a soft mixture of the batch's keys.

    Relations come from the other keys of the same (global) batch; the loss is
    mean_i (2 - 2 Σ_j y_ij p_i · k_j).

    Args:
        prediction: (n, d) L2-normalised predictor outputs of the strong view (carries the gradient).
        key: (g, d) L2-normalised momentum-encoder projections of the whole (global) batch, g >= n.
        positive_offset: row of `key` that is the positive of `prediction[0]`; prediction i pairs with
            key[positive_offset + i] (the process's offset in the gathered batch).
    """
    num_predictions, num_keys = prediction.shape[0], key.shape[0]
    if prediction.shape[1] != key.shape[1] or not 0 <= positive_offset <= num_keys - num_predictions:
        raise ValueError(
            f"Shape mismatch: prediction {tuple(prediction.shape)} must be (n, d) and key {tuple(key.shape)} "
            f"(g, d) with positive_offset ({positive_offset}) + n <= g."
        )
    prediction, key = prediction.float(), key.float()
    rows = torch.arange(num_predictions, device=key.device)
    positives = rows + positive_offset  # (n,)

    with torch.no_grad():
        is_other = torch.ones(num_predictions, num_keys, dtype=torch.bool, device=key.device)
        is_other[rows, positives] = False
        targets = torch.zeros(num_predictions, num_keys, device=key.device)  # (n, g)
        targets[rows, positives] = 1.0
        if num_keys > 1:
            similarity = (key[positives] @ key.T)[is_other].view(num_predictions, num_keys - 1)  # (n, g - 1)
            weights, confidence = neighbor_weights(
                similarity,
                relation=relation,
                num_neighbors=num_neighbors,
                target_temperature=target_temperature,
            )
            targets[is_other] = weights.flatten()
        else:
            confidence = torch.ones(num_predictions, device=key.device)
        targets = targets / targets.sum(dim=1, keepdim=True)
        max_neighbor_weight = (
            targets.masked_fill(~is_other, 0.0).max(dim=1).values.mean() if num_keys > 1 else targets.new_zeros(())
        )

    alignment = prediction @ key.T  # (n, g)
    loss = (2.0 - 2.0 * (targets * alignment).sum(dim=1)).mean()
    return SoftLossOutput(loss, confidence.mean(), max_neighbor_weight)


__all__ = ["SoftLossOutput", "neighbor_weights", "moco_soft_loss", "byol_soft_loss"]
