"""The recipe: :func:`mmtune.recipe.fit.fit` (``mmtune.fit``) — a table and a config in, a run bundle out — and the
single-modality baselines it fits beside the model (:mod:`mmtune.recipe.baselines`). It sits above training, the
bundle, evaluation and explanations, and imports them; nothing below imports it. Nothing is re-exported here."""
