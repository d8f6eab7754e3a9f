"""Distillation (orchestrator/train/distill.py): Hinton et al.'s loss against a hand
computation, alpha = 0 as plain training bit for bit, the teacher ensemble's outputs on
eval inputs equal to the evaluation's combination, and a student that resumes from its
checkpoint like any member."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from ensemble.core import math as em
from orchestrator.config import MemberWork, parse_config, resolve_members
from orchestrator.records.runs_file import load_runs, write_runs
from orchestrator.runtime import in_trial
from orchestrator.train import teacher as teachers
from orchestrator.train.distill import DistillLoss, TeacherEnsemble, soften
from orchestrator.train.member import build_eval_loader, eval_transform_of, open_member_data, train_member
from tests.test_hikvision import recipe_config, train_teacher

CPU = torch.device("cpu")


def test_the_loss_is_hintons_against_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    teacher_probs = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.15, 0.8]])
    labels = torch.tensor([0, 2])
    t, alpha = 2.0, 0.7

    def by_hand(row):
        z = [x / t for x in logits[row].tolist()]
        log_q = [x - math.log(sum(math.exp(v) for v in z)) for x in z]  # student at T
        soft_t = [p ** (1 / t) for p in teacher_probs[row].tolist()]
        p = [v / sum(soft_t) for v in soft_t]  # the teacher at T: softmax(log p / T)
        kl = sum(pi * (math.log(pi) - qi) for pi, qi in zip(p, log_q))
        ce = -(logits[row, labels[row]].item() - math.log(sum(math.exp(v) for v in logits[row].tolist())))
        return alpha * t * t * kl + (1 - alpha) * ce

    fixed = lambda images: teacher_probs  # noqa: E731  (a teacher that returns fixed probabilities)
    loss = DistillLoss(torch.nn.CrossEntropyLoss(), fixed, t, alpha)(logits, labels, None)
    assert loss.item() == pytest.approx((by_hand(0) + by_hand(1)) / 2, rel=1e-5)  # float32
    # one member's softened probabilities are its logits' softmax at T
    z = torch.randn(4, 5)
    assert torch.allclose(soften(z.softmax(1), 3.0), (z / 3.0).softmax(1), atol=1e-6)


def distill_cfg(tiny_root, runs: str, alpha: float, **recipe):
    return parse_config(recipe_config(tiny_root, **{"epochs": 1, **recipe}, distill={
        "teacher": {"runs": runs}, "temperature": 4.0, "alpha": alpha}))


def test_alpha_zero_is_plain_training_bit_for_bit(tiny_root, tmp_path):
    plain = parse_config(recipe_config(tiny_root, epochs=1))
    # alpha 0: the teacher is never loaded (this runs file does not even exist)
    zero = parse_config(recipe_config(tiny_root, epochs=1, distill={"teacher": {"runs": str(tmp_path / "none.yaml")},
                                                                    "alpha": 0.0}))
    data = open_member_data(plain.data)
    a, _ = train_member(resolve_members(plain)[0], data, device=CPU)
    b, _ = train_member(resolve_members(zero)[0], data, device=CPU)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def two_members(tiny_root, tmp_path_factory):
    """A runs file of two members trained by the platform, plus a student recorded in it
    (with a role: never part of the teacher)."""
    folder = tmp_path_factory.mktemp("teachers")
    (folder / "a").mkdir(), (folder / "b").mkdir()
    teacher_a, _ = train_teacher(tiny_root, folder / "a")
    teacher_b, _ = train_teacher(tiny_root, folder / "b")
    runs = load_runs(teacher_a["runs"])
    second = load_runs(teacher_b["runs"]).members[0].model_copy(update={"name": "teacher-b", "key": "tb"})
    student = second.model_copy(update={"name": "student", "key": "s", "role": "student of t"})
    runs.members += [second, student]
    write_runs(str(folder / "runs.yaml"), runs)
    return str(folder / "runs.yaml")


def test_the_teacher_on_eval_inputs_is_the_evaluations_ensemble(tiny_root, two_members):
    cfg = distill_cfg(tiny_root, two_members, 0.9)
    member, data = resolve_members(cfg)[0], open_member_data(cfg.data)
    ev, eval_tf = eval_transform_of(member)
    ensemble = teachers.load_distill_teacher(member.recipe, data.train.class_names,
                                             (member.input_size, ev.mean, ev.std), CPU)
    assert isinstance(ensemble, TeacherEnsemble) and len(ensemble.members) == 2  # the student left out
    rows = {}
    for idx, images, _ in build_eval_loader(data.val, eval_tf, 8, 0, 0, 1):
        rows.update(zip(idx.tolist(), ensemble(images)))
    got = torch.stack([rows[i] for i in sorted(rows)])
    runs = load_runs(two_members)
    stored = [np.load(m.predictions) for m in runs.ensemble_members()]
    assert torch.allclose(got, em.combine(stored), atol=1e-5)  # the evaluation's mean softmax
    # a student of another size: the batch is resized to each member's input
    small = TeacherEnsemble(list(ensemble.members), ensemble.geometry, (24, ev.mean, ev.std))
    probs = small(torch.randn(3, 3, 24, 24))
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(1), torch.ones(3))


def test_a_student_learns_from_the_ensemble_and_resumes_from_its_checkpoint(tiny_root, two_members, tmp_path,
                                                                             capsys):
    cfg = distill_cfg(tiny_root, two_members, 0.9, epochs=2)
    member = resolve_members(cfg)[0]
    one = member.model_copy(update={"recipe": member.recipe.model_copy(update={"epochs": 1})})
    folder = str(tmp_path / "ckpt")
    first, _ = in_trial.run_here(MemberWork(member=one, data=cfg.data), folder, 0, progress=lambda m: None)
    assert "distilled from 2 members of" in capsys.readouterr().out
    final, uri = in_trial.run_here(MemberWork(member=member, data=cfg.data), folder, 0, progress=lambda m: None)
    assert "resuming after epoch 1" in capsys.readouterr().out and final["epoch"] == 2 and uri.endswith("epoch_0002")
    # its loss is the distillation loss, not the labels' cross-entropy: its plain twin's
    # first epoch (same images, seed and initialisation) reports another
    plain = resolve_members(parse_config(recipe_config(tiny_root, epochs=1)))[0]
    twin, _ = in_trial.run_here(MemberWork(member=plain, data=cfg.data), str(tmp_path / "twin"), 0,
                             progress=lambda m: None)
    assert first["train_loss"] != pytest.approx(twin["train_loss"], rel=1e-3)
