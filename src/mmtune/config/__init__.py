"""The typed configuration, by job: the schema — every section and :class:`Config`, validated with the parts' own
tables (:mod:`.sections`); earlier formats — renamed keys and the upgrade of a format-1 bundle's config
(:mod:`.migrate`); and loading — YAML files, ``--set`` overrides, raw-dict helpers and presets (:mod:`.loading`).

A YAML file, ``--set a.b=c`` overrides on the command line and the Python API all produce a :class:`Config`.
Unknown keys and bad values raise :class:`ConfigError`, which names the key and what would be valid. A run bundle
stores the fully resolved config."""
# the package's names, by job: what every caller imports from ``mmtune.config``
from .loading import (_keep_settings_of_new_type, apply_preset, get_raw_key, load_config,  # noqa: F401
                      raw_section, read_yaml_mapping, set_raw_key)
from .migrate import RENAMED, config_differences, upgrade_format1  # noqa: F401
from .sections import (MAX_NAME_BYTES, AlignConfig, Config, ConfigError, DataConfig, EncoderConfig,  # noqa: F401
                       EvaluationConfig, GANConfig, HeadConfig, ImbalanceConfig, MatchingConfig, ModelConfig,
                       OptimConfig, RegularizationConfig, ScheduleConfig, SectionError, SynthesisConfig, TaskConfig,
                       TrainerConfig, _model_in, _tables, _valid_keys, _validate)
