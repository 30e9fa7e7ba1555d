"""The configuration reference (``docs/configuration.md``), generated from :mod:`pipelines.config`.

Why generated: the dataclasses are the only definition of the keys, their types and defaults,
and the ``# ...`` comment lines directly above each field are already its documentation. A
hand-kept table drifts (a key documented that does not exist, a default that changed);
regenerating cannot, and a test fails when the checked-in file is stale.

Usage::

    python -m pipelines.config_reference            # print the reference
    python -m pipelines.config_reference --write    # rewrite docs/configuration.md
    python -m pipelines.config_reference --check    # exit 1 when docs/configuration.md is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from pipelines.config import SECRET_KEYS, PipelineConfig, config_keys, section_class

DEFAULT_PATH = "docs/configuration.md"
COMMAND = "python -m pipelines.config_reference --write"


@dataclass
class Key:
    """One documented config key."""

    key: str  # dotted: section.name
    type: str  # as config errors spell it ("an integer or null")
    default: Any
    meaning: str  # the field's comment lines, joined


@dataclass
class Section:
    """One config section: its dataclass docstring and its keys."""

    name: str
    intro: str
    keys: list[Key]


def field_comments(cls: type) -> dict[str, str]:
    """``field name -> text`` of the ``#`` comment lines directly above each field of ``cls``.

    Parsed from the source (``ast`` finds the fields, the lines above them are read as they are)
    so that the comments stay ordinary comments in ``config.py``.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    (node,) = ast.parse(source).body
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        row = stmt.lineno - 2  # 0-based index of the line just above the field
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        out[stmt.target.id] = " ".join(part for part in above if part)
    return out


def sections() -> list[Section]:
    """Every section of :class:`PipelineConfig` in declaration order, with its keys."""
    hints = typing.get_type_hints(PipelineConfig)
    types_and_defaults = {key: (tp, default) for key, tp, default in config_keys()}
    out = []
    for section in dataclasses.fields(PipelineConfig):
        cls = section_class(hints[section.name])  # the heads: list documents its items' keys
        comments = field_comments(cls)
        keys = []
        for f in dataclasses.fields(cls):
            dotted = f"{section.name}.{f.name}"
            tp, default = types_and_defaults[dotted]
            keys.append(Key(dotted, tp, default, comments.get(f.name, "")))
        out.append(Section(section.name, inspect.getdoc(cls) or "", keys))
    return out


def _literal(value: Any) -> str:
    """A default as it is written in YAML (``null``, ``true``, ``[a, b]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: ``|`` would end the cell, ``*`` start emphasis and
    ``<...>`` read as an HTML tag (the comments are plain text, not Markdown)."""
    for char in ("\\", "|", "*", "<"):
        text = text.replace(char, "\\" + char)
    return text


def _type_label(type_name: str) -> str:
    """``"an integer or null"`` -> ``"integer or null"``: the article reads badly in a table."""
    words = [w for w in type_name.split(" ") if w not in ("a", "an")]
    return " ".join(words)


def render() -> str:
    """The whole reference as Markdown."""
    intro = textwrap.dedent(f"""\
        # Configuration reference

        <!-- Generated from pipelines/config.py by `{COMMAND}`; edit the comments there, not this file. -->

        Every key of a job's config, by section. Values come from the dataclass defaults, then the
        file given with `-c` (see `conf/*.yaml`), then `section.key=value` overrides on the command
        line, which are read as YAML (`index.enabled=false`, `label.classes=[cat, dog]`); a key
        whose type includes a string keeps the text as typed. An unknown key or a value of the
        wrong type stops the job before it starts, naming the key. Credentials
        ({", ".join(f"`{k}`" for k in SECRET_KEYS)}) are never printed or recorded.
        """)
    parts = [intro]
    for section in sections():
        parts.append(f"\n## `{section.name}`\n\n{section.intro}\n\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|\n")
        for k in section.keys:
            default = _literal(k.default).replace("|", "\\|")  # a code span: only "|" needs escaping
            parts.append(f"| `{k.key}` | {_cell(_type_label(k.type))} | `{default}` "
                         f"| {_cell(k.meaning)} |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Print, write or check the reference; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.config_reference", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the reference to PATH")
    mode.add_argument("--check", action="store_true", help="exit 1 when PATH differs from the generated reference")
    parser.add_argument("path", nargs="?", default=DEFAULT_PATH, help=f"the reference file (default {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        with open(args.path, "w", encoding="utf-8") as f:
            f.write(text)
        return 0
    if args.check:
        try:
            with open(args.path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"{args.path} is out of date with pipelines/config.py; run: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


__all__ = ["COMMAND", "DEFAULT_PATH", "Key", "Section", "field_comments", "main", "render", "sections"]


if __name__ == "__main__":
    sys.exit(main())
