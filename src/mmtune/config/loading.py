"""Loading a config: YAML files, ``--set`` overrides, raw-dict helpers, presets applied, and errors that name the
key and what would be valid."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import yaml

from .sections import Config, ConfigError, _tables, _validate

# --------------------------------------------------------------------------------------
# loading, overrides, errors that name the key


def load_config(
    source: Union[str, Path, Mapping[str, Any], Config, None] = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build a :class:`Config` from a YAML file, a mapping or an existing config, then apply
    ``key.path=value`` overrides (values parsed as YAML scalars / lists).

    Relative manifest paths in a YAML file are resolved against the file's folder.
    Raises :class:`ConfigError` naming the offending key and what is valid.
    """
    base_dir: Optional[Path] = None
    if source is None:
        raw: Dict[str, Any] = {}
    elif isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        raw = read_yaml_mapping(path, "config file")
        base_dir = path.resolve().parent
    from_file = set(raw["data"]) if base_dir is not None and isinstance(raw.get("data"), dict) else set()
    overridden = {_apply_override(raw, item) for item in overrides}
    _keep_settings_of_new_type(raw, overridden)
    cfg = _validate(raw)
    # Relative manifest paths written in a YAML file are relative to the file's folder; paths given as
    # overrides (typed on a command line) are relative to the current directory, as a shell path is.
    for key in ("train", "val", "test"):
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute():
            written_in_file = key in from_file and f"data.{key}" not in overridden
            setattr(cfg.data, key, str(base_dir / value) if written_in_file else str(Path(value).resolve()))
    if cfg.data.align is not None:
        written_in_file = "align" in from_file and "data.align.tables" not in overridden
        cfg.data.align.tables = [t if Path(t).is_absolute() else str(base_dir / t) if written_in_file
                                 else str(Path(t).resolve()) for t in cfg.data.align.tables]
    return cfg


def read_yaml_mapping(path: Path, what: str, error: type = ConfigError) -> Dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}); ``error`` naming the file when it is missing, is not YAML,
    or holds something else (FileNotFoundError for a missing file when ``error`` is not ConfigError)."""
    if not path.is_file():
        raise (error if error is ConfigError else FileNotFoundError)(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    except RecursionError:
        raise error(f"{what} {str(path)!r} is nested too deeply to be a config") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {str(path)!r} must hold a mapping at the top level")
    return raw


def raw_section(raw: Dict[str, Any], dotted: str) -> Dict[str, Any]:
    """The mapping at ``dotted`` in a raw config dict, created (or replacing a non-mapping) on the way."""
    node = raw
    for part in (p for p in dotted.split(".") if p):
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    return node


def get_raw_key(raw: Dict[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` in a raw config dict (None where a step is missing or not a mapping)."""
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def set_raw_key(raw: Dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a raw config dict."""
    head, _, leaf = dotted.rpartition(".")
    raw_section(raw, head)[leaf] = value


def _keep_settings_of_new_type(raw: Dict[str, Any], overridden: set) -> None:
    """A part whose ``type`` an override changes keeps only the settings the new type has (the old type's
    own settings from the file are dropped; settings given as overrides are kept and checked)."""
    for section, (table, _) in _tables().items():
        if f"{section}.type" not in overridden:
            continue
        node = get_raw_key(raw, section)
        if not isinstance(node, dict) or node.get("type") not in table:
            continue
        fields = table.get(node["type"]).Config.model_fields
        for key in [k for k in node if k not in fields and f"{section}.{k}" not in overridden]:
            del node[key]


def _apply_override(raw: Dict[str, Any], item: str) -> str:
    """Set ``key.path=value`` in ``raw``; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value (for example trainer.max_epochs=3)")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
        parsed = value.strip()  # YAML 1.1 reads on / off / yes / no as booleans; only true / false are
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = parsed
    return ".".join(parts)


def apply_preset(cfg, stats):
    """``cfg`` with its preset's settings filled in where the config does not set the key itself. A part
    section (``finetune``, ``model.fusion``, ``loss``) whose ``type`` the config names keeps the config's type,
    and takes the preset's other settings for it only when the types agree (``stats``: a
    :class:`~mmtune.presets.TableStats`)."""
    from ..presets import _PARTS, _get, explicit_keys, preset_settings

    if not cfg.preset:
        return cfg
    given = set(explicit_keys(cfg))
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    for key, value in preset_settings(cfg.preset, stats).items():
        if isinstance(value, dict):
            if key in _PARTS and f"{key}.type" in given and _get(cfg, key).type != value.get("type"):
                continue  # the config chose another type: the preset's settings for its own type do not apply
            for sub, v in value.items():
                if f"{key}.{sub}" not in given:
                    set_raw_key(raw, f"{key}.{sub}", v)
        elif key not in given:
            set_raw_key(raw, key, value)
    return load_config(raw)
