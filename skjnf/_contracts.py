"""The contract probe: every network of a freshly built model run once on two training rows."""

from __future__ import annotations

import torch

from ._modules import JNFModule, frozen_inference

__all__ = ["check_contracts"]


def check_contracts(module: JNFModule, sample: dict) -> None:
    """Run every network once on two rows; a broken contract is a ValueError naming modality and part."""
    D = module.latent_dim
    with frozen_inference(module):
        for j, name in enumerate(module.names):
            x = module.encoder_input(j, sample[name])
            n = x.shape[0]
            _expect(
                lambda j=j, x=x: module.joint_encoder.trunks[j](x),
                lambda h, n=n: h.dim() == 2 and h.shape[0] == n,
                name,
                "trunk",
                f"features of shape ({n}, width)",
            )
            _expect(
                lambda j=j, x=x: module.encoders[j](x),
                lambda out, n=n: len(out) == 2 and all(t.shape == (n, D) for t in out),
                name,
                "encoder",
                f"(mean, log_variance), each of shape ({n}, {D})",
            )
            n_outputs = module.likelihoods[j].n_outputs
            for z in (torch.zeros(n, D), torch.zeros(3, n, D)):
                _expect(
                    lambda j=j, z=z: module.natural_parameters(j, z),
                    lambda a, z=z, k=n_outputs: a.shape == (*z.shape[:-1], k),
                    name,
                    "decoder",
                    f"natural parameters with {n_outputs} values per row, for z of shape {tuple(z.shape)}",
                )
            _check_flow(module.flows[j], name, D)


def _expect(call, ok, name: str, part: str, expected: str) -> None:
    try:
        out = call()
    except Exception as error:  # a user network failing on a probe batch: say which one
        raise ValueError(
            f"Modality {name!r}: the {part} failed on a probe batch ({error!r}); it must return {expected}."
        ) from error
    if not ok(out):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"Modality {name!r}: the {part} must return {expected}; got {got}.")


def _check_flow(flow, name: str, D: int) -> None:
    if not callable(getattr(flow, "inverse", None)):
        raise ValueError(f"Modality {name!r}: the flow has no inverse(u) method; it must map u back to (z, log_det).")
    z = torch.linspace(-1.0, 1.0, 2 * D).reshape(2, D)
    _expect(
        lambda: flow(z),
        lambda out: len(out) == 2 and out[0].shape == (2, D) and out[1].shape == (2,),
        name,
        "flow",
        f"(u, log_det) of shapes (2, {D}) and (2,) from forward(z)",
    )
    u, _ = flow(z)
    _expect(
        lambda: flow.inverse(u),
        lambda out: len(out) == 2 and out[0].shape == (2, D),
        name,
        "flow",
        f"(z, log_det) of shapes (2, {D}) and (2,) from inverse(u)",
    )
    if not torch.allclose(flow.inverse(u)[0], z, atol=1e-3):
        raise ValueError(f"Modality {name!r}: the flow's inverse does not undo its forward pass.")
