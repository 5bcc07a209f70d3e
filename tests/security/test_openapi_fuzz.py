"""Property-based requests from the served OpenAPI schema (schemathesis): whatever a client
sends within, or just outside, the documented shapes, the API answers without a 5xx and in
the documented response shapes.

The stack has no worker and no inference engine: job creation only queues, and inference
requests end at model resolution (the fuzzed names exist in no project).
"""

from __future__ import annotations

from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app
from tests.support import Stack

# Examples per operation: enough to reach every branch of the request models, and the whole
# test stays well under two minutes.
EXAMPLES = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


# The schema the API serves, built in this process at collection (schemathesis parametrizes
# from it); ``test_served_schema_is_the_one_fuzzed`` checks that the stack serves the same.
APP_SCHEMA = create_app().openapi()
schema = schemathesis.openapi.from_dict(APP_SCHEMA)
schema.config.generation.update(max_examples=EXAMPLES, modes=["positive", "negative"],
                                with_security_parameters=False)  # our key, not generated ones


@pytest.fixture(scope="module")
def fuzz_stack(make_module_stack: Any) -> Stack:
    return make_module_stack(workers=0)


def test_served_schema_is_the_one_fuzzed(fuzz_stack: Stack) -> None:
    served = httpx.get(f"{fuzz_stack.base_url}/openapi.json", timeout=30).json()

    assert served == APP_SCHEMA


@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_no_server_errors_and_documented_responses(case: Any, fuzz_stack: Stack) -> None:
    response = case.call_and_validate(base_url=fuzz_stack.base_url,
                                      headers={"Authorization": f"Bearer {fuzz_stack.key}"},
                                      checks=CHECKS, timeout=30)

    # Every request carries a valid key: the fuzzed input, not the key, decides the answer.
    assert response.status_code != 401, response.text
