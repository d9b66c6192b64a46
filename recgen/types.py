"""Typed hand-offs between the pipeline stages: frozen, keyword-only dataclasses.

Data flows history -> interest state -> prompt -> generation -> parsing -> grounding -> ranking.
Each stage takes one of these types and returns the next; no stage passes dicts.
"""

# pyright: strict
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from recgen.errors import DataError

__all__ = [
    "AttrValue",
    "Candidate",
    "Catalog",
    "Event",
    "Example",
    "Generation",
    "Grounded",
    "Grounding",
    "History",
    "InterestState",
    "Item",
    "LoadReport",
    "Message",
    "Parsed",
    "Prompt",
    "Ranker",
    "RecDataset",
    "Recommendation",
    "Rejected",
    "Split",
]

AttrValue = str | int | float | tuple[str, ...]
"""An item attribute: a scalar (year, brand, description) or a tuple of labels (genres)."""


# --------------------------------------------------------------------------- catalog and data


@dataclass(frozen=True, kw_only=True, slots=True)
class Item:
    """One catalog item.

    Attributes:
        item_id: The item's identifier, unique in its catalog (always a string).
        title: Human-readable title, e.g. ``"Heat (1995)"``.
        attributes: Optional attributes: tuples of labels (``genres``, ``categories``) or scalars
            (``year``, ``brand``, ``description``).
    """

    item_id: str
    title: str
    attributes: Mapping[str, AttrValue] = field(default_factory=dict[str, AttrValue])

    @property
    def labels(self) -> tuple[str, ...]:
        """The item's profile labels: tuple-of-label attributes and short string attributes
        (not titles, descriptions, dates or years), distinct, in attribute order."""
        labels: dict[str, None] = {}
        for key, value in self.attributes.items():
            if key.lower() in _SKIP_LABEL_KEYS:
                continue
            values = (
                value if isinstance(value, tuple) else (value,) if isinstance(value, str) else ()
            )
            for raw in values:
                label = " ".join(raw.split())
                if (
                    label
                    and len(label) <= _MAX_LABEL_CHARS
                    and len(label.split()) <= _MAX_LABEL_WORDS
                    and not label.replace(".", "").isdigit()
                ):
                    labels.setdefault(label)
        return tuple(labels)


_SKIP_LABEL_KEYS = frozenset(
    {"description", "year", "title", "text", "summary", "plot", "url", "date", "release_date"}
)
_MAX_LABEL_CHARS = 40
_MAX_LABEL_WORDS = 5


@dataclass(frozen=True, kw_only=True)
class Catalog:
    """An ordered collection of items with unique ids; positions index score vectors.

    Raises:
        DataError: if two items share an id.
    """

    items: tuple[Item, ...]
    name: str = ""
    _pos: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pos: dict[str, int] = {}
        for i, item in enumerate(self.items):
            if item.item_id in pos:
                raise DataError(
                    f"catalog {self.name!r}: duplicate item_id {item.item_id!r} "
                    f"(positions {pos[item.item_id]} and {i}); item ids must be unique"
                )
            pos[item.item_id] = i
        object.__setattr__(self, "_pos", pos)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._pos

    def __getitem__(self, item_id: str) -> Item:
        """The item with this id (``KeyError`` if absent; use ``in`` to check first)."""
        return self.items[self._pos[item_id]]

    def position(self, item_id: str) -> int:
        """The item's position in the catalog, which indexes score vectors."""
        return self._pos[item_id]

    @property
    def item_ids(self) -> tuple[str, ...]:
        return tuple(item.item_id for item in self.items)

    @property
    def titles(self) -> tuple[str, ...]:
        return tuple(item.title for item in self.items)

    def fingerprint(self) -> str:
        """A short hash of ids and titles: artifacts built for one catalog refuse another."""
        h = hashlib.sha256()
        for item in self.items:
            h.update(item.item_id.encode())
            h.update(b"\x1f")
            h.update(item.title.encode())
            h.update(b"\x1e")
        return h.hexdigest()[:16]


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """One interaction of a user with an item.

    Attributes:
        item_id: The item interacted with.
        timestamp: Unix seconds, or the position in the sequence when the data has no times.
        rating: Explicit rating where the data has one.
    """

    item_id: str
    timestamp: float | None = None
    rating: float | None = None


