"""What a run is: trainconfig (TrainConfig, YAML and overrides), resolve (the one place that chooses),
validate (every field against its rule), fidelity (ours or the authors' release) and presets (the
paper's configs).

``manpp.config.TrainConfig``, ``apply``, ``load_yaml`` and the other names of trainconfig are
importable from here, as they were before the layout.
"""

from .trainconfig import (IDENTITY_FIELDS, LEGACY_HEAD_KEYS, PREDATED, SESSION_FIELDS, TrainConfig, apply,
                          check_resumable, config_text, from_dict, load_yaml, parse_overrides, run_config, save_yaml,
                          saved_config)

__all__ = ["IDENTITY_FIELDS", "LEGACY_HEAD_KEYS", "PREDATED", "SESSION_FIELDS", "TrainConfig", "apply",
           "check_resumable", "config_text", "from_dict", "load_yaml", "parse_overrides", "run_config", "save_yaml",
           "saved_config"]
