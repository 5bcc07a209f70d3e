"""LoRA adapters on a vLLM server: checked, loaded at runtime, and held to their parity probe.

An adapter version (:class:`~engine.adapters.AdapterRef`, whose name changes with its
weights) is loaded once per server with ``POST /v1/load_lora_adapter``, so a new adapter is
served without a restart, and a folder rewritten with new weights never serves the old ones.

Parity: the worker stores in the adapter's ``lorafleet.json`` the greedy tokens that peft
generated for a fixed probe prompt (``parity_probe``). The first time a server loads the
adapter it replays the probe; tokens that differ mean vLLM would serve something other than
what was trained, and the adapter is refused (``parity_check="strict"``) instead of being
served silently wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from engine.adapters import META_FILE, AdapterRef
from engine.errors import AdapterLoadFailed, AdapterParityFailed
from engine.vllm.servers import VllmServer
from modelio.model_text import ModelText
from shared.errors import InvalidRequest, ServiceUnavailable
from shared.settings import VLLM_LORA_RANKS, Settings

log = logging.getLogger(__name__)



def adapter_rank(path: str | Path) -> int:
    """The highest LoRA rank of an adapter folder (``r``, or a larger one of
    ``rank_pattern``); 0 when its ``adapter_config.json`` says none."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0  # check_adapter refuses such a folder with the reason
    ranks = [config.get("r")]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks.extend(pattern.values())
    return max((r for r in ranks if isinstance(r, int) and not isinstance(r, bool)), default=0)


def check_rank(ref: AdapterRef, max_rank: int) -> int:
    """The adapter's LoRA rank (:func:`adapter_rank`), checked against the engine's maximum.

    Raises:
        InvalidRequest: the adapter's rank is above the highest the vLLM servers serve."""
    rank = adapter_rank(ref.path)
    if rank > max_rank:
        higher = [r for r in VLLM_LORA_RANKS if r >= rank]
        fix = (f"set LORAFLEET_VLLM_MAX_LORA_RANK to {higher[0]} or more to serve it"
               if higher else "vLLM serves no rank that high")
        raise InvalidRequest(
            f"This adapter has LoRA rank {rank}, above the inference engine's maximum of "
            f"{max_rank} (LORAFLEET_VLLM_MAX_LORA_RANK): {fix}.", param="model")
    return rank


@dataclass(frozen=True)
class Probe:
    """What peft generated for the probe prompt, as the worker recorded it."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    stop_token_ids: list[int] | None


def read_probe(path: str | Path) -> Probe | None:
    """The adapter's parity probe; None for an adapter that has none (a checkpoint, or an
    adapter trained before probes were recorded) or an unreadable one (logged)."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
        probe = meta.get("parity_probe")
        if probe is None:
            return None
        stops = probe.get("stop_token_ids")
        result = Probe([int(i) for i in probe["prompt_ids"]],
                       [int(i) for i in probe["token_ids"]], str(probe.get("text", "")),
                       [int(i) for i in stops] if stops is not None else None)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("ignoring the unreadable parity probe of %s: %s", path, e)
        return None
    return result if result.prompt_ids and result.token_ids else None


def _vllm_error(answer: httpx.Response) -> str:
    try:
        error = answer.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return answer.text[:500]


