"""Segmentation: metrics against hand-computed values, the canvas masks, the folder layout, a training run."""
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from test_distributed import write_segfolder
from vitlab.config import DataConfig
from vitlab.data import build_data
from vitlab.train.segmentation import confusion, iou_dice


def test_miou_and_dice_equal_hand_computed_values():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, -100]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    m = confusion(pred, target, 3)  # rows true, columns predicted; the -100 pixel counts nowhere
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    got = iou_dice(m)
    # class 0: tp 1, fp 1, fn 1; class 1: tp 2, fp 1, fn 0; class 2: tp 2, fp 0, fn 1
    assert got["miou"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert got["dice"] == pytest.approx((2 / 4 + 4 / 5 + 4 / 5) / 3)
    assert got["pixel_acc"] == pytest.approx(5 / 7)


def test_mean_pooled_segmentation_normalises_every_token_before_the_head():
    import vitlab
    torch.manual_seed(0)
    model = vitlab.create_model("vit_micro_patch4_32", global_pool="avg", task="segment", in_chans=1,
                                num_classes=3).eval()
    with torch.no_grad():
        model.fc_norm.weight.zero_()  # the final norm's output is its bias, 0, so the head outputs its own bias
        model.head.bias.copy_(torch.randn(3 * 4 * 4))
        out = model(torch.randn(2, 1, 32, 32))
    tile = model.head.bias.reshape(3, 4, 4).repeat(1, 8, 8)  # each 4 x 4 patch painted with the same bias
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, tile.expand_as(out))


def test_segfolder_pairs_images_with_masks(tmp_path):
    write_segfolder(tmp_path)
    d = build_data(DataConfig(dataset="segfolder", data_dir=str(tmp_path), img_size=16, augment="none"), img_size=16)
    assert d.info.task == "segment" and d.info.num_classes == 3
    x, y = next(iter(d.loader("test", 8)))
    assert x.shape == (3, 3, 16, 16) and y.shape == (3, 16, 16) and set(y.unique().tolist()) <= {0, 1, 2}
    bright = x.mean(1) > x.mean()  # the square is the bright part of each image
    assert ((y > 0) == bright).float().mean() > 0.95


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "MNIST").is_dir(), reason="needs MNIST in ../shared/data")
def test_canvas_masks_label_the_digit_pixels_with_their_class():
    d = build_data(DataConfig(dataset="mnist_canvas_seg", data_dir=str(ROOT.parent / "shared" / "data"),
                              canvas_size=48, canvas_digit_size=28, augment="none"))
    train = d.loader("train", 16)
    train.set_epoch(3)  # images and masks redraw their layout together
    x, y = next(iter(train))
    lit = x[:, 0] > (0.5 - d.info.mean[0]) / d.info.std[0]  # normalised pixels brighter than half
    assert torch.equal(lit, y > 0)
    assert all(len(m[m > 0].unique()) == 1 for m in y) and y.max() <= 10  # one digit, one class per image


def test_segmentation_run_reports_miou_and_dice(tmp_path, capsys):
    from vitlab import load_config
    from vitlab.train import train
    write_segfolder(tmp_path / "seg", n=20)
    cfg = load_config(None, ["data.dataset=segfolder", f"data.data_dir={tmp_path / 'seg'}", "data.img_size=16",
                             "data.augment=none", "model.name=gdt_vit_tiny_64", "model.stages=[[8,4,0.5]]",
                             "model.embed_dim=16", "model.depth=1", "model.num_heads=2", "train.epochs=2",
                             "train.batch_size=4", "data.num_workers=0", f"output.dir={tmp_path}",
                             "output.progress=none", "output.tensorboard=false"])
    results = train(cfg)
    assert 0.0 <= results["test_miou"] <= 1.0 and 0.0 <= results["test_dice"] <= 1.0
    run = Path(results["run_dir"])
    assert json.loads((run / "results.json").read_text())["test_miou"] == results["test_miou"]
    code, out, _ = run_cli(["evaluate", "--checkpoint", str(run)], capsys)  # prints them too
    assert code == 0 and json.loads(out)["miou"] == pytest.approx(results["test_miou"])
    code, out, _ = run_cli(["plot", "--checkpoint", str(run), "--out", str(tmp_path / "plots")], capsys)
    assert code == 0 and "segmentation_" in out  # image + leaf boxes, true mask, predicted mask
    assert list((tmp_path / "plots").glob("segmentation_*.png"))
