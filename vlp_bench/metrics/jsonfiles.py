"""Reading the official JSON formats with one-line errors that name the file and the problem.
Shared by the caption and VQA metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlp_bench.errors import UserError

MAX_IDS_IN_MESSAGE = 5  # a message lists this many offending ids, then "..."


def load_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} file not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} path is not a file: {path}")
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)


def some_ids(ids: list[Any]) -> str:
    shown = ", ".join(str(i) for i in ids[:MAX_IDS_IN_MESSAGE])
    return shown + (", ..." if len(ids) > MAX_IDS_IN_MESSAGE else "")


def load_results(path: Path, what: str, id_key: str, text_key: str, unit: str) -> dict[int, str]:
    """A results file in the official form `[{id_key: int, text_key: str}, ...]`, one entry per id."""
    path = Path(path)
    data = load_json(path, what)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of {{\"{id_key}\": int, \"{text_key}\": str}} "
                        f"objects, got a JSON {json_type(data)}")
    if not data:
        raise UserError(f"{path}: no predictions (the list is empty)")
    results: dict[int, str] = {}
    first_entry: dict[int, int] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: entry {index} is a JSON {json_type(entry)}, not an object")
        if id_key not in entry or text_key not in entry:
            raise UserError(f"{path}: entry {index} needs both '{id_key}' and '{text_key}'")
        key, text = entry[id_key], entry[text_key]
        if not is_int(key):
            raise UserError(f"{path}: entry {index} has a '{id_key}' of type {json_type(key)}, not an integer")
        if not isinstance(text, str):
            raise UserError(f"{path}: entry {index} has a '{text_key}' of type {json_type(text)}, not a string")
        if key in results:
            raise UserError(f"{path}: {id_key} {key} has more than one {text_key} (entries {first_entry[key]} "
                            f"and {index}); give exactly one per {unit}")
        results[key] = text
        first_entry[key] = index
    return results
