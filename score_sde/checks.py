"""The one check of a name against its valid values, shared by every module.

    check_choice("config.sampling.method", "odee", SAMPLERS)
    # ValueError: Unknown config.sampling.method 'odee'; valid: ['ddim', 'ode', 'pc', ...]
"""

from __future__ import annotations

from typing import Any, Iterable


def check_choice(what: str, value: Any, valid: Iterable[Any], hint: str = "") -> None:
  """Raises a ValueError naming `what`, the bad `value` and the valid ones (sorted), unless
  `value` is one of `valid`. `hint` is appended to the message (e.g. "or a .npy file")."""
  valid = list(valid)
  if value in valid:
    return
  try:
    shown = sorted(valid)
  except TypeError:  # mixed types
    shown = valid
  raise ValueError(f"Unknown {what} {value!r}; valid: {shown}{' ' + hint if hint else ''}")
