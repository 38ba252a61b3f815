from .fit import FitResult, fit

__all__ = ["FitResult", "fit"]
