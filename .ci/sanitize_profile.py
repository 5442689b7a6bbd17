"""A small Hypothesis profile for .ci/sanitize (a sanitizer build runs several times slower)."""

from hypothesis import HealthCheck, settings

settings.register_profile("sanitize", max_examples=10, deadline=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
