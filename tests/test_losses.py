"""Losses against hand-written references, and the router that picks one per dataset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmembed.data.schema import RecordFacts, parse_record
from llmembed.losses import (CoSENT, CoSENTLoss, InfoNCE, InfoNCELoss, LossConfig, LossRouter, SimCSE,
                             TeacherSignals, choose_loss)
from llmembed.losses.cosent import CoSENTSettings
from llmembed.losses.simcse import SimCSESettings


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


def _pair(score=None):
    return parse_record({"query": "q", "positive": "p", "score": score})


def _text():
    return parse_record({"text": "t"})


def test_choose_loss_once_per_dataset():
    assert choose_loss("auto", RecordFacts.of([_pair(1.0), _pair(0.0)]), "d").name == "cosent"
    # partly scored: cannot rank as a whole
    assert choose_loss("auto", RecordFacts.of([_pair(1.0), _pair()]), "d").name == "infonce"
    assert choose_loss("infonce", RecordFacts.of([_pair(1.0), _pair(0.0)]), "d").name == "infonce"
    with pytest.raises(ValueError, match="d: loss cosent needs a score on every record"):
        choose_loss("cosent", RecordFacts.of([_pair(1.0), _pair()]), "d")
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        choose_loss("triplet", RecordFacts.of([_pair(1.0)]), "d")


def test_simcse_is_chosen_for_plain_text_and_refused_for_pairs():
    assert choose_loss("auto", RecordFacts.of([_text(), _text()]), "d").name == "simcse"
    assert choose_loss("auto", RecordFacts.of([_text(), _pair()]), "d").name == "infonce"
    with pytest.raises(ValueError, match="d: loss simcse trains on unlabelled text"):
        choose_loss("simcse", RecordFacts.of([_pair()]), "d")


def test_simcse_loss_is_infonce_between_the_two_views_written_out():
    """Gao et al.'s unsupervised SimCSE: view i of each text against every second view in the
    batch, -log softmax at the diagonal, at simcse_temperature (symmetric: both directions)."""
    from llmembed.data.collate import LoadedDataset

    torch.manual_seed(9)
    a, b = _unit(5, 8), _unit(5, 8)
    for symmetric in (False, True):
        router = LossRouter([LoadedDataset("wiki", [], None, True, 1, SimCSE)],
                            LossConfig(temperature=0.02, simcse=SimCSESettings(temperature=0.07),
                                       symmetric=symmetric))
        forward = sum(-math.log(math.exp(float(a[i] @ b[i]) / 0.07)
                                / sum(math.exp(float(a[i] @ b[j]) / 0.07) for j in range(5))) for i in range(5)) / 5
        backward = sum(-math.log(math.exp(float(b[i] @ a[i]) / 0.07)
                                 / sum(math.exp(float(b[i] @ a[j]) / 0.07) for j in range(5))) for i in range(5)) / 5
        want = (forward + backward) / 2 if symmetric else forward
        assert abs(router(0)(a, b).loss.item() - want) < 1e-5


def test_router_binds_each_datasets_loss_and_settings():
    from llmembed.data.collate import LoadedDataset

    datasets = [LoadedDataset("pairs", [], None, True, 2, InfoNCE),
                LoadedDataset("labels", [], None, False, 3, InfoNCE),
                LoadedDataset("sts", [], None, True, 1, CoSENT)]
    router = LossRouter(datasets, LossConfig(temperature=0.05, symmetric=True, cosent=CoSENTSettings(scale=10.0)))
    assert len(router) == 3 and router.names == ["infonce", "infonce", "cosent"]
    torch.manual_seed(3)
    q = _unit(3, 8)
    p2, p3 = _unit(6, 8), _unit(9, 8)
    want = InfoNCELoss(0.05, symmetric=True)(q, p2, group_size=2, in_batch_negatives=True)
    assert torch.equal(router(0)(q, p2).loss, want.loss)
    want = InfoNCELoss(0.05, symmetric=True)(q, p3, group_size=3, in_batch_negatives=False)
    assert torch.equal(router(1)(q, p3).loss, want.loss)
    scores = torch.tensor([3.0, 1.0, 2.0])
    p1 = _unit(3, 8)
    assert torch.equal(router(2)(q, p1, scores).loss, CoSENTLoss(scale=10.0)(q, p1, scores).loss)
    with pytest.raises(ValueError, match="dataset sts: a CoSENT batch came without scores"):
        router(2)(q, p1)


def _planted():
    """Three queries, group size 2. Query 0's positive scores 0.6; the other query's positive
    in column 2 is a planted false negative for query 0 (cosine 0.9 > 0.6 + 0.1); query 0's hard
    negative scores 0.65, inside the margin, and must stay."""
    torch.manual_seed(3)
    b = torch.linalg.qr(torch.randn(16, 16))[0].T  # orthonormal rows
    q = torch.stack([b[0], b[3], b[5]])
    p = torch.stack([0.6 * b[0] + 0.8 * b[1], 0.65 * b[0] + (1 - 0.65**2) ** 0.5 * b[2],
                     0.9 * b[0] + (1 - 0.9**2) ** 0.5 * b[3], b[6], 0.9 * b[5] + (1 - 0.9**2) ** 0.5 * b[8], b[7]])
    return q, p


def test_false_negative_masking_removes_exactly_the_planted_negative():
    q, p = _planted()
    cosines = q @ p.T
    # The planted one is the only column of any row above its positive + 0.1.
    above = cosines > cosines[torch.arange(3), torch.tensor([0, 2, 4])].unsqueeze(1) + 0.1
    assert above.nonzero().tolist() == [[0, 2]]
    q.requires_grad_(True)
    p.requires_grad_(True)
    out = InfoNCELoss(temperature=0.05, false_negative_margin=0.1)(q, p, group_size=2)
    assert out.masked == 1
    logits = cosines.detach() / 0.05
    kept0 = [0, 1, 3, 4, 5]
    manual = (-torch.log_softmax(logits[0, kept0], 0)[0] - torch.log_softmax(logits[1], 0)[2]
              - torch.log_softmax(logits[2], 0)[4]) / 3
    assert torch.allclose(out.loss, manual, atol=1e-6)
    # Query 0 pulls on its positive and pushes its hard negative, but never touches the masked
    # passage: that passage's gradient is what rows 1 and 2 give it, unchanged.
    out.loss.backward()
    rows12 = sum(-torch.log_softmax((q[i] @ p.T) / 0.05, 0)[2 * i] for i in (1, 2)) / 3
    (expected,) = torch.autograd.grad(rows12, p, retain_graph=False)
    assert torch.allclose(p.grad[2], expected[2], atol=1e-6)
    unmasked = InfoNCELoss(temperature=0.05)(q.detach(), p.detach(), group_size=2)
    assert unmasked.masked == 0 and unmasked.loss > out.loss


def test_guided_masking_removes_what_the_teacher_ranks_above_the_positive():
    """GISTEmbed: the student sees nothing suspicious (no margin set), the teacher scores query
    1's hard negative (column 3) above its positive: exactly that column leaves row 1, and the
    loss is the hand-written softmax without it. The router passes the teacher's vectors."""
    from llmembed.data.collate import LoadedDataset

    q, p = _planted()
    b = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4)))[0].T
    guide_q = torch.stack([b[0], b[1], b[2]])
    guide_p = torch.stack([b[0], b[4], 0.5 * b[1] + 0.75**0.5 * b[5], 0.9 * b[1] + 0.19**0.5 * b[6],
                           b[2], b[7]])
    out = InfoNCELoss(temperature=0.05)(q, p, group_size=2, guide=(guide_q, guide_p))
    assert out.masked == 1
    logits = (q @ p.T) / 0.05
    kept1 = [0, 1, 2, 4, 5]
    manual = (-torch.log_softmax(logits[0], 0)[0] - torch.log_softmax(logits[1, kept1], 0)[2]
              - torch.log_softmax(logits[2], 0)[4]) / 3
    assert torch.allclose(out.loss, manual, atol=1e-6)
    # Symmetric: passage 2 (query 1's positive) -> queries: the teacher puts no query above
    # query 1 for it, so the reverse direction masks nothing more.
    both = InfoNCELoss(temperature=0.05, symmetric=True)(q, p, group_size=2, guide=(guide_q, guide_p))
    assert both.masked == 1
    router = LossRouter([LoadedDataset("d", [], None, True, 2, InfoNCE)],
                        LossConfig(temperature=0.05, teacher_model="t", guided_masking=True))
    routed = router(0)(q, p, None, TeacherSignals(query=guide_q, passage=guide_p))
    assert routed.masked == 1 and torch.allclose(routed.loss, manual, atol=1e-6)
    with pytest.raises(ValueError, match="guided_masking needs teacher_model"):
        LossConfig(guided_masking=True)


