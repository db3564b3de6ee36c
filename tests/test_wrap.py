"""manpp.wrap on any model: torchvision and timm classifiers, Sequentials, named units, unit lists.

The contract, per model: the wrapped network computes what the model does; one local training
step trains the model's own parameters; the modules are gradient-isolated; the exported weights
load with strict=True into a fresh instance of the model and give the same outputs.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import manpp
from manpp.base.errors import ManppError
from manpp.models.wrap import as_backbone

try:
    import timm
except ImportError:  # an optional dependency: pip install 'manpp[timm]'
    timm = None

needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (pip install 'manpp[timm]')")


def cases(table):
    """The table's names as test parameters; those that build a timm model are skipped without timm."""
    return [pytest.param(name, marks=needs_timm) if "timm" in name else name for name in table]


def conv_block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def pool_head(cin, classes=10):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class ActResNet(nn.Module):
    """A timm-style ResNet written by hand: ``act1`` (not ``relu``), ``global_pool``, no ``forward_head``."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2, down))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        self.act1 = nn.ReLU()  # registered last, run second: the stem is found by running the model

    def forward(self, x):
        x = self.layer2(self.layer1(self.act1(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.global_pool(x), 1))


class Named(nn.Module):
    """A model whose structure manpp cannot guess: wrapped with units= and head=."""

    def __init__(self):
        super().__init__()
        self.stem = conv_block(3, 8)
        self.body = nn.ModuleDict({"a": conv_block(8, 16, 2), "b": conv_block(16, 16)})
        self.classifier = pool_head(16)

    def forward(self, x):
        return self.classifier(self.body["b"](self.body["a"](self.stem(x))))


def timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                           num_classes=10)


def torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 24, [1, 1], [1, 2], [4, 4], num_classes=10)


def unit_list():
    return [conv_block(3, 8), conv_block(8, 16, 2), conv_block(16, 32, 2)]


# name -> (a fresh model, the wrap keyword arguments)
MODELS = {
    # zero_init_last=False: timm zeroes each block's last BN scale, so one step could not move the convs before it
    "timm_resnet18": lambda: (timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False),
                              {}),
    "timm_convnext_atto": lambda: (timm.create_model("convnext_atto", pretrained=False, num_classes=10), {}),
    "timm_efficientnet_b0": lambda: (timm.create_model("efficientnet_b0", pretrained=False, num_classes=10), {}),
    "timm_vit_tiny": lambda: (timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                                img_size=32), {}),
    "timm_swin": lambda: (timm_swin(), {}),
    "torchvision_swin": lambda: (torchvision_swin(), {}),
    "act1_resnet": lambda: (ActResNet(), {}),
    "sequential": lambda: (nn.Sequential(conv_block(3, 8), conv_block(8, 16, 2), conv_block(16, 16), pool_head(16)),
                           {}),
    "named_units": lambda: (Named(), {"units": ["stem", "body.a", "body.b"], "head": "classifier"}),
    "unit_list": lambda: (unit_list(), {"head": pool_head(32)}),
}


def build(name):
    torch.manual_seed(0)
    model, kwargs = MODELS[name]()
    # MAN++ (copies of the wrapped units) with DGL heads; recompute_ema=False skips the two measured
    # steps that settle 'auto' before the first step (tested in test_wrap_cuts_torchvision_models_and_trains_them)
    local = manpp.wrap(model, k=3, objective="dgl", image_size=32, recompute_ema=False, **kwargs)
    # the network as its owner runs it (a list of units has no model of its own)
    reference = nn.Sequential(*model, kwargs["head"]) if isinstance(model, list) else model
    return model, kwargs, local, reference


def fresh(name):
    """A fresh, differently initialised instance of the same architecture, as export_state_dict's target."""
    torch.manual_seed(1)
    model, kwargs = MODELS[name]()
    return as_backbone(model, image_size=32, **kwargs) if isinstance(model, list) else model


def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def step(local, x, y):
    opt = torch.optim.SGD(local.parameters_to_optimize(), lr=0.1)
    opt.zero_grad()
    torch.manual_seed(0)
    result = local.train_step(x, y)
    opt.step()
    return result


@pytest.mark.parametrize("name", cases(MODELS))
def test_wrapped_network_computes_what_the_model_does(name):
    model, _, local, reference = build(name)
    x, _ = images()
    reference.eval()
    local.eval()
    with torch.no_grad():
        assert torch.allclose(local(x), reference(x), atol=1e-5)
    backbone = local.backbone
    assert len(backbone.units) == len(backbone.unit_names) == len(backbone.unit_stages) >= 3
    assert backbone.num_classes == 10 and backbone.in_channels == 3 and backbone.image_size == 32
    assert backbone.aux_family == ("vit" if name == "timm_vit_tiny" else "imagenet")


