"""Streaming readers: each yields one story (str) at a time, so memory stays bounded.

Readers register under a string key (`fmt`); `auto` picks one by file extension. A user's mistake
(undecodable bytes, a missing field or column, an empty file) raises `UserError` naming the file
and the line or field.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxlm.errors import UserError

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class ReadOptions:
    """How to read one input."""

    field: str = "text"  # JSON Lines field / Parquet or CSV column / HF or TFDS feature
    split: str = "train"  # HF `datasets` / TFDS split
    txt_separator: str = "auto"  # text files: "eot" (<|endoftext|>), "blank" (blank lines), "auto"


Reader = Callable[[str, ReadOptions], Iterator[str]]
READERS: dict[str, Reader] = {}
_EXTENSIONS: dict[str, str] = {}


def register(fmt: str, *extensions: str) -> Callable[[Reader], Reader]:
    """Registers a reader under `fmt`, and for `auto`, under file extensions."""

    def wrap(fn: Reader) -> Reader:
        READERS[fmt] = fn
        for ext in extensions:
            _EXTENSIONS[ext] = fmt
        return fn

    return wrap


def resolve_format(path: str, fmt: str = "auto") -> str:
    """The registered format for `path`: `fmt` itself, or by extension when `fmt` is `auto`."""
    if fmt != "auto":
        if fmt not in READERS:
            raise UserError(f"unknown format {fmt!r} for {path}; choose one of {formats()}")
        return fmt
    name = path.lower().removesuffix(".gz")
    for ext, found in sorted(_EXTENSIONS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(ext):
            return found
    raise UserError(
        f"cannot tell the format of {path} from its extension; pass --format ({formats()})"
    )


def formats() -> list[str]:
    """All known formats, `auto` first."""
    return ["auto", *sorted(READERS)]


def read(path: str, fmt: str = "auto", options: ReadOptions | None = None) -> Iterator[str]:
    """Streams the stories of one input; raises `UserError` if it holds no records at all."""
    fmt = resolve_format(path, fmt)
    if fmt not in ("hf", "tfds") and not Path(path).is_file():
        raise UserError(f"input file not found: {path}")
    n = 0
    for n, story in enumerate(READERS[fmt](path, options or ReadOptions()), 1):  # noqa: B007
        yield story
    if n == 0:
        raise UserError(f"{path}: empty input (no records found)")


def inputs_identity(inputs: Sequence[str], fmt: str = "auto") -> list[dict]:
    """What identifies the inputs of an output made from them (a tokenizer, a DATADIR): each
    file's fingerprint (path, size, modification time) and format, or a dataset's name; a
    missing file is one line now, before any work."""
    from jaxlm.outputs import file_fingerprint

    out = []
    for path in inputs:
        f = resolve_format(path, fmt)
        if f in ("hf", "tfds"):
            out.append({"dataset": path, "format": f})
            continue
        if not Path(path).is_file():
            raise UserError(f"input file not found: {path}")
        out.append(file_fingerprint(path) | {"format": f})
    return out


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) with a one-line error on undecodable bytes; a leading byte
    order mark (Windows editors write one) is dropped, not read as text."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: undecodable bytes at column {e.start + 1} (not UTF-8)"
                ) from None


def json_lines(path: str | Path) -> Iterator[tuple[str, object]]:
    """("path:line", parsed value) for each non-blank line of a JSON Lines file, through
    `text_lines`; a line that is not JSON is a one-line error naming it."""
    for lineno, line in text_lines(path):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None


def _sniff_eot(path: str, limit: int = 1 << 20) -> bool:
    with open(path, "rb") as f:
        return EOT.encode() in f.read(limit)


@register("txt", ".txt", ".text")
def read_text(path: str, options: ReadOptions) -> Iterator[str]:
    """Plain text: stories separated by `<|endoftext|>` lines, or else by blank lines."""
    sep = options.txt_separator
    if sep == "auto":
        sep = "eot" if _sniff_eot(path) else "blank"
    if sep not in ("eot", "blank"):
        raise UserError(f"unknown text separator {sep!r}: choose auto, eot or blank")
    buf: list[str] = []
    for _, line in text_lines(path):
        if sep == "eot" and EOT in line:
            head, *rest = line.split(EOT)
            buf.append(head)
            for part in rest:
                yield "".join(buf)
                buf = [part]
        elif sep == "blank" and not line.strip():
            if buf:
                yield "".join(buf)
            buf = []
        else:
            buf.append(line)
    if "".join(buf).strip():
        yield "".join(buf)


@register("jsonl", ".jsonl", ".json", ".ndjson")
def read_jsonl(path: str, options: ReadOptions) -> Iterator[str]:
    """JSON Lines: the story is the `options.field` string of each object."""
    for where, obj in json_lines(path):
        if not isinstance(obj, dict) or options.field not in obj:
            raise UserError(f"{where}: missing field {options.field!r} (use --field)")
        value = obj[options.field]
        if not isinstance(value, str):
            raise UserError(f"{where}: field {options.field!r} is not a string")
        yield value


@register("csv", ".csv", ".tsv")
def read_csv(path: str, options: ReadOptions) -> Iterator[str]:
    """CSV with a header row (e.g. AraStories `,Prompt,Story`): the `options.field` column."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # stories are long and multi-line
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    # decoded a line at a time (text_lines), so an undecodable byte's error names its line
    rows = csv.reader((line for _, line in text_lines(path)), delimiter=delimiter)
    try:
        header = next(rows, None)
        if header is None:
            return
        if options.field not in header:
            raise UserError(
                f"{path}: missing column {options.field!r} (have {header}; use --field)"
            )
        col = header.index(options.field)
        for row in rows:
            if not row:
                continue
            if col >= len(row):
                raise UserError(f"{path}:{rows.line_num}: row has no {options.field!r} value")
            yield row[col]
    except csv.Error as e:
        raise UserError(f"{path}:{rows.line_num}: bad CSV ({e})") from None