@dataclass(frozen=True, kw_only=True)
class History:
    """A user's interactions, oldest first."""

    events: tuple[Event, ...]
    user_id: str | None = None

    @classmethod
    def create(
        cls,
        history: History | Iterable[str | Event | Mapping[str, object]],
        *,
        user_id: str | None = None,
    ) -> History:
        """Normalise loose input: a ``History``, item ids, ``Event`` s or dicts with ``item_id``.

        Raises:
            DataError: if an element is not one of those, or a dict lacks ``item_id``.
        """
        if isinstance(history, History):
            return history if user_id is None else cls(events=history.events, user_id=user_id)
        events: list[Event] = []
        for i, el in enumerate(history):
            if isinstance(el, Event):
                events.append(el)
            elif isinstance(el, str):
                events.append(Event(item_id=el))
            elif isinstance(el, Mapping) and "item_id" in el:  # pyright: ignore[reportUnnecessaryIsInstance]
                ts, rating = el.get("timestamp"), el.get("rating")
                events.append(
                    Event(
                        item_id=str(el["item_id"]),
                        timestamp=None if ts is None else float(ts),  # type: ignore[arg-type]
                        rating=None if rating is None else float(rating),  # type: ignore[arg-type]
                    )
                )
            else:
                raise DataError(
                    f"history element {i} is {el!r}: expected an item id (str), an Event, "
                    "or a dict with an 'item_id' key"
                )
        return cls(events=tuple(events), user_id=user_id)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def item_ids(self) -> tuple[str, ...]:
        return tuple(e.item_id for e in self.events)

    def head(self, n: int) -> History:
        """The first ``n`` events (a prefix), same user."""
        return History(events=self.events[:n], user_id=self.user_id)


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """What a loader read and what it dropped on purpose, with counts by reason."""

    source: str
    n_users: int
    n_items: int
    n_interactions: int
    dropped: Mapping[str, int] = field(default_factory=dict[str, int])
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RecDataset:
    """A loaded recommendation data set: catalog plus each user's time-ordered history.

    Attributes:
        name: Short name (``ml-100k``, ``amazon-scientific``, a file stem).
        catalog: The items.
        histories: user_id -> History, oldest first; ties in time broken by a seeded shuffle.
        has_timestamps: False when times are only sequence positions (e.g. RecBole sequences).
        report: Counts of what was read and dropped.
    """

    name: str
    catalog: Catalog
    histories: Mapping[str, History]
    has_timestamps: bool
    report: LoadReport


@dataclass(frozen=True, kw_only=True)
class Example:
    """One evaluation case: the history the model sees and the item it should rank first."""

    user_id: str
    history: History
    target: str
    candidates: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Split:
    """A split of a data set under one protocol.

    Attributes:
        protocol: ``"leave-one-out"`` or ``"temporal"``.
        train: Per user, everything a model may learn from (nothing after the split point).
        valid: Validation examples (tuning, early stopping).
        test: Test examples, read once per reported run.
        seed: The seed of the tie-breaking shuffle and any sampling.
        info: Protocol details (cut times, filter counts) for the run record.
    """

    protocol: str
    train: Mapping[str, History]
    valid: tuple[Example, ...]
    test: tuple[Example, ...]
    seed: int
    info: Mapping[str, object] = field(default_factory=dict[str, object])


# --------------------------------------------------------------------------- the LLM pipeline


