"""The contract of ``manpp.wrap`` over whole libraries: every timm model family (its smallest model)
and every torchvision classifier family (a small member of each), at 64 px rather than 224, either
trains one MAN++ step with finite losses or is refused with one ``ManppError`` line saying why. The
families refused are listed: a family that starts to fail, or to cut, shows up here.

The full sweep is the slow tier (make test-all); the fast tier runs a few families of each library.
"""

import re

import pytest
import torch
import torchvision

import manpp
from manpp.base.errors import ManppError

timm = pytest.importorskip("timm")

SIZE = 64
FAST_TIMM = ("resnet", "convnext", "efficientnet", "regnet", "byobnet", "mobilenetv3")
FAST_TORCHVISION = ("mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf")

TIMM_FAMILIES = {  # family (timm module) -> its smallest model
    "beit": "beit_base_patch16_224",
    "byoanet": "halonet_h1",
    "byobnet": "test_byobnet",
    "cait": "cait_xxs24_224",
    "coat": "coat_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_768_32",
    "convnext": "test_convnext",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240",
    "csatv2": "csatv2",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "test_efficientnet",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": "vit_tiny_patch16_dinov3_qkvb",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m_enc",
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_b",
    "hgnet": "hgnetv2_b0",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": "test_mambaout",
    "maxxvit": "test_coatnet",
    "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmlp_ti16_224",
    "mobilenetv3": "lcnet_035",
    "mobilenetv5": "mobilenetv5_base",
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_parfac_gap",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "test_nfnet",
    "pit": "pit_ti_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_88m",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
    "res2net": "res2next50",
    "resnest": "resnest14d",
    "resnet": "test_resnet",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_legacy_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_svt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "test_vit",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "test_vit_relpos",
    "vision_transformer_sam": "samvit_base_patch16_224",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception",
    "xception_aligned": "xception41p",
    "xcit": "xcit_nano_12_p8_224",
}
# the families manpp cannot cut by itself, and why (one line each; pass units= and head= for them)
TIMM_REFUSED = {
    "beit": "does not run its stages",
    "byoanet": "does not run on a batch",
    "cait": "faithfully",
    "coat": "does not run its stages",
    "convit": "does not run its stages",
    "crossvit": "does not run on a batch",
    "csatv2": "does not run on a batch",
    "deepseek_vit": "does not run on a batch",
    "efficientformer": "does not run on a batch",
    "efficientvim": "does not run its stages",
    "eva": "does not run its stages",
    "fastvit": "does not run its stages",
    "gemma4_vit": "does not run on a batch",
    "hiera": "does not run its stages",
    "hieradet_sam2": "does not run its stages",
    "hrnet": "fails on its input",
    "inception_resnet_v2": "does not run on a batch",
    "inception_v3": "does not run on a batch",
    "inception_v4": "does not run on a batch",
    "levit": "fails on its input",
    "mobilenetv5": "does not run its stages",
    "mvitv2": "does not run its stages",
    "naflexvit": "does not run its stages",
    "nasnet": "does not run on a batch",
    "nest": "the head fails",
    "pit": "does not run on a batch",
    "pnasnet": "does not run on a batch",
    "qwen3_vit": "fails on its input",
    "tnt": "does not run its stages",
    "tresnet": "does not run on a batch",
    "twins": "does not run its stages",
    "visformer": "between its stages",
    "vision_transformer_relpos": "does not run its stages",
    "vision_transformer_sam": "the head fails",
    "vitamin": "without a class token",
    "volo": "does not run its stages",
    "xcit": "does not run its stages",
}

TORCHVISION = {  # a small member of every torchvision classifier family -> (keyword arguments, image size)
    "alexnet": ({}, SIZE), "convnext_tiny": ({}, SIZE), "densenet121": ({}, SIZE), "efficientnet_b0": ({}, SIZE),
    "efficientnet_v2_s": ({}, SIZE), "googlenet": ({"aux_logits": False, "init_weights": True}, SIZE),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 96), "maxvit_t": ({}, 224),
    "mnasnet0_5": ({}, SIZE), "mobilenet_v2": ({}, SIZE), "mobilenet_v3_small": ({}, SIZE),
    "regnet_x_400mf": ({}, SIZE), "regnet_y_400mf": ({}, SIZE), "resnet18": ({}, SIZE),
    "resnext50_32x4d": ({}, SIZE), "shufflenet_v2_x0_5": ({}, SIZE), "squeezenet1_1": ({}, SIZE),
    "swin_t": ({}, SIZE), "swin_v2_t": ({}, SIZE), "vgg11": ({}, SIZE), "vit_b_32": ({"image_size": SIZE}, SIZE),
    "wide_resnet50_2": ({}, SIZE),
}
TORCHVISION_REFUSED = {"densenet121": "faithfully"}  # its forward applies a ReLU outside any module


def one_manpp_step(model: torch.nn.Module, size: int) -> None:
    torch.manual_seed(0)
    local = manpp.wrap(model, k=3, method="manpp", image_size=size, recompute_ema=False)
    result = local.train_step(torch.randn(2, 3, size, size), torch.tensor([0, 1]))
    assert all(torch.isfinite(v) for v in result.losses), result.losses


def expect(refused: str | None, run) -> None:
    if refused is None:
        run()
        return
    with pytest.raises(ManppError, match=refused) as caught:
        run()
    assert "\n" not in str(caught.value)  # one line


def timm_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    try:  # the models with a fixed input size take it; the others do not know the keyword
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=SIZE)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=10)


def tiers(names, fast):
    return [name if name in fast else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", tiers(sorted(TIMM_FAMILIES), FAST_TIMM))
def test_every_timm_family_trains_one_manpp_step_or_says_why(family):
    expect(TIMM_REFUSED.get(family), lambda: one_manpp_step(timm_model(TIMM_FAMILIES[family]), SIZE))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", tiers(sorted(TORCHVISION), FAST_TORCHVISION))
def test_every_torchvision_classifier_family_trains_one_manpp_step_or_says_why(name):
    kwargs, size = TORCHVISION[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10, **kwargs)
    expect(TORCHVISION_REFUSED.get(name), lambda: one_manpp_step(model, size))


def test_the_tables_cover_the_libraries():
    assert set(TIMM_REFUSED) <= set(TIMM_FAMILIES)
    modules = {m for m in timm.list_modules() if timm.list_models(module=m)}
    assert modules <= set(TIMM_FAMILIES), sorted(modules - set(TIMM_FAMILIES))  # a new timm family: add it
    family = lambda name: re.match(r"[a-z]+", name).group()  # noqa: E731 - vgg11_bn -> vgg, regnet_x_400mf -> regnet
    families = {family(name) for name in torchvision.models.list_models(module=torchvision.models)}
    covered = {family(name) for name in TORCHVISION}
    assert families <= covered, sorted(families - covered)