@register("parquet", ".parquet", ".pq")
def read_parquet(path: str, options: ReadOptions) -> Iterator[str]:
    """Parquet: the `options.field` column, read one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    if options.field not in pf.schema_arrow.names:
        raise UserError(
            f"{path}: missing column {options.field!r} (have {pf.schema_arrow.names}; use --field)"
        )
    kind = pf.schema_arrow.field(options.field).type
    if kind not in (pa.string(), pa.large_string()):
        raise UserError(f"{path}: column {options.field!r} is {kind}, not text (use --field)")
    for batch in pf.iter_batches(batch_size=4096, columns=[options.field]):
        for value in batch.column(0).to_pylist():
            yield "" if value is None else value


def _optional(module: str, extra: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{what} needs the optional package {module!r}: pip install 'jaxlm[{extra}]'"
        ) from None


@register("hf")
def read_hf(name: str, options: ReadOptions) -> Iterator[str]:
    """A Hugging Face `datasets` name (streamed; needs the network and `datasets`)."""
    datasets = _optional("datasets", "hf", f"--format hf ({name})")
    ds = datasets.load_dataset(name, split=options.split, streaming=True)
    for i, ex in enumerate(ds):
        if options.field not in ex:
            raise UserError(f"{name}[{options.split}] record {i}: missing field {options.field!r}")
        if not isinstance(ex[options.field], str):
            raise UserError(f"{name}[{options.split}] record {i}: {options.field!r} is not text")
        yield ex[options.field]


@register("tfds")
def read_tfds(name: str, options: ReadOptions) -> Iterator[str]:
    """A TFDS dataset through `tfds.data_source` (random-access ArrayRecord, no TF graph)."""
    tfds = _optional("tensorflow_datasets", "tfds", f"--format tfds ({name})")
    source = tfds.data_source(name, split=options.split)
    for i in range(len(source)):
        ex = source[i]
        if options.field not in ex:
            raise UserError(f"{name}[{options.split}] record {i}: missing field {options.field!r}")
        value = ex[options.field]
        yield value.decode("utf-8") if isinstance(value, bytes) else str(value)