@dataclass(frozen=True, kw_only=True)
class InterestState:
    """A user's interests at one point in time, ready to render into a prompt.

    Attributes:
        user_id: Whose state this is.
        n_events: How many interactions it summarises.
        long_term: (label, weight) over the whole history, recency-weighted, strongest first;
            labels are attribute values such as ``"Drama"``; weights sum to at most 1.
        recent_profile: (label, weight) over the recent window only.
        recent: The recent window, oldest first.
        rising: Labels whose share is clearly higher in the recent window than long-term.
        fading: Labels whose share is clearly lower in the recent window than long-term.
        liked: Highly rated items (ratings at or above the user's mean + threshold), newest first.
        disliked: Low-rated items, newest first.
        mean_rating: The user's mean rating, if the data has ratings.
        time_context: Short facts about timing (``"active on weekends"``), empty without times.
    """

    user_id: str | None
    n_events: int
    long_term: tuple[tuple[str, float], ...]
    recent_profile: tuple[tuple[str, float], ...]
    recent: tuple[Item, ...]
    rising: tuple[str, ...] = ()
    fading: tuple[str, ...] = ()
    liked: tuple[Item, ...] = ()
    disliked: tuple[Item, ...] = ()
    mean_rating: float | None = None
    time_context: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """A rendered prompt, ready for a chat model.

    Attributes:
        messages: System and user messages (the chat template is applied by the tokenizer/server).
        template: Name of the Jinja template in ``prompts/``.
        template_hash: Hash of the template source, recorded with every artifact and run.
        user_id: Whose prompt this is.
        n_history: History items rendered.
        truncated: History items cut to fit the token budget (oldest first).
        candidates: Item ids offered to the model, in the order shown, when the prompt lists any.
        answer: The target completion, for fine-tuning examples only.
    """

    messages: tuple[Message, ...]
    template: str
    template_hash: str
    user_id: str | None = None
    n_history: int = 0
    truncated: int = 0
    candidates: tuple[str, ...] = ()
    answer: str | None = None


@dataclass(frozen=True, kw_only=True)
class Generation:
    """What a generator returned for one prompt: one or more completions, best first."""

    prompt: Prompt
    texts: tuple[str, ...]
    model: str
    scores: tuple[float, ...] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """A title the model proposed, with its explanation and where it stood in the output."""

    title: str
    explanation: str
    rank: int
    sequence: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Rejected:
    """Model output that was skipped, and why (counted in eval, logged at DEBUG)."""

    text: str
    reason: str
    stage: Literal["parse", "ground"]


@dataclass(frozen=True, kw_only=True)
class Parsed:
    """The parse of one generation: candidates in output order, and what could not be parsed."""

    candidates: tuple[Candidate, ...]
    failures: tuple[Rejected, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Grounded:
    """A candidate matched to a real catalog item.

    Attributes:
        item_id: The catalog item.
        title: The catalog title (not the generated one).
        candidate: What the model generated.
        similarity: Cosine similarity of generated and catalog title (1.0 for an exact match).
        match: ``"exact"`` (normalised title equality) or ``"semantic"`` (embedding neighbour).
    """

    item_id: str
    title: str
    candidate: Candidate
    similarity: float
    match: Literal["exact", "semantic"]


@dataclass(frozen=True, kw_only=True)
class Grounding:
    """Grounding of one parse: matched items (deduplicated, history excluded) and rejections."""

    grounded: tuple[Grounded, ...]
    rejected: tuple[Rejected, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Recommendation:
    """One recommended item.

    Attributes:
        item_id: A real catalog item, never one in the user's history.
        title: Its catalog title.
        score: The fused ranking score (higher is better).
        explanation: One sentence on why, from the LLM or from the collaborative signal.
        rank: 1-based position in the list.
        source: ``"llm"`` (generated and grounded), ``"collab"`` (collaborative scorer),
            ``"popular"`` (fallback for an empty history), or ``"hybrid"``.
        similarity: Grounding similarity, when the LLM proposed it.
        match: How it was grounded, when the LLM proposed it.
    """

    item_id: str
    title: str
    score: float
    explanation: str
    rank: int = 0
    source: str = "llm"
    similarity: float | None = None
    match: str | None = None


@runtime_checkable
class Ranker(Protocol):
    """Anything the evaluator can score: ranks catalog items for each example.

    Implementations (popularity, SASRec, the LLM ``Recommender``) exclude each example's history
    items and, when ``example.candidates`` is set, rank only those.
    """

    name: str

    def rank(self, examples: Sequence[Example], *, n: int) -> list[list[str]]:
        """Item ids for each example, best first, at most ``n`` each."""
        ...


def as_tuple(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """A tuple copy of ``values`` (or None): frozen types never hold caller-owned lists."""
    return None if values is None else tuple(values)
