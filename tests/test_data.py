"""Tests for recgen.data: the generic, MovieLens and RecBole loaders, k-core, ties and errors."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recgen import data
from recgen.config import DataConfig
from recgen.data import fetch_movielens_100k, load_catalog, load_data, load_dataset, save_catalog
from recgen.errors import ConfigError, DataError, DataWarning
from recgen.splits import leave_one_out

FIXTURES = Path(__file__).resolve().parent / "data"
GENERIC = FIXTURES / "generic"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
T0 = 978307200  # 2001-01-01T00:00:00Z, the start of the fixture's interactions


def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (see ../shared/data/README.md)")
    return path


def _fixture_rows() -> list[dict[str, object]]:
    lines = (GENERIC / "interactions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _write(folder: Path, items: str, interactions: str, ext: str = "csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"items.{ext}").write_text(items, encoding="utf-8")
    (folder / f"interactions.{ext}").write_text(interactions, encoding="utf-8")
    return folder


ITEMS_CSV = "item_id,title,genres,year,brand\n1,Heat (1995),Action|Crime,1995,\n2,Alien (1979),Horror,,Fox\n"


# --------------------------------------------------------------------------- generic format


def test_generic_fixture_loads_every_row_and_attribute() -> None:
    ds = load_dataset(GENERIC)
    rows = _fixture_rows()
    assert ds.name == "generic"
    assert ds.has_timestamps
    assert len(ds.catalog) == 50
    assert ds.report.n_interactions == len(rows) == sum(len(h) for h in ds.histories.values())
    assert set(ds.histories) == {str(r["user_id"]) for r in rows}
    assert ds.report.dropped == {}
    matrix = ds.catalog["4"]
    assert matrix.title == "Matrix, The (1999)"
    assert matrix.attributes["genres"] == ("Action", "Sci-Fi")
    assert matrix.attributes["year"] == 1999
    assert isinstance(matrix.attributes["description"], str)
    assert ds.catalog["3"].attributes["director"] == "Michael Mann"
    assert ds.catalog["26"].title.startswith("千と千尋の神隠し")
    assert ds.catalog["50"].attributes == {}
    assert ds.catalog.titles.count("Chasing Amy (1997)") == 2


def test_generic_histories_are_in_time_order_with_iso_and_unix_times() -> None:
    ds = load_dataset(GENERIC)
    for history in ds.histories.values():
        times = [e.timestamp for e in history.events]
        assert times == sorted(times)  # type: ignore[type-var]
    alice = {e.item_id: e for e in ds.histories["alice"].events}
    assert alice["4"].timestamp == T0 + 5 * 3600  # "2001-01-01T05:00:00Z"
    assert alice["38"].rating is None
    assert alice["7"].rating == 5.0
    assert ds.histories["erin"].events[0].timestamp == T0 + 1800  # "...T00:30:00+00:00"


def test_catalog_fixture_is_the_generic_items_and_round_trips(tmp_path: Path) -> None:
    catalog = load_catalog(FIXTURES / "catalog.jsonl")
    assert catalog.items == load_dataset(GENERIC).catalog.items
    again = load_catalog(save_catalog(catalog, tmp_path / "c.jsonl"))
    assert again.items == catalog.items
    assert again.fingerprint() == catalog.fingerprint()


def test_generic_csv_splits_labels_and_keeps_other_columns(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp,rating\nu1,2,2001-01-01T00:00:00,\nu1,1,978307201,4.5\n"
    ds = load_dataset(_write(tmp_path / "csv", ITEMS_CSV, inter))
    assert ds.catalog["1"].attributes == {"genres": ("Action", "Crime"), "year": 1995}
    assert ds.catalog["2"].attributes == {"genres": ("Horror",), "brand": "Fox"}
    events = ds.histories["u1"].events
    assert [e.item_id for e in events] == ["2", "1"]
    assert events[0].timestamp == T0  # naive ISO is read as UTC
    assert (events[0].rating, events[1].rating) == (None, 4.5)


def test_load_data_follows_the_config() -> None:
    config = DataConfig(source=str(GENERIC), kcore=2, seed=3)
    assert load_data(config) == load_dataset(GENERIC, kcore=2, seed=3)


# --------------------------------------------------------------------------- ties


def _tie_order(seed: int) -> tuple[str, ...]:
    """Carol's three events at the same second, in loaded order."""
    events = load_dataset(GENERIC, seed=seed).histories["carol"].events
    return tuple(e.item_id for e in events if e.timestamp == T0 + 3600)


