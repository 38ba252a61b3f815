from .metrics import classification_metrics, multilabel_metrics, task_metrics, tune_thresholds

__all__ = ["classification_metrics", "multilabel_metrics", "task_metrics", "tune_thresholds"]
