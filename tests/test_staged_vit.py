"""TowerViT vs stage-wise ViT (seed 004) and PiT pooling: one stage is the tower; transitions do what they say."""
import pytest
import torch

import vitlab
from vitlab.errors import VitlabError
from vitlab.models.staged_vit import StagedViT


@pytest.mark.parametrize("transition", ["linear", "pool"])
def test_one_stage_equals_the_tower_on_the_same_weights(transition):
    torch.manual_seed(0)
    tower = vitlab.create_model("tower_vit_patch4_32", depth=3, embed_dim=64, num_heads=4).eval()
    staged = vitlab.create_model("staged_vit_patch4_32", widths=[64], depths=[3], transition=transition).eval()
    assert set(staged.state_dict()) == set(tower.state_dict())
    staged.load_state_dict(tower.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(staged(x), tower(x), rtol=0, atol=0)


def test_linear_transition_widens_every_token():
    m = vitlab.create_model("staged_vit_patch4_32").eval()
    assert [b.attn.num_heads for b in m.blocks] == [4, 4, 8, 8, 16, 16]  # heads grow with width (head size 16)
    x = m.embed(torch.randn(2, 3, 32, 32))  # (2, 65, 64)
    after_stage1 = m.blocks[:2](x)
    out = m.transitions[0](after_stage1)
    torch.testing.assert_close(out, after_stage1 @ m.transitions[0].proj.weight.T + m.transitions[0].proj.bias)
    assert m.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 65, 256)


def test_pool_transition_halves_the_grid_and_maps_cls_by_linear():
    m = vitlab.create_model("pit_vit_patch4_32").eval()
    t = m.transitions[0]
    x = torch.randn(2, 1 + 64, 64)  # cls + 8x8 grid
    out = t(x)
    assert out.shape == (2, 1 + 16, 128)
    torch.testing.assert_close(out[:, 0], t.fc(x[:, 0]))
    grid = x[:, 1:].transpose(1, 2).reshape(2, 64, 8, 8)
    torch.testing.assert_close(out[:, 1:], t.conv(grid).flatten(2).transpose(1, 2))
    # token 0 of the pooled map sees only patches (0..1, 0..1) of the input: a local, stride-2 pool
    x2 = x.clone()
    x2[:, 1 + 8 * 7 + 7] += 1.0  # the bottom-right patch
    assert torch.equal(t(x2)[:, 1], out[:, 1])
    assert m.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 4, 256)  # 8x8 -> 4x4 -> 2x2


def test_staged_config_errors():
    with pytest.raises(VitlabError, match="same number"):
        StagedViT(widths=(64, 128), depths=(2,))
    with pytest.raises(VitlabError, match="multiple of 64"):
        StagedViT(widths=(64, 96), depths=(1, 1), transition="pool")
    with pytest.raises(VitlabError, match="head_dim"):
        StagedViT(widths=(64, 100), depths=(1, 1))
