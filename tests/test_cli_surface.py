"""The `vlp-bench` command line's surface, written out: every command and sub-command with its
options and arguments. Adding, renaming or removing one is a deliberate change made here too
(and in the README and docs that show it)."""

from __future__ import annotations

import typer

from vlp_bench.cli import app

# command path ("" is `vlp-bench` itself) -> its options (every flag, aliases and --no- forms
# included) and arguments (upper case, as in the usage line)
SURFACE: dict[str, set[str]] = {
    "": {"--debug"},
    "run": {"--config", "-c", "--set", "-s", "--methods", "--tasks", "--task", "--seeds", "--out", "-o", "--resume"},
    "summary": {"RUNS", "--metric", "--target", "--reference", "--json"},
    "search": {"--config", "-c", "--set", "-s", "--method", "--trials", "--storage", "--study", "--out", "-o"},
    "claims": {"--config", "-c", "--set", "-s", "--out", "-o", "--only", "--worlds", "--seeds", "--tune", "--resume",
               "--from", "--bench", "--list", "--json"},
    "report": {"RUNS", "--out", "-o", "--metric", "--target", "--reference", "--flops"},
    "flops": {"--preset", "--methods", "--config", "-c", "--set", "-s", "--json"},
    "bench": {"--preset", "--methods", "--batch-size", "--steps", "--warmup", "--overhead", "--rounds", "--config", "-c",
              "--set", "-s", "--json"},
    "export-shards": {"OUT", "--split", "--shard-size", "--config", "-c", "--set", "-s"},
    "import-coco": {"KARPATHY", "--images", "--out", "-o", "--vqa-questions", "--vqa-annotations"},
    "validate": {"--config", "-c", "--set", "-s", "--methods"},
    "prepare": {"--config", "-c", "--set", "-s"},
    "list": set(),
    "evaluate": set(),
    "evaluate caption": {"--annotations", "--predictions", "--spice", "--no-spice"},
    "evaluate vqa": {"--questions", "--annotations", "--predictions"},
    "evaluate run": {"RUN_DIR", "--task", "--tasks", "--split", "--set", "-s", "--name"},
    "predict": {"RUN_DIR", "INPUTS", "--question", "--task", "--set", "-s", "--json"},
}


def surface(command, path: str = "") -> dict[str, set[str]]:
    """The commands of a (Typer-built, click-style) command tree and their parameters' names."""
    names: set[str] = set()
    for p in command.params:
        if p.param_type_name == "argument":
            names.add(p.name.upper())
        else:
            names.update([*p.opts, *p.secondary_opts])
    out = {path: names}
    for name, sub in sorted(getattr(command, "commands", {}).items()):  # a group's sub-commands
        out |= surface(sub, f"{path} {name}".strip())
    return out


def test_the_command_line_is_what_is_written_here():
    actual = surface(typer.main.get_command(app))
    changes = []
    for cmd in sorted(actual.keys() - SURFACE.keys()):
        changes.append(f"command added: `vlp-bench {cmd}` {sorted(actual[cmd])}")
    for cmd in sorted(SURFACE.keys() - actual.keys()):
        changes.append(f"command removed: `vlp-bench {cmd}`")
    for cmd in sorted(actual.keys() & SURFACE.keys()):
        if added := sorted(actual[cmd] - SURFACE[cmd]):
            changes.append(f"`vlp-bench {cmd}`: added {', '.join(added)}")
        if removed := sorted(SURFACE[cmd] - actual[cmd]):
            changes.append(f"`vlp-bench {cmd}`: removed {', '.join(removed)}")
    assert not changes, ("the command line changed (if on purpose, update SURFACE in "
                         "tests/test_cli_surface.py):\n  " + "\n  ".join(changes))


def test_the_walk_sees_sub_commands_and_every_kind_of_parameter():
    actual = surface(typer.main.get_command(app))
    assert {"evaluate", "evaluate caption", "evaluate vqa"} <= actual.keys()
    assert {"RUNS", "--json"} <= actual["summary"]  # an argument, an option
    assert {"--spice", "--no-spice"} <= actual["evaluate caption"]  # a flag's --no- form
    assert {"--tasks", "--task"} <= actual["run"]  # an alias
