"""Output policies: which outputs a caller may receive, server-wide and per key (the stricter wins).

    policy      allows
    logits      logits, probs, loss, topk, label   (everything: the default)
    probs       probs, loss, topk, label
    loss        loss                               (the paper's setting: a loss per candidate, nothing else)
    topk:K      topk with K' <= K, label
    label       label

A request is checked before any work or charge: an output its policy does not allow is refused with
403 (``ForbiddenError``) naming the policy and what it allows. The V2 classification extension's output
parameter ``classification: K`` turns ``probs`` or ``logits`` into their top K (BYTES ``[P, N, K]``);
a classified ``probs`` is exactly ``topk`` (needs the ``topk`` permission), a classified ``logits``
still reveals logit values (needs ``logits``). A request that names no outputs gets the richest its
policy allows (``loss`` with labels, else ``logits``, when those are allowed, as before).

Policies that are not ordered (``loss`` and ``topk:K``, ``loss`` and ``label``) combine to what both
allow: nothing. Such a key is refused every output, with a message naming both policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bptvlm.shared import protocol as p
from bptvlm.shared.errors import ForbiddenError, ProtocolError

DEFAULT_TOPK = 5  # K of a 'topk' output that names none, under a policy without a K of its own
_ALLOWED: dict[str, frozenset[str]] = {  # the registry of policies
    "logits": frozenset({p.LOGITS, p.PROBS, p.LOSS, p.TOPK, p.LABEL}),
    "probs": frozenset({p.PROBS, p.LOSS, p.TOPK, p.LABEL}),
    "loss": frozenset({p.LOSS}),
    "topk": frozenset({p.TOPK, p.LABEL}),
    "label": frozenset({p.LABEL}),
}
_RICHNESS = (p.LOGITS, p.PROBS, p.LOSS, p.TOPK, p.LABEL)  # what a request without outputs gets, first allowed
POLICY_HELP = "logits (everything), probs, loss, topk:K (K >= 1) or label"


@dataclass(frozen=True)
class OutputPolicy:
    """A named set of allowed outputs; ``topk`` bounds K (None: up to the number of classes)."""

    name: str
    allowed: frozenset[str]
    topk: int | None = None

    def __str__(self) -> str:
        return self.name

    def describe(self) -> str:
        """What the policy allows, in words for an error message."""
        if not self.allowed:
            return "nothing"
        names = [o + (f" (K <= {self.topk})" if o == p.TOPK and self.topk else "") for o in _RICHNESS if o in self.allowed]
        return ", ".join(names)

    def covers(self, other: OutputPolicy) -> bool:
        """Everything ``other`` allows, this allows too."""
        k, other_k = self.topk or 1 << 62, other.topk or 1 << 62
        return other.allowed <= self.allowed and (p.TOPK not in other.allowed or other_k <= k)


def parse_policy(text: str) -> OutputPolicy:
    """``"logits"``, ``"probs"``, ``"loss"``, ``"topk:K"`` or ``"label"``; ``ValueError`` naming them otherwise."""
    name, _, k = str(text).strip().partition(":")
    if name not in _ALLOWED or (name == "topk") != bool(k):
        raise ValueError(f"output policy {text!r} is not one of {POLICY_HELP}")
    if name != "topk":
        return OutputPolicy(name, _ALLOWED[name])
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"output policy {text!r}: K must be a whole number >= 1, e.g. topk:5")
    return OutputPolicy(f"topk:{int(k)}", _ALLOWED["topk"], int(k))


def stricter(a: OutputPolicy, b: OutputPolicy) -> OutputPolicy:
    """The policy that allows only what both allow: the stricter one, or their meet when neither is."""
    if b.covers(a):
        return a
    if a.covers(b):
        return b
    ks = [k for k in (a.topk, b.topk) if k is not None]
    return OutputPolicy(f"{a} & {b}", a.allowed & b.allowed, min(ks) if ks else None)


def _count(output: p.RequestedOutput) -> int | None:
    """The output's ``classification`` K, or None; 400 unless a whole number >= 1."""
    k = (output.parameters or {}).get(p.PARAM_CLASSIFICATION)
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ProtocolError(f"output '{output.name}': parameter '{p.PARAM_CLASSIFICATION}' must be a whole number "
                            f">= 1 (the K of a top-K), received {k!r}")
    if output.name not in (p.LOGITS, p.PROBS, p.TOPK):
        raise ProtocolError(f"output '{output.name}' cannot be classified; '{p.PARAM_CLASSIFICATION}' applies to "
                            f"'{p.PROBS}', '{p.LOGITS}' and '{p.TOPK}'")
    return k


