"""Every key and command that an error message, ``--help`` or the README advises exists: the dotted config
keys named in the source's string literals (error texts, help texts) and in the README, and the ``effdense``
commands they name, checked against the schemas and the parser (issue 21)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import typing
from pathlib import Path

from tasks import registry
from tasks.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
# Advice names a key as `--set key=...`, `set key=...`, `key=value`, or after "set " (e.g. "set data.train_split")
KEY = re.compile(r"(?:(?<=set )|(?<=--set ))((?:model|data|train|optim|schedule|loss)\.[a-z_]+(?:\.[a-z_]+)*)"
                 r"|(?<![\w./-])((?:model|data|train|optim|schedule|loss)\.[a-z_]+(?:\.[a-z_]+)*)(?==)")
# ... and a command in backticks, after "run ", or at the start of a README command line
COMMAND = re.compile(r"(?:`|\brun )effdense ([a-z][a-z-]+)(?: ([a-z][a-z-]+))?")
README_COMMAND = re.compile(r"^\s*effdense ([a-z][a-z-]+)(?: ([a-z][a-z-]+))?")


def schema_keys() -> set[str]:
    keys = set()

    def walk(schema, prefix=""):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            keys.add(prefix + f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    for task in registry.TASKS.values():
        walk(task.config)
    return keys


def texts() -> list[tuple[str, str]]:
    """(where, text) for every string literal in the package and the README's lines."""
    found = []
    for top in ("backbones", "heads", "tasks"):
        for path in (ROOT / top).rglob("*.py"):
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.value))
    found += [(f"README.md:{i}", line) for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1)]
    return found


def test_every_config_key_named_in_a_message_exists():
    keys = schema_keys()
    named = [(where, a or b) for where, text in texts() for a, b in KEY.findall(text)]
    assert len(named) > 30  # the rule finds the advice there is
    unknown = [f"{where}: {key}" for where, key in named if key not in keys]
    assert not unknown, "\n".join(unknown)


def test_every_effdense_command_named_in_a_message_exists():
    parser = build_parser()
    commands = {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                for name, sub in action.choices.items()}

    def actions(sub: argparse.ArgumentParser) -> set[str] | None:
        found = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        return set(found[0].choices) if found else None

    wrong = []
    for where, text in texts():
        found = COMMAND.findall(text) + (README_COMMAND.findall(text) if where.startswith("README") else [])
        assert not where.startswith("README.md:82") or found  # the README's command block is read
        for first, second in found:
            if first not in commands:
                wrong.append(f"{where}: effdense {first}")
            elif second and actions(commands[first]) is not None and second not in actions(commands[first]):
                wrong.append(f"{where}: effdense {first} {second}")
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_a_wrong_key_and_command():
    assert [a or b for a, b in KEY.findall("use --set model.num_clases=3 or set data.val_splt")] == \
        ["model.num_clases", "data.val_splt"]
    assert KEY.findall("writes model.safetensors and data.yaml") == []
    assert "model.num_clases" not in schema_keys() and "model.num_classes" in schema_keys()
    assert COMMAND.findall("run `effdense data chek CONFIG`") == [("data", "chek")]
