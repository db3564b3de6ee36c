"""PredSim (Nøkland & Eidnes 2019): its two losses, its registration, and that it trains on real data."""

import torch
from torch.nn import functional as F

import manpp
from manpp.commands.cli import main
from manpp.core.engine import LocalContext
from manpp.objectives.predsim import PredSimHead, similarity_matrix


def test_similarity_matrix_of_one_hot_labels():
    y = torch.tensor([0, 1, 0, 2])
    s = similarity_matrix(F.one_hot(y, 4))
    # centred one-hot rows: the same class has similarity 1, two classes -1 / (C - 1)
    assert torch.allclose(s.diagonal(), torch.ones(4))
    assert torch.isclose(s[0, 2], torch.tensor(1.0)) and torch.isclose(s[0, 1], torch.tensor(-1 / 3))
    assert torch.allclose(s, s.T)


def test_the_loss_mixes_similarity_matching_and_prediction():
    torch.manual_seed(0)
    h, y = torch.randn(6, 8, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = LocalContext(h, y)
    sim_only, pred_only = PredSimHead(8, 4, 3, beta=1.0), PredSimHead(8, 4, 3, beta=0.0)
    pred_only.sim_conv.load_state_dict(sim_only.sim_conv.state_dict())
    expected_sim = F.mse_loss(similarity_matrix(sim_only.sim_conv(h)), similarity_matrix(F.one_hot(y, 3)))
    assert torch.allclose(sim_only(h, ctx), expected_sim)
    side = pred_only.pool_side
    assert 8 * side * side <= 2048 and side == 4  # small maps are not pooled
    expected_pred = F.cross_entropy(pred_only.pred(h.flatten(1)), y)
    assert torch.allclose(pred_only(h, ctx), expected_pred)
    mixed = PredSimHead(8, 4, 3, beta=0.99)
    mixed.load_state_dict(pred_only.state_dict())
    assert torch.allclose(mixed(h, ctx), 0.99 * expected_sim + 0.01 * expected_pred, atol=1e-6)
    big = PredSimHead(256, 16, 3, pred_features=2048)  # 256 channels: pooled to 2x2 = 1024 values
    assert big.pool_side == 2 and big.pred.in_features == 1024


def test_predsim_is_a_method_and_an_objective_of_man_pp():
    net = manpp.build_backbone("resnet8")
    plain = manpp.local_model(net, method="predsim", k=3)
    assert plain.objective == "predsim" and all(isinstance(a, PredSimHead) for a in plain.aux)
    wrapped = manpp.local_model(manpp.build_backbone("resnet8"), method="manpp", k=3, objective="predsim", beta=0.5)
    assert all(isinstance(a.head, PredSimHead) and a.head.beta == 0.5 for a in wrapped.aux)


def test_predsim_trains_on_digits(capsys):
    from manpp.data import build_datasets

    torch.manual_seed(0)
    train, _, info = build_datasets("digits", augment=False)
    net = manpp.build_backbone("resnet8", num_classes=10, in_channels=1)
    model = manpp.local_model(net, method="predsim", k=2)
    opt = torch.optim.SGD(model.parameters_to_optimize(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            losses.append(torch.stack(model.train_step(x, y).losses))
            opt.step()
    losses = torch.stack(losses)
    first, last = losses[:5].mean(0), losses[-5:].mean(0)
    assert (last < 0.8 * first).all(), (first, last)  # every module's loss fell, the PredSim one included
    assert main(["describe", "--model", "resnet8", "--method", "predsim", "--k", "2", "--dataset", "digits",
                 "--batch-size", "8"]) == 0
    assert "resnet8 / predsim: 2 modules" in capsys.readouterr().out
