"""A stand-in for another package's entry points (see test_catalog)."""

from finetune.catalog.optimizers import SGD


def build_fake_sgd(**settings):
    return SGD(**settings)
