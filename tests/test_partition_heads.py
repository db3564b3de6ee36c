import copy

import pytest
import torch

import manpp
from manpp.base.errors import ManppError
from manpp.memory.measure import measure_step
from manpp.objectives.infopro import supcon_loss
from manpp.core.partition import make_partition


def net(depth):
    return manpp.build_backbone(f"resnet{depth}")


@pytest.mark.parametrize("depth,k,modules", [(32, 8, 9), (32, 16, 16), (110, 32, 33), (110, 55, 55)])
def test_paper_presets_report_their_true_module_count(depth, k, modules):
    part = make_partition(net(depth), k, "paper")
    assert part.k == modules and part.nominal_k == k
    assert part.bounds[0] == (0, 1)  # the stem is its own module, as in the release
    assert f"{modules} modules" in part.label
    assert part.bounds[-1][1] == len(net(depth).units)


def test_resnet32_k8_module_sets_match_the_release():
    b = net(32)
    names = make_partition(b, 8, "paper").describe(b.unit_names)
    assert names == ["stem", "layer1.0", "layer1.1..layer1.2", "layer1.3..layer1.4", "layer2.0..layer2.1",
                     "layer2.2..layer2.3", "layer2.4..layer3.0", "layer3.1..layer3.2", "layer3.3..layer3.4"]


def test_resnet110_k32_stage3_pattern():
    b = net(110)
    part = make_partition(b, 32, "paper")
    stage3 = [len(part.units_of(j)) for j in range(part.k) if b.unit_stages[part.bounds[j][0]] == 3]
    assert stage3 == [2, 2, 1, 2, 1, 2, 2, 2, 2, 2]


def test_even_and_explicit_splits():
    b = net(32)  # 16 units
    assert [len(r) for r in map(make_partition(b, 5).units_of, range(5))] == [3, 3, 3, 3, 4]
    part = make_partition(b, None, [0, "layer1.4", 10])
    assert part.bounds == ((0, 1), (1, 6), (6, 11), (11, 16))
    assert make_partition(b, None, "0,5").k == 3


@pytest.mark.parametrize("k,split,needle", [
    (17, "even", "from 1 to 16"), (0, "even", "from 1 to 16"), (4, "paper", "K=8 (9 modules)"),
    (None, [5, 3], "strictly increasing"), (None, [15], "out of range"), (None, ["layer9.0"], "unknown unit"),
    (3, "balanced", "'even'"),
])
def test_bad_partitions_name_what_is_possible(k, split, needle):
    with pytest.raises(ManppError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        make_partition(net(32), k, split)


def test_release_lambda_weights_for_resnet32_k8():
    model = manpp.local_model(net(32), method="manpp", k=8, split="paper", ixy_2=0.0,
                              lambda_schedule="auto")  # the README's end weights, the release's schedule
    weights = [(round(a.head.lambda1, 2), round(a.head.lambda2, 3)) for a in model.aux]
    # stem 5/0.5; copies in stage 1: 4.17/0.417, stage 2: 3.33/0.333, stage 3: 2.5/0.25 (docs/release.md: auxiliary heads)
    assert weights == [(5.0, 0.5), (4.17, 0.417), (4.17, 0.417), (3.33, 0.333), (3.33, 0.333), (3.33, 0.333),
                       (2.5, 0.25), (2.5, 0.25)]


def test_infopro_module_schedule_goes_to_the_end_weights():
    with pytest.warns(UserWarning, match="module 3 gets no local loss"):
        model = manpp.local_model(net(20), method="infopro", k=5, ixx_2=0.0, ixy_2=0.0, allow_zero_loss=True)
    assert [round(a.lambda1, 3) for a in model.aux] == [5.0, 3.333, 1.667, 0.0]
    assert [round(a.lambda2, 3) for a in model.aux] == [0.5, 0.333, 0.167, 0.0]


def test_heads_read_the_right_features():
    model = manpp.local_model(net(32), method="manpp", k=16, objective="dgl")
    # module 0 is the stem (16 ch); its copy is layer1.0 -> 16 channels; module 5 copies layer2.0 -> 32 ch
    assert model.aux[0].head.convs[0].in_channels == 16
    assert model.aux[5].head.convs[0].in_channels == 32
    assert model.aux[5].source is model.backbone.units[6]


def test_supcon_prefers_clustered_features():
    y = torch.tensor([0, 0, 1, 1])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]]), dim=1)
    bad = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]]), dim=1)
    assert supcon_loss(good, y) < supcon_loss(bad, y)
    lonely = supcon_loss(good, torch.tensor([0, 1, 2, 3]))  # no positives: contributes 0
    assert float(lonely) == 0.0