class Loras:
    """Loads adapter versions on servers, once each, and checks their parity probe.

    Args:
        settings: ``parity_check``.
        client: the gateway's HTTP client.
    """

    def __init__(self, settings: Settings, client: httpx.AsyncClient):
        self.settings = settings
        self.client = client
        self._locks: dict[tuple[int, str], asyncio.Lock] = {}
        # Adapter versions that failed their probe: refused at once from then on.
        self.refused: dict[str, AdapterParityFailed] = {}
        self.parity_checks = 0

    async def ensure(self, server: VllmServer, ref: AdapterRef, text: ModelText) -> str:
        """The lora name to send requests for ``ref`` to ``server``, loaded and checked.

        Raises:
            AdapterParityFailed: vLLM's probe tokens differ from peft's (strict mode).
            AdapterLoadFailed: vLLM could not load the adapter.
            ServiceUnavailable: the server does not answer.
        """
        if ref.name in self.refused:
            raise self.refused[ref.name]
        if ref.name in server.adapters:
            return ref.name
        lock = self._locks.setdefault((id(server), ref.name), asyncio.Lock())
        async with lock:
            if ref.name in self.refused:
                raise self.refused[ref.name]
            if ref.name not in server.adapters:
                await self._load(server, ref, text)
        self._locks.pop((id(server), ref.name), None)
        return ref.name

    async def _load(self, server: VllmServer, ref: AdapterRef, text: ModelText) -> None:
        for name, old in list(server.adapters.items()):
            if old.path == ref.path:  # an older version of this folder: never served again
                await self.unload(server, name)
        answer = await self._post(server, "/v1/load_lora_adapter",
                                  {"lora_name": ref.name, "lora_path": ref.path})
        # "already been loaded": a server that outlived a gateway restart knows it already.
        if answer.status_code != 200 and "already been loaded" not in _vllm_error(answer):
            raise AdapterLoadFailed(f"vLLM could not load the adapter {ref.path}: "
                                    f"{_vllm_error(answer)}", param="model")
        log.info("loaded adapter %s as %s on the vLLM server of %s", ref.path, ref.name,
                 server.base_model)
        probe = read_probe(ref.path) if self.settings.parity_check != "off" else None
        if probe is not None:
            failure = await self._check_parity(server, ref, probe, text)
            if failure is not None:
                if self.settings.parity_check == "strict":
                    await self.unload(server, ref.name)
                    self.refused[ref.name] = failure
                    log.error("%s", failure.message)
                    raise failure
                log.warning("serving it anyway (LORAFLEET_PARITY_CHECK=warn): %s",
                            failure.message)
        server.adapters[ref.name] = ref
        server.adapter_loads += 1

    async def _check_parity(self, server: VllmServer, ref: AdapterRef, probe: Probe,
                            text: ModelText) -> AdapterParityFailed | None:
        """Replay the probe greedily; the error to raise if vLLM's tokens differ."""
        stops = probe.stop_token_ids if probe.stop_token_ids is not None else sorted(
            text.eos_ids)
        payload = {"model": ref.name, "prompt": probe.prompt_ids,
                   "max_tokens": len(probe.token_ids), "temperature": 0, "top_p": 1,
                   "top_k": 0, "stop_token_ids": stops, "return_token_ids": True}
        answer = await self._post(server, "/v1/completions", payload)
        if answer.status_code != 200:
            raise AdapterLoadFailed(f"the parity probe of adapter {ref.path} failed on vLLM: "
                                    f"{_vllm_error(answer)}", param="model")
        choice = answer.json()["choices"][0]
        got: list[int] = list(choice.get("token_ids") or [])
        self.parity_checks += 1
        if got == probe.token_ids:
            log.info("adapter %s passed its parity probe (%d tokens)", ref.path, len(got))
            return None
        return AdapterParityFailed(
            f"The adapter {ref.path} fails the parity check, so it is not served: for its "
            f"probe prompt, peft generated the tokens {probe.token_ids} ({probe.text!r}) when "
            f"it was trained, but vLLM generates {got} ({choice.get('text', '')!r}). The "
            "adapter's weights may have changed since it was trained. LORAFLEET_PARITY_CHECK="
            "warn serves it anyway.")

    async def unload(self, server: VllmServer, name: str) -> None:
        server.adapters.pop(name, None)
        try:
            answer = await self._post(server, "/v1/unload_lora_adapter", {"lora_name": name})
        except ServiceUnavailable:
            return
        if answer.status_code == 200:
            server.adapter_unloads += 1
        else:
            log.warning("vLLM did not unload adapter %s: %s", name, _vllm_error(answer))

    async def _post(self, server: VllmServer, path: str, payload: dict[str, Any]
                    ) -> httpx.Response:
        try:
            return await self.client.post(f"{server.url}{path}", json=payload)
        except httpx.TransportError as e:
            if await server.gone(e):
                raise server.death() from e
            raise ServiceUnavailable(
                f"The vLLM server of {server.base_model} does not answer: {e!r}") from e