@pytest.mark.parametrize("name", cases(MODELS))
def test_one_step_trains_the_models_own_parameters(name):
    _, _, local, reference = build(name)
    x, y = images()
    before = [p.detach().clone() for p in reference.parameters()]
    result = step(local, x, y)
    assert len(result.losses) == 3 and all(torch.isfinite(v) for v in result.losses)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, reference.parameters()))
    assert changed > 0.8 * len(before)


@pytest.mark.parametrize("name", cases(MODELS))
def test_wrapped_modules_are_gradient_isolated_for_any_model(name):
    _, _, a, _ = build(name)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.backbone.head.parameters():
            p.mul_(3.0)
    x, y = images()
    for local in (a, b):
        torch.manual_seed(0)
        local.train_step(x, y)
    for i in a.partition.units_of(0):
        for pa, pb in zip(a.backbone.units[i].parameters(), b.backbone.units[i].parameters()):
            assert pa.grad is not None and torch.equal(pa.grad, pb.grad)
    last = a.partition.units_of(a.k - 1)[-1]  # the head's scale does reach the final module
    assert any(not torch.equal(pa.grad, pb.grad) for pa, pb in
               zip(a.backbone.units[last].parameters(), b.backbone.units[last].parameters()))


@pytest.mark.parametrize("name", cases(MODELS))
def test_exported_weights_load_strictly_into_a_fresh_model(name):
    _, _, local, reference = build(name)
    x, y = images()
    step(local, x, y)
    target = fresh(name)
    target.load_state_dict(local.export_state_dict(), strict=True)
    reference.eval()
    target.eval()
    with torch.no_grad():
        assert torch.allclose(target(x), reference(x), atol=1e-5)


# more families, checked without training: the cut computes what the model does, and the export
# (mapped by tensor identity) loads strictly into a fresh, differently initialised instance
FAMILIES = {
    "timm_mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10),
    "timm_regnet": lambda: timm.create_model("regnetx_002", pretrained=False, num_classes=10),
    "timm_deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                                     num_classes=10, img_size=32, depth=2),
    "torchvision_mobilenet_v3": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "torchvision_efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "torchvision_regnet": lambda: torchvision.models.regnet_y_400mf(num_classes=10),
}


@pytest.mark.parametrize("name", cases(FAMILIES))
def test_more_families_cut_exactly_and_export_strictly(name):
    torch.manual_seed(0)
    model = FAMILIES[name]()
    backbone = as_backbone(model, image_size=32)
    torch.manual_seed(1)
    target = FAMILIES[name]()
    target.load_state_dict(backbone.export_state_dict(), strict=True)
    x, _ = images()
    for m in (model, backbone, target):
        m.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(backbone(x), expected, atol=1e-5) and torch.allclose(target(x), expected, atol=1e-5)
    assert len(backbone.units) >= 3 and backbone.aux_family == ("vit" if "deit" in name else "imagenet")


@needs_timm
def test_wrap_keeps_timm_structure_and_swin_units_give_channels_first_maps():
    torch.manual_seed(0)
    resnet = as_backbone(timm.create_model("resnet18", pretrained=False, num_classes=10), image_size=32)
    assert resnet.unit_names[:3] == ["stem", "layer1.0", "layer1.1"] and resnet.unit_stages == [0, 1, 1, 2, 2, 3, 3,
                                                                                               4, 4]
    assert resnet.arch == "resnet18"
    vit = as_backbone(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32))
    assert vit.image_size == 32 and vit.unit_names[0] == "embed" and len(vit.units) == 13  # img_size is read
    swin = as_backbone(timm_swin())
    h = swin.units[0](torch.randn(2, 3, 32, 32))
    assert h.shape == (2, 24, 8, 8)  # (B, C, H, W) between units, although Swin's stages are (B, H, W, C)
    assert swin.units[1](h).shape == (2, 24, 8, 8) and swin.units[2](h).shape == (2, 48, 4, 4)


@needs_timm
def test_default_objective_on_a_wrapped_timm_model():
    torch.manual_seed(0)
    local = manpp.wrap(timm.create_model("resnet18", pretrained=False, num_classes=10), k=2, image_size=32,
                       recompute_ema=False)
    assert local.objective == "infopro"
    x, y = images()
    result = step(local, x, y)
    assert all(torch.isfinite(v) for v in result.losses)


