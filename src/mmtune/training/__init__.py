"""Training: the Lightning module (``module``), the trainer (``trainer``), the objective and the batch transforms.
The recipe that uses them (``mmtune.fit``) lives above, in :mod:`mmtune.recipe`; nothing is re-exported here, so
importing the Lightning module does not load the recipe's world (the bundle, evaluation, explanations, presets)."""
