"""The metadata filter of the job list, as OpenAI takes it: ``?metadata[k]=v`` (every pair
must match; ``metadata[k]=`` matches an empty value) or ``?metadata=null`` (jobs created
without metadata). The openai SDK sends ``jobs.list(metadata={"k": "v"})`` as the former."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, exists, func, literal, or_, select

from shared.errors import InvalidRequest
from shared.models import Job

MAX_PAIRS = 16  # as many as a job's metadata holds


@dataclass(frozen=True)
class MetadataFilter:
    """The jobs a list keeps: those whose metadata has every one of ``pairs`` or, with
    ``null``, those created without metadata."""

    pairs: dict[str, str]
    null: bool = False

    @classmethod
    def parse(cls, params: Iterable[tuple[str, str]]) -> MetadataFilter | None:
        """The filter in a query string's ``(name, value)`` pairs; None when it has none.

        Raises:
            InvalidRequest: both forms, another ``metadata`` value, NUL, too many pairs.
        """
        pairs: dict[str, str] = {}
        null = False
        for name, value in params:
            if name == "metadata":
                if value != "null":
                    raise InvalidRequest("metadata: filter with metadata[key]=value, or "
                                         "metadata=null for jobs without metadata",
                                         param="metadata")
                null = True
            elif name.startswith("metadata[") and name.endswith("]"):
                pairs[name[len("metadata["):-1]] = value
        if null and pairs:
            raise InvalidRequest("metadata: give metadata[key]=value pairs or metadata=null, "
                                 "not both", param="metadata")
        if len(pairs) > MAX_PAIRS:
            raise InvalidRequest(f"metadata: at most {MAX_PAIRS} filter pairs",
                                 param="metadata")
        # PostgreSQL text cannot hold NUL, and no stored key or value has one.
        if any("\x00" in s for pair in pairs.items() for s in pair):
            raise InvalidRequest("metadata: a filter key or value contains NUL",
                                 param="metadata")
        return cls(pairs, null) if pairs or null else None

    def conditions(self, dialect: str) -> list[ColumnElement[bool]]:
        """SQL conditions on ``jobs.metadata`` (JSON) for SQLite or PostgreSQL."""
        sqlite = dialect == "sqlite"
        if self.null:  # stored as SQL NULL or as JSON null
            json_type = func.json_type if sqlite else func.json_typeof
            return [or_(Job.user_metadata.is_(None), json_type(Job.user_metadata) == "null")]
        if not sqlite:
            return [Job.user_metadata[k].as_string() == v for k, v in self.pairs.items()]
        # SQLite's JSON paths cannot quote every key ('"' for one): match the object's pairs.
        conditions: list[ColumnElement[bool]] = []
        for key, value in self.pairs.items():
            each = func.json_each(Job.user_metadata).table_valued("key", "value")
            conditions.append(exists(select(literal(1)).select_from(each)
                                     .where(each.c.key == key, each.c.value == value)))
        return conditions