def test_ties_are_broken_by_a_seeded_shuffle_not_by_item_id() -> None:
    assert _tie_order(0) == _tie_order(0)
    orders = {_tie_order(seed) for seed in range(12)}
    assert len(orders) > 1, "different seeds never changed the order of tied events"
    assert any(list(o) != sorted(o) and list(o) != sorted(o, key=int) for o in orders)
    assert all(sorted(o) == ["16", "17", "40"] for o in orders)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.sampled_from(["1", "2", "3"]), st.integers(0, 4)),
        min_size=1,
        max_size=25,
    ),
    st.integers(0, 5),
)
def test_histories_are_time_sorted_permutations_of_the_rows(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[str, str, int]], seed: int
) -> None:
    unique = list(dict.fromkeys(rows))
    inter = "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in unique)
    items = "item_id,title\n1,One\n2,Two\n3,Three\n"
    ds = load_dataset(_write(tmp_path_factory.mktemp("prop"), items, inter), seed=seed)
    for user, history in ds.histories.items():
        got = [(e.item_id, e.timestamp) for e in history.events]
        assert [t for _, t in got] == sorted(t for _, t in got)
        assert Counter(got) == Counter((i, float(t)) for u, i, t in unique if u == user)


# --------------------------------------------------------------------------- drops and k-core


