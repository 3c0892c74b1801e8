"""Training objectives: next-token prediction on supervised positions and the auxiliary losses
(per-task, per-layer embedding and alignment losses; :func:`auxiliary_losses` sums them)."""

from olavlm.objectives.auxiliary import auxiliary_losses

__all__ = ["auxiliary_losses"]
