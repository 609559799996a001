"""Integrations with training frameworks, each importing its framework only when used:

* :mod:`steadygrad.integrations.lightning`: ``ClipperCallback`` for Lightning's ``Trainer``;
* :mod:`steadygrad.integrations.transformers`: ``ClipperCallback`` for the Hugging Face
  ``Trainer``.

Both run a :class:`steadygrad.Clipper` on the gradients at the point where the framework is about to
step the optimizer (after AMP's unscaling), skip non-finite steps, and keep the clipper's tensor
state in the framework's checkpoints. ``import steadygrad`` imports none of this. Recipes for these,
accelerate, DDP, FSDP2 and DCP are in ``docs/integrations.md``.
"""