def test_false_negative_masking_in_the_reverse_direction_and_within_groups_only():
    q, p = _planted()
    both = InfoNCELoss(temperature=0.05, symmetric=True, false_negative_margin=0.1)(q, p, group_size=2)
    assert both.masked == 2  # query 0 -> passage 2, and passage 2 (query 1's positive) -> query 0
    # Without in-batch negatives column 2 never competes with query 0: nothing to mask.
    own = InfoNCELoss(temperature=0.05, false_negative_margin=0.1)(q, p, group_size=2, in_batch_negatives=False)
    assert own.masked == 0
    config = LossConfig(false_negative_margin=0.1)
    assert config.false_negative_margin == 0.1
    with pytest.raises(ValueError, match="false_negative_margin"):
        LossConfig(false_negative_margin=-0.5)


def test_kl_distillation_matches_its_formula_and_vanishes_for_a_teacher_equal_to_the_student():
    from llmembed.losses import KLDistillLoss

    torch.manual_seed(5)
    q = _unit(4, 8).requires_grad_(True)
    p = _unit(12, 8).requires_grad_(True)  # group size 3
    teacher = torch.rand(4, 3)
    loss = KLDistillLoss(temperature=0.05, teacher_temperature=0.1)(q, p, teacher)
    student = torch.stack([q[i] @ p[3 * i : 3 * i + 3].T for i in range(4)]) / 0.05
    pt = torch.softmax(teacher / 0.1, 1)
    manual = (pt * (pt.log() - torch.log_softmax(student, 1))).sum(1).mean()
    assert torch.allclose(loss, manual, atol=1e-6) and loss > 0
    # The student as its own teacher: zero loss and zero gradient.
    own = torch.stack([q[i] @ p[3 * i : 3 * i + 3].T for i in range(4)]).detach()
    same = KLDistillLoss(temperature=0.05, teacher_temperature=0.05)(q, p, own)
    q_grad, p_grad = torch.autograd.grad(same, [q, p])
    assert abs(same.item()) < 1e-7 and q_grad.abs().max() < 1e-6 and p_grad.abs().max() < 1e-6
    # A NaN row (a record without scored negatives) sits out; all-NaN costs nothing.
    holed = teacher.clone()
    holed[1] = float("nan")
    kept = KLDistillLoss(temperature=0.05, teacher_temperature=0.1)(q[[0, 2, 3]], p[[0, 1, 2, 6, 7, 8, 9, 10, 11]],
                                                                    teacher[[0, 2, 3]])
    assert torch.allclose(KLDistillLoss(0.05, 0.1)(q, p, holed), kept, atol=1e-6)
    assert KLDistillLoss(0.05, 0.1)(q, p, torch.full((4, 3), float("nan"))).item() == 0.0


