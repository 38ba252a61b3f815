from .freeze import apply_strategy, trainable_parameter_count
from .param_groups import param_groups

__all__ = ["apply_strategy", "param_groups", "trainable_parameter_count"]
