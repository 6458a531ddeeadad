"""The noise study's parts: fixed pixel noise and label noise (`data.pixel_noise`, `data.label_noise`), each
attention layer's map (exactly what it multiplies V by) and the attention share per kind of patch (exact on a
hand-made map)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vitlab import create_model
from vitlab.attention_maps import attention_maps, attention_shares, negative_share, patch_kinds, readout_row
from vitlab.config import DataConfig
from vitlab.data import build_data
from vitlab.data.datasets import CanvasDigits
from vitlab.data.loaders import _tensors
from vitlab.data.noise import NoisyImages, add_pixel_noise, gaussian_noise
from vitlab.errors import VitlabError
from vitlab.layers import Attention, DiffAttention, DiffAttentionV2, LocalitySelfAttention

from conftest import MNIST_DIR, ROOT, run_subprocess



def test_the_noise_is_standard_normal_and_a_function_of_the_sample_alone():
    z = gaussian_noise(torch.arange(2000), (1, 8, 8), seed=3)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 0.1  # Gaussian kurtosis
    # neighbouring samples and pixels are uncorrelated
    flat = z.flatten(1)
    assert abs(torch.corrcoef(torch.stack([flat[:-1].flatten(), flat[1:].flatten()]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([flat[:, :-1].flatten(), flat[:, 1:].flatten()]))[0, 1]) < 0.01
    # sample 1234's noise does not depend on the batch it is drawn in; the seed changes it
    assert torch.equal(gaussian_noise(torch.tensor([7, 1234]), (1, 8, 8), 3)[1], z[1234])
    assert not torch.equal(gaussian_noise(torch.tensor([1234]), (1, 8, 8), 4)[0], z[1234])


def test_no_two_images_get_the_same_noise_permuted():
    """A plain counter in the hash gave samples whose keys differ in their low bits the same values in another
    order (hundreds of MNIST pairs); sorted, every image's noise must be its own."""
    z = gaussian_noise(torch.arange(20000), (1, 28, 28), seed=0).flatten(1)
    assert len(torch.unique(z.sort(dim=1).values, dim=0)) == 20000
    with pytest.raises(ValueError, match="0..2"):
        gaussian_noise(torch.tensor([2 ** 32]), (1, 2, 2), 0)


def test_stored_images_are_noised_once_and_kept():
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    noisy = NoisyImages(images, 0.3, seed=1)
    first = noisy[torch.tensor([3, 1, 3])]
    assert torch.equal(first[0], add_pixel_noise(images[3], torch.tensor([3]), 0.3, 1))
    assert noisy.cached.tolist() == [i in (1, 3) for i in range(10)]
    assert torch.equal(noisy[torch.arange(10)][[3, 1]], first[[0, 1]])
    assert torch.equal(noisy.subset(torch.tensor([1]))[0], first[1])


def test_noisy_images_follow_their_sample_in_subsets_and_epochs():
    canvas = CanvasDigits(torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8), 16, 8, seed=0)
    noisy = NoisyImages(canvas, 0.5, seed=9)
    full = noisy[torch.arange(20)]
    part = noisy.subset(torch.tensor([5, 11]))
    assert part[torch.tensor([1])].shape == (1, 1, 16, 16)
    # a subset of a canvas draws its own layout, so compare the noise: noisy - clean, where nothing clipped
    clean_full, clean_part = canvas[torch.arange(20)], canvas.subset(torch.tensor([5, 11]))[torch.tensor([0, 1])]
    noise_full = full.float() - clean_full.float()
    noise_part = part[torch.tensor([0, 1])].float() - clean_part.float()
    both = (clean_full[[5, 11]] == 0) & (clean_part == 0) & (noise_full[[5, 11]] > 0) & (noise_part > 0)
    assert both.sum() > 50 and torch.equal(noise_full[[5, 11]][both], noise_part[both])
    noisy.set_epoch(1)  # the canvas moves its digits; the noise of each sample stays
    moved = noisy[torch.arange(20)].float() - canvas[torch.arange(20)].float()
    still = (canvas[torch.arange(20)] == 0) & (clean_full == 0) & (moved > 0) & (noise_full > 0)
    assert torch.equal(moved[still], noise_full[still])
    assert noisy[3].shape == (1, 16, 16)


