"""Tests for recgen.grounding: encoders, the catalog index (save/load, ANN) and ground()."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recgen.config import GroundingConfig
from recgen.errors import IndexMismatchError
from recgen.grounding import (
    REASON_DUPLICATE,
    REASON_EXPLANATION,
    REASON_HISTORY,
    REASON_NO_MATCH,
    CatalogIndex,
    Encoder,
    HashEncoder,
    ground,
    ground_batch,
    named_labels,
    normalize_title,
)
from recgen.types import Candidate, Catalog, Item, Parsed

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TITLES = [
    "Heat (1995)", "Heat (1986)", "Alien (1979)", "Aliens (1986)", "Matrix, The (1999)",
    "Matrix Reloaded, The (2003)", "Godfather, The (1972)", "Godfather: Part II, The (1974)",
    "Amélie (2001)", "Big Lebowski, The (1998)", "Casablanca (1942)", "Fargo (1996)",
    "Toy Story (1995)", "Toy Story 2 (1999)", "Seven (Se7en) (1995)", "Ran (1985)",
    "Appartement, L' (1996)", "Star Wars (1977)", "Brazil (1985)", "Clerks (1994)",
]  # fmt: skip


def _catalog(titles: Sequence[str] = TITLES, name: str = "tiny") -> Catalog:
    items = tuple(Item(item_id=f"i{k}", title=t) for k, t in enumerate(titles))
    return Catalog(items=items, name=name)


def _ids(titles: Sequence[str]) -> set[str]:
    return {f"i{TITLES.index(t)}" for t in titles}


def _parsed(*titles: str) -> Parsed:
    return Parsed(
        candidates=tuple(
            Candidate(title=t, explanation=f"why {k}", rank=k + 1) for k, t in enumerate(titles)
        )
    )


class CountingEncoder:
    """Wraps an encoder and counts its encode calls (a fake, not a mock)."""

    def __init__(self, inner: Encoder) -> None:
        self.inner, self.name, self.dim, self.calls = inner, inner.name, inner.dim, 0

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls += 1
        return self.inner.encode(texts)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


@pytest.fixture
def config() -> GroundingConfig:
    return GroundingConfig(encoder="hash", min_similarity=0.6)


@pytest.fixture
def index(config: GroundingConfig) -> CatalogIndex:
    return CatalogIndex.build(_catalog(), HashEncoder(), config, show_progress=False)


# --------------------------------------------------------------------------- encoder contract


class EncoderContract:
    """Every Encoder must pass these; subclasses provide the ``encoder`` fixture."""

    @pytest.fixture
    def encoder(self) -> Encoder:
        raise NotImplementedError

    def test_is_an_encoder(self, encoder: Encoder) -> None:
        assert isinstance(encoder, Encoder)
        assert encoder.name
        assert encoder.dim > 0

    def test_shape_dtype_and_unit_rows(self, encoder: Encoder) -> None:
        out = encoder.encode(["Heat (1995)", "Toy Story (1995)", "x", ""])
        assert out.shape == (4, encoder.dim)
        assert out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)

    def test_empty_input(self, encoder: Encoder) -> None:
        assert encoder.encode([]).shape == (0, encoder.dim)

    def test_deterministic_and_batch_independent(self, encoder: Encoder) -> None:
        texts = ["Heat (1995)", "Fargo (1996)", "The Matrix (1999)"]
        batch = encoder.encode(texts)
        np.testing.assert_allclose(batch, encoder.encode(texts), atol=1e-6)
        np.testing.assert_allclose(batch[1], encoder.encode([texts[1]])[0], atol=1e-4)

    def test_near_identical_titles_are_nearest(self, encoder: Encoder) -> None:
        a, b, c = encoder.encode(["Toy Story (1995)", "Toy Story 1995", "Casablanca (1942)"])
        assert float(a @ b) > float(a @ c) + 0.1


class TestHashEncoder(EncoderContract):
    @pytest.fixture
    def encoder(self) -> Encoder:
        return HashEncoder()

    def test_dim_is_part_of_the_name(self) -> None:
        assert HashEncoder(dim=32).name != HashEncoder(dim=64).name


@pytest.fixture(scope="session")
def sentence_encoder() -> Encoder:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from recgen.grounding import SentenceEncoder

    return SentenceEncoder("embedded")


@pytest.mark.model
class TestSentenceEncoder(EncoderContract):
    @pytest.fixture
    def encoder(self, sentence_encoder: Encoder) -> Encoder:
        return sentence_encoder


def test_import_stays_light() -> None:
    code = (
        "import sys, recgen.grounding; "
        "print([m for m in ('torch', 'faiss', 'sentence_transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Matrix, The (1999)", "The Matrix (1999)"),
        ("The Matrix (1999)", "the matrix 1999"),
        ("Star Wars (1977)", "Star Wars 1977"),
        ("Amélie (2001)", "AMELIE (2001)"),
        ("Appartement, L' (1996)", "L'Appartement (1996)"),
        ("Toy  Story (1995)", "Toy Story (1995)."),
        ("ﬁght club (1999)", "Fight Club (1999)"),  # NFKC folds the ligature
    ],
)
def test_normalize_title_equates(a: str, b: str) -> None:
    assert normalize_title(a) == normalize_title(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Heat (1995)", "Heat (1986)"),
        ("Toy Story (1995)", "Toy Story 2 (1999)"),
        ("Alien", "Aliens"),
    ],
)
def test_normalize_title_distinguishes(a: str, b: str) -> None:
    assert normalize_title(a) != normalize_title(b)


# --------------------------------------------------------------------------- ground()


class ConfusedEncoder(HashEncoder):
    """Embeds "The Matrix (1999)" exactly like "Fargo (1996)"."""

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        swap = {"The Matrix (1999)": "Fargo (1996)"}
        return super().encode([swap.get(t, t) for t in texts])


def test_exact_match_beats_a_closer_embedding(config: GroundingConfig) -> None:
    index = CatalogIndex.build(_catalog(), ConfusedEncoder(), config, show_progress=False)
    _sims, pos = index.search(["The Matrix (1999)"], 1)  # by embedding alone: Fargo, at 1.0
    assert index.catalog.items[int(pos[0, 0])].title == "Fargo (1996)"
    g = ground(_parsed("The Matrix (1999)"), index=index, config=config)
    assert [(x.title, x.similarity, x.match) for x in g.grounded] == [
        ("Matrix, The (1999)", 1.0, "exact")
    ]


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("The Godfather", "Godfather, The (1972)"),  # unique without the year
        ("Big Lebowski (1998)", "Big Lebowski, The (1998)"),  # article dropped
        ("Seven (1995)", "Seven (Se7en) (1995)"),  # a.k.a. dropped
        ("L'Appartement", "Appartement, L' (1996)"),
        ("Star Wars 1977", "Star Wars (1977)"),
    ],
)
def test_loose_exact_matches(
    index: CatalogIndex, config: GroundingConfig, generated: str, expected: str
) -> None:
    g = ground(_parsed(generated), index=index, config=config)
    assert [(x.title, x.match) for x in g.grounded] == [(expected, "exact")]


def test_ambiguous_title_without_year_is_not_an_exact_match(index: CatalogIndex) -> None:
    assert index.match_exact("Heat") == ()
    assert len(index.match_exact("Heat (1986)")) == 1


def test_history_item_proposed_exactly_is_rejected(
    index: CatalogIndex, config: GroundingConfig
) -> None:
    g = ground(
        _parsed("Heat (1995)", "Fargo (1996)"),
        index=index,
        exclude=_ids(["Heat (1995)"]),
        config=config,
    )
    assert [x.title for x in g.grounded] == ["Fargo (1996)"]
    assert [(r.text, r.reason, r.stage) for r in g.rejected] == [
        ("Heat (1995)", REASON_HISTORY, "ground")
    ]


def test_semantic_match_skips_history_for_the_nearest_unseen_item(
    index: CatalogIndex,
) -> None:
    config = GroundingConfig(encoder="hash", min_similarity=0.0)
    title = "Toy Story (1996)"  # a typo: nearest is Toy Story (1995), which the user has seen
    sims, pos = index.search([title], len(index))
    seen = {index.catalog.items[int(pos[0, 0])].item_id}
    expected = index.catalog.items[int(pos[0, 1])]
    g = ground(_parsed(title), index=index, exclude=seen, config=config)
    assert [(x.item_id, x.match) for x in g.grounded] == [(expected.item_id, "semantic")]
    assert g.grounded[0].similarity == pytest.approx(float(sims[0, 1]), abs=1e-6)
    assert not g.rejected


def test_duplicates_keep_the_first(index: CatalogIndex, config: GroundingConfig) -> None:
    g = ground(
        _parsed("Matrix, The (1999)", "Fargo (1996)", "The Matrix (1999)"),
        index=index,
        config=config,
    )
    assert [x.title for x in g.grounded] == ["Matrix, The (1999)", "Fargo (1996)"]
    assert g.grounded[0].candidate.rank == 1
    assert [r.text for r in g.rejected] == ["The Matrix (1999)"]
    assert g.rejected[0].reason.startswith(REASON_DUPLICATE)


def test_threshold_rejects_far_titles(index: CatalogIndex, config: GroundingConfig) -> None:
    made_up = "Totally Made Up Film (2031)"
    g = ground(_parsed(made_up), index=index, config=config)
    assert not g.grounded
    assert g.rejected[0].reason.startswith(f"{REASON_NO_MATCH} 0.6")
    lenient = config.model_copy(update={"min_similarity": -1.0})
    assert len(ground(_parsed(made_up), index=index, config=lenient).grounded) == 1


def test_neighbours_are_above_threshold_and_sorted(index: CatalogIndex) -> None:
    config = GroundingConfig(encoder="hash", min_similarity=0.3, neighbours=3)
    g = ground(_parsed("Toy Story (1997)"), index=index, config=config)
    sims = [x.similarity for x in g.grounded]
    assert 1 <= len(sims) <= 3
    assert sims == sorted(sims, reverse=True)
    assert min(sims) >= 0.3
    assert g.grounded[0].title == "Toy Story (1995)"


def test_batch_equals_single_calls_and_encodes_once(config: GroundingConfig) -> None:
    encoder = CountingEncoder(HashEncoder())
    index = CatalogIndex.build(_catalog(), encoder, config, show_progress=False)
    parses = [_parsed("Heat (1995)", "Alein (1979)"), _parsed("Toy Story (1996)"), _parsed()]
    excludes = [_ids(["Alien (1979)"]), set[str](), _ids(["Fargo (1996)"])]
    encoder.calls = 0
    batch = ground_batch(parses, index=index, excludes=excludes, config=config)
    assert encoder.calls == 1
    singles = [
        ground(p, index=index, exclude=e, config=config)
        for p, e in zip(parses, excludes, strict=True)
    ]
    assert batch == singles


_title = st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.sampled_from(TITLES)


@settings(max_examples=60, deadline=None)
@given(titles=st.lists(_title, max_size=8), seen=st.sets(st.sampled_from(TITLES), max_size=5))
def test_grounding_invariants(titles: list[str], seen: set[str]) -> None:
    config = GroundingConfig(encoder="hash", min_similarity=0.3, neighbours=2)
    index = CatalogIndex.build(_catalog(), HashEncoder(), config, show_progress=False)
    g = ground(_parsed(*titles), index=index, exclude=_ids(sorted(seen)), config=config)
    ids = [x.item_id for x in g.grounded]
    assert len(ids) == len(set(ids))
    assert all(i in index.catalog and i not in _ids(sorted(seen)) for i in ids)
    assert all(index.catalog[x.item_id].title == x.title for x in g.grounded)
    grounded_cands = {x.candidate.rank for x in g.grounded}
    assert len(grounded_cands) + len(g.rejected) == len(titles)  # each is grounded or rejected


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_without_reencoding(
    tmp_path: Path, index: CatalogIndex, config: GroundingConfig
) -> None:
    index.save(tmp_path / "idx")
    encoder = CountingEncoder(HashEncoder())
    loaded = CatalogIndex.load(tmp_path / "idx", catalog=_catalog(), encoder=encoder)
    assert encoder.calls == 0
    queries = ["Toy Story (1996)", "Alein", "Godfather 2"]
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.config == index.config
    parsed = _parsed("The Matrix (1999)", "Toy Story (1996)")
    assert ground(parsed, index=loaded, config=config) == ground(parsed, index=index, config=config)


def test_load_refuses_another_catalog(tmp_path: Path, index: CatalogIndex) -> None:
    index.save(tmp_path / "idx")
    other = _catalog([*TITLES[:-1], "Clerks II (2006)"], name="other")
    with pytest.raises(
        IndexMismatchError, match=r"catalog 'tiny'.*not for catalog 'other'.*rebuild"
    ):
        CatalogIndex.load(tmp_path / "idx", catalog=other, encoder=HashEncoder())


def test_load_refuses_another_encoder(tmp_path: Path, index: CatalogIndex) -> None:
    index.save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match=r"encoder 'hash-3gram-64'.*rebuild"):
        CatalogIndex.load(tmp_path / "idx", catalog=_catalog(), encoder=HashEncoder(dim=32))


def test_load_of_a_missing_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no saved CatalogIndex"):
        CatalogIndex.load(tmp_path / "nope", catalog=_catalog(), encoder=HashEncoder())


def test_failed_save_keeps_the_previous_index(
    tmp_path: Path, index: CatalogIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    index.save(tmp_path / "idx")
    before = (tmp_path / "idx" / "embeddings.npy").read_bytes()

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "embeddings.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp folders left


# --------------------------------------------------------------------------- ANN path


def _synthetic_titles(rng: np.random.Generator, n: int) -> list[str]:
    words = ["night", "red", "river", "star", "city", "ghost", "love", "war", "king", "blue"]
    return [
        f"{' '.join(rng.choice(words, size=3))} {k} ({rng.integers(1930, 2020)})" for k in range(n)
    ]


def test_ann_agrees_with_brute_force(tmp_path: Path, rng: np.random.Generator) -> None:
    pytest.importorskip("faiss")
    catalog = _catalog(_synthetic_titles(rng, 400), name="synthetic")
    brute_cfg = GroundingConfig(encoder="hash", ann_threshold=10_000)
    ann_cfg = GroundingConfig(encoder="hash", ann_threshold=50)
    brute = CatalogIndex.build(catalog, HashEncoder(), brute_cfg, show_progress=False)
    ann = CatalogIndex.build(catalog, HashEncoder(), ann_cfg, show_progress=False)
    assert brute.ann is None
    assert ann.ann is not None
    queries = [t.replace("e", "a", 1) for t in catalog.titles[:50]]
    (bs, bp), (as_, ap) = brute.search(queries, 10), ann.search(queries, 10)
    recall = np.mean([len(set(b) & set(a)) / 10 for b, a in zip(bp, ap, strict=True)])
    assert recall >= 0.9
    assert np.mean(bp[:, 0] == ap[:, 0]) >= 0.95
    np.testing.assert_allclose(as_[:, 0], bs[:, 0], atol=1e-5)
    ann.save(tmp_path / "ann")
    loaded = CatalogIndex.load(tmp_path / "ann", catalog=catalog, encoder=HashEncoder())
    assert loaded.ann is not None
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], ap)


# --------------------------------------------------------------------------- real encoder


def _movielens_catalog() -> Catalog:
    path = DATA / "ml-100k" / "u.item"
    if not path.is_file():
        pytest.skip(f"MovieLens 100K not found at {path} (see ../shared/data/README.md)")
    rows = [line.split("|") for line in path.read_text(encoding="latin-1").splitlines() if line]
    return Catalog(items=tuple(Item(item_id=r[0], title=r[1]) for r in rows), name="ml-100k")


@pytest.mark.model
def test_real_encoder_grounds_movielens_titles(sentence_encoder: Encoder) -> None:
    catalog = _movielens_catalog()
    config = GroundingConfig(min_similarity=0.6)
    index = CatalogIndex.build(catalog, sentence_encoder, config, show_progress=False)
    generated = {
        "Star Wars 1977": ("Star Wars (1977)", "exact"),
        "The Godfather": ("Godfather, The (1972)", "exact"),
        "The Godfather: Part 2 (1974)": ("Godfather: Part II, The (1974)", "semantic"),
        "Pulp Fictoin (1994)": ("Pulp Fiction (1994)", "semantic"),
        "Shawshank Redemtion (1994)": ("Shawshank Redemption, The (1994)", "semantic"),
    }
    g = ground(_parsed(*generated, "Zorblax Quantum Llama Saga (2031)"), index=index, config=config)
    assert {x.candidate.title: (x.title, x.match) for x in g.grounded} == generated
    assert [r.text for r in g.rejected] == ["Zorblax Quantum Llama Saga (2031)"]
    star_wars = catalog.items[index.match_exact("Star Wars (1977)")[0]].item_id
    seen = ground(_parsed("Star Wars 1977"), index=index, exclude={star_wars}, config=config)
    assert not seen.grounded
    assert seen.rejected[0].reason == REASON_HISTORY


def _genre_index(config: GroundingConfig) -> CatalogIndex:
    items = (
        Item(item_id="h", title="Heat (1995)", attributes={"genres": ("Action", "Crime")}),
        Item(
            item_id="t", title="Toy Story (1995)", attributes={"genres": ("Comedy", "Children's")}
        ),
        Item(item_id="w", title="Star Wars (1977)", attributes={"genres": ("Sci-Fi", "War")}),
        Item(item_id="c", title="Clerks (1994)", attributes={"genres": ("Comedy-Drama",)}),
    )
    return CatalogIndex.build(
        Catalog(items=items, name="genres"), HashEncoder(), config, show_progress=False
    )


def test_named_labels_are_whole_words_longest_first() -> None:
    vocab = {"War", "Drama", "Comedy-Drama", "Children's", "Sci-Fi"}
    assert named_labels("Sci-Fi and War, like Star Wars", vocab) == {"Sci-Fi", "War"}
    assert named_labels("a Comedy-Drama; no war here", vocab) == {"Comedy-Drama"}
    assert named_labels("for Children's evenings", vocab) == {"Children's"}
    assert named_labels("anything", set()) == set()


def test_an_explanation_naming_a_label_the_item_lacks_is_dropped(config: GroundingConfig) -> None:
    index = _genre_index(config)
    parsed = Parsed(
        candidates=(
            Candidate(title="Heat (1995)", explanation="It is Action, like Alien.", rank=1),
            Candidate(title="Toy Story (1995)", explanation="A War film, and Comedy.", rank=2),
            Candidate(title="Star Wars (1977)", explanation="Many liked it.", rank=3),
        )
    )
    g = ground(parsed, index=index, config=config)
    assert [x.item_id for x in g.grounded] == ["h", "t", "w"]  # every item keeps its place
    assert [x.candidate.explanation for x in g.grounded] == [
        "It is Action, like Alien.",
        "",
        "Many liked it.",
    ]
    assert [(r.text, r.reason, r.stage) for r in g.rejected] == [
        ("A War film, and Comedy.", f"{REASON_EXPLANATION}: War (Toy Story (1995))", "ground")
    ]
    off = config.model_copy(update={"check_explanations": False})
    kept = ground(parsed, index=_genre_index(off), config=off)
    assert kept.grounded[1].candidate.explanation == "A War film, and Comedy."
    assert not kept.rejected
