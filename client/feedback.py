"""Feedback objectives: what the optimizer is told, from what the key's output policy lets the server return.

    feedback  asks for            training loss [P] (lower is better), against the labels y [N]
    logits    logits [P, N, C]    mean cross-entropy (or focal loss) of softmax(logits), computed here
    probs     probs [P, N, C]     mean cross-entropy (or focal) of the probabilities: -log max(p_y, 1e-12)
    loss      loss [P]            the server's own loss (the paper's setting)
    topk      topk [P, N, K]      cross-entropy where p_y is seen in the top K; where it is not, the unseen
                                  mass m = 1 - (sum of the top K) spread evenly over the C - K unseen classes,
                                  at most the K-th value: p_y ~ min(m / (C - K), p_(K)), floored at 1e-12
    label     label [P, N]        training error rate: the fraction of images whose label is not y

Tie rules of ``label``: the server's label is the argmax of the logits, the lowest class index among
equal logits; candidates with the same error rate are equal to the optimizer, and the best seen keeps
the earliest (the loop replaces it only by a strictly lower loss).

Accuracy (validation, test) needs only labels: it is read from the ``label`` output wherever the policy
allows it (every policy but ``loss``); under ``loss`` no accuracy is observable through the API, the
prompt is chosen by validation loss and test accuracy is reported as None. A server that publishes no
output policy (an older bptvlm) is taken to allow ``loss`` and ``logits``, as those did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bptvlm.shared.protocol import LABEL, LOGITS, LOSS, PARAM_CLASSIFICATION, PROBS, TOPK, ModelMetadata, OutputAccess

FEEDBACKS = ("logits", "probs", "loss", "topk", "label")  # richest first
# The default is the first of these the key allows: the server's loss where allowed (the same cross-entropy
# as from logits, one float per candidate on the wire instead of N x C: 1.9 GB a generation for 16-shot
# ImageNet at popsize 30), then the richest of the rest.
DEFAULT_ORDER = ("loss", "logits", "probs", "topk", "label")
DEFAULT_TOPK = 5  # K of topk feedback when the policy sets none
EPS = 1e-12
_TOPK = re.compile(r"topk(?::([1-9][0-9]*))?")
LEGACY_ACCESS = OutputAccess(policy="unpublished", allowed=[LOSS, LOGITS])  # what servers before policies returned


def check_feedback(name: str | None) -> None:
    """``ValueError`` unless ``name`` is None or one of ``FEEDBACKS`` (``topk:K`` names its K)."""
    if name is not None and name not in FEEDBACKS and not _TOPK.fullmatch(name):
        raise ValueError(f"feedback must be one of {', '.join(FEEDBACKS)} (or topk:K), received {name!r}")


def access_of(metadata: ModelMetadata) -> OutputAccess:
    """What the caller's key may receive, from the model metadata (``LEGACY_ACCESS`` if unpublished)."""
    published = metadata.parameters.get("outputs")
    return LEGACY_ACCESS if published is None else OutputAccess.model_validate(published)


def resolve_feedback(name: str | None, access: OutputAccess) -> str:
    """``name``, checked against the key's policy; None: the first of ``DEFAULT_ORDER`` the policy allows
    (the server's loss where allowed, as tuning always used, else the richest feedback there is)."""
    check_feedback(name)
    if name is None:
        found = next((f for f in DEFAULT_ORDER if f in access.allowed), None)
        if found is None:
            raise ValueError(f"this key's output policy '{access.policy}' allows no output to tune with")
        return found
    base, k = name.partition(":")[0], _TOPK.fullmatch(name)
    if base not in access.allowed:
        raise ValueError(f"--feedback {name}: this key's output policy '{access.policy}' allows "
                         f"{', '.join(access.allowed) or 'nothing'}; choose --feedback among "
                         f"{', '.join(f for f in FEEDBACKS if f in access.allowed) or 'none'}")
    if k and k.group(1) and access.topk is not None and int(k.group(1)) > access.topk:
        raise ValueError(f"--feedback {name}: the output policy '{access.policy}' allows K <= {access.topk}")
    return name


