"""What the engine asks of an exit policy, and what a policy may know of the model.

The core calls a policy through this interface only; the policies themselves (rules, learned
classifiers, the registry that builds them from model args) live in :mod:`adainfer_lmeval.policies`
and import this, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adainfer_lmeval.errors import AdaInferError


@dataclass(frozen=True)
class ModelIdentity:
    """What a policy may know of the model it runs on (a trained policy checks it fits)."""

    name: str  # the short name (e.g. smollm2-135m) or the folder/hub id's last part
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int


#: where a stopping row's answer is read: ``lens`` its exit layer's states through the final norm
#: and head; ``continuation`` its scored positions carried on alone to the last layer first
#: (SimLens, :mod:`.continuation`)
EXIT_READOUTS = ("lens", "continuation")

#: how a continuation carries its tokens (:mod:`.continuation`): ``simlens`` token 0 and the carried
#: positions alone; ``filled`` the carried positions attending to the whole prompt, its keys and
#: values projected at every layer run from the layer-l states
CONTINUATION_CARRIES = ("simlens", "filled")


class ExitPolicy:
    """Base class. Subclasses set ``name``, ``params`` and override :meth:`decide`.

    ``features`` names the signals :meth:`decide` reads (registered in :mod:`.features`), one
    history column each; the engine runs exit checks only at layers where :meth:`consults_at`
    is true, only if ``features`` is not empty (a policy with no features, like ``static``,
    costs no head evaluations), and computes only what those signals read. ``exit_readout``
    (one of :data:`EXIT_READOUTS`) says how a row that stops before the last layer is read, and
    ``continuation_carry`` (one of :data:`CONTINUATION_CARRIES`) how its continuations, the exit
    read-out's and those of the signals read off it, carry their tokens.
    """

    name = "base"
    #: parameter name -> (type, help); values arrive as strings or numbers from model args
    params: dict[str, tuple[type, str]] = {}
    features: tuple[str, ...] = ()
    min_layer: int = 1
    exit_readout: str = "lens"
    continuation_carry: str = "simlens"

    def consults_at(self, layer: int, num_layers: int) -> bool:
        return self.min_layer <= layer < num_layers

    def decide(self, layer: int, num_layers: int, history: torch.Tensor) -> torch.Tensor:
        """Bool tensor [rows]: stop after ``layer``.

        ``history`` is float [rows, layer + 1, len(features)]: the features of layers
        0..layer, NaN for layers where the policy was not consulted.
        """
        raise NotImplementedError

    def bind(self, model: ModelIdentity) -> None:
        """Called once with the model the policy will run on: refuse what cannot work there.

        A trained policy loads or checks its file here (it must fit the model's depth).
        """
        if not 1 <= self.min_layer <= model.num_layers:
            raise AdaInferError(f"min_layer={self.min_layer} is outside 1..{model.num_layers} for this model")

    def describe(self) -> dict:
        """What the results JSON records about this policy."""
        return {"name": self.name, "min_layer": self.min_layer}