def test_duplicate_interactions_are_dropped_with_a_warning(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp\nu1,1,5\nu1,1,5\nu1,2,6\nu1,1,7\n"
    with pytest.warns(DataWarning, match=r"1 duplicate.*interactions.csv:3 repeats"):
        ds = load_dataset(_write(tmp_path, ITEMS_CSV, inter))
    assert ds.report.dropped == {"duplicate_interactions": 1}
    assert ds.histories["u1"].item_ids == ("1", "2", "1")  # a re-watch later is kept


def test_kcore_drops_items_then_users_and_counts_them() -> None:
    full = load_dataset(GENERIC)
    ds = load_dataset(GENERIC, kcore=2)
    item_n = Counter(e.item_id for h in full.histories.values() for e in h.events)
    kept_items = {i for i, n in item_n.items() if n >= 2}
    for user, history in ds.histories.items():
        assert len(history) >= 2
        assert set(history.item_ids) <= kept_items
        assert history.item_ids == tuple(
            i for i in full.histories[user].item_ids if i in kept_items
        )
    dropped = ds.report.dropped
    assert dropped["kcore_items"] == sum(1 for n in item_n.values() if n < 2)
    assert ds.report.n_interactions + dropped["kcore_interactions"] == full.report.n_interactions
    assert len(ds.histories) + dropped["kcore_users"] == len(full.histories)
    assert set(ds.catalog.item_ids) == {i for h in ds.histories.values() for i in h.item_ids}


# --------------------------------------------------------------------------- bad input


BAD_INPUT = {
    "missing column": (
        "item_id,name\n1,Heat\n", "user_id,item_id,timestamp\nu1,1,5\n",
        r"items\.csv:1: missing column\(s\) title .*add them to the header",
    ),
    "unknown item": (
        ITEMS_CSV, "user_id,item_id,timestamp\nu1,1,5\nu1,999,6\n",
        r"interactions\.csv:3: item_id '999' is not in the catalog .*add the item",
    ),
    "duplicate item id": (
        "item_id,title\n1,Heat (1995)\n2,Alien\n1,Heat again\n", "user_id,item_id,timestamp\nu1,1,5\n",
        r"items\.csv:4: duplicate item_id '1' \(first at .*items\.csv:2\).*unique",
    ),
    "empty title": (
        "item_id,title\n1,Heat (1995)\n2,  \n", "user_id,item_id,timestamp\nu1,1,5\n",
        r"items\.csv:3: field 'title' is empty .*give every item a title",
    ),
    "bad timestamp": (
        ITEMS_CSV, "user_id,item_id,timestamp\nu1,1,5\nu1,2,yesterday\n",
        r"interactions\.csv:3: field 'timestamp' has value 'yesterday'.*ISO 8601",
    ),
    "missing timestamp": (
        ITEMS_CSV, "user_id,item_id,timestamp\nu1,1,\n",
        r"interactions\.csv:2: field 'timestamp' is missing or empty",
    ),
    "bad rating": (
        ITEMS_CSV, "user_id,item_id,timestamp,rating\nu1,1,5,4\nu1,2,6,five\n",
        r"interactions\.csv:3: field 'rating' has value 'five', which is not a number",
    ),
    "bad year": (
        "item_id,title,year\n1,Heat,nineteen\n", "user_id,item_id,timestamp\nu1,1,5\n",
        r"items\.csv:2: field 'year' has value 'nineteen'.*whole number",
    ),
    "too many fields": (
        "item_id,title\n1,Heat, The (1995)\n", "user_id,item_id,timestamp\nu1,1,5\n",
        r"items\.csv:2: more fields than the header has; quote",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_csv_input_names_file_line_field_value_and_fix(tmp_path: Path, case: str) -> None:
    items, inter, message = BAD_INPUT[case]
    with pytest.raises(DataError, match=message):
        load_dataset(_write(tmp_path, items, inter))


def test_bad_jsonl_input_names_the_line(tmp_path: Path) -> None:
    items = '{"item_id": "1", "title": "Heat"}\n{"item_id": "2"}\n'
    with pytest.raises(DataError, match=r"items\.jsonl:2: missing field 'title'"):
        load_dataset(_write(tmp_path / "a", items, "", "jsonl"))
    items = '{"item_id": "1", "title": "Heat"}\n\n{"item_id": "2", title: "x"}\n'
    with pytest.raises(DataError, match=r"items\.jsonl:3: not valid JSON"):
        load_dataset(_write(tmp_path / "b", items, "", "jsonl"))
    inter = '{"user_id": "u", "item_id": "1", "timestamp": 1, "rating": [4]}\n'
    with pytest.raises(DataError, match=r"interactions\.jsonl:1: field 'rating' has value \[4\]"):
        load_dataset(_write(tmp_path / "c", '{"item_id": "1", "title": "Heat"}\n', inter, "jsonl"))


def test_wrong_encoding_names_the_line_and_how_to_convert(tmp_path: Path) -> None:
    folder = _write(tmp_path, ITEMS_CSV, "user_id,item_id,timestamp\nu1,1,5\n")
    (folder / "items.csv").write_bytes(
        "item_id,title\n1,Heat\n2,Misérables, Les\n".encode("latin-1")
    )
    with pytest.raises(
        DataError, match=r"items\.csv:3: byte 0xe9 is not valid UTF-8.*iconv -f latin1"
    ):
        load_dataset(folder)


def test_bad_sources_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot tell the format .*notes\.txt"):
        load_dataset(tmp_path)
    with pytest.raises(ConfigError, match="unknown data format 'parquet'"):
        load_dataset(GENERIC, format="parquet")
    with pytest.raises(ConfigError, match="kcore must be >= 0"):
        load_dataset(GENERIC, kcore=-1)


# --------------------------------------------------------------------------- RecBole, tiny fixtures


def test_recbole_plain_builds_movielens_titles(tmp_path: Path) -> None:
    (tmp_path / "tiny.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tunkonwn\tunkonwn\tunknown\n"
        "3\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation\n",
        encoding="utf-8",
    )
    (tmp_path / "tiny.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t4\t10\n1\t3\t2\t5\n",
        encoding="utf-8",
    )
    ds = load_dataset(tmp_path)
    assert ds.catalog.titles == (
        "Toy Story (1995)",
        "unknown",
        "Land Before Time III: The Time of the Great Giving (1995) (V)",
    )
    assert ds.catalog["1"].attributes == {
        "genres": ("Animation", "Children's", "Comedy"),
        "year": 1995,
    }
    assert ds.catalog["3"].attributes["year"] == 1995
    assert ds.histories["1"].item_ids == ("3", "1")
    assert any("unkonwn" in note for note in ds.report.notes)


def test_recbole_typed_header_is_required(tmp_path: Path) -> None:
    (tmp_path / "x.inter").write_text("user_id\titem_id\n1\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.inter:1: header field 'user_id' is not name:type"):
        load_dataset(tmp_path)


def test_recbole_sequences_are_rebuilt_from_the_longest_row(tmp_path: Path) -> None:
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (tmp_path / "S.train.inter").write_text(
        head + "0\t0\t1\n0\t0 1\t2\n1\t2\t0\n", encoding="utf-8"
    )
    (tmp_path / "S.valid.inter").write_text(head + "0\t0 1 2\t3\n1\t2 0\t1\n", encoding="utf-8")
    (tmp_path / "S.test.inter").write_text(head + "0\t0 1 2 3\t1\n1\t2 0 1\t3\n", encoding="utf-8")
    (tmp_path / "S.item2index").write_text("A\t0\nB\t1\nC\t2\nD\t3\n", encoding="utf-8")
    (tmp_path / "S.user2index").write_text("ann\t0\nbo\t1\n", encoding="utf-8")
    (tmp_path / "S.text").write_text(
        "item_id:token\ttext:token_seq\n"
        "A\tGlue No. 5. Shop Tapes Glue. Acme. \nB\tTape. Shop Tapes. Acme Co. Ltd. \n"
        "C\tBroom. . Sweepco. \nD\tScrews, 100 pack. Shop Fasteners. . \n",
        encoding="utf-8",
    )
    ds = load_dataset(tmp_path)
    assert not ds.has_timestamps
    assert ds.histories["ann"].item_ids == ("A", "B", "C", "D", "B")
    assert ds.histories["bo"].item_ids == ("C", "A", "B", "D")
    assert [e.timestamp for e in ds.histories["bo"].events] == [0.0, 1.0, 2.0, 3.0]
    a, b, c, d = (ds.catalog[i] for i in "ABCD")
    assert (a.title, a.attributes) == (
        "Glue No. 5",
        {"categories": ("Tapes", "Glue"), "brand": "Acme"},
    )
    assert (b.title, b.attributes["brand"]) == ("Tape", "Acme Co. Ltd")
    assert (c.title, c.attributes) == ("Broom", {"brand": "Sweepco"})
    assert (d.title, d.attributes) == ("Screws, 100 pack", {"categories": ("Fasteners",)})


# --------------------------------------------------------------------------- fetching ml-100k


def _fake_pip(files: dict[str, str]):
    """A stand-in for ``subprocess.run(pip download ...)`` that writes a tiny recbole wheel."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **_: object):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "recbole-1.2.1-py3-none-any.whl", "w") as zf:
            for name, text in files.items():
                zf.writestr(f"recbole/dataset_example/ml-100k/{name}", text)

        class Done:
            returncode, stderr = 0, ""

        return Done()

    return run, calls


def test_fetch_extracts_once_and_writes_the_marker_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECGEN_CACHE", str(tmp_path))
    files = {
        "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\t5\t9\n",
        "ml-100k.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\n1\tHeat\t1995\n",
        "ml-100k.user": "user_id:token\n7\n",
    }
    run, calls = _fake_pip(files)
    monkeypatch.setattr(data.subprocess, "run", run)
    folder = fetch_movielens_100k()
    assert folder == tmp_path / "data" / "ml-100k"
    assert (folder / ".complete").is_file()
    assert (folder / "ml-100k.item").read_text(encoding="utf-8") == files["ml-100k.item"]
    assert "recbole==1.2.1" in calls[0]
    assert "--only-binary=:all:" in calls[0]
    fetch_movielens_100k()
    assert len(calls) == 1, "a completed fetch must be cached"
    ds = load_dataset("ml-100k")
    assert (ds.name, ds.catalog.titles, ds.histories["7"].item_ids) == (
        "ml-100k",
        ("Heat (1995)",),
        ("1",),
    )
    (folder / ".complete").unlink()  # as after a killed fetch: it is redone
    fetch_movielens_100k()
    assert len(calls) == 2


def test_fetch_failure_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECGEN_CACHE", str(tmp_path))

    class Failed:
        returncode, stderr = 1, "ERROR: no network"

    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(
        DataError, match=r"could not download recbole==1.2.1.*no network.*grouplens"
    ):
        fetch_movielens_100k()
    assert not (tmp_path / "data" / "ml-100k" / ".complete").exists()


# --------------------------------------------------------------------------- real data


def test_movielens_raw_folder() -> None:
    ds = load_dataset(_shared("ml-100k"))
    assert (len(ds.histories), len(ds.catalog), ds.report.n_interactions) == (943, 1682, 100_000)
    assert ds.catalog["1"].title == "Toy Story (1995)"
    assert ds.catalog["1"].attributes == {
        "genres": ("Animation", "Children's", "Comedy"),
        "year": 1995,
    }
    assert ds.catalog["1128"].title == "Heidi Fleiss: Hollywood Madam (1995)"  # trailing space cut
    assert all(len(h) >= 20 for h in ds.histories.values())


def test_kcore_5_on_movielens_matches_llamarec() -> None:
    ds = load_dataset(_shared("ml-100k"), kcore=5)
    assert (len(ds.histories), len(ds.catalog), ds.report.n_interactions) == (943, 1349, 99_287)
    assert (ds.report.n_users, ds.report.n_items) == (943, 1349)
    assert ds.report.dropped["kcore_interactions"] == 100_000 - 99_287


@pytest.mark.slow
def test_recbole_fetch_and_raw_folder_agree() -> None:
    """The fetched RecBole files give the raw folder's catalog and interactions.

    RecBole's copy differs from GroupLens' in exactly one rating (user 94, item 1224: 3 vs 4).
    """
    raw = load_dataset(_shared("ml-100k"))
    fetched = load_dataset("ml-100k")
    assert fetched.catalog == raw.catalog
    assert fetched.histories.keys() == raw.histories.keys()
    changed = set()
    for user, history in raw.histories.items():
        other = fetched.histories[user].events
        assert [(e.item_id, e.timestamp) for e in other] == [
            (e.item_id, e.timestamp) for e in history.events
        ]
        changed |= {(user, a.item_id) for a, b in zip(history.events, other, strict=True) if a != b}
    assert changed == {("94", "1224")}


def test_amazon_sequences_reproduce_the_given_leave_one_out() -> None:
    folder = _shared("amazon-scientific")
    ds = load_dataset(folder)
    assert not ds.has_timestamps
    assert (len(ds.histories), len(ds.catalog), ds.report.n_interactions) == (2928, 1585, 19_712)
    items = dict(_pairs(folder / "Scientific.item2index"))
    users = dict(_pairs(folder / "Scientific.user2index"))
    split = leave_one_out(ds)
    for name, examples in (("valid", split.valid), ("test", split.test)):
        given = {
            users[u]: ([items[i] for i in seq.split()], items[target])
            for u, seq, target in _inter_rows(folder / f"Scientific.{name}.inter")
        }
        got = {ex.user_id: (list(ex.history.item_ids), ex.target) for ex in examples}
        assert got == given
    for u, seq, target in _inter_rows(folder / "Scientific.train.inter"):
        full = ds.histories[users[u]].item_ids
        prefix = [items[i] for i in seq.split()] + [items[target]]
        assert list(full[: len(prefix)]) == prefix


def test_amazon_text_is_split_into_title_categories_and_brand() -> None:
    ds = load_dataset(_shared("amazon-scientific"))
    glue = ds.catalog["B0000223UV"]
    assert (
        glue.title
        == "Gorilla Original Gorilla Glue, Waterproof Polyurethane Glue, 8 ounce Bottle, Brown"
    )
    assert glue.attributes == {
        "categories": ("Tapes, Adhesives & Sealants", "Urethane Adhesives"),
        "brand": "Gorilla",
    }
    assert sum("brand" in it.attributes for it in ds.catalog) >= 1580
    assert sum("categories" in it.attributes for it in ds.catalog) >= 1530
    for item in ds.catalog:
        assert ". Industrial & Scientific" not in item.title, item  # no category path left in
        assert not item.title.endswith(".")


def _pairs(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")[::-1]) for line in path.read_text(encoding="utf-8").splitlines()]  # type: ignore[misc]


def _inter_rows(path: Path) -> list[tuple[str, str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines if line.strip()]  # type: ignore[misc]


def test_iso_and_unix_times_agree(tmp_path: Path) -> None:
    moment = datetime(1998, 3, 4, 5, 6, 7, tzinfo=UTC)
    inter = f"user_id,item_id,timestamp\nu,1,{moment.isoformat()}\nu,2,{int(moment.timestamp())}\n"
    ds = load_dataset(_write(tmp_path, ITEMS_CSV, inter))
    times = {e.timestamp for e in ds.histories["u"].events}
    assert times == {moment.timestamp()}
