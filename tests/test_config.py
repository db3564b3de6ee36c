"""Nested objective settings: ``objective_settings.<name>=value``, and the names of earlier versions: ``heads.<name>``,
YAML ``heads:``, and the flat keys."""

import pytest

from manpp.config import trainconfig as C
from manpp.train.build import build_model, data_info
from manpp.base.errors import ManppError


def test_dotted_yaml_and_legacy_head_settings_land_in_the_objective_settings(tmp_path):
    cfg = C.apply(C.TrainConfig(), C.parse_overrides(["heads.ixx_1=3", "aux_config=1c2f"]))
    assert cfg.objective_settings == {"ixx_1": 3, "aux_config": "1c2f"}
    path = tmp_path / "c.yaml"
    path.write_text("method: infopro\nheads:\n  ixy_1: 0.25\nfeature_dim: 64\n")
    cfg = C.apply(cfg, C.load_yaml(path))
    assert cfg.objective_settings == {"ixx_1": 3, "aux_config": "1c2f", "ixy_1": 0.25, "feature_dim": 64}
    model = build_model(C.apply(cfg, {"model": "resnet8", "k": 3}), data_info(cfg))
    s = model.objective_settings
    assert (s.ixx_1, s.ixy_1, s.aux_config, s.feature_dim) == (3.0, 0.25, "1c2f", 64)
    assert model.aux[0].lambda1 == 3.0 and model.aux[0].classifier.fc[0].out_features == 64


def test_bad_nested_settings_are_refused_with_the_accepted_names():
    with pytest.raises(ManppError, match="only 'objective_settings' \\(also called 'heads'\\) has nested settings"):
        C.apply(C.TrainConfig(), {"optim.lr": 1})
    with pytest.raises(ManppError, match="expected a mapping"):
        C.apply(C.TrainConfig(), {"heads": 5})
    cfg = C.apply(C.TrainConfig(), {"model": "resnet8", "k": 2, "method": "dgl", "heads.ixx_9": 1})
    with pytest.raises(ManppError, match="unknown setting 'objective_settings.ixx_9' for objective 'dgl': its "
                                         "settings are objective_settings.feature_dim"):
        build_model(cfg, data_info(cfg))


def test_a_setting_of_another_objective_is_left_out_with_a_warning():
    cfg = C.apply(C.TrainConfig(), {"model": "resnet8", "k": 2, "method": "dgl", "ixx_1": 2})
    with pytest.warns(UserWarning, match="objective_settings.ixx_1 is a setting of objective 'infopro', not of 'dgl'"):
        model = build_model(cfg, data_info(cfg))
    assert model.objective == "dgl"