def test_router_adds_weighted_distillation_only_where_a_dataset_has_teacher_scores():
    from llmembed.data.collate import LoadedDataset
    from llmembed.losses import KLDistillLoss

    torch.manual_seed(6)
    q, p, teacher = _unit(2, 8), _unit(4, 8), torch.rand(2, 2)
    plain = LoadedDataset("plain", [], None, True, 2, InfoNCE)
    taught = LoadedDataset("taught", [], None, True, 2, InfoNCE, teacher=[[0.5, 0.1]])
    router = LossRouter([plain, taught], LossConfig(temperature=0.05, distill_weight=0.5, teacher_temperature=0.1))
    infonce = InfoNCELoss(0.05)(q, p, 2).loss
    kl = KLDistillLoss(0.05, 0.1)(q, p, teacher)
    signals = TeacherSignals(scores=teacher)
    assert torch.allclose(router(0)(q, p, None, signals).loss, infonce)
    assert torch.allclose(router(1)(q, p, None, signals).loss, infonce + 0.5 * kl)
    with pytest.raises(ValueError, match="taught: a distillation batch came without teacher scores"):
        router(1)(q, p)


def test_similarity_structure_loss_is_the_mse_of_cosine_matrices_of_any_widths():
    from llmembed.data.collate import LoadedDataset
    from llmembed.losses import SimilarityStructureLoss

    torch.manual_seed(7)
    q, p = torch.randn(3, 16).requires_grad_(True), torch.randn(6, 16).requires_grad_(True)
    tq, tp = _unit(3, 5), _unit(6, 5)  # a narrower teacher
    teacher = tq @ tp.T
    loss = SimilarityStructureLoss()(q, p, teacher)
    manual = ((F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T - teacher) ** 2).mean()
    assert torch.allclose(loss, manual, atol=1e-7) and loss > 0
    own = (F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T).detach()
    same = SimilarityStructureLoss()(q, p, own)
    assert same.item() < 1e-12 and all(g.abs().max() < 1e-7 for g in torch.autograd.grad(same, [q, p]))
    router = LossRouter([LoadedDataset("d", [], None, True, 2, InfoNCE)],
                        LossConfig(temperature=0.05, teacher_model="teacher", structure_weight=2.0))
    qn, pn = F.normalize(q, dim=-1).detach(), F.normalize(p, dim=-1).detach()
    out = router(0)(qn, pn, None, TeacherSignals(similarity=teacher))
    expected = InfoNCELoss(0.05)(qn, pn, 2).loss + 2.0 * SimilarityStructureLoss()(qn, pn, teacher)
    assert torch.allclose(out.loss, expected)
    with pytest.raises(ValueError, match="without the teacher's similarities"):
        router(0)(qn, pn)
    with pytest.raises(ValueError, match="structure_weight > 0 needs teacher_model"):
        LossConfig(structure_weight=1.0)
    # Listwise: KL of each query's distribution over all the batch's passages.
    kl = SimilarityStructureLoss("kl", temperature=0.05, teacher_temperature=0.1)(q, p, teacher)
    student = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T / 0.05
    pt = torch.softmax(teacher / 0.1, 1)
    assert torch.allclose(kl, (pt * (pt.log() - torch.log_softmax(student, 1))).sum(1).mean(), atol=1e-6)
    assert SimilarityStructureLoss("kl", 0.05, 0.05)(q, p, own).abs().item() < 1e-6
    with pytest.raises(ValueError, match="structure_kind"):
        LossConfig(structure_kind="l1")


