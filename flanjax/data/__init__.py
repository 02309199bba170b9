"""Data: templates, collections as seqio Tasks, mixtures, packing.

Importing the package loads none of its modules: ``flanjax.data.packing`` and
``flanjax.data.templates`` need no TensorFlow, seqio or JAX. The registry's
``list_tasks``, ``list_mixtures`` and ``register_all`` are still reachable
here; they load it (and TensorFlow) on first use.
"""

_FROM_REGISTRY = ("list_mixtures", "list_tasks", "register_all")
__all__ = list(_FROM_REGISTRY)


def __getattr__(name: str):
  if name in _FROM_REGISTRY:
    from flanjax.data import registry  # pylint: disable=g-import-not-at-top
    return getattr(registry, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
