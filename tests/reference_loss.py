"""A deliberately plain, per-row float64 implementation of DESIGN.md §1, to check ascl_hf.loss against."""

import math

import torch


def reference_weights(similarities, relation, num_neighbors, target_temperature):
    """One row: similarities (m,) float64 list → (weights list, confidence)."""
    m = len(similarities)
    exps = [math.exp(s / target_temperature) for s in similarities]
    total = sum(exps)
    probabilities = [e / total for e in exps]
    entropy = -sum(p * math.log(p) for p in probabilities if p > 0)
    confidence = 1.0 - entropy / math.log(m) if m > 1 else 1.0
    order = sorted(range(m), key=lambda j: -similarities[j])[:num_neighbors]
    weights = []
    for j in range(m):
        if relation == "ascl":
            weights.append(min(1.0, num_neighbors * confidence * probabilities[j]))
        elif relation == "ahcl":
            weights.append(confidence if j in order else 0.0)
        elif relation == "hard":
            weights.append(1.0 if j in order else 0.0)
        else:
            weights.append(0.0)
    return weights, confidence


def reference_moco(query, key, queue, relation, num_neighbors, temperature, target_temperature):
    query, key, queue = (t.double().tolist() for t in (query, key, queue))
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    losses, confidences, max_weights = [], [], []
    for q, k in zip(query, key):
        weights, confidence = reference_weights(
            [dot(k, z) for z in queue], relation, num_neighbors, target_temperature
        )
        targets = [1.0] + weights
        targets = [t / sum(targets) for t in targets]
        max_weights.append(max(targets[1:]))
        logits = [dot(q, k) / temperature] + [dot(q, z) / temperature for z in queue]
        top = max(logits)
        log_normaliser = top + math.log(sum(math.exp(l - top) for l in logits))
        losses.append(-sum(t * (l - log_normaliser) for t, l in zip(targets, logits)))
        confidences.append(confidence)
    mean = lambda values: torch.tensor(sum(values) / len(values), dtype=torch.float64)  # noqa: E731
    return mean(losses), mean(confidences), mean(max_weights)


def reference_byol(prediction, key, relation, num_neighbors, target_temperature):
    prediction, key = prediction.double().tolist(), key.double().tolist()
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    n = len(key)
    losses, confidences = [], []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        weights, confidence = reference_weights(
            [dot(key[i], key[j]) for j in others], relation, num_neighbors, target_temperature
        )
        targets = [0.0] * n
        targets[i] = 1.0
        for j, w in zip(others, weights):
            targets[j] = w
        total = sum(targets)
        losses.append(2 - 2 * sum(targets[j] / total * dot(prediction[i], key[j]) for j in range(n)))
        confidences.append(confidence)
    return torch.tensor(sum(losses) / n, dtype=torch.float64), torch.tensor(sum(confidences) / n, dtype=torch.float64)
