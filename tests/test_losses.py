"""Losses against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmembed.losses import CoSENTLoss, InfoNCELoss


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_infonce_in_batch_plus_hard_negatives():
    torch.manual_seed(0)
    q, p = _unit(3, 8), _unit(6, 8)  # group size 2: [pos0, neg0, pos1, neg1, pos2, neg2]
    out = InfoNCELoss(temperature=0.05)(q, p, group_size=2)
    scores = q @ p.T / 0.05
    manual = sum(-torch.log_softmax(scores[i], 0)[2 * i] for i in range(3)) / 3
    assert torch.allclose(out.loss, manual, atol=1e-6)
    assert out.accuracy.item() == (scores.argmax(1) == torch.tensor([0, 2, 4])).float().mean().item()


def test_without_in_batch_negatives_only_the_own_group_competes():
    torch.manual_seed(1)
    q, p = _unit(3, 8), _unit(9, 8)
    out = InfoNCELoss(temperature=0.1)(q, p, group_size=3, in_batch_negatives=False)
    manual = 0
    for i in range(3):
        own = q[i] @ p[3 * i : 3 * i + 3].T / 0.1
        manual += -torch.log_softmax(own, 0)[0]
    assert torch.allclose(out.loss, manual / 3, atol=1e-6)


def test_symmetric_term_adds_passage_to_query():
    torch.manual_seed(2)
    q, p = _unit(4, 8), _unit(4, 8)
    one = InfoNCELoss(0.02)(q, p, 1).loss
    both = InfoNCELoss(0.02, symmetric=True)(q, p, 1).loss
    reverse = F.cross_entropy(p @ q.T / 0.02, torch.arange(4))
    assert torch.allclose(both, (one + reverse) / 2, atol=1e-5)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0)


def test_cosent_rewards_the_right_order():
    q = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), dim=-1)
    close, mid, far = [1.0, 0.1], [1.0, 1.0], [0.0, 1.0]
    scores = torch.tensor([5.0, 3.0, 1.0])
    right = CoSENTLoss(scale=20)(q, torch.tensor([close, mid, far]), scores)
    wrong = CoSENTLoss(scale=20)(q, torch.tensor([far, mid, close]), scores)
    assert right.loss < 0.1 < wrong.loss and right.accuracy == 1.0 and wrong.accuracy == 0.0
    cos = F.cosine_similarity(q, torch.tensor([close, mid, far]), dim=-1) * 20
    terms = [cos[j] - cos[i] for i in range(3) for j in range(3) if scores[i] > scores[j]]
    manual = math.log(1 + sum(math.exp(t) for t in terms))
    assert abs(right.loss.item() - manual) < 1e-5
