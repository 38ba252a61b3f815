from .param_groups import param_groups
from .strategies import STRATEGIES, FinetuneConfig, Strategy, apply_strategy, build_strategy, trainable_parameter_count

__all__ = ["STRATEGIES", "FinetuneConfig", "Strategy", "apply_strategy", "build_strategy", "param_groups",
           "trainable_parameter_count"]
