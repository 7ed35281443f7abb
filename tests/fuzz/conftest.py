"""Property-based fuzzing (hypothesis): every parser of outside input either returns a value
or raises its documented error with a message; nothing else escapes.

Example counts are bounded (``FUZZ_EXAMPLES``, 200 by default; ``make chaos`` runs 2,000) and
the database is off, so ``make test`` stays fast and a run is reproducible from its seed
(``--hypothesis-seed``)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("fuzz")
