"""pfedla: personalized federated learning with layer-wise model aggregation (pFedLA)."""

from pfedla.errors import PfedlaError

__all__ = ["PfedlaError"]
