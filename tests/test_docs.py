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


# ---- every block is run, or says why not ------------------------------------------------------------------------
NOT_RUN = re.compile(r"<!-- not run: ([^>]*\S[^>]*) -->\n*$")


def _fenced(page):
    """(first line, language, code, reason it is not run or None) of each ``bash`` or ``python`` block."""
    text = page.read_text()
    for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, flags=re.S | re.M):
        marked = NOT_RUN.search(text[:m.start()])
        yield m.group(2).splitlines()[0], m.group(1), m.group(2), marked.group(1) if marked else None


def _text_table(folder, n, seed, label="label"):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    y = rng.choice(["keep", "return"], n)
    note = [f"this {rng.choice(['lamp', 'mug', 'kettle'])} is {'great' if v == 'keep' else 'broken'}" for v in y]
    return pd.DataFrame({"order": [f"o{seed}-{i}" for i in range(n)], "note": note,
                         "shop": rng.choice(["a", "b"], n), label: y})


def _tables(folder):
    """What the fit examples read: train.csv / test.csv / new_rows.csv and train_df / test_df (label ``category``)."""
    _text_table(folder, 48, 0).to_csv(folder / "train.csv", index=False)
    _text_table(folder, 16, 1).to_csv(folder / "test.csv", index=False)
    _text_table(folder, 8, 2).drop(columns="label").to_csv(folder / "new_rows.csv", index=False)
    return {"train_df": _text_table(folder, 48, 3, "category"), "test_df": _text_table(folder, 16, 4, "category")}


def _config(folder, tiny_vit, tiny_bert):
    """configs.md's example: my.yaml (tiny encoders) and the demo task's tables as DataFrames."""
    import pandas as pd
    import yaml

    from mmtune.demo import make_dataset

    from conftest import base_config

    paths = make_dataset(folder / "data", n=120, image_size=32, seed=0)
    cfg = base_config(folder, {"image": {"modality": "image", "checkpoint": tiny_vit},
                               "text": {"modality": "text", "checkpoint": tiny_bert}}, evaluation={"report": False})
    (folder / "my.yaml").write_text(yaml.safe_dump(cfg))
    frames = {k: pd.read_csv(p).assign(image=lambda d: [str(folder / "data" / x) for x in d["image"]])
              for k, p in paths.items()}
    train = frames["train"]
    return {"train_df": train.iloc[20:], "val_df": train.iloc[:20], "test_df": frames["test"],
            "new_df": frames["test"].drop(columns="label").head(6)}


def _matcher(folder, tiny_vit, tiny_bert):
    """matching.md's examples: a matcher at runs/catalogue and the tables they read."""
    import pandas as pd

    import mmtune
    from mmtune.demo import make_pairs

    from test_matching import _matcher_config

    tables = make_pairs(folder, n=96, image_size=32, seed=0)
    cfg = _matcher_config(folder, tiny_vit, tiny_bert, tables, trainer={"max_epochs": 2})
    mmtune.fit({**cfg, "name": "catalogue"})
    test = pd.read_csv(tables["test"])
    test[["id", "image"]].to_csv(folder / "photos.csv", index=False)
    test[["id", "text"]].to_csv(folder / "catalogue.csv", index=False)
    test.to_csv(folder / "pairs.csv", index=False)
    test.assign(kind=lambda d: d["text"].str.replace("this ", "", regex=False))[["id", "image", "kind"]].to_csv(
        folder / "labelled.csv", index=False)
    return {}


# page -> how to set up what its Python blocks read (each block runs in a fresh folder, in order on its page)
RUN = {"README.md": _tables, "docs/index.md": _tables, "docs/getting-started.md": _tables,
       "docs/guides/configs.md": _config, "docs/guides/matching.md": _matcher}
SHORT = ["trainer.max_epochs=1", "evaluation.report=false", "evaluation.baselines=false", "evaluation.explain=0"]


def test_every_command_and_python_block_is_run_or_says_why_not():
    unmarked = [f"{page.relative_to(ROOT).as_posix()}: {first}" for page in PAGES for first, lang, _, why in _fenced(page)
                if why is None and not (lang == "python" and page.relative_to(ROOT).as_posix() in RUN)]
    assert not unmarked, "a block that is neither run by test_docs.py nor marked <!-- not run: reason -->: " + str(unmarked)
    assert all(any(lang == "python" for _, lang, _, _ in _fenced(ROOT / p)) for p in RUN)  # no stale entry


@pytest.mark.parametrize("page", sorted(RUN))
def test_the_python_blocks_run(page, tmp_path, monkeypatch, tiny_vit, tiny_bert):
    """Each Python block of the page, as written, on tiny generated tables; a fit the block starts runs one epoch
    without the report (``SHORT`` is added to its overrides) so the suite stays short."""
    import functools

    import mmtune

    blocks = [code for _, lang, code, why in _fenced(ROOT / page) if lang == "python" and why is None]
    monkeypatch.chdir(tmp_path)
    setup = RUN[page]
    names = setup(tmp_path) if setup is _tables else setup(tmp_path, tiny_vit, tiny_bert)
    real_fit = mmtune.fit

    @functools.wraps(real_fit)
    def short_fit(*args, overrides=(), **kwargs):
        return real_fit(*args, overrides=[*SHORT, *overrides], **kwargs)

    monkeypatch.setattr(mmtune, "fit", short_fit)
    for code in blocks:
        scope = {"mmtune": mmtune, **names}
        exec(compile(code, f"{page}:block", "exec"), scope)
