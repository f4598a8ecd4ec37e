"""Every command in README.md and docs/ as written: its program exists in .venv/bin, its flags parse; cheap ones run.

Commands are the lines of fenced code blocks that start with ``fcsae``,
``fcsae-sweep``, ``fcsae-report``, ``.venv/bin/...`` or ``make`` (a trailing
``# comment`` removed, ``\\`` continuations joined). Synopsis lines with
placeholders (``[--opt]``, ``a|b``, ``...``, upper-case ``DIR``/``SAE_DIR``) are
parsed only up to nothing: they are skipped. Commands that only read
(``--help``, ``--version``, ``query``, ``fcsae-report``) are run on a
synthetic experiment at the path they name.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from fcsae.cli import build_parser as fcsae_parser
from fcsae.report.cli import build_parser as report_parser
from orchestrator.cli import build_sweep_parser
from tests._report_utils import write_sweep

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PROGRAMS = {"fcsae": fcsae_parser, "fcsae-sweep": build_sweep_parser, "fcsae-report": report_parser}
PLACEHOLDER = re.compile(r"\[|\||\.\.\.|\b[A-Z][A-Z_]{2,}\b|<[a-z]")
MAKE_TARGETS = {"demo", "test", "test-fast", "bench", "assets", "venv", "clean"}


def doc_commands() -> list[tuple[str, int, str]]:
    """(file, line number, command) for every command line of every fenced block."""
    out = []
    for doc in DOCS:
        fenced, pending, start = False, "", 0
        for i, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            text = pending + line.strip()
            if text.endswith("\\"):
                pending, start = text[:-1] + " ", start or i
                continue
            pending = ""
            cmd = re.sub(r"\s+#.*$", "", text).strip()
            first = cmd.split(" ", 1)[0] if cmd else ""
            if first.removeprefix(".venv/bin/") in PROGRAMS or first.startswith(".venv/bin/") or first == "make":
                out.append((doc.relative_to(REPO).as_posix(), start or i, cmd))
            start = 0
    return out


COMMANDS = doc_commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("where, line, cmd", COMMANDS, ids=[f"{w}:{n}" for w, n, _ in COMMANDS])
def test_command_is_runnable_as_written(where, line, cmd):
    argv = shlex.split(cmd)
    prog = argv[0]
    if prog == "make":
        assert set(argv[1:]) <= MAKE_TARGETS, f"{where}:{line}: unknown make target in {cmd!r}"
        return
    # After the two set-up commands only .venv/bin is there: a bare name is copy-pasteable only when activated,
    # which the README and every docs page say first.
    name = prog.removeprefix(".venv/bin/")
    if (REPO / ".venv" / "bin").is_dir():
        assert (REPO / ".venv" / "bin" / name).exists(), f"{where}:{line}: no .venv/bin/{name}"
    if name not in PROGRAMS:
        return
    args = [a for a in argv[1:] if not re.match(r"^[A-Z_]+=", a)]
    known = _options(PROGRAMS[name](), args)
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"{where}:{line}: {cmd!r} uses flags that {name} does not take: {unknown}"
    if PLACEHOLDER.search(cmd):
        return  # a synopsis: its flags exist, its placeholders do not parse
    try:
        PROGRAMS[name]().parse_args(args)
    except SystemExit as e:
        assert e.code == 0, f"{where}:{line}: {cmd!r} does not parse (exit {e.code})"


def _options(parser: argparse.ArgumentParser, args: list[str]) -> set[str]:
    """Documented option strings of ``parser`` (and of the subcommand named first in ``args``); hidden ones excluded."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = next((a for a in args if not a.startswith("-")), None)
            if sub in action.choices:
                out |= _options(action.choices[sub], [])
        elif action.help != argparse.SUPPRESS:
            out |= set(action.option_strings)
    return out


@pytest.mark.parametrize("doc", sorted({w for w, _, _ in COMMANDS}))
def test_pages_with_bare_commands_say_to_activate_the_venv(doc):
    """A bare `fcsae ...` is copy-pasteable only in an activated venv: the page must say so."""
    bare = [c for w, _, c in COMMANDS if w == doc and c.split(" ", 1)[0] in PROGRAMS]
    if bare:
        assert "source .venv/bin/activate" in (REPO / doc).read_text(), f"{doc}: bare commands, no activation line"


def _reading(cmd: str) -> bool:
    argv = shlex.split(cmd)
    name = argv[0].removeprefix(".venv/bin/")
    return (not PLACEHOLDER.search(cmd) and "://" not in cmd and name in ("fcsae", "fcsae-report")  # no object store here
            and (name == "fcsae-report" or "--help" in argv or "--version" in argv or argv[1:2] == ["query"]))


READING = [pytest.param(w, n, c, id=f"{w}:{n}",
                        marks=[pytest.mark.slow] if "fcsae-report" in c else [])  # a report build takes ~10 s
           for w, n, c in COMMANDS if _reading(c)]


@pytest.mark.parametrize("where, line, cmd", READING)
def test_reading_commands_run_on_a_synthetic_experiment(where, line, cmd, tmp_path, monkeypatch):
    """Query and report commands run as written, from a directory holding the experiment they name."""
    from fcsae.cli import main as fcsae_main
    from fcsae.report.cli import main as report_main

    for exp in set(re.findall(r"experiments/[A-Za-z0-9_.-]+", cmd)):
        write_sweep(tmp_path / exp, seeds=(0, 1), n_failed=0, events=False)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(cmd)
    main = report_main if argv[0].removeprefix(".venv/bin/") == "fcsae-report" else fcsae_main
    try:
        rc = main(argv[1:])
    except SystemExit as e:  # --help, --version
        rc = e.code
    assert rc == 0, f"{where}:{line}: {cmd!r} exited {rc}"
