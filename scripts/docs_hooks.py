"""MkDocs hooks of the documentation site (``make docs``): the config reference, generated from the pydantic schema
(every key with its type, default and the first sentence of its docstring), and the CLI reference, generated from
the argparse parser, are added to the site as pages when it is built; nothing generated is kept in ``docs/``."""
from __future__ import annotations

import argparse
import ast
import inspect
import re
import textwrap
import typing
from typing import Any, Dict, Iterator, List, Tuple

from pydantic import BaseModel


def _attribute_docs(cls) -> Dict[str, str]:
    """``{field: docstring}`` from the string literals that follow the fields in the class bodies (bases too)."""
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                out[a.target.id] = " ".join(b.value.value.split())
    return out


def _first_sentence(doc: str) -> str:
    m = re.match(r"(.+?\.)(\s+[A-Z(`]|$)", doc)  # not at "e.g." or "i.e."
    return (m.group(1) if m else doc).replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"typing\.|pydantic\.\w+\.|mmtune\.[\w.]+\.", "", text)
    text = text.replace("NoneType", "None").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def _models_in(annotation: Any) -> List[Tuple[str, type]]:
    """The config sections an annotation holds, with how their keys are written (``.``, ``.<name>.``, ``[].``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(".", annotation)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (dict, typing.Dict) and len(args) == 2:
        return [(".<name>.", m) for _, m in _models_in(args[1])]
    if origin in (list, typing.List):
        return [("[].", m) for _, m in _models_in(args[0])] if args else []
    out = []
    for a in args:
        out += _models_in(a)
    return out


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except Exception:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    from pydantic_core import PydanticUndefined

    return "(required)" if field.default is PydanticUndefined else f"`{field.default!r}`"


def _rows(model, prefix: str) -> Iterator[Tuple[str, str, str, str]]:
    docs = _attribute_docs(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, _type_name(field.annotation), _default(field), _first_sentence(docs.get(name, field.description or ""))
        for joint, sub in _models_in(field.annotation):
            if sub is not model:
                yield from _rows(sub, f"{key}{joint}")


def config_reference() -> str:
    from mmtune.config import Config, _tables

    lines = ["# Config reference", "",
             "Every key of a config (YAML, `--set key=value`), generated from the schema (`mmtune.config`) when the "
             "site is built: its type, its default and the first sentence of its documentation. A part's section "
             "(`finetune`, `loss`, `model.fusion`) takes the keys of the type it names; they are listed per type below.",
             "", "| key | type | default | what it is |", "| --- | --- | --- | --- |"]
    parts = _tables()
    for key, typ, default, doc in _rows(Config, ""):
        if key in ("finetune", "loss"):
            doc = doc or f"see `{key}` types below"
        lines.append(f"| `{key}` | {typ} | {default} | {doc} |")
    for section, (table, fallback) in parts.items():
        lines += ["", f"## `{section}` by type (default `{fallback}`)", ""]
        for name in table.names():
            cls = table.get(name).Config
            lines += [f"### `{section}.type: {name}`", "", "| key | type | default | what it is |", "| --- | --- | --- | --- |"]
            for key, typ, default, doc in _rows(cls, f"{section}."):
                if key != f"{section}.type":
                    lines.append(f"| `{key}` | {typ} | {default} | {doc} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _usage(parser: argparse.ArgumentParser) -> str:
    return parser.format_usage().strip().replace("usage: ", "")


def cli_reference() -> str:
    from mmtune.cli import _parser

    parser = _parser()
    lines = ["# CLI reference", "", "Every command and option of `mmtune`, generated from its argparse parser when the "
             "site is built (`mmtune COMMAND --help` prints the same).", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        lines += [f"## `mmtune {name}`", "", helps.get(name) or "", "", "```text", _usage(p), "```", "",
                  "| option | what it does |", "| --- | --- |"]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flag = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.dest}`"
            text = (a.help or "").replace("%(default)s", str(a.default)).replace("|", "\\|").replace("\n", " ")
            if a.choices and not isinstance(a, argparse._SubParsersAction):
                text += f" (one of {', '.join(map(str, a.choices))})"
            lines.append(f"| {flag} | {text} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def contributing() -> str:
    """CONTRIBUTING.md (the repository's own file) as a page of the site."""
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text(encoding="utf-8")


GENERATED = {"reference/config.md": config_reference, "reference/cli.md": cli_reference,
             "contributing.md": contributing}


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, make in GENERATED.items():
        files.append(File.generated(config, path, content=make()))
    return files
