from .classifier import MultimodalClassifier, build_model


def model_for(config, tasks, bundle_dir=None):
    """The model a config describes for ``tasks``: a :class:`~mmtune.models.matcher.TwoTowerMatcher` for a
    matcher (``data.query``), else the classifier with a head per task; pretrained encoders, or a bundle's
    (``bundle_dir``). Absent modalities get placeholders when ``data.allow_missing`` or modality dropout asks."""
    if config.task == "matching":
        from .matcher import build_matcher

        return build_matcher(config, bundle_dir)
    allow_missing = bool(config.data.allow_missing) or config.model.modality_dropout > 0
    return build_model(config.model, {t.name: t.outputs for t in tasks}, bundle_dir=bundle_dir, allow_missing=allow_missing)


__all__ = ["MultimodalClassifier", "build_model", "model_for"]
