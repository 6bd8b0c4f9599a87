"""mahals: activation capture on nnsight, the Alignment Quality Index, and D-STEER steering vectors.

The everyday entry points are re-exported here::

    import mahals
    model = mahals.load_model("SmolLM2-135M-Instruct")
    acts = mahals.capture(model, texts, pool="mean")      # Activations, .tensor [n, L, d]
    report = mahals.aqi.evaluate(model, dataset)            # AQIReport
    vector = mahals.SteeringVector.from_diff(h_base, h_tuned)

``mahals.capture`` is the function; its module's other names (``Activations``, ``tokenize`` …)
are imported with ``from mahals.activations import …``.
"""

from mahals import aqi  # noqa: E402
from mahals._version import __version__
from mahals.activations import Activations, TokenActivations, capture  # noqa: E402
from mahals.models import MahalsModel, load_model, load_tokenizer  # noqa: E402
from mahals.registry import load_registry  # noqa: E402
from mahals.steering import SteeringVector, difference_svd  # noqa: E402

__all__ = [
    "Activations",
    "MahalsModel",
    "SteeringVector",
    "TokenActivations",
    "__version__",
    "aqi",
    "capture",
    "difference_svd",
    "load_model",
    "load_registry",
    "load_tokenizer",
]
