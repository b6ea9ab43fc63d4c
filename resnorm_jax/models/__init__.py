"""Model families: the registry (:mod:`resnorm_jax.models.family`) and the package's own
families, CIFAR ResNets (:mod:`resnorm_jax.models.resnet`) and the Transformer
(:mod:`resnorm_jax.models.transformer`), which register themselves when imported here."""

from resnorm_jax.models import resnet as _resnet  # noqa: F401  (registers cifar_resnet)
from resnorm_jax.models import transformer as _transformer  # noqa: F401  (transformer)
from resnorm_jax.models.family import (MODELS, DataInfo, ModelFamily, NormContext,
                                       build_model, compute_dtype, example_inputs, family,
                                       norm_context, register_model)

__all__ = ["MODELS", "DataInfo", "ModelFamily", "NormContext", "register_model", "family",
           "norm_context", "compute_dtype", "build_model", "example_inputs"]
