"""Docs agree with the code: every llavao1-* command in README.md and docs/ parses with the real parsers,
every flag and subcommand they name exists, and every file they link to is there."""

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODULES = {"llavao1-edge": "llavao1_edge.cli", "llavao1-data": "llavao1_data.cli", "llavao1-train": "llavao1_train.cli",
           "llavao1-export": "llavao1_export.cli", "llavao1-bench": "llavao1_bench.cli"}
BY_MODULE = {m: c for c, m in MODULES.items()}


def _parser(command: str) -> argparse.ArgumentParser:
    import importlib

    return importlib.import_module(MODULES[command]).build_parser()


def _invocations(text: str, code_blocks: bool):
    """(command, args) for each llavao1-* call in the fenced code blocks (or in the inline code spans)."""
    if code_blocks:
        chunks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        lines = "\n".join(chunks).replace("\\\n", " ").splitlines()
    else:
        lines = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    for line in lines:
        for part in re.split(r"&&|;|\||>", line):  # commands joined, piped or redirected
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            for i, w in enumerate(words):
                if w in MODULES:
                    yield w, words[i + 1:]
                    break
                if w == "-m" and i + 1 < len(words) and words[i + 1] in BY_MODULE:
                    yield BY_MODULE[words[i + 1]], words[i + 2:]
                    break


def _subparser(parser: argparse.ArgumentParser, args: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names = [a for a in args if not a.startswith("-")]
            assert names and names[0] in action.choices, f"no subcommand {names[:1]}; known: {list(action.choices)}"
            return action.choices[names[0]]
    return parser


def _calls(code_blocks: bool):
    return [pytest.param(cmd, args, id=f"{doc.name}:{cmd} {' '.join(args)[:60]}")
            for doc in DOCS for cmd, args in _invocations(doc.read_text(encoding="utf-8"), code_blocks)]


@pytest.mark.parametrize(("command", "args"), _calls(code_blocks=True))
def test_documented_commands_parse(command, args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            _parser(command).parse_args(args)
        except SystemExit as e:
            assert e.code == 0 and "--help" in args, f"{command} {' '.join(args)}: {err.getvalue().strip()}"


@pytest.mark.parametrize(("command", "args"), [c for c in _calls(code_blocks=False) if c.values[1]])
def test_documented_flags_and_subcommands_exist(command, args):
    parser = _subparser(_parser(command), args)
    known = {s for a in parser._actions for s in a.option_strings}
    for flag in (a.split("=")[0] for a in args if a.startswith("-") and not re.fullmatch(r"-\d.*", a)):
        assert flag in known, f"{command}: {flag} is documented but not a flag of {parser.prog}"


def test_documented_files_exist():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not there"
        for path in re.findall(r"`((?:results|docs|llavao1_edge|train|bench|export|data|models)/[\w./*-]+)`", text):
            if "*" not in path and "RUN" not in path:
                assert (ROOT / path).exists(), f"{doc.name} names {path}, which is not there"


def test_readme_is_short_and_its_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = re.search(r"^python3 -m pip install torch.*$", readme, re.M).group(0)
    assert command in ci
