"""The documentation: the site builds offline with ``--strict`` (no broken link, anchor or API page), its generated
references hold every config key and CLI command, every ``mmtune`` command shown parses, every Python block
compiles, and the README stays a newcomer's page whose links lead somewhere."""
import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def _blocks(text, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def _leaf_keys(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_the_site_builds_strictly_with_every_config_key_and_command(site):
    from mmtune.cli import _parser
    from mmtune.config import Config

    config = (site / "reference" / "config" / "index.html").read_text()
    missing = [k for k in _leaf_keys(Config) if f"<code>{k}</code>" not in config]
    assert not missing, missing
    assert "<code>finetune.r</code>" in config and "<code>model.fusion.heads</code>" in config  # per part type
    cli = (site / "reference" / "cli" / "index.html").read_text()
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert all(f"mmtune {name}" in cli for name in sub.choices)
    assert "<code>--single</code>" in cli and "<code>--ensemble</code>" in cli
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "predict_table" in api and "greedy_selection" in api  # docstrings rendered, not just names
    assert (site / "contributing" / "index.html").is_file()


def _commands():
    for page in PAGES:
        for block in _blocks(page.read_text(), "bash"):
            joined = block.replace("\\\n", " ")
            for line in joined.splitlines():
                line = line.split(" #")[0].strip()
                while re.search(r"\s\[[^\[\]]*\]", line):  # optional parts shown in brackets: left out
                    line = re.sub(r"\s\[[^\[\]]*\]", "", line)
                line = re.sub(r"<[^<>]+>", "X", line)  # placeholders
                if line.startswith("mmtune ") and not re.search(r"[\[\]<>…|]|\.\.\.", line):
                    yield page.relative_to(ROOT).as_posix(), line


COMMANDS = list(_commands())


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{p}:{c[:40]}" for p, c in COMMANDS])
def test_every_mmtune_command_in_the_docs_parses(page, line):
    """Shown commands are not run here (they need the user's tables); their command and options must exist."""
    from mmtune.cli import _parser

    try:
        _parser().parse_args(shlex.split(line)[1:])
    except SystemExit as exc:
        pytest.fail(f"{page}: `{line}` does not parse (exit {exc.code})")


def test_every_python_block_in_the_docs_compiles():
    bad = []
    for page in PAGES:
        for block in _blocks(page.read_text(), "python"):
            try:
                ast.parse(block)
            except SyntaxError as exc:
                bad.append(f"{page.name}: {exc}")
    assert not bad, bad


def test_the_readme_is_a_newcomers_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 8_000
    assert "make demo" in text and "make test" in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
