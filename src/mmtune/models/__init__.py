from .classifier import MultimodalClassifier, build_model

__all__ = ["MultimodalClassifier", "build_model"]
