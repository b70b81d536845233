"""Reading a batch of items for `cardq submit`: JSONL, a JSON array, or CSV with a header.

Every item must be a JSON object (CSV rows become objects of strings; empty cells are left out). The first bad
line stops the parse with an InputError naming the source, the line and what is expected, so nothing of a bad
batch is ever submitted.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from cardq import jsonshape
from cardq.errors import InputError
from cardq.store.submit import NewJob
from cardq.vocabulary import FORMATS

Item = NewJob  # what a parsed item is: exactly what the store inserts (payload JSON, idempotency key, where)


def read_text(file: str, name: str) -> str:
    """A file's (or, for "-", stdin's) text; InputError naming it when missing, unreadable or not UTF-8."""
    try:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 text (byte {e.start}); expected JSONL, JSON or CSV in UTF-8") from None


def detect_format(name: str, text: str) -> str:
    """By extension, else by the first non-blank character: '[' JSON array, '{' JSONL, anything else CSV."""
    lower = name.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv")):
        if lower.endswith(ext):
            return fmt
    head = text.lstrip()[:1]
    return {"[": "json", "{": "jsonl"}.get(head, "csv")


def parse_items(text: str, name: str, fmt: str = "auto", key_field: str | None = None) -> list[Item]:
    """Parse a whole file's text into items; raises InputError at the first bad line."""
    if fmt not in FORMATS:
        raise InputError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}", where="format")
    if fmt == "auto":
        fmt = detect_format(name, text)
    items = make_items({"jsonl": _jsonl, "json": _json_array, "csv": _csv}[fmt](text, name), key_field)
    if not items:
        raise InputError(f"{name}: no items; expected at least one {_WHAT[fmt]}")
    return items


def items_from_objects(objects: Iterable[Any], key_field: str | None = None) -> list[Item]:
    """Items handed to the Python API: each must be a JSON object (a dict); named "item N" (0-based, as the
    caller indexes its list) in every message."""
    def named() -> Iterator[tuple[str, dict]]:
        for i, obj in enumerate(objects):
            if not isinstance(obj, dict):
                raise InputError(f"item {i}: a {type(obj).__name__}; expected a JSON object (a dict)",
                                 where=f"item {i}", index=i, reason="expected a JSON object (a dict)")
            yield f"item {i}", obj

    items = make_items(named(), key_field)
    if not items:
        raise InputError("empty batch: expected at least one item", reason="expected at least one item")
    return items


def make_items(objects: Iterable[tuple[str, dict]], key_field: str | None) -> list[Item]:
    """(where, object) pairs -> Items: the object as compact JSON, and its idempotency key if key_field is set."""
    items = []
    for index, (where, obj) in enumerate(objects):
        key = None
        if key_field is not None:
            if key_field not in obj or obj[key_field] in (None, ""):
                reason = f"no {key_field!r} field, which the idempotency key field names"
                raise InputError(f"{where}: {reason}", where=where, index=index, reason=reason)
            value = obj[key_field]
            if isinstance(value, bool) or not isinstance(value, str | int):
                reason = f"{key_field!r} is {type(value).__name__}; expected a string or number"
                raise InputError(f"{where}: {reason}", where=where, index=index, reason=reason)
            key = str(value)
        try:
            payload = jsonshape.encode(obj)
        except ValueError as e:
            reason = str(e)
            raise InputError(f"{where}: {reason}; expected JSON values nested at most {jsonshape.MAX_DEPTH} levels",
                             where=where, index=index, reason=reason) from None
        items.append(Item(payload, key, where))
    return items


_WHAT = {"jsonl": "JSON object per line", "json": "object in the JSON array", "csv": "row under the CSV header"}


def _jsonl(text: str, name: str) -> Iterator[tuple[str, dict]]:
    for lineno, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({_reason(e)}); expected one JSON object per line") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: a JSON {_kind(obj)}; expected one JSON object per line")
        yield where, obj


def _json_array(text: str, name: str) -> Iterator[tuple[str, dict]]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{name} line {e.lineno}: invalid JSON ({_reason(e)}); expected a JSON array of "
                         "objects") from None
    if not isinstance(data, list):
        raise InputError(f"{name}: a JSON {_kind(data)}; expected a JSON array of objects (or JSONL)")
    for n, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise InputError(f"{name} item {n}: a JSON {_kind(obj)}; expected a JSON object")
        yield f"{name} item {n}", obj


def _csv(text: str, name: str) -> Iterator[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise InputError(f"{name} line 1: no CSV header; expected column names such as title,category")
        header = [h.strip() for h in header]
        dupes = sorted({h for h in header if header.count(h) > 1 and h})
        if dupes or "" in header:
            problem = f"duplicate column {dupes[0]!r}" if dupes else "an empty column name"
            raise InputError(f"{name} line 1: CSV header has {problem}; expected unique column names")
        lineno = reader.line_num + 1  # a record spanning lines (a quoted newline) is named by its first line
        for row in reader:
            start, lineno = lineno, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise InputError(
                    f"{name} line {start}: {len(row)} fields; expected {len(header)} as in the header")
            yield f"{name} line {start}", {h: v for h, v in zip(header, row, strict=True) if v != ""}
    except csv.Error as e:
        raise InputError(f"{name} line {reader.line_num}: invalid CSV ({e})") from None


def _reason(e: orjson.JSONDecodeError) -> str:
    return f"{e.msg} at column {e.colno}"


def _kind(obj: object) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(obj), "null")
