"""train.teacher: knowledge distillation from a trained vitlab run (Hinton et al. 2015)."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, run_cli
from vitlab.objective import distillation_loss


def test_distillation_loss_is_hintons_formula():
    torch.manual_seed(0)
    student, teacher, t = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p = F.softmax(teacher / t, dim=-1)
    expected = t * t * (p * (p.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, t), expected)
    assert distillation_loss(teacher, teacher, t).abs() < 1e-6  # a student that agrees learns nothing new


def test_a_run_distils_from_a_trained_run(trained_run, capsys, tmp_path):
    teacher_dir, _ = trained_run
    code, _, err = run_cli(["train", *QUICK, "train.epochs=1", "--output", str(tmp_path), f"train.teacher={teacher_dir}",
                            "train.distill_weight=0.7", "train.distill_temperature=2", "model.depth=1"], capsys)
    assert code == 0, err
    run_dir = next(tmp_path.rglob("results.json")).parent
    batches = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train_batch"]
    # the logged loss is 0.3 CE + the distillation term (which already holds its weight 0.7)
    for r in batches:
        assert r["loss"] == pytest.approx(0.3 * r["ce"] + r["kd"], rel=1e-5)
    assert all(r["kd"] > 0 for r in batches)
    # a resume must distil as the run began: another teacher, weight or temperature is refused
    code, _, err = run_cli(["train", *QUICK, "train.epochs=2", "--output", str(tmp_path), f"train.teacher={teacher_dir}",
                            "train.distill_weight=0.5", "train.distill_temperature=2", "model.depth=1", "--reload"],
                           capsys)
    assert code == 2 and err.count("\n") == 1 and "train.distill_weight: 0.7 -> 0.5" in err


def test_a_student_with_the_teachers_weights_has_nothing_to_learn(trained_run):
    """build_teacher gives the run's evaluated model, frozen: a student loaded from the same weights agrees
    with it exactly (zero distillation loss)."""
    from vitlab.resolve import load
    from vitlab.train.build import build_data_for, build_model, build_teacher
    teacher_dir, _ = trained_run
    weights = teacher_dir / "checkpoints" / "last" / "model.safetensors"  # the same file for both
    cfg = load(None, [*QUICK, f"train.teacher={weights}", f"model.pretrained={weights}"])
    data = build_data_for(cfg)
    student, teacher = build_model(cfg, data).eval(), build_teacher(cfg, data, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.stack([data.dataset("train")[i][0] for i in range(16)])
    with torch.no_grad():
        assert distillation_loss(student(x), teacher(x), 1.0).abs() < 1e-6


def test_bad_teachers_are_one_line(trained_run, capsys, tmp_path):
    teacher_dir, _ = trained_run
    code, _, err = run_cli(["train", *QUICK, "--output", str(tmp_path), f"train.teacher={teacher_dir}",
                            "data.img_size=16"], capsys)
    assert code == 2 and err.count("\n") == 1 and "the teacher reads other images" in err and "data.img_size" in err
    code, _, err = run_cli(["train", *QUICK, "--output", str(tmp_path), f"train.teacher={teacher_dir}",
                            "data.normalization=half"], capsys)
    assert code == 2 and err.count("\n") == 1 and "mean [" in err and "(data.normalization)" in err
    code, _, err = run_cli(["train", *QUICK, "--output", str(tmp_path), f"train.teacher={tmp_path / 'none'}"], capsys)
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(["train", *QUICK, "--output", str(tmp_path), "train.distill_weight=1.5"], capsys)
    assert code == 2 and "train.distill_weight must be in [0, 1]" in err
