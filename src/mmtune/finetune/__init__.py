from .freeze import STRATEGIES, apply_strategy, trainable_parameter_count
from .param_groups import param_groups

__all__ = ["STRATEGIES", "apply_strategy", "param_groups", "trainable_parameter_count"]
