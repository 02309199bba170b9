"""Errors that are the user's to fix: reported as one line, with no traceback."""


class UserError(ValueError):
  """A configuration, path or data problem; the message names the fix."""
