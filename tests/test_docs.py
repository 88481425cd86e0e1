"""Every `bertpre` command written in the README and docs/ parses (lines ending in a backslash
joined to the next, as the shell does): each option it names
exists and takes the value given (argparse commands through their parser, train and finetune
through LightningCLI's --print_config, which resolves the config without running anything).
Usage synopses (with [optional] parts) are skipped; paths need not exist."""

import re
import shlex

import pytest
from conftest import ROOT

from bertpre.cli import PARSERS, main

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "studies").rglob("*.md")),
        ROOT / "data_prep" / "README.md"]


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        in_code, pending = False, ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                in_code, pending = not in_code, ""
                continue
            if not in_code:
                continue
            if line.rstrip().endswith("\\"):  # a command continued on the next line
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = (pending + line).split(" # ")[0].strip(), ""
            for part in re.split(r"\s*&&\s*", line):
                if part.startswith("bertpre ") and "[" not in part and "..." not in part:
                    found.append((f"{path.relative_to(ROOT)}: {part}", shlex.split(part)[1:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_kind():
    kinds = {args[0] for _, args in COMMANDS}
    assert {"prepare", "train", "finetune", "predict", "export", "import", "combine"} <= kinds, kinds


@pytest.mark.parametrize("where, args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    command, rest = args[0], args[1:]
    if command in ("train", "finetune"):
        with pytest.raises(SystemExit) as exited:
            main([command, *rest, "--print_config"])
        assert exited.value.code == 0, capsys.readouterr().err
    else:
        assert command in PARSERS, f"{where}: unknown command"
        PARSERS[command]().parse_args(rest)


def test_every_relative_link_in_the_docs_resolves():
    """Links between the README, docs/, studies/ and data_prep/ point at files that exist (a moved
    study or doc breaks them)."""
    broken = []
    for path in [*DOCS, *sorted((ROOT / "tests").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken
