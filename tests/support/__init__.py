"""Reusable test machinery: live stacks of real processes, backends, data and job helpers."""

from tests.support.backends import BACKENDS, EMBEDDED, REDIS_POSTGRES
from tests.support.jobs import (
    FAST_TRAINING,
    create_job,
    dialogsum_records,
    get_job,
    jsonl_bytes,
    list_all_events,
    upload_bytes,
    upload_dialogsum,
    wait_for_status,
)
from tests.support.stack import Stack, StackError, StackFactory

__all__ = [
    "BACKENDS",
    "EMBEDDED",
    "FAST_TRAINING",
    "REDIS_POSTGRES",
    "Stack",
    "StackError",
    "StackFactory",
    "create_job",
    "dialogsum_records",
    "get_job",
    "jsonl_bytes",
    "list_all_events",
    "upload_bytes",
    "upload_dialogsum",
    "wait_for_status",
]
