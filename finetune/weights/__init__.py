"""``finetune weights``: which ImageNet files are here, fetch them, import files you have.

Built on the backbone registry (:mod:`finetune.backbones`), which also
loads these files when a recipe says ``weights: imagenet``.
"""