def digits(**kw) -> DataConfig:
    return DataConfig(**{"dataset": "digits", "augment": "none", "num_workers": 0, **kw})


def test_pixel_noise_is_the_same_in_every_batch_size_and_differs_between_splits():
    data = build_data(digits(pixel_noise=0.5))
    one = torch.cat([x for x, _ in data.loader("test", 64)])
    other = torch.cat([x for x, _ in data.loader("test", 7)])
    assert torch.equal(one, other)
    clean = torch.cat([x for x, _ in build_data(digits()).loader("test", 64)])
    assert 0.3 < ((one - clean) * data.info.std[0]).std() < 0.6  # the noise's std in pixel units, clipped
    train_images, _ = _tensors(data.splits["train"])
    assert isinstance(train_images, NoisyImages)  # the batched loader's path, not per sample
    assert train_images.seed != _tensors(data.splits["test"])[0].seed


def test_pixel_noise_on_image_files_goes_through_the_per_sample_path(tmp_path):
    for c in range(2):
        (tmp_path / "train" / str(c)).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (12, 12), color=40 * c).save(tmp_path / "train" / str(c) / f"{i}.png")
    cfg = dict(dataset="imagefolder", data_dir=str(tmp_path), img_size=12, test_fraction=0.34, val_fraction=0.25)
    noisy = build_data(digits(pixel_noise=0.3, **cfg))
    clean = build_data(digits(**cfg))
    x, _ = noisy.dataset("test")[0]
    y, _ = clean.dataset("test")[0]
    assert x.shape == y.shape and (x - y).abs().max() > 0.1
    assert torch.equal(noisy.dataset("test")[0][0], x)  # fixed, not redrawn per call


def test_label_noise_moves_an_exact_fraction_of_training_labels_to_a_wrong_class():
    noisy, clean = build_data(digits(label_noise=0.3)), build_data(digits())
    _, y = _tensors(noisy.splits["train"])
    _, y0 = _tensors(clean.splits["train"])
    assert (y != y0).sum() == round(0.3 * len(y0))
    for split in ("val", "test"):  # the truth stays where it is measured
        assert torch.equal(_tensors(noisy.splits[split])[1], _tensors(clean.splits[split])[1])
    counts = torch.bincount(y[y != y0], minlength=10)
    assert counts.min() > 0  # wrong classes spread over all classes


def test_noise_options_are_bounded_and_label_noise_needs_classes():
    with pytest.raises(VitlabError, match="data.pixel_noise=5"):
        build_data(digits(pixel_noise=5))
    with pytest.raises(VitlabError, match="must be in 0..0.9"):
        build_data(digits(label_noise=0.9))
    with pytest.raises(VitlabError, match="a fraction in 0..1"):
        build_data(digits(label_noise=-0.1))


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="needs ../shared/data/MNIST")
def test_label_noise_is_refused_for_segmentation():
    with pytest.raises(VitlabError, match="labels pixels"):
        build_data(DataConfig(dataset="mnist_canvas_seg", data_dir=str(MNIST_DIR), label_noise=0.2))


def _check_map(attn: torch.nn.Module, x: torch.Tensor, tail) -> None:
    """attention_map(x) @ V, through the rest of the layer (`tail`), equals the layer's forward."""
    with torch.no_grad():
        m = attn.attention_map(x)
        _, _, v = attn.heads(x)
        assert torch.allclose(attn.proj(tail(m, v)), attn(x), atol=1e-12)


