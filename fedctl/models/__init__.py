"""The model zoo: framework-free model specs with canonical parameter names, shapes and initialisers."""

from fedctl.models.zoo import MODELS, ModelSpec, ParamSpec, first_difference, get_model, init_params, spec_from_wire

__all__ = ["MODELS", "ModelSpec", "ParamSpec", "first_difference", "get_model", "init_params", "spec_from_wire"]