def test_matryoshka_sums_each_prefix_loss_on_renormalised_prefixes_as_written_out():
    from llmembed.data.collate import LoadedDataset

    datasets = [LoadedDataset("pairs", [], None, True, 2, InfoNCE), LoadedDataset("sts", [], None, True, 1, CoSENT)]
    config = LossConfig(temperature=0.05, matryoshka_dims=[8, 2, 4], matryoshka_weights=[1.0, 0.5, 0.25])
    router = LossRouter(datasets, config)
    torch.manual_seed(4)
    q, p = _unit(3, 8), _unit(6, 8)

    def infonce_at(d):
        qd, pd = F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1)
        scores = qd @ pd.T / 0.05
        return sum(-torch.log_softmax(scores[i], 0)[2 * i] for i in range(3)) / 3

    manual = 1.0 * infonce_at(8) + 0.5 * infonce_at(2) + 0.25 * infonce_at(4)
    out = router(0)(q, p)
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert out.loss.item() > infonce_at(8).item() + 0.1  # the prefixes really add their terms
    scores, p1 = torch.tensor([3.0, 1.0, 2.0]), _unit(3, 8)
    cosent = CoSENTLoss()
    manual = sum(w * cosent(F.normalize(q[:, :d], dim=-1), F.normalize(p1[:, :d], dim=-1), scores).loss
                 for d, w in ((8, 1.0), (2, 0.5), (4, 0.25)))
    assert torch.allclose(router(1)(q, p1, scores).loss, manual, atol=1e-5)
    for bad, message in (({"matryoshka_dims": [4, 4]}, "distinct"),
                         ({"matryoshka_weights": [1.0]}, "needs matryoshka_dims"),
                         ({"matryoshka_dims": [4, 2], "matryoshka_weights": [1.0]}, "one weight per width")):
        with pytest.raises(ValueError, match=message):
            LossConfig(**bad)