def test_sequential_head_names_a_child_or_appends_a_module():
    torch.manual_seed(0)
    seq = nn.Sequential(conv_block(3, 8), conv_block(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    b = as_backbone(seq, head="2", image_size=32)  # children 2.. (pool, flatten, linear) form the head
    assert b.unit_names == ["0", "1"] and list(b.head) == list(seq)[2:]
    body = nn.Sequential(conv_block(3, 8), conv_block(8, 16, 2))
    fc = pool_head(16)
    b = as_backbone(body, head=fc, image_size=32)  # a head of one's own: every child is a unit
    assert b.unit_names == ["0", "1"] and b.head is fc
    assert set(b.export_state_dict()) == set(body.state_dict())  # the model's keys; fc is the caller's own
    with pytest.raises(ManppError, match=r"unit '3' \(Flatten\) .*pass head='3' so that this child and the ones "
                                         r"after it form the head"):
        as_backbone(seq, image_size=32)  # only the last child is the head, so the Flatten unit gives vectors


def test_wrap_names_what_it_cannot_cut():
    with pytest.raises(ManppError, match=r"cannot wrap Sequential: unit '0' \(Flatten\) outputs a \(B, 150528\) "
                                         r"tensor"):
        manpp.wrap(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), k=2)
    # DenseNet's forward applies a ReLU outside its modules: the check against the model catches it
    with pytest.raises(ManppError, match="cannot cut DenseNet faithfully.*units=.*head="):
        manpp.wrap(torchvision.models.DenseNet(8, (1, 1), 8, num_classes=10), k=2, image_size=32)


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


class Orphan(Named):
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))


ERRORS = {
    "unrecognised": (lambda: TwoBranch(), {}, r"cannot cut TwoBranch into units: it is not a torchvision or timm "
                                              r"classifier .*units=\[dotted names"),
    "bad unit name": (lambda: Named(), {"units": ["stem", "body.c"], "head": "classifier"},
                      r"unit 'body.c' is not a module of Named"),
    "no head": (lambda: Named(), {"units": ["stem", "body.a"]}, r"units= needs head="),
    "unit inside unit": (lambda: Named(), {"units": ["body", "body.a"], "head": "classifier"},
                         r"'body' contains 'body.a'"),
    "tensor in no unit": (lambda: Orphan(), {"units": ["stem", "body.a", "body.b"], "head": "classifier"},
                          r"its tensor 'temperature' is in none of the units or the head"),
    "list without head": (lambda: unit_list(), {}, r"a list of units needs head="),
    "wrong image size (timm)": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32),
                         {"image_size": 64}, r"does not run on a batch of shape \(2, 3, 64, 64\).*image_size="),
    "vit without class token (timm)": (lambda: timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="avg"), {},
        r"without a class token"),
    "head without units": (lambda: ActResNet(), {"head": "fc"}, r"head= without units="),
}


@pytest.mark.parametrize("case", cases(ERRORS))
def test_unwrappable_models_get_one_clear_error(case):
    make, kwargs, message = ERRORS[case]
    with pytest.raises(ManppError, match=message):
        manpp.wrap(make(), k=2, objective="dgl", **{"image_size": 32, **kwargs})


def test_named_units_that_skip_part_of_the_forward_warn():
    class Skips(Named):
        def forward(self, x):
            return self.classifier(torch.relu(self.body["b"](self.body["a"](self.stem(x)))) * 2)

    with pytest.warns(UserWarning, match="computes something else than the model itself"):
        as_backbone(Skips(), units=["stem", "body.a", "body.b"], head="classifier", image_size=32)


# --- torchvision (moved from test_wrap_plan.py) -----------------------------------------------

def _vit():
    return torchvision.models.vision_transformer.VisionTransformer(32, 16, 4, 2, 32, 64, num_classes=10)


TORCHVISION = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "vit": _vit,
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg11" else n for n in TORCHVISION])
def test_wrap_cuts_torchvision_models_and_trains_them(name):
    torch.manual_seed(0)
    model = TORCHVISION[name]()
    local = manpp.wrap(model, k=3, method="manpp", objective="dgl", image_size=32)
    assert local.k == 3 and len(local.backbone.units) >= 3
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    model.eval()
    local.eval()
    with torch.no_grad():
        assert torch.allclose(local(x), model(x), atol=1e-5)  # the same network, cut into units
    local.train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(local.parameters_to_optimize(), lr=0.1)
    result = local.train_step(x, y)
    opt.step()
    assert len(result.losses) == 3 and all(torch.isfinite(v) for v in result.losses)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed > len(before) // 2  # the user's model itself was trained


