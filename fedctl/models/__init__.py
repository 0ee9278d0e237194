"""The model zoo: framework-free model specs with canonical parameter names, shapes and initialisers."""

from fedctl.models.zoo import MODELS, ModelSpec, ParamSpec, get_model, init_params

__all__ = ["MODELS", "ModelSpec", "ParamSpec", "get_model", "init_params"]