def test_manpp_k16_activation_peak_is_below_half_of_e2e():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    e2e = measure_step(manpp.local_model(net(32), method="e2e"), x, y)
    local = measure_step(manpp.local_model(net(32), method="manpp", k=16), x, y)
    assert local.peak_activation_bytes < 0.5 * e2e.peak_activation_bytes
    assert local.peak_activation_bytes == max(local.module_peak_bytes)
    # one module's bytes are about what ResNet-32 keeps per unit; E2E keeps them all
    assert e2e.peak_activation_bytes > 5 * min(local.module_peak_bytes)


def test_measure_step_leaves_the_model_unchanged(batch):
    x, y = batch
    model = manpp.local_model(net(14), method="manpp", k=3, objective="dgl")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = measure_step(model, x, y)
    assert report.peak_activation_bytes > 0 and report.peak_allocated_bytes is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_decoder_upsampling_matches_the_plain_interpolation():
    from manpp.objectives.infopro import Decoder

    torch.manual_seed(0)
    dec = Decoder(32, image_size=32, image_channels=3)
    x = torch.randn(4, 32, 16, 16, requires_grad=True)
    target = torch.rand(4, 3, 32, 32)
    loss = dec(x, target)
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    up = torch.nn.functional.interpolate(x2, size=(32, 32), mode="bilinear", align_corners=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(dec.net(up), target)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("channels,size", [(64, 8), (32, 16), (16, 32), (24, 5)])
def test_factored_decoder_matches_resize_then_conv(channels, size):
    """The decoder's conv at the feature's resolution gives the losses and all gradients of resize-then-conv."""
    from manpp.objectives.infopro import Decoder

    torch.manual_seed(0)
    fast = Decoder(channels, image_size=32, image_channels=3)
    plain = copy.deepcopy(fast)
    plain.factored = False
    x = torch.randn(4, channels, size, size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    target = torch.rand(4, 3, 32, 32)
    loss, ref = fast(x, target), plain(x2, target)
    loss.backward()
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-8)
    for p, q in zip(fast.parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_resized_conv_any_kernel_and_the_imagenet_decoder():
    from manpp.objectives.infopro import ImageNetDecoder, resized_conv

    torch.manual_seed(0)
    for k in (1, 3, 5):
        conv = torch.nn.Conv2d(7, 5, k, 1, k // 2)
        x = torch.randn(2, 7, 6, 9)
        up = torch.nn.functional.interpolate(x, size=(20, 13), mode="bilinear", align_corners=True)
        assert torch.allclose(resized_conv(x, conv, (20, 13)), conv(up), atol=1e-5)
    with pytest.raises(AssertionError):  # the comparison can fail: a shifted tap is not the same conv
        conv = torch.nn.Conv2d(7, 5, 3, 1, 1)
        shifted = torch.nn.functional.pad(up, (1, 0, 0, 0))[..., :-1]
        assert torch.allclose(resized_conv(x, conv, (20, 13)), conv(shifted), atol=1e-5)
    # the ImageNet decoder (x2 steps, 1x1 and 3x3 convs): factored where it is cheaper, plain elsewhere
    dec = ImageNetDecoder(512, 7, 112)
    plain = copy.deepcopy(dec)
    plain.factored = False
    x = torch.randn(2, 512, 7, 7)
    target = torch.rand(2, 3, 112, 112)
    assert torch.allclose(dec(x, target), plain(x, target), rtol=1e-5)


def test_the_factored_path_on_channels_last_maps_only_where_it_saves_half(monkeypatch):
    """Channels-last maps take the factored path only where it does under half the plain multiply-adds
    (8x8 to 32x32: about a seventh); a 16x16 map (about two thirds) takes the plain NHWC path, NCHW the factored."""
    from manpp.objectives import infopro

    calls = []
    original = infopro._shifted_resize_matrices
    monkeypatch.setattr(infopro, "_shifted_resize_matrices", lambda *a: calls.append(a) or original(*a))
    for channels, size, nhwc, factored in ((64, 8, True, True), (32, 16, True, False), (32, 16, False, True)):
        calls.clear()
        conv = torch.nn.Conv2d(channels, 12, 3, 1, 1)
        x = torch.randn(2, channels, size, size)
        x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
        up = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=True)
        assert torch.allclose(infopro.resized_conv(x, conv, (32, 32)), conv(up), atol=1e-5)
        assert bool(calls) == factored, (channels, size, nhwc)
