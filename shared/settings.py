"""The one place that reads the environment: every setting has the prefix ``LORAFLEET_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, computed_field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The ranks vLLM's --max-lora-rank accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class Settings(BaseSettings):
    """Service configuration; ``LORAFLEET_<NAME>`` overrides a field (``LORAFLEET_PORT``)."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    # --- where things live -------------------------------------------------------------
    storage_url: str = Field(
        "",
        description="Where the service keeps every byte it stores (uploads, checkpoints, "
        "adapters, result files, the tokenized-data cache): file:///path, a folder that the "
        "API, every worker and the engine see at that path, or s3://bucket/prefix, a bucket "
        "of any S3-compatible store (nodes then share no folder). Empty: file:// of "
        "LORAFLEET_STORAGE_DIR.",
    )
    storage_dir: Path = Field(
        Path("lorafleet-data"),
        description="The storage folder where LORAFLEET_STORAGE_URL is unset (the same as "
        "file://<this folder>); also where the default SQLite database and the embedded "
        "broker live.",
    )
    s3_endpoint_url: str = Field(
        "",
        description="The S3-compatible server of an s3:// storage URL (http://minio:9000, "
        "http://seaweedfs:8333, a Ceph RGW). Empty: AWS S3. Credentials, region and retries "
        "come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        "AWS_PROFILE, an instance or pod role, AWS_MAX_ATTEMPTS).",
    )
    s3_path_style: bool = Field(
        False,
        description="Address buckets as http://host/bucket/key (path style), which most "
        "self-hosted S3 servers need, rather than http://bucket.host/key.",
    )
    cache_dir: Path = Field(
        Path("lorafleet-cache"),
        description="This node's cache of what it fetches from storage (training files, the "
        "checkpoint a job resumes from, adapters the engine serves) and its workers' "
        "checkpoints before they are committed. Per node, never shared between nodes; the "
        "processes of one node may share it.",
    )
    cache_max_bytes: int = Field(
        20 * 1024**3,
        ge=0,
        description="Most bytes kept in the node cache; the least recently used entries go "
        "first (an entry in use stays).",
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL. Empty: an SQLite file in the storage folder. "
        "Production: postgresql+psycopg://user:pass@host/db",
    )
    broker_url: str = Field(
        "",
        description="Celery broker URL. Empty: kombu's filesystem transport in the storage folder "
        "(no server needed). Production: redis://host:6379/0",
    )
    broker_visibility_timeout: int = Field(
        3600,
        ge=1,
        description="Redis visibility timeout (s). Redelivery of a running job is harmless: the "
        "database claim decides who trains.",
    )
    broker_poll_interval: float = Field(
        0.1, gt=0, description="Polling interval (s) of the embedded filesystem broker."
    )
    queue: str = Field("lorafleet.train", description="Celery queue that training jobs go to.")

    # --- API server ----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    auto_migrate: bool = Field(
        True, description="Upgrade the database schema when the API starts."
    )
    auth_cache_seconds: float = Field(
        10.0,
        ge=0,
        description="How long the API trusts an API key it has checked before asking the "
        "database again: a key revoked by `lorafleet keys revoke` stops working within this "
        "time. 0: check every request.",
    )
    status_cache_seconds: float = Field(
        0.25,
        ge=0,
        description="How long the API reuses a job's status answer (GET "
        "/v1/fine_tuning/jobs/{id}): a worker's progress shows up this much later at most; "
        "a cancel shows at once on the API process that took it. 0: read the database every "
        "request.",
    )
    stale_status_seconds: float = Field(
        300.0,
        ge=0,
        description="While the database cannot be reached, the API still answers a job's "
        "status (GET /v1/fine_tuning/jobs/{id}) with the last answer it read for the job, if "
        "that is at most this old, to a key it checked at most this long ago; the answer "
        "carries the headers X-Lorafleet-Stale: database_unavailable and Age (seconds). "
        "0: such a request gets 503, as every other request that needs the database.",
    )

    model_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long the API reuses what a model name in an inference request "
        "resolved to (the job and adapter behind it): a model deleted through another API "
        "process is answered 404 by the engine instead of the API for this long. 0: read the "
        "database every request.",
    )

    # --- input limits --------------------------------------------------------------------
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1, description="Largest upload (bytes).")
    max_upload_lines: int = Field(1_000_000, ge=1, description="Most JSONL lines in one upload.")
    max_record_chars: int = Field(200_000, ge=1, description="Longest JSONL line (characters).")
    max_length_limit: int = Field(8192, ge=16, description="Largest accepted max_length.")
    max_lora_r: int = Field(256, ge=1, description="Largest accepted LoRA rank.")
    max_steps_limit: int = Field(
        1_000_000, ge=1, description="Largest accepted max_steps, save_steps and logging_steps."
    )
    max_epochs_limit: int = Field(100, ge=1, description="Largest accepted n_epochs.")
    max_request_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Largest request body (bytes) of every route but uploads; larger is refused "
        "with 413 before it is read.",
    )
    max_queued_jobs_per_project: int = Field(
        100,
        ge=1,
        description="Most jobs of one project waiting to run; one more is refused with 429 and "
        "a Retry-After header.",
    )
    max_running_jobs_per_project: int | None = Field(
        None,
        ge=1,
        description="Most jobs of one project training at once; further jobs stay queued until "
        "one ends. Unset: no limit but the number of workers.",
    )
    models_dir: Path | None = Field(
        None,
        description="Folder of the operator's local base models: a job may name a model by an "
        "absolute path under it. A folder of each node, not in storage: every node that "
        "trains or serves such a model needs it at the same path. Unset: only hub ids are "
        "accepted, never a local path.",
    )

    # --- job lifecycle -------------------------------------------------------------------
    lease_seconds: float = Field(
        15.0, gt=0, description="A running job whose heartbeat is older than this is re-queued."
    )
    heartbeat_seconds: float = Field(3.0, gt=0, description="Worker heartbeat interval (s).")
    sweep_seconds: float = Field(2.0, gt=0, description="How often workers look for lost jobs.")
    requeue_after_seconds: float = Field(
        30.0,
        gt=0,
        description="A queued job that no worker claimed for this long is sent to the broker again "
        "(covers lost broker messages, e.g. a Redis restart).",
    )
    max_attempts: int = Field(
        3, ge=1, description="A job that loses its worker or fails transiently this often fails."
    )
    retry_backoff_seconds: float = Field(
        2.0, ge=0, description="Delay before a retried attempt; doubles with each failure."
    )
    keep_checkpoints: int = Field(
        3, ge=1, description="Complete checkpoints kept per job (plus the final adapter)."
    )
    preempt_grace_seconds: float = Field(
        60.0, gt=0, description="On SIGTERM, time allowed to write a checkpoint before exit."
    )
    wandb_mode: Literal["auto", "offline", "disabled"] = Field(
        "auto",
        description="Weights & Biases for jobs that ask for it (integrations: wandb). 'auto': "
        "online where W&B has an API key and answers, else W&B's offline mode (a run folder "
        "under the job's storage, for `wandb sync`); 'offline': never try the network; "
        "'disabled': ignore the integration (the job says so).",
    )

    # --- webhooks ------------------------------------------------------------------------
    webhook_max_attempts: int = Field(
        16, ge=1, description="Sends of one webhook event before its delivery is marked failed."
    )
    webhook_backoff_seconds: float = Field(
        10.0, gt=0, description="Delay before the second send of an event; doubles after each."
    )
    webhook_max_backoff_seconds: float = Field(
        3600.0, gt=0, description="Longest delay between two sends of an event."
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="How long a receiver may take to answer one send."
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, description="How often the API and each worker look for events to send."
    )
    webhook_allow_private_targets: bool = Field(
        False,
        description="Allow webhook URLs on loopback, private, link-local and cloud metadata "
        "addresses (refused by default: an API key must not reach the operator's network).",
    )

    # --- metrics (Prometheus) ----------------------------------------------------------
    metrics_token: str = Field(
        "",
        description="Bearer token that GET /metrics on the API requires. Empty: /metrics "
        "answers whoever reaches the API's port; it names every project's models, so set a "
        "token (or block /metrics at the proxy) where that port is public.",
    )
    worker_metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of each worker's own /metrics. Unset: none. Several workers on one "
        "host need one port each; 0 picks a free port and logs it.",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Interface a worker's /metrics listens on."
    )

    # --- training defaults ---------------------------------------------------------------
    device: str = Field(
        "auto",
        description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'. A worker given 'cuda:N' sees that "
        "GPU alone (one job, one GPU); a GPU the node lacks stops it at start-up.",
    )
    eval_max_examples: int = Field(
        20,
        ge=0,
        description="When a job with a validation file has trained, the base and the "
        "fine-tuned model answer up to this many of its first validation records (greedy), and "
        "the job gets their ROUGE and exact-match scores (`evaluation`). 0: no evaluation.",
    )
    eval_max_new_tokens: int = Field(
        64, ge=1, description="The most tokens each answer of that evaluation may have."
    )

    # --- inference engine (`lorafleet serve`) --------------------------------------------
    engine_url: str = Field(
        "http://127.0.0.1:8001",
        description="Where the API finds the inference engine. The engine has no auth of its "
        "own: keep it on a private network.",
    )
    engine_host: str = Field("127.0.0.1", description="Interface the engine listens on.")
    engine_port: int = Field(8001, ge=1, le=65535, description="Port the engine listens on.")
    engine_device: str = Field(
        "auto", description="Device of the served models: 'auto', 'cpu', 'cuda', 'cuda:1'."
    )
    engine_torch_threads: int = Field(
        0, ge=0, description="CPU threads for torch in the engine; 0: torch's default."
    )
    engine_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Lower the CPU priority of the engine and of every process it starts by "
        "this much (Unix niceness), to put it behind other work on its host. On a CPU, vLLM's "
        "model processes yield the CPU to the API already (LORAFLEET_VLLM_CPU_SCHEDULING).",
    )
    engine_timeout_seconds: float = Field(
        600.0, gt=0, description="How long the API waits for the engine to answer."
    )
    batch_window_ms: float = Field(
        10.0,
        ge=0,
        description="How long the engine waits for more requests before it starts a batch.",
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most sequences (requests x n) generated in one batch."
    )
    max_queued_requests: int = Field(
        256, ge=1, description="Requests waiting for a batch beyond this are refused with 429."
    )
    adapter_cache_count: int = Field(
        16, ge=1, description="Most adapters kept loaded per base model (LRU)."
    )
    adapter_cache_bytes: int = Field(
        2 * 1024**3, ge=1, description="Most adapter weight bytes kept loaded per base model."
    )
    max_tokens_limit: int = Field(
        4096, ge=1, description="Largest accepted max_tokens of a completion request."
    )
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens of a request that sets none (capped by the context)."
    )

    # --- vLLM, the engine's generation backend -----------------------------------------------
    engine_backend: Literal["auto", "vllm", "builtin"] = Field(
        "auto",
        description="What generates for `lorafleet serve`: 'vllm' (vLLM OpenAI servers, one "
        "per base model), 'builtin' (peft on this process), 'auto': vLLM when a vLLM Python "
        "(vllm_python) or servers (vllm_servers) are there, else the built-in engine.",
    )
    vllm_python: str = Field(
        "",
        description="The Python of an environment with vLLM installed (`make venv-vllm`). "
        "Empty: .venv-vllm/bin/python in the installed project's folder (or beside "
        "lorafleet's own environment), whatever the current folder.",
    )
    vllm_servers: dict[str, str] = Field(
        {},  # pydantic copies it for each instance
        description='vLLM servers started by someone else, as JSON {"<base model>": "<url>"}: '
        "used instead of starting one. They must run with --enable-lora, "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true and see the engine's cache folder "
        "(LORAFLEET_CACHE_DIR, where it fetches adapters to) at the same path.",
    )
    vllm_max_servers: int = Field(
        2, ge=1, description="Most vLLM servers (base models) running at once; starting one "
        "more stops the least recently used idle one."
    )
    vllm_idle_seconds: float = Field(
        900.0, gt=0, description="A vLLM server that served nothing for this long is stopped."
    )
    vllm_startup_seconds: float = Field(
        600.0, gt=0, description="How long a starting vLLM server may take to answer /health."
    )
    vllm_max_loras: int = Field(
        8, ge=1, description="vLLM --max-loras: adapters in one batch (memory per slot)."
    )
    vllm_max_cpu_loras: int = Field(
        32, ge=1, description="vLLM --max-cpu-loras: adapters kept loaded in host memory."
    )
    vllm_max_lora_rank: int | None = Field(
        None,
        description="vLLM --max-lora-rank (1, 8, 16, 32, 64, 128, 256, 320 or 512): adapters "
        "of a higher rank are refused. Memory per adapter slot grows with it, and on the CPU "
        "time too (vLLM's CPU LoRA kernels compute at this rank whatever the adapter's). "
        "Unset: 64.",
    )
    vllm_adaptive_lora_rank: bool | None = Field(
        None,
        description="Start each vLLM server the engine manages at the smallest --max-lora-rank "
        "that covers the adapters asked of it (at least 8), and restart it at a higher one, up "
        "to LORAFLEET_VLLM_MAX_LORA_RANK, when a larger adapter is asked for (requests already "
        "running finish on the old server). Unset: on when vLLM runs on the CPU, where its LoRA "
        "kernels compute at --max-lora-rank, off on a GPU, where the maximum costs little.",
    )
    vllm_max_model_len: int = Field(
        4096, ge=16, description="Longest sequence a vLLM server takes (capped by the model's "
        "own context): sizes its KV cache."
    )
    vllm_gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="vLLM --gpu-memory-utilization of each server the engine starts on a GPU: "
        "the share of the GPU's memory it takes up front (weights, KV cache, LoRA slots). "
        "Unset: 0.9 shared equally by LORAFLEET_VLLM_MAX_SERVERS, so that they all fit.",
    )
    vllm_kv_cache_gib: int = Field(
        1, ge=1,
        description="KV cache of a vLLM server on the CPU, in GiB (VLLM_CPU_KVCACHE_SPACE).",
    )
    vllm_cpu_lora_ops: Literal["grouped", "vllm"] = Field(
        "grouped",
        description="How a vLLM server the engine starts on the CPU computes LoRA: grouped "
        "(lorafleet's vLLM plugin, which `make venv-vllm` installs: one matrix product per "
        "layer for all the adapters of a batch) or vllm (vLLM's own CPU ops, which copy every "
        "token's adapter weights; several times slower, bench/cpu_lora.py). No effect on a GPU.",
    )
    vllm_cpu_scheduling: Literal["idle", "normal"] = Field(
        "idle",
        description="How the processes of a vLLM server the engine starts on the CPU that run "
        "the model are scheduled: idle (Linux SCHED_IDLE, by lorafleet's vLLM plugin: the "
        "model computes on the CPU time every other process leaves, so the API answers as "
        "fast while the engine is saturated as while it is idle; a CPU-bound process on the "
        "same cores, such as a training worker, then comes first) or normal. No effect on a "
        "GPU.",
    )
    parity_check: Literal["strict", "warn", "off"] = Field(
        "strict",
        description="An adapter whose vLLM output differs from the probe recorded with peft "
        "when it was trained: 'strict' refuses it (422 adapter_parity_failed), 'warn' serves "
        "it and logs, 'off' skips the check.",
    )

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, v: str) -> str:
        if v and not v.startswith(("file://", "s3://")):
            raise ValueError("must be file:///path or s3://bucket/prefix")
        if v.startswith("s3://") and not v[len("s3://"):].split("/", 1)[0]:
            raise ValueError("an s3:// URL needs a bucket: s3://bucket/prefix")
        return v

    @field_validator("vllm_max_lora_rank")
    @classmethod
    def _vllm_rank(cls, v: int | None) -> int | None:
        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, VLLM_LORA_RANKS))} (vLLM's "
                             "choices)")
        return v

    @computed_field  # type: ignore[prop-decorator]
    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.storage_dir / 'lorafleet.db').resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or f"file://{self.storage_dir.resolve()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.storage_dir / "broker").resolve()

    @property
    def uses_embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
