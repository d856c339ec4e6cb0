"""What a user's feedback label says about a served answer: the API counts it, the trainer's drift report shows it.

``neither`` (the photo is neither a dandelion nor grass) is not a verdict on the two-class answer: it is evidence
about the in-domain check. With the answer's ``in_domain`` it confirms a flag or shows a missed one; a
``dandelion`` or ``grass`` label on a flagged answer shows a photo wrongly flagged.
"""

from __future__ import annotations

from shared.labels import NEITHER

DOMAIN_OUTCOMES: tuple[str, ...] = (
    "confirmed_out_of_domain",
    "missed_out_of_domain",
    "wrongly_flagged",
    "confirmed_in_domain",
)
"""Every value :func:`domain_outcome` returns, in the order reports list them."""


def domain_outcome(in_domain: bool | None, label: str) -> str | None:
    """What ``label`` says about an answer's in-domain verdict; None when the answer had none (no score)."""
    if in_domain is None:
        return None
    if label == NEITHER:
        return "missed_out_of_domain" if in_domain else "confirmed_out_of_domain"
    return "confirmed_in_domain" if in_domain else "wrongly_flagged"
