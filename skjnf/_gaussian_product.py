"""The Gaussian product of linearised experts: a closed-form posterior given a subset of modalities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["flow_jacobian", "linearized_expert", "GaussianProduct"]


def flow_jacobian(flow: torch.nn.Module, z: Tensor) -> Tensor:
    """∂f(z)/∂z (n, D, D) of a flow's forward map u = f(z) at each row of z (n, D), in one
    forward and one backward pass (each row's map is independent of the others)."""
    n, dim = z.shape
    with torch.enable_grad():
        tiled = z.detach().expand(dim, n, dim).clone().requires_grad_(True)  # copy i gives row i of J
        u, _ = flow(tiled.reshape(-1, dim))
        picked = torch.diagonal(u.reshape(dim, n, dim), dim1=0, dim2=2)  # (n, D): u_i of copy i
        (grad,) = torch.autograd.grad(picked.sum(), tiled)
    return grad.transpose(0, 1)  # (n, D_u, D_z)


def linearized_expert(expert, scale_tril: Tensor, centre: Tensor):
    """Gaussian approximation of an expert z = f⁻¹(u), u ~ N(μ, σ²) (a
    :class:`~skjnf._distributions.FlowDistribution`), in the aggregate posterior's
    whitened coordinates y = L⁻¹(z − m): its mean ȳ (n, D) and precision Λ (n, D, D).

    Linearising f at z̄ = f⁻¹(μ) (the delta method): Λ = (diag(σ⁻¹) J L)ᵀ (diag(σ⁻¹) J L), with J
    the flow's Jacobian there; exact for an affine flow. Eigenvalues below 1 are raised to 1: no
    direction is left wider than the aggregate posterior the experts integrate to (the product
    stays proper; a wider linearisation comes from a flow's curvature far in its tails).
    """
    log_var = expert.log_var
    with torch.no_grad():
        z = expert.base_mean_image()
    jacobian = flow_jacobian(expert.flow, z).detach()
    tril = scale_tril.to(torch.float64)  # float64: precisions of tight experts reach 1e6 and more
    scaled = torch.exp(-0.5 * log_var.to(torch.float64))[..., None] * (jacobian.to(torch.float64) @ tril)
    eigenvalues, vectors = torch.linalg.eigh(scaled.transpose(1, 2) @ scaled)
    precision = (vectors * eigenvalues.clamp(min=1.0)[:, None, :]) @ vectors.transpose(1, 2)
    centred = (z - centre).to(torch.float64)[..., None]
    return torch.linalg.solve_triangular(tril, centred, upper=False)[..., 0], precision


class GaussianProduct:
    """N(μ, Λ⁻¹) ∝ Π_j N(ȳ_j, Λ_j⁻¹) / N(0, I)^{s−1}: the product of s linearised experts
    (:func:`linearized_expert`) divided by the aggregate posterior, in its whitened coordinates.

    Λ = Σ Λ_j − (s − 1) I ⪰ I and μ = Λ⁻¹ Σ Λ_j ȳ_j. This is the product-of-experts target of
    HMC (``subset_posterior="product"``) with each expert replaced by its Gaussian linearisation,
    so it needs no sampling; exact where the experts are Gaussian (a linear-Gaussian model).
    Latents come back in z = m + L y.
    """

    def __init__(self, experts: Sequence[tuple[Tensor, Tensor]], scale_tril: Tensor, centre: Tensor):
        eye = torch.eye(len(centre), dtype=experts[0][1].dtype, device=centre.device)
        precision = sum(p for _, p in experts) - (len(experts) - 1) * eye
        # Λ ⪰ I by construction; a row fails only on non-finite inputs, and its latent is then NaN
        self.cholesky, _ = torch.linalg.cholesky_ex(precision)  # (n, D, D), lower: Λ = C Cᵀ
        information = sum(p @ y[..., None] for y, p in experts)
        self.whitened_mean = torch.cholesky_solve(information, self.cholesky)[..., 0]
        self.scale_tril, self.centre = scale_tril, centre

    def _unwhiten(self, y: Tensor) -> Tensor:
        return (self.centre + y @ self.scale_tril.T.to(y.dtype)).to(self.centre.dtype)

    def mean(self) -> Tensor:
        return self._unwhiten(self.whitened_mean)

    def sample(self, noise: Tensor) -> Tensor:
        """Draws (k, n, D) from standard normal noise (k, n, D) or (k, 1, D): y = μ + C⁻ᵀ ε."""
        noise = noise.expand(noise.shape[0], *self.whitened_mean.shape)
        upper = self.cholesky.transpose(1, 2)
        offset = torch.linalg.solve_triangular(upper, noise.to(upper.dtype).permute(1, 2, 0), upper=True)
        return self._unwhiten(self.whitened_mean + offset.permute(2, 0, 1))
