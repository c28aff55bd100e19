"""Swin (the reference's D2SwinTransformer keys) and the DINOv2 ViT with a simple feature pyramid."""
import pytest
import torch
from detectron2.modeling import build_backbone

from selftrain_d2.config import get_selftrain_cfg
from selftrain_d2.modeling.backbone.swin import relative_position_index, shifted_window_mask


def _swin_cfg(*opts):
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "D2SwinTransformer", *opts])
    return cfg


def _reference_swin_keys(embed_dim, depths, num_heads, window):
    """Key -> shape of the reference D2SwinTransformer (mask2former/modeling/backbone/swin.py), APE off,
    patch norm on, derived from its module tree: PatchEmbed(proj, norm), BasicLayer(blocks[SwinTransformerBlock
    (norm1, attn=WindowAttention(relative_position_bias_table, relative_position_index buffer, qkv, proj), norm2,
    mlp=Mlp(fc1, fc2))], downsample=PatchMerging(reduction without bias, norm over 4C) except in the last stage),
    and one LayerNorm norm{i} per output stage."""
    keys = {
        "patch_embed.proj.weight": (embed_dim, 3, 4, 4),
        "patch_embed.proj.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,),
        "patch_embed.norm.bias": (embed_dim,),
    }
    n = window * window
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        c = embed_dim * 2**i
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            keys.update({
                b + "norm1.weight": (c,), b + "norm1.bias": (c,),
                b + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads),
                b + "attn.relative_position_index": (n, n),
                b + "attn.qkv.weight": (3 * c, c), b + "attn.qkv.bias": (3 * c,),
                b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
                b + "norm2.weight": (c,), b + "norm2.bias": (c,),
                b + "mlp.fc1.weight": (4 * c, c), b + "mlp.fc1.bias": (4 * c,),
                b + "mlp.fc2.weight": (c, 4 * c), b + "mlp.fc2.bias": (c,),
            })
        if i < len(depths) - 1:
            keys.update({
                f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                f"layers.{i}.downsample.norm.weight": (4 * c,),
                f"layers.{i}.downsample.norm.bias": (4 * c,),
            })
        keys.update({f"norm{i}.weight": (c,), f"norm{i}.bias": (c,)})
    return keys


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(0)
    return build_backbone(_swin_cfg())  # the config's defaults are Swin-T


def test_swin_t_state_dict_matches_reference_keys(swin_t):
    expected = _reference_swin_keys(96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    got = {k: tuple(v.shape) for k, v in swin_t.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected
    # The relative position index is a buffer, not a parameter (checkpoints carry it, optimizers don't).
    assert not any(k.endswith("relative_position_index") for k, _ in swin_t.named_parameters())


def test_swin_b_sizes_are_config_values():
    cfg = _swin_cfg("MODEL.SWIN.EMBED_DIM", "128", "MODEL.SWIN.DEPTHS", "[2, 2, 18, 2]",
                    "MODEL.SWIN.NUM_HEADS", "[4, 8, 16, 32]", "MODEL.SWIN.WINDOW_SIZE", "12")
    model = build_backbone(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _reference_swin_keys(128, [2, 2, 18, 2], [4, 8, 16, 32], 12)
    assert {k: s.channels for k, s in model.output_shape().items()} == {"res2": 128, "res3": 256, "res4": 512, "res5": 1024}


def test_swin_output_shapes_and_strides(swin_t):
    swin_t.eval()
    with torch.no_grad():
        out = swin_t(torch.randn(2, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 96, 16, 24), "res3": (2, 192, 8, 12), "res4": (2, 384, 4, 6), "res5": (2, 768, 2, 3)}
    shapes = swin_t.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (96, 4), "res3": (192, 8), "res4": (384, 16), "res5": (768, 32)}
    assert swin_t.size_divisibility == 32


def test_swin_any_input_size(swin_t):
    swin_t.eval()
    with torch.no_grad():
        out = swin_t(torch.randn(1, 3, 50, 77))
    assert {k: tuple(v.shape[2:]) for k, v in out.items()} == {
        "res2": (13, 20), "res3": (7, 10), "res4": (4, 5), "res5": (2, 3)}
    assert all(torch.isfinite(v).all() for v in out.values())


def test_swin_gradients_reach_every_parameter():
    # Two blocks a stage, so every stage has a shifted-window block; narrow, to stay fast.
    model = build_backbone(_swin_cfg("MODEL.SWIN.EMBED_DIM", "32", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
                                     "MODEL.SWIN.NUM_HEADS", "[1, 2, 4, 8]"))
    model.train()
    out = model(torch.randn(2, 3, 64, 96))
    sum(v.square().mean() for v in out.values()).backward()
    # DDP without find_unused_parameters needs a gradient for every parameter.
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert model.layers[0].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_swin_out_features_subset():
    model = build_backbone(_swin_cfg("MODEL.SWIN.OUT_FEATURES", "['res3', 'res5']", "MODEL.SWIN.DEPTHS", "[1, 1, 1, 1]"))
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res3", "res5"] and list(model.output_shape()) == ["res3", "res5"]
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_backbone(_swin_cfg("MODEL.SWIN.OUT_FEATURES", "['res6']"))


def test_relative_position_index_and_shift_mask():
    idx = relative_position_index(7)
    assert idx.shape == (49, 49) and idx.min() == 0 and idx.max() == 13 * 13 - 1
    assert (idx.diagonal() == 6 * 13 + 6).all()  # zero offset sits in the middle of the table
    assert idx[0, 48] == 0 and idx[48, 0] == 13 * 13 - 1  # key 6 rows and 6 columns before / after the query
    mask = shifted_window_mask(14, 14, 7, 3)
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    assert set(mask[3].unique().tolist()) == {0.0, -100.0}
    assert torch.equal(mask, mask.transpose(1, 2))


# --- DINOv2 ViT + simple feature pyramid -------------------------------------------------------------

VIT = "vit_small_patch14_dinov2"


def _vit_cfg(*opts):
    cfg = get_selftrain_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_vit_sfp_backbone", "MODEL.VIT.NAME", VIT,
                         "MODEL.VIT.IMG_SIZE", "112", "MODEL.VIT.OUT_CHANNELS", "32", *opts])
    return cfg


