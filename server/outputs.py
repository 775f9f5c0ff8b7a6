"""What leaves the server: the requested outputs derived from the logits, after the degradations.

    logits [P, N, C]  --noise (--output-noise S: Gaussian, seeded by key and request id)-->  noisy logits
    noisy logits -> loss [P] (CE or focal against the labels), logits, probs (softmax) [P, N, C],
                    label (argmax, ties: the lowest index) INT64 [P, N],
                    top K BYTES [P, N, K] of "<value>:<index>" (``topk``, or ``classification: K``)
    every float returned -> rounded to --output-decimals D (top-K values before they are formatted)

The noise is drawn from a generator seeded by (the server's noise seed, the key, the request id): a
retry or a replay of a request id gets the same outputs, also when it is recomputed after a restart
(the ledger remembers the id); two ids differ. A request without an id gets fresh noise.
Top-K strings follow Triton's classification extension exactly: the value as C++ ``std::to_string``
prints a float (``%f``, six decimals), a colon, the class index; sorted by value, highest first
(equal values: the lower index first).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from bptvlm.shared import protocol as p
from bptvlm.shared.errors import InvalidTensorError

from .model import loss_per_candidate
from .plan import RequestPlan


@dataclass(frozen=True)
class Degradation:
    """``noise``: std of the Gaussian added to the logits; ``decimals``: rounding of every float output."""

    noise: float = 0.0
    decimals: int | None = None
    seed: int = 0  # the server's noise seed: with the request id it fixes the noise (keep it private)

    def stricter(self, noise: float, decimals: int | None) -> Degradation:
        """This degradation or a request's own, whichever is noisier and coarser (a caller cannot ask for less)."""
        kept = [d for d in (self.decimals, decimals) if d is not None]
        return Degradation(max(self.noise, noise), min(kept) if kept else None, self.seed)

    def generator(self, scope: int, request_id: str | None) -> np.random.Generator:
        """The noise generator of one request: fixed by (seed, key, id); fresh without an id."""
        if request_id is None:
            return np.random.default_rng(secrets.randbits(128))
        digest = hashlib.sha256(f"{self.seed}\x00{scope}\x00{request_id}".encode("utf-8", "surrogatepass")).digest()
        return np.random.default_rng(int.from_bytes(digest[:16], "little"))

    def noisy(self, logits: torch.Tensor, scope: int, request_id: str | None) -> torch.Tensor:
        """``logits`` [P, N, C] (float32) plus the request's noise (unchanged when ``noise`` is 0)."""
        logits = logits.float()
        if self.noise <= 0:
            return logits
        draw = self.generator(scope, request_id).standard_normal(tuple(logits.shape), dtype=np.float32)
        return logits + torch.from_numpy(draw * np.float32(self.noise)).to(logits.device)

    def rounded(self, array: np.ndarray) -> np.ndarray:
        """float32 ``array`` rounded to ``decimals`` (unchanged when None)."""
        if self.decimals is None:
            return array
        return np.round(array.astype(np.float64), self.decimals).astype(np.float32)


def triton_value(value: float) -> str:
    """A float as Triton's classification writes it (C++ ``std::to_string``: ``%f``)."""
    return f"{value:f}"


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """float32 ``values`` [P, N, C] -> BYTES (object of bytes) [P, N, min(k, C)] of ``"<value>:<index>"``."""
    k = min(k, values.shape[-1])
    order = np.argsort(-values, axis=-1, kind="stable")[..., :k]  # highest first; equal values: lower index first
    picked = np.take_along_axis(values, order, axis=-1)
    out = np.empty(order.shape, dtype=object)
    flat_out, flat_v, flat_i = out.reshape(-1), picked.reshape(-1), order.reshape(-1)
    for j in range(flat_out.size):
        flat_out[j] = f"{triton_value(float(flat_v[j]))}:{int(flat_i[j])}".encode()
    return out


def _check_finite(name: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():  # finite inputs can overflow (3e38): refuse, and charge nothing
        raise InvalidTensorError(
            f"output '{name}': {int((~np.isfinite(array)).sum())} values are NaN or infinite (finite inputs "
            "overflowed); scale the prompts down. Nothing was charged"
        )


def derive_outputs(logits: torch.Tensor, plan: RequestPlan, degradation: Degradation) -> dict[str, np.ndarray]:
    """The plan's wanted outputs from the (already noisy) float32 ``logits`` [P, N, C]."""
    outputs: dict[str, np.ndarray] = {}
    if p.LOSS in plan.wanted:
        assert plan.labels is not None
        labels = torch.from_numpy(plan.labels.astype(np.int64)).to(logits.device)
        loss = loss_per_candidate(logits, labels, plan.params["loss"], plan.params["focal_gamma"])
        outputs[p.LOSS] = loss.cpu().numpy().astype(np.float32)
    raw = logits.cpu().numpy().astype(np.float32, copy=False)
    if plan.wanted - {p.LOSS}:
        _check_finite(p.LOGITS, raw)
    probs = torch.softmax(logits, dim=-1).cpu().numpy() if plan.wanted & {p.PROBS, p.TOPK} else None
    for name in (p.LOGITS, p.PROBS, p.TOPK, p.LABEL):
        if name not in plan.wanted:
            continue
        if name == p.LABEL:
            outputs[name] = raw.argmax(-1).astype(np.int64)  # ties: the lowest class index
            continue
        values = raw if name == p.LOGITS else probs
        assert values is not None
        values = degradation.rounded(values)
        k = plan.classify.get(name)
        outputs[name] = values if k is None else top_k(values, k)
    for name, array in outputs.items():
        if array.dtype == np.float32:
            if name == p.LOSS:
                outputs[name] = array = degradation.rounded(array)
            _check_finite(name, array)
    return outputs
