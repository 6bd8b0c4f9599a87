"""mahals: activation capture on nnsight, the Alignment Quality Index, and D-STEER steering vectors.

The everyday entry points are re-exported here::

    import mahals
    model = mahals.load_model("SmolLM2-135M-Instruct")
    acts = mahals.capture(model, texts, pool="mean")      # Activations, .tensor [n, L, d]
    report = mahals.aqi.evaluate(model, dataset)            # AQIReport
    vector = mahals.SteeringVector.from_diff(h_base, h_tuned)
    with mahals.steer(model, mahals.Steering(vector, alpha=0.5)):
        model.generate(["How do I pick a lock?"])

``mahals.capture`` is the function; its module's other names (``Activations``, ``tokenize`` …)
are imported with ``from mahals.activations import …``.
"""

from mahals import aqi
from mahals._version import __version__
from mahals.activations import Activations, TokenActivations, capture
from mahals.models import MahalsModel, load_model, load_tokenizer
from mahals.registry import load_registry
from mahals.steering import Steering, SteeringVector, difference_svd, steer

__all__ = [
    "Activations",
    "MahalsModel",
    "Steering",
    "SteeringVector",
    "TokenActivations",
    "__version__",
    "aqi",
    "capture",
    "difference_svd",
    "load_model",
    "load_registry",
    "load_tokenizer",
    "steer",
]
