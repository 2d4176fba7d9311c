"""Losses: values on small hand-computed cases."""

import math

import pytest
import torch

from relsegcore.losses import relation_loss, relation_matrix, segmentation_loss, soft_dice_loss


def test_relation_matrix_of_hand_computed_batch():
    # Rows a=(1,0), b=(1,1): Gram = [[1,1],[1,2]]; row-normalised: [1,1]/sqrt2, [1,2]/sqrt5.
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(5), 2 / math.sqrt(5)]])
    assert torch.allclose(relation_matrix(features), expected)


def test_relation_loss_hand_computed_value():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # Gram = identity: rows (1,0), (0,1)
    ra = relation_matrix(a)
    expected = ((ra - torch.eye(2)) ** 2).mean()
    assert relation_loss(a, b).item() == pytest.approx(expected.item())
    # By hand: (1/sqrt2-1)^2 + (1/sqrt2)^2 + (1/sqrt5)^2 + (2/sqrt5-1)^2, over 4
    by_hand = ((1 / math.sqrt(2) - 1) ** 2 + 0.5 + 0.2 + (2 / math.sqrt(5) - 1) ** 2) / 4
    assert relation_loss(a, b).item() == pytest.approx(by_hand)


def test_relation_loss_ignores_scale_and_width_but_not_relations():
    torch.manual_seed(0)
    a = torch.randn(4, 8, 5, 5)
    assert relation_loss(a, 3.0 * a).item() == pytest.approx(0.0, abs=1e-7)
    wider = torch.cat([a, a], dim=1)  # same relations, twice the channels
    assert relation_loss(a, wider).item() == pytest.approx(0.0, abs=1e-7)
    assert relation_loss(a, torch.randn(4, 8, 5, 5)).item() > 1e-3


def test_relation_loss_needs_the_same_batch():
    with pytest.raises(ValueError):
        relation_loss(torch.randn(3, 4), torch.randn(2, 4))


def test_soft_dice_is_zero_for_a_perfect_confident_prediction_and_one_for_the_opposite():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    perfect = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 40 - 20
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    assert soft_dice_loss(-perfect, target).item() == pytest.approx(1.0, abs=1e-4)


def test_segmentation_loss_with_deep_supervision_weights_coarser_levels_less():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4] = 1
    good = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 20 - 10
    bad_coarse = torch.zeros(1, 2, 4, 4)
    single = segmentation_loss(good, target)
    combined = segmentation_loss([good, bad_coarse], target)
    assert single.item() < combined.item() < segmentation_loss(bad_coarse, target[:, ::2, ::2]).item()


def test_distillation_loss_is_zero_when_student_and_teacher_agree_and_grows_with_disagreement():
    from relsegcore.losses import distillation_loss

    teacher = torch.tensor([[[[2.0]], [[-1.0]]]])  # (1, 2, 1, 1): class 0 likely
    assert float(distillation_loss(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-7)
    near, far = torch.tensor([[[[1.5]], [[-0.5]]]]), torch.tensor([[[[-2.0]], [[1.0]]]])
    assert 0 < float(distillation_loss(near, teacher)) < float(distillation_loss(far, teacher))
    # hand value at T=1: KL(p || q) for p = softmax(teacher), q = softmax(far)
    p, q = teacher.softmax(1), far.softmax(1)
    assert float(distillation_loss(far, teacher, temperature=1.0)) == pytest.approx(float((p * (p / q).log()).sum()))
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(torch.zeros(1, 3, 1, 1), teacher)


def confident_logits(labels: torch.Tensor) -> torch.Tensor:
    """Two-class logits that put (almost) all probability on ``labels``."""
    return torch.stack([(labels == 0).float(), (labels == 1).float()], dim=1) * 40.0


def test_tversky_weight_half_is_dice_to_the_last_bit_and_above_half_costs_misses_more():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1  # 16 pixels
    missed, extra = target.clone(), target.clone()
    missed[0, 2, 2:6] = 0  # 4 missed: TP 12, FN 4
    extra[0, 6, 2:6] = 1  # 4 extra: TP 16, FP 4
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    labels = torch.randint(0, 2, (2, 8, 8))
    assert torch.equal(soft_dice_loss(logits, labels, false_negative_weight=0.5), soft_dice_loss(logits, labels))
    # Tversky by hand: 1 - TP / (TP + 0.3 FP + 0.7 FN)
    assert soft_dice_loss(confident_logits(missed), target, false_negative_weight=0.7).item() == pytest.approx(
        1 - 12 / (12 + 0.7 * 4), abs=1e-4)
    assert soft_dice_loss(confident_logits(extra), target, false_negative_weight=0.7).item() == pytest.approx(
        1 - 16 / (16 + 0.3 * 4), abs=1e-4)
    for prediction, costs_more in ((missed, True), (extra, False)):
        dice = soft_dice_loss(confident_logits(prediction), target).item()
        tversky = soft_dice_loss(confident_logits(prediction), target, false_negative_weight=0.7).item()
        assert (tversky > dice) == costs_more
    missed_logits = confident_logits(missed)
    assert segmentation_loss(missed_logits, target, 0.7) > segmentation_loss(missed_logits, target)


def test_the_loss_options_reach_the_training_config(tmp_path):
    from relsegcore.cli import build_parser
    from relsegcore.cli.train import stage2_config

    def config(*extra: str):
        args = build_parser().parse_args(["train", "--data", f"ctseg2d:{tmp_path}", "--out", str(tmp_path), *extra])
        return stage2_config(args)

    assert config().false_negative_weight == 0.5
    assert config("--false-negative-weight", "0.7").to_dict()["false_negative_weight"] == 0.7
    for bad in ("1", "0", "high"):
        with pytest.raises(SystemExit):
            config("--false-negative-weight", bad)
    assert not config().dice_per_sample
    assert config("--dice-per-sample").to_dict()["dice_per_sample"] is True


def test_per_sample_dice_weighs_a_small_structure_as_much_as_a_large_one():
    # Sample 0: a 36-pixel structure found exactly; sample 1: a 4-pixel one with 4 false pixels beside it.
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, 1:7, 1:7] = 1
    target[1, 0, 0:4] = 1
    prediction = target.clone()
    prediction[1, 0, 0:4] = 0
    prediction[1, 0, 0:2] = 1  # TP 2, FN 2
    prediction[1, 7, 0:4] = 1  # FP 4
    logits = confident_logits(prediction)
    # batch Dice: 2 * 38 / (42 + 40); per sample: 1 and 2 * 2 / (6 + 4), averaged
    assert soft_dice_loss(logits, target).item() == pytest.approx(1 - 76 / 82, abs=1e-4)
    assert soft_dice_loss(logits, target, per_sample=True).item() == pytest.approx(1 - (1 + 0.4) / 2, abs=1e-4)
    assert segmentation_loss(logits, target, dice_per_sample=True) > segmentation_loss(logits, target)
    # one sample: both readings are the same number
    assert soft_dice_loss(logits[:1], target[:1], per_sample=True).item() == pytest.approx(
        soft_dice_loss(logits[:1], target[:1]).item(), abs=1e-6)
