"""InferDPT's wire format (Tong et al. 2023, arXiv 2310.12214), imported by both sides.

Text travels in the legacy messages' config / metrics (Flower scalars may be strings), as
JSON lists; no arrays travel. The protocol is explained in
:mod:`fatellm_flwr.strategies.inferdpt`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

METRIC_PROMPTS = "inferdpt-prompts"  # client -> server (fit): JSON list of perturbed prompts
KEY_ANSWERS = "inferdpt-answers"  # server -> client (evaluate config): JSON list of answers
KEY_ASK_ROUND = "inferdpt-ask-round"  # server -> client: the round whose prompts are answered
STATE_PENDING = "fatellm.inferdpt-pending"  # client's context.state: its unanswered originals


def encode_texts(texts: Sequence[str]) -> str:
    return json.dumps(list(texts), ensure_ascii=False)


def decode_texts(value) -> list[str]:
    """A JSON list of strings; raises ValueError on anything else."""
    texts = json.loads(str(value))
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("expected a JSON list of strings")
    return texts