def _timm_vit(name=VIT, img_size=112):
    import timm

    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # away from the initial values, so a missed key shows
    return model


@pytest.fixture(scope="module")
def vit_sfp():
    torch.manual_seed(0)
    return build_backbone(_vit_cfg())


def test_vit_sfp_output_shapes_and_strides(vit_sfp):
    vit_sfp.eval()
    with torch.no_grad():
        out = vit_sfp(torch.randn(2, 3, 128, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 32, 32, 24), "res3": (2, 32, 16, 12), "res4": (2, 32, 8, 6), "res5": (2, 32, 4, 3)}
    assert {k: (s.channels, s.stride) for k, s in vit_sfp.output_shape().items()} == {
        "res2": (32, 4), "res3": (32, 8), "res4": (32, 16), "res5": (32, 32)}
    assert vit_sfp.size_divisibility == 32
    with torch.no_grad():
        odd = vit_sfp(torch.randn(1, 3, 112, 112))  # 8 x 8 patches, resampled to the 7 x 7 stride-16 grid
    assert {k: tuple(v.shape[2:]) for k, v in odd.items()} == {
        "res2": (28, 28), "res3": (14, 14), "res4": (7, 7), "res5": (3, 3)}


def test_vit_sfp_weights_file_timm_names(tmp_path):
    source = _timm_vit()
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone(_vit_cfg("MODEL.VIT.WEIGHTS", str(path)))
    loaded = model.net.vit.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_vit_sfp_weights_file_dinov2_names_under_prefix(tmp_path):
    source = _timm_vit()
    state = {"backbone." + k: v for k, v in source.state_dict().items()}
    state["backbone.mask_token"] = torch.zeros(1, source.embed_dim)  # marks original DINOv2 naming
    path = tmp_path / "dinov2.pth"
    torch.save({"model": state}, path)
    loaded = build_backbone(_vit_cfg("MODEL.VIT.WEIGHTS", str(path))).net.vit.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_vit_sfp_weights_dinov2_registers_teacher(tmp_path):
    name = "vit_small_patch14_reg4_dinov2"
    source = _timm_vit(name)
    sd = source.state_dict()
    pos0 = torch.randn(1, 1, source.embed_dim)
    # Original DINOv2 layout: the class token has a position (pos_embed[:, 0]); registers have none.
    original = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    original.update({"register_tokens": sd["reg_token"], "cls_token": sd["cls_token"] - pos0,
                     "pos_embed": torch.cat([pos0, sd["pos_embed"]], dim=1), "mask_token": torch.zeros(1, source.embed_dim)})
    checkpoint = {"teacher": {"backbone." + k: v for k, v in original.items()}}
    checkpoint["teacher"]["dino_head.last_layer.weight"] = torch.zeros(8, 4)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(checkpoint, path)
    loaded = build_backbone(_vit_cfg("MODEL.VIT.NAME", name, "MODEL.VIT.WEIGHTS", str(path))).net.vit.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=1e-5, msg=k)


def test_vit_sfp_weights_resampled_to_img_size(tmp_path):
    source = _timm_vit(img_size=112)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone(_vit_cfg("MODEL.VIT.IMG_SIZE", "70", "MODEL.VIT.WEIGHTS", str(path)))
    assert model.net.vit.pos_embed.shape == (1, 1 + 5 * 5, source.embed_dim)
    assert torch.equal(model.net.vit.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    with pytest.raises(FileNotFoundError, match="MODEL.VIT.WEIGHTS"):
        build_backbone(_vit_cfg("MODEL.VIT.WEIGHTS", str(tmp_path / "missing.pth")))


def test_vit_sfp_freeze_stops_gradients_to_the_vit():
    model = build_backbone(_vit_cfg("MODEL.VIT.FREEZE", "True"))
    model.train()
    assert not model.net.vit.training  # frozen trunk: no drop-path
    out = model(torch.randn(1, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    assert all(p.grad is None for p in model.net.vit.parameters())
    pyramid = [p for n, p in model.named_parameters() if n.startswith("simfp_")]
    assert pyramid and all(p.grad is not None for p in pyramid)


def test_vit_sfp_trains_end_to_end_without_freeze(vit_sfp):
    vit_sfp.train()
    vit_sfp.zero_grad()
    out = vit_sfp(torch.randn(1, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    assert [n for n, p in vit_sfp.named_parameters() if p.grad is None] == []
    assert vit_sfp.net.vit.patch_embed.proj.weight.grad.abs().sum() > 0