def classification_counts(request: p.InferenceRequest) -> dict[str, int]:
    """Output name -> K for every output returned as a top-K (``topk``, or ``classification: K``)."""
    counts = {o.name: _count(o) for o in request.outputs or []}
    return {name: k if k is not None else DEFAULT_TOPK for name, k in counts.items()
            if k is not None or name == p.TOPK}


def _permission(name: str, k: int | None) -> str:
    """The policy entry an output needs: a classified probs is a top-K; a classified logits is still logits."""
    return p.TOPK if name == p.PROBS and k is not None else name


def apply_policy(request: p.InferenceRequest, have_labels: bool, policy: OutputPolicy) -> p.InferenceRequest:
    """``request`` with its outputs checked against ``policy`` (403) and filled in: the richest allowed
    output when it names none, and a top-K's K (the policy's, else ``DEFAULT_TOPK``) where none is given."""
    if not request.outputs:
        default = p.LOSS if have_labels else p.LOGITS
        if default not in policy.allowed:
            default = next((o for o in _RICHNESS if o in policy.allowed and (o != p.LOSS or have_labels)), default)
        request = request.model_copy(update={"outputs": [p.RequestedOutput(name=default)]})
    filled = []
    for output in request.outputs or []:
        k = _count(output)
        if output.name == p.TOPK and k is None:
            k = policy.topk or DEFAULT_TOPK
            output = output.model_copy(update={"parameters": {**(output.parameters or {}), p.PARAM_CLASSIFICATION: k}})
        _check(policy, output.name, k)
        filled.append(output)
    return request.model_copy(update={"outputs": filled})


def _check(policy: OutputPolicy, name: str, k: int | None) -> None:
    if name not in p.OUTPUT_NAMES:
        return  # the planner names the unknown output (422)
    need = _permission(name, k)
    asked = f"output '{name}'" + (f" with {p.PARAM_CLASSIFICATION} {k}" if k is not None and name != p.TOPK else "")
    if need not in policy.allowed:
        raise ForbiddenError(f"{asked} is not allowed by this key's output policy '{policy}'; it allows "
                             f"{policy.describe()}")
    if need == p.TOPK and policy.topk is not None and k is not None and k > policy.topk:
        raise ForbiddenError(f"{asked} asks for the top {k}; this key's output policy '{policy}' allows K <= "
                             f"{policy.topk}")


def access(policy: OutputPolicy, decimals: int | None, noise: float) -> dict[str, Any]:
    """What the model metadata publishes under ``parameters["outputs"]`` (``protocol.OutputAccess``)."""
    allowed = [o for o in _RICHNESS if o in policy.allowed]
    return p.OutputAccess(policy=policy.name, allowed=allowed, topk=policy.topk, decimals=decimals,
                          noise=noise).model_dump()


def degradation_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The request's own ``output_noise`` (float >= 0) and ``output_decimals`` (int >= 0, or None), checked (400)."""
    noise = params.get(p.PARAM_OUTPUT_NOISE, 0.0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1e6:
        raise ProtocolError(f"parameter '{p.PARAM_OUTPUT_NOISE}' must be a number >= 0, received {noise!r}")
    decimals = params.get(p.PARAM_OUTPUT_DECIMALS)
    if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 12):
        raise ProtocolError(f"parameter '{p.PARAM_OUTPUT_DECIMALS}' must be a whole number in [0, 12], received {decimals!r}")
    return {"output_noise": float(noise), "output_decimals": decimals}
