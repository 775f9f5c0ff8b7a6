"""bptvlm: black-box prompt tuning of vision-language models as a service.

``bptvlm.tune(endpoint, data, **config)`` and ``bptvlm.evaluate(endpoint, prompts, data)`` are the
notebook API (bptvlm/api.py); ``bptvlm`` on the command line is bptvlm/cli/.
"""

from typing import Any

__version__ = "0.1.0"


def tune(endpoint: str, data: Any = None, **kwargs: Any) -> Any:
    """See ``bptvlm.api.tune``."""
    from .api import tune as _tune

    return _tune(endpoint, data, **kwargs)


def evaluate(endpoint: str, prompts: Any, data: Any, **kwargs: Any) -> Any:
    """See ``bptvlm.api.evaluate``."""
    from .api import evaluate as _evaluate

    return _evaluate(endpoint, prompts, data, **kwargs)
