"""Building blocks of unsupervised domain adaptation, pure modules and functions usable without a Trainer.

Gradient reversal and DANN's ramp (:mod:`~lt_finetune.domain.reversal`), domain discriminators
(:mod:`~lt_finetune.domain.discriminator`), alignment losses (:mod:`~lt_finetune.domain.losses`: adversarial,
MK-MMD, CORAL, CDAN's conditioning, MCC), AdaBN (:mod:`~lt_finetune.domain.adabn`) and label-free model selection
(:mod:`~lt_finetune.domain.selection`), and the digit LeNet of the papers' digit experiments
(:class:`~lt_finetune.domain.DigitLeNet`). :class:`lt_finetune.callbacks.DomainAdapt` puts them together.
"""

from lt_finetune.domain.adabn import batchnorm_layers, target_batchnorm
from lt_finetune.domain.discriminator import ConditionalDomainDiscriminator, DomainDiscriminator
from lt_finetune.domain.lenet import DigitLeNet
from lt_finetune.domain.losses import (
    coral_loss,
    domain_adversarial_loss,
    entropy,
    entropy_weights,
    mcc_loss,
    mmd_loss,
    multilinear_map,
)
from lt_finetune.domain.reversal import GradientReversal, dann_coefficient, gradient_reversal
from lt_finetune.domain.selection import information_maximization, selection_score, soft_neighborhood_density

__all__ = [
    "ConditionalDomainDiscriminator",
    "DigitLeNet",
    "DomainDiscriminator",
    "GradientReversal",
    "batchnorm_layers",
    "coral_loss",
    "dann_coefficient",
    "domain_adversarial_loss",
    "entropy",
    "entropy_weights",
    "gradient_reversal",
    "information_maximization",
    "mcc_loss",
    "mmd_loss",
    "multilinear_map",
    "selection_score",
    "soft_neighborhood_density",
    "target_batchnorm",
]
