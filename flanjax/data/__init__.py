"""Data: templates, collections as seqio Tasks, mixtures, packing."""

from flanjax.data.registry import list_mixtures, list_tasks, register_all

__all__ = ["list_mixtures", "list_tasks", "register_all"]
