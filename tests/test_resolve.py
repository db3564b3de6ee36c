"""One resolution of a config (manpp.config.resolve): made once, from the model's name, recorded in config.yaml."""

import dataclasses

import pytest

from manpp.config import trainconfig as C
from manpp.base.errors import ManppError
from manpp.models import BACKBONES, build_backbone
from manpp.config.resolve import backbone_facts, resolve
from manpp.train.loop import train


def test_resolving_needs_no_built_model(monkeypatch):
    import manpp.models

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was built to resolve a built-in model's config")

    monkeypatch.setattr(manpp.models, "build_backbone", refuse)
    cfg = resolve(C.apply(C.TrainConfig(), {"model": "resnet101", "dataset": "imagenet", "fidelity": "release",
                                            "method": "manpp", "k": 4}))
    assert (cfg.k, cfg.split, cfg.objective, cfg.copy_init) == (4, "paper", "infopro", "random")
    assert cfg.objective_settings["ixx_1"] == 5.0 and "aux_config" in cfg.objective_settings  # all its settings
    vit = resolve(C.apply(C.TrainConfig(), {"model": "vit_tiny", "dataset": "imagenet"}))
    assert (vit.k, vit.split, vit.objective) == (4, "even", "dgl")  # the ViT family's default objective
    cifar = resolve(C.apply(C.TrainConfig(), {"model": "resnet8"}))
    assert cifar.k == 4  # the CIFAR default of 16, capped at ResNet-8's 4 units


def test_resolving_twice_changes_nothing():
    for values in ({}, {"fidelity": "release", "k": 8}, {"method": "dgl"}, {"method": "e2e"},
                   {"model": "vit_tiny", "dataset": "synthetic", "image_size": 32}, {"split": "0,3,7"}):
        once = resolve(C.apply(C.TrainConfig(), values))
        assert resolve(once) == once, values


@pytest.mark.parametrize("name", [n for n, e in BACKBONES.items() if e.units is not None and "<" not in n
                                  and not n.startswith(("deeplabv3", "retinanet"))] + ["resnet32", "resnet110"])
def test_what_a_name_says_is_what_the_built_model_has(name):
    from manpp.objectives.methods import family_of

    cfg = C.apply(C.TrainConfig(), {"model": name, "dataset": "synthetic", "image_size": 32})
    facts = backbone_facts(cfg)
    built = build_backbone(name, image_size=32)
    assert facts.units == len(built.units) and facts.family == family_of(built)


def test_config_yaml_records_the_resolved_config(tmp_path):
    cfg = C.apply(C.TrainConfig(), {"model": "resnet8", "dataset": "synthetic", "train_subset": 16, "test_subset": 16,
                                    "batch_size": 8, "epochs": 1, "max_steps": 1, "device": "cpu",
                                    "out": str(tmp_path / "r"), "recompute_ema": False})
    train(cfg, verbose=False)
    expected = dataclasses.replace(resolve(cfg), out=str(tmp_path / "r"), max_steps=None,
                                   classes=[str(i) for i in range(10)])  # the synthetic set's class names
    assert (tmp_path / "r" / "config.yaml").read_text() == C.config_text(expected)


def test_resolution_refuses_what_cannot_be():
    with pytest.raises(ManppError, match="K must be 1"):
        resolve(C.apply(C.TrainConfig(), {"method": "e2e", "k": 4}))
    with pytest.raises(ManppError, match="objective 'infopro' reads cifar or imagenet features"):
        resolve(C.apply(C.TrainConfig(), {"model": "vit_tiny", "objective": "infopro"}))