def test_wrapped_modules_are_gradient_isolated():
    torch.manual_seed(0)
    a = manpp.wrap(torchvision.models.resnet18(num_classes=10), k=3, image_size=32)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.backbone.head.parameters():
            p.mul_(3.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    a.train_step(x, y)
    b.train_step(x, y)
    for i in a.partition.units_of(0):
        for pa, pb in zip(a.backbone.units[i].parameters(), b.backbone.units[i].parameters()):
            assert torch.equal(pa.grad, pb.grad)


# --- wrap as users really use it (issue 20, section 5) -----------------------------------------

@pytest.mark.parametrize("method", ["man", "manpp"])
def test_a_module_starting_with_a_unit_without_parameters(method):
    """Module 1 starts with a MaxPool: its EMA copy has no parameters to follow (it once crashed)."""
    torch.manual_seed(0)
    net = nn.Sequential(conv_block(3, 8), nn.MaxPool2d(2), conv_block(8, 8), pool_head(8))
    local = manpp.wrap(net, k=3, method=method, objective="dgl", image_size=32, split="0,1", recompute_ema=False)
    assert isinstance(local.aux[0].source, nn.MaxPool2d) and not list(local.aux[0].source.parameters())
    x, y = images()
    result = step(local, x, y)
    assert all(torch.isfinite(v) for v in result.losses) and local.aux[0].ema_distance() == 0.0


def test_the_default_objective_trains_at_any_input_size():
    """wrap's probe batch is 224 px by default; InfoPro's decoders follow the images they are given."""
    torch.manual_seed(0)
    local = manpp.wrap(torchvision.models.resnet18(num_classes=10), k=4, recompute_ema=False)
    assert local.objective == "infopro" and local.backbone.image_size == 224
    for side in (48, 64):
        result = local.train_step(torch.randn(2, 3, side, side), torch.tensor([0, 1]))
        assert all(torch.isfinite(v) for v in result.losses)


def test_ddp_around_a_local_model_is_refused_with_the_supported_way(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        local = manpp.wrap(nn.Sequential(conv_block(3, 8), conv_block(8, 8), pool_head(8)), k=2, objective="dgl",
                           image_size=32)
        wrapped = DistributedDataParallel(local)
        x, y = images()
        with pytest.raises(ManppError, match=r"wrapped in DistributedDataParallel.*all_reduce_gradients"):
            wrapped.module.train_step(x, y)
        plain = manpp.wrap(nn.Sequential(conv_block(3, 8), conv_block(8, 8), pool_head(8)), k=2, objective="dgl",
                           image_size=32)
        plain.train_step(x, y)  # the supported way: the model itself, gradients averaged by hand
        manpp.base.distributed.all_reduce_gradients(plain.parameters_to_optimize())
    finally:
        dist.destroy_process_group()


class SameShapes(nn.Module):
    """Two blocks of the same shape: listed in the wrong order they would run without an error."""

    def __init__(self):
        super().__init__()
        self.stem = conv_block(3, 8)
        self.a, self.b = conv_block(8, 8), conv_block(8, 8)
        self.fc = pool_head(8)

    def forward(self, x):
        return self.fc(self.b(self.a(self.stem(x))))


@pytest.mark.parametrize("head", ["fc", "outside"])
def test_units_listed_out_of_order_are_refused(head):
    model = SameShapes()
    given = pool_head(8) if head == "outside" else head
    units = ["stem", "b", "a"]
    if head == "outside":  # the model's own head is then not trained: a body-only model
        model.fc = nn.Identity()
    with pytest.raises(ManppError, match=r"units= lists 'b' before 'a', but SameShapes's forward runs 'a' first"):
        manpp.wrap(model, k=2, units=units, head=given, image_size=32)
    assert manpp.wrap(model, k=2, units=["stem", "a", "b"], head=given, image_size=32).k == 2


@needs_timm
def test_a_timm_features_only_model_gets_the_right_diagnosis():
    model = timm.create_model("resnet18", pretrained=False, features_only=True)
    with pytest.raises(ManppError, match=r"features_only model .*without features_only=True"):
        manpp.wrap(model, k=2, image_size=32)


def test_squeezenet_is_cut_with_its_convolutional_classifier():
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=10)
    backbone = as_backbone(model, image_size=64)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), backbone.eval()
    with torch.no_grad():
        assert torch.allclose(backbone(x), model(x), atol=1e-5)


@needs_timm
def test_timm_regnet_is_cut_per_block():
    backbone = as_backbone(timm.create_model("regnetx_002", pretrained=False, num_classes=10), image_size=32)
    assert "s4.b7" in backbone.unit_names and len(backbone.units) == 1 + 1 + 1 + 4 + 7  # stem, then 1, 1, 4, 7 blocks


def test_a_unit_that_writes_into_its_input_gets_copies_of_it():
    """A unit starting with ReLU(inplace=True) would overwrite the module's output, which the module's own
    backward still needs: its learnable and EMA copies read copies of it (timm's VGG and DLA once crashed)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), body, conv_block(8, 8), pool_head(8))
    for recompute in (False, True):
        local = manpp.wrap(copy.deepcopy(net), k=3, objective="dgl", image_size=32, recompute_ema=recompute)
        x, y = images()
        result = step(local, x, y)
        assert all(torch.isfinite(v) for v in result.losses)
        assert [a.inplace_input for a in local.aux] == [True, False]
