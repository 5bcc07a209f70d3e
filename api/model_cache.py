"""Models resolved recently, for ``model_cache_seconds``: what every inference request looks up.

A completion or chat request names a model, which :func:`api.served_models.resolve_model`
turns into the engine's target with a database read. A busy client sends many requests for
the same few models; their targets are kept (:class:`~api.read_cache.ReadCache`, by project
and model), so that such a request costs no thread pool call and no session: on a host
where the engine takes the CPU, the API's work per request is what other clients (status
polls) wait behind. What a client can rely on:

- only models that resolved are kept: an unknown name, a job not yet succeeded, are read
  every time, so a model can be used the moment its job succeeds;
- deleting a model through this process forgets it at once. Another API process may still
  send a deleted model's requests on for up to ``model_cache_seconds``; the engine then
  finds no adapter files and answers 404 (``adapter_missing``), so a deleted model (or a
  checkpoint that retention removed) is never served, only named in a different 404.
"""

from __future__ import annotations

from api import served_models
from api.read_cache import ReadCache
from shared.db import session_scope
from shared.inference import Target
from shared.settings import get_settings

model_cache: ReadCache[tuple[str, str], Target] = ReadCache(
    lambda: get_settings().model_cache_seconds)


def _resolve(project: str, model: str) -> Target:
    with session_scope() as session:
        return served_models.resolve_model(session, project, model)


async def resolve(project: str, model: str) -> Target:
    """The engine target of ``model`` for ``project`` (see
    :func:`~api.served_models.resolve_model`, and its errors)."""
    return await model_cache.fetch((project, model), lambda: _resolve(project, model))
