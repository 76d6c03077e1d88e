"""How a fitted estimator is pickled: plain containers (numpy weights, dicts), device-independent,
and the pickles of earlier versions read back."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from ._spec import ModelSpec, build_module
from ._validation import Layout

__all__ = ["resolve_device", "plain_state", "restored_state", "RENAMED_PARAMETERS"]

#: Parameters renamed in 0.2 (old name: new name); pickles and skops files with the old ones load.
RENAMED_PARAMETERS = {"decoder": "likelihood", "decoder_scale": "likelihood_scale"}

#: Parameters added since 0.1 whose default would change what a 0.1 model answers: a 0.1 pickle
#: gets the value that keeps its behaviour (the paper's product of experts by HMC, no weight decay).
#: Other added parameters take their defaults.
_AS_IN_0_1 = {"subset_posterior": "product_prior", "expert_weight_decay": 0.0}

#: Module state added since 0.1; a pickle without them gets their defaults, the old behaviour:
#: no routes, no Gaussian products, no linear paths beside the MLPs, no clipping to fit's input
#: ranges, no learned features for missing modalities.
_ADDED_STATE = ("target_routes", "subset_products", "target_routes_own")
_ADDED_SUFFIXES = (".linear_weight", ".linear_bias", ".skip.weight")
#: The joint encoder's linear paths (zero: the MLP alone, as before them).
_ADDED_PARTS = (".missing_features.", "joint_encoder.skips.", "joint_encoder.missing_skips.")
#: The amortised subset posterior, its routes and the aggregate posterior's fit, all added in 0.2.
_ADDED_IN_0_2 = ("subset_encoder.", "subset_flow.", "subset_routes", "aggregate_")


def resolve_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'auto'.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available on this machine; "
            "use device='cpu' or device='auto'."
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'auto'.")
    return resolved


def plain_state(state: dict, module: torch.nn.Module | None) -> dict:
    """The estimator's ``__dict__`` as plain containers: the fitted module as numpy weights, the
    layout and the model spec as dicts; the device is not kept (it is the ``device`` parameter's)."""
    state = dict(state)
    state.pop("_device", None)
    if isinstance(state.get("_spec"), ModelSpec):
        state["_spec"] = state["_spec"].as_dict()
    if module is not None:
        state["module_"] = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    if "_layout" in state:
        layout = state["_layout"]
        state["_layout"] = {
            "names": list(layout.names),
            "dims": list(layout.dims),
            "columns": None if layout.columns is None else [c.tolist() for c in layout.columns],
            "shapes": None if layout.shapes is None else [list(shape) for shape in layout.shapes],
        }
    return state


def restored_state(state: dict, defaults: dict) -> dict:
    """:func:`plain_state`'s inverse, for this version's pickles and earlier ones: renamed
    parameters take their new names, parameters added since get ``defaults`` (or, for a 0.1
    model, the value that keeps its behaviour), and the module is rebuilt (frozen, as ``fit``
    leaves it) on the ``device`` parameter's device if this machine has it, else on the CPU."""
    state = dict(state)
    for old, new in RENAMED_PARAMETERS.items():
        if old in state:
            state.setdefault(new, state.pop(old))
    weights = state.get("module_")
    from_0_1 = isinstance(weights, dict) and "aggregate_mean" not in weights
    for name, value in defaults.items():
        state.setdefault(name, _AS_IN_0_1.get(name, value) if from_0_1 else value)
    if isinstance(state.get("_spec"), Mapping):  # stored as plain containers (and by 0.1)
        state["_spec"] = ModelSpec.from_dict(state["_spec"])
    if isinstance(state.get("_layout"), dict):
        layout = state["_layout"]
        columns = layout["columns"]
        shapes = layout.get("shapes")
        state["_layout"] = Layout(
            tuple(layout["names"]),
            tuple(layout["dims"]),
            None if columns is None else tuple(np.asarray(c, dtype=np.intp) for c in columns),
            None if shapes is None else tuple(tuple(shape) for shape in shapes),
        )
    if isinstance(weights, dict):
        module = build_module(state["_spec"], None, 0)
        weights = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        for key, value in module.state_dict().items():
            new = key in _ADDED_STATE or key.endswith(_ADDED_SUFFIXES)
            filled = new or any(part in key for part in _ADDED_PARTS) or key.startswith("input_ranges.")
            # a 0.1 model has no subset posterior: these are unused by "product_prior"
            if filled or (from_0_1 and key.startswith(_ADDED_IN_0_2)):
                weights.setdefault(key, value)
        module.load_state_dict(weights)
        device = _loaded_device(state.get("device", "cpu"))
        state["module_"] = module.to(device).eval().requires_grad_(False)
        state["_device"] = device
    return state


def _loaded_device(device) -> torch.device:
    """The estimator's device if this machine has it, else CPU (pickles are device-independent)."""
    try:
        return resolve_device(device)
    except ValueError:
        warnings.warn(
            f"device={device!r} is not available here; the model was loaded on CPU.", UserWarning, stacklevel=2
        )
        return torch.device("cpu")
