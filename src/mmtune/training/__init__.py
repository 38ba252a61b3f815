"""Training: the Lightning module (``module``), the trainer (``trainer``), the objective, batch transforms — and
the recipe, :func:`mmtune.training.fit.fit` (``mmtune.fit``). Nothing is re-exported here, so importing the Lightning
module does not load the recipe's world (the bundle, evaluation, explanations, presets)."""
