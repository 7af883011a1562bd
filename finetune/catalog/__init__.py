"""The techniques of "Training Deep Neural Networks" (Hands-On ML, ch. 11) as named plugins.

One registry per kind, each in the Keras ``get(identifier)`` style:
optimizers, schedules, regularizers, callbacks, and the initializers and
activations of dense stacks (:mod:`finetune.catalog.layers`).
"""