@pytest.mark.parametrize("layer", [Attention, LocalitySelfAttention])
def test_a_classic_layers_map_is_what_multiplies_v(layer):
    torch.manual_seed(0)
    attn, x = layer(16, num_heads=4).double().eval(), torch.randn(2, 7, 16, dtype=torch.float64)
    _check_map(attn, x, lambda m, v: (m @ v).transpose(1, 2).reshape(2, 7, 16))
    assert torch.allclose(attn.attention_map(x).sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))
    if layer is LocalitySelfAttention:  # its masked diagonal shows in the map
        assert attn.attention_map(x).diagonal(dim1=-2, dim2=-1).abs().max() == 0


def test_a_differential_layers_map_is_the_difference_of_its_two_maps():
    torch.manual_seed(0)
    attn, x = DiffAttention(16, num_heads=2, depth=3).double().eval(), torch.randn(2, 7, 16, dtype=torch.float64)
    tail = lambda m, v: (attn.sub_norm(m @ v) * (1 - attn.lambda_init)).transpose(1, 2).reshape(2, 7, 16)  # noqa: E731
    _check_map(attn, x, tail)
    rows = attn.attention_map(x).sum(-1)
    assert torch.allclose(rows, (1 - attn.lambda_full()).to(rows).expand_as(rows))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_v2_layers_map_pairs_the_heads_of_one_group(kv_heads):
    torch.manual_seed(0)
    attn = DiffAttentionV2(16, num_heads=4, kv_heads=kv_heads).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    r = 8 // kv_heads  # query heads per KV head: head i's pair reads KV head 2i // r

    def tail(m, v):
        return torch.stack([m[:, i] @ v[:, 2 * i // r] for i in range(4)], 1).transpose(1, 2).reshape(2, 7, 16)
    _check_map(attn, x, tail)
    lam = torch.sigmoid(attn.lambda_proj(x)).transpose(1, 2)  # (B, H, N)
    assert torch.allclose(attn.attention_map(x).sum(-1), 1 - lam)


@pytest.mark.parametrize("attn_layer", ["mhsa", "diff", "diff2"])
def test_attention_maps_hooks_every_block_and_restores_the_mode(attn_layer):
    model = create_model("vit_micro_patch7_28", attn_layer=attn_layer, depth=3, num_heads=2, in_chans=1).train()
    maps = attention_maps(model, torch.randn(2, 1, 28, 28))
    assert len(maps) == 3 and maps[0].shape == (2, 2, 17, 17) and model.training
    assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())


def test_attention_shares_on_a_hand_made_map():
    # one image, two heads, a class token and four patches of kinds [background, digit, digit, clutter]
    kinds = torch.tensor([[0, 1, 1, 2]])
    head1 = torch.zeros(5, 5)
    head1[0] = torch.tensor([0.2, 0.1, 0.3, 0.3, 0.1])  # the class token's row: patches 0.1 0.3 0.3 0.1
    head1[1:] = torch.tensor([0.0, 0.4, 0.2, 0.2, 0.2])  # every patch query alike
    head2 = torch.zeros(5, 5)
    head2[0] = torch.tensor([0.0, 0.0, 0.6, 0.2, 0.2])  # patches 0 .6 .2 .2
    head2[1:] = torch.tensor([0.5, 0.0, 0.5, -0.25, 0.25])  # a differential row: a negative weight
    maps = torch.stack([head1, head2])[None]  # (1, 2, 5, 5)
    cls = attention_shares([readout_row(maps, 1, "cls")], kinds, 3, prefix=1)
    # heads averaged: patches .05 .45 .25 .15, sum .9 -> background .05/.9, digit .7/.9, clutter .15/.9
    assert torch.allclose(cls, torch.tensor([[0.05, 0.7, 0.15]]) / 0.9)
    row = readout_row(maps, 1, "mean")
    mean = attention_shares([row], kinds, 3, prefix=1)
    # patch rows averaged over heads: .2 .35 -.025 .225; positive part .2 .35 0 .225, sum .775
    assert torch.allclose(mean, torch.tensor([[0.2, 0.35, 0.225]]) / 0.775)
    assert torch.allclose(mean.sum(-1), torch.ones(1))
    assert torch.allclose(negative_share([row], 1), torch.tensor([0.025 / 0.8]))
    assert negative_share([readout_row(maps, 1, "cls")], 1) == 0


def test_attention_shares_sum_over_the_images_before_dividing():
    # image 1: patch weights .5 (digit) .5 (background); image 2: .1 (digit) .02 (background)
    rows = torch.tensor([[0.0, 0.5, 0.5], [0.88, 0.1, 0.02]])
    kinds = torch.tensor([[1, 0], [1, 0]])
    shares = attention_shares([rows], kinds, 2, prefix=1)
    # (.5 + .1) / (1 + .12) on the digit, not the mean of .5 and .1 / .12
    assert torch.allclose(shares, torch.tensor([[0.52, 0.6]]) / 1.12)


def test_attention_maps_refuse_merged_tokens():
    model = create_model("vit_micro_patch7_28", depth=2, in_chans=1, merge=2)
    with pytest.raises(VitlabError, match="merges tokens"):
        attention_maps(model, torch.randn(1, 1, 28, 28))


def test_patch_kinds_from_ink():
    digit = torch.zeros(1, 4, 4)
    clutter = torch.zeros(1, 4, 4)
    digit[0, 0, 2] = 1.0  # patch 1 (top right): digit only
    digit[0, 2, 0], clutter[0, 3, 1] = 0.2, 0.9  # patch 2 (bottom left): more clutter
    clutter[0, 3, 3] = 0.5  # patch 3: clutter only
    assert patch_kinds(digit, clutter, 2).tolist() == [[0, 1, 2, 2]]


def test_every_attention_option_reports_its_map():
    """A new `model.attn_layer` must say where its attention goes (the noise study reads every layer)."""
    from vitlab.layers import ATTN_LAYERS
    assert all(callable(getattr(cls, "attention_map", None)) for cls in ATTN_LAYERS.values())


@pytest.mark.skipif(not (MNIST_DIR / "MNIST" / "raw").is_dir(), reason="needs ../shared/data/MNIST")
def test_the_noise_study_is_analysed_from_its_run_directories_alone(tmp_path):
    """The study's analysis end to end on tiny runs: two attentions x clean / pixel noise x two seeds; the
    tables, the paired differences and the attention shares come from the run directories and the data."""
    from vitlab.config import load_config
    from vitlab.train import train
    for attn, name in (("mhsa", "vit_micro_patch7_28"), ("diff2", "vit_micro_patch7_28")):
        for noise in (0.0, 0.8):
            for seed in (0, 1):
                cfg = load_config(None, [
                    "data.dataset=mnist", f"data.data_dir={MNIST_DIR}", "data.max_train_samples=256",
                    "data.val_fraction=0.01", "data.augment=none", "data.num_workers=0", f"data.pixel_noise={noise}",
                    f"model.name={name}", f"model.attn_layer={attn}", "model.depth=1", "model.embed_dim=16",
                    "train.epochs=1", "train.batch_size=64", f"train.seed={seed}", "train.eval_batch_size=2000",
                    "output.progress=none", "output.tensorboard=false", f"output.dir={tmp_path}", "task_name=study",
                    f"output.savefile={attn}_{noise}_{seed}"])
                train(cfg)
    done = run_subprocess([ROOT / "bench" / "seed002_noise.py", tmp_path / "study", "--images", "32"])
    assert done.returncode == 0, done.stderr[-2000:]
    md = (tmp_path / "study" / "noise_study.md").read_text()
    assert "| MNIST pixel noise 0.8 | 2 |" in md  # V2 - classic, 2 pairs (size 16, seeds 0 and 1)
    assert "minus the clean gap" in md and "| MNIST clean | differential V2 | 1 | 2 |" in md  # shares, layer 1
    for figure in ("noise_accuracy", "noise_paired_difference", "attention_shares", "attention_maps"):
        assert (tmp_path / "study" / "plots" / f"{figure}.png").is_file()
    shares = (tmp_path / "study" / "attention_shares.csv").read_text().splitlines()
    assert len(shares) == 1 + 8  # a row per run and layer