def _picked_loss(p_y: np.ndarray, kind: str, gamma: float) -> np.ndarray:
    """Mean over images of the CE (or focal) of the true class's probability ``p_y`` [P, N] -> [P]."""
    p_y = np.clip(p_y.astype(np.float64), EPS, 1.0)
    losses = -np.log(p_y)
    if kind == "focal":
        losses = (1 - p_y) ** gamma * losses
    return np.asarray(losses.mean(axis=1), dtype=np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64: ``[P, N, C]``."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def parse_top_k(top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BYTES ``[P, N, K]`` of ``"<value>:<index>"`` -> values float64 [P, N, K], indices int64 [P, N, K]."""
    flat = [(s.decode() if isinstance(s, bytes) else str(s)).split(":") for s in top.reshape(-1)]
    values = np.array([float(v[0]) for v in flat], dtype=np.float64).reshape(top.shape)
    indices = np.array([int(v[1]) for v in flat], dtype=np.int64).reshape(top.shape)
    return values, indices


def top_k_true_probability(values: np.ndarray, indices: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Estimated p_y [P, N] from top-K probabilities: seen, or the unseen mass's even share (see the module)."""
    seen = indices == labels[None, :, None]
    p_seen = np.where(seen, values, 0.0).sum(-1)
    unseen = max(1, num_classes - values.shape[-1])
    mass = np.clip(1.0 - values.sum(-1), 0.0, 1.0)
    share = np.minimum(mass / unseen, values.min(-1))
    return np.where(seen.any(-1), p_seen, share)


@dataclass(frozen=True)
class Feedback:
    """One feedback objective: the outputs it asks for and the training loss it makes of them."""

    name: str  # one of FEEDBACKS
    k: int | None = None  # topk: the K asked for
    loss_kind: str = "ce"
    gamma: float = 2.0

    @classmethod
    def of(cls, name: str, access: OutputAccess, loss_kind: str = "ce") -> Feedback:
        """The feedback ``name`` (resolved: see ``resolve_feedback``) under ``access``."""
        base, _, k = name.partition(":")
        top = int(k) if k else (access.topk or DEFAULT_TOPK) if base == "topk" else None
        return cls(base, top, loss_kind)

    @property
    def outputs(self) -> tuple[str, ...]:
        return {"logits": (LOGITS,), "probs": (PROBS,), "loss": (LOSS,), "topk": (TOPK,), "label": (LABEL,)}[self.name]

    @property
    def output_parameters(self) -> dict[str, dict[str, Any]]:
        return {TOPK: {PARAM_CLASSIFICATION: self.k}} if self.name == "topk" else {}

    def loss(self, outputs: dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Training loss [P] from a response's ``outputs`` and the labels [N]."""
        return _LOSSES[self.name](self, outputs, np.asarray(labels, dtype=np.int64), num_classes)


def _true_class(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_y [P, N] from probabilities [P, N, C]."""
    return np.take_along_axis(probs, labels[None, :, None].repeat(len(probs), 0), axis=-1)[..., 0]


_Loss = Callable[[Feedback, dict[str, np.ndarray], np.ndarray, int], np.ndarray]
_LOSSES: dict[str, _Loss] = {  # the registry of feedback objectives, one per name in FEEDBACKS
    "logits": lambda f, o, y, c: _picked_loss(_true_class(softmax(o[LOGITS]), y), f.loss_kind, f.gamma),
    "probs": lambda f, o, y, c: _picked_loss(_true_class(o[PROBS], y), f.loss_kind, f.gamma),
    "loss": lambda f, o, y, c: np.asarray(o[LOSS], dtype=np.float64),
    "topk": lambda f, o, y, c: _picked_loss(top_k_true_probability(*parse_top_k(o[TOPK]), y, c), f.loss_kind, f.gamma),
    "label": lambda f, o, y, c: np.asarray((o[LABEL] != y[None, :]).mean(axis=1), dtype=np.float64),
}


def accuracy_output(access: OutputAccess) -> str | None:
    """The output accuracy is read from: ``label`` where allowed, ``logits`` from a legacy server, else None."""
    if LABEL in access.allowed:
        return LABEL
    return LOGITS if LOGITS in access.allowed else None


def accuracy_from(outputs: dict[str, np.ndarray], labels: np.ndarray) -> np.ndarray | None:
    """Accuracy [P] from a ``label`` [P, N] or ``logits`` [P, N, C] output; None when neither came."""
    if LABEL in outputs:
        predicted = outputs[LABEL]
    elif LOGITS in outputs:
        predicted = outputs[LOGITS].argmax(-1)
    else:
        return None
    return np.asarray((predicted == np.asarray(labels)[None, :]).mean(-1), dtype=np.float64)
