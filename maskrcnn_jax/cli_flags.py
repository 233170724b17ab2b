"""Flags of the command-line entry points: one spelling, underscores.

``predict``, ``evaluate`` and ``convert`` spell their flags with underscores
(``--output_dir``, ``--max_images``), as absl does and as ``train``'s
``--config.train.batch_size`` already is. The dashed spellings of earlier
versions (``--output-dir``) keep working as aliases, left out of ``--help``,
because users' scripts depend on them; so do unambiguous abbreviations, as
argparse has always accepted them.
"""

from __future__ import annotations

import argparse
from typing import Any

ALIAS_NOTE = (
    "Flags are spelled with underscores; the dashed spellings of earlier versions "
    "(e.g. --batch-size) are accepted too."
)


def dashed(flag: str) -> str:
    """``--output_dir`` -> ``--output-dir`` (the alias of an underscore flag)."""
    return "--" + flag.removeprefix("--").replace("_", "-")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option under its underscore name only."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = [s for s in action.option_strings if s not in getattr(action, "aliases", ())]
        if len(shown) == len(action.option_strings):
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(shown)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{s} {metavar}" for s in shown)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose :meth:`add_flag` adds a dashed alias."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("epilog", ALIAS_NOTE)
        super().__init__(**kwargs)

    def add_flag(self, flag: str, **kwargs: Any) -> argparse.Action:
        """Adds ``flag`` (``--name_with_underscores``) and, if it differs, its dashed alias.

        Args:
          flag: the option, e.g. ``"--output_dir"``.
          **kwargs: as for ``add_argument``.

        Returns:
          The action; ``dest`` is the underscore name.
        """
        alias = dashed(flag)
        names = [flag] if alias == flag else [flag, alias]
        action = self.add_argument(*names, **kwargs)
        action.aliases = tuple(names[1:])
        return action

    def _get_option_tuples(self, option_string: str) -> list[tuple[Any, ...]]:
        # An abbreviation such as --output matches both --output_dir and its alias
        # --output-dir; they are one option, so it is not ambiguous. (argparse
        # private API; its tuples start with the action in every version.)
        unique, seen = [], set()
        for option in super()._get_option_tuples(option_string):
            if id(option[0]) not in seen:
                seen.add(id(option[0]))
                unique.append(option)
        return unique
