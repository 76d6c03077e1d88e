"""Hamiltonian Monte Carlo on the product-of-experts posterior of a conditioning subset."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ._chunks import row_chunks
from ._distributions import FlowDistribution, std_normal_log_prob
from ._validation import check_int

__all__ = [
    "Expert",
    "MAX_CHAIN_ROWS_CPU",
    "MAX_CHAIN_ROWS_CUDA",
    "TARGET_ACCEPTANCE",
    "STEP_SIZE_BOUNDS",
    "STEP_SIZE_JITTER",
    "ESCAPE_RADIUS",
    "HMCResult",
    "product_of_experts_log_prob",
    "hmc_sample",
]

#: One expert q_j(z | x_j) of the n rows: base mean and log-variance (n, D) and flow f_j (z -> u).
Expert = FlowDistribution

#: Most chains x rows simulated at once (docs/algorithm.md §4.3 item 2: at most 2**14 on CPU);
#: rows are chunked above it. On CPU small chunks keep the MADE activations in cache: 4,000 rows
#: given 2 of 3 modalities took 25.3 s with 2**14, 19.6 s with 2**12, 17.5 s with 2**10.
MAX_CHAIN_ROWS_CPU = 2**10
MAX_CHAIN_ROWS_CUDA = 2**16

#: Dual averaging aims at this mean acceptance probability during burn-in.
TARGET_ACCEPTANCE = 0.75

#: Every adapted step size is kept inside these bounds.
STEP_SIZE_BOUNDS = (1e-5, 10.0)

#: Each chain's step is ε·U(1 − j, 1 + j) afresh every iteration (Neal 2011, §4.2): this breaks
#: the resonances of a fixed trajectory length, which make acceptance jump up and down with ε.
STEP_SIZE_JITTER = 0.1

#: A final state with some |z_d| above this hints at an improper target (docs/algorithm.md §4.2 caveat).
ESCAPE_RADIUS = 10.0

# Hoffman & Gelman (2014), section 3.2: dual averaging shrinks log ε towards log(10·ε₀) (a bias
# towards larger steps), with shrinkage γ, offset t₀ and averaging decay κ.
_DUAL_AVERAGING_MU_FACTOR = 10.0
_DUAL_AVERAGING_GAMMA = 0.05
_DUAL_AVERAGING_T0 = 10.0
_DUAL_AVERAGING_KAPPA = 0.75

# The first half of the iterations is burn-in (adaptation, then discarded).
_BURN_IN_FRACTION = 0.5

# A trajectory whose energy grows by more than this is counted as divergent.
_DIVERGENCE_THRESHOLD = 1000.0

# Shrinkage of the adapted inverse mass towards a small constant (Stan's regularisation).
_MASS_PRIOR_COUNT = 5.0
_MASS_PRIOR_VALUE = 1e-3


@dataclass
class HMCResult:
    """What :func:`hmc_sample` returns; tensors live on the experts' device.

    Attributes
    ----------
    mean : Tensor of shape (n, D)
        Posterior mean: positions averaged over chains and post-burn-in iterations.
    draws : Tensor of shape (n_chains, n, D)
        Final state of every chain: independent approximate posterior draws.
    acceptance : float
        Fraction of post-burn-in proposals accepted, over all chains and rows.
    acceptance_per_row : Tensor of shape (n,)
        The same fraction for each row.
    step_size : Tensor of shape (n,)
        Leapfrog step size used after burn-in, per row.
    n_divergent : int
        Post-burn-in trajectories with a non-finite energy or an energy error above 1000
        (burn-in is left out: step-size adaptation tries too-large steps on purpose).
    escaped : Tensor of shape (n,), dtype bool
        Rows with a final state outside ``[-10, 10]^D``: the target is probably improper there.
    """

    mean: Tensor
    draws: Tensor
    acceptance: float
    acceptance_per_row: Tensor
    step_size: Tensor
    n_divergent: int
    escaped: Tensor


def product_of_experts_log_prob(
    z: Tensor, experts: Sequence[Expert], divisor: Callable[[Tensor], Tensor] = std_normal_log_prob
) -> Tensor:
    """Unnormalised log π_S(z) = Σ_j log q_j(z | x_j) − (s − 1)·log r(z).

    ``z`` has shape (..., n, D) and each expert's mean and log-variance (n, D); returns (..., n).
    ``divisor`` is log r: the prior N(0, I) by default (the paper's product), or the experts'
    own marginal, the joint encoder's aggregate posterior (docs/algorithm.md §4.2).
    """
    log_prob = sum(expert.log_prob(z) for expert in experts)
    return log_prob - (len(experts) - 1) * divisor(z)


#: A chunk's unnormalised log target: z (C, n_chunk, D) -> (C, n_chunk).
LogTarget = Callable[[Tensor], Tensor]


def _log_target_and_grad(z: Tensor, target: LogTarget) -> tuple[Tensor, Tensor]:
    """log π and its gradient in z, chains treated independently; nothing else is differentiated."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        log_prob = target(z)
        (grad,) = torch.autograd.grad(log_prob.sum(), z)
    return log_prob.detach(), grad


def _initial_positions(experts: Sequence[Expert], n_chains: int, generator: torch.Generator) -> Tensor:
    """One draw per chain from a uniformly chosen expert, z = f_j⁻¹(u) with u ~ N(μ_j, σ_j²)."""
    means = torch.stack([expert.loc for expert in experts])  # (s, n, D)
    stds = torch.stack([torch.exp(0.5 * expert.log_var) for expert in experts])
    n_rows, dim = means.shape[1:]
    device, dtype = means.device, means.dtype
    choice = torch.randint(len(experts), (n_chains, n_rows), generator=generator, device=device)
    noise = torch.randn((n_chains, n_rows, dim), generator=generator, device=device, dtype=dtype)
    rows = torch.arange(n_rows, device=device)
    base = means[choice, rows] + stds[choice, rows] * noise  # (C, n, D)
    z = torch.empty_like(base)
    # Only the chains assigned to expert j go through its (sequential, costly) inverse.
    for j, expert in enumerate(experts):
        picked = choice == j
        z[picked] = expert.flow.inverse(base[picked])[0]
    return z


def _initial_step_size(experts: Sequence[Expert]) -> Tensor:
    """ε₀ per row: half the smallest expert's mean base standard deviation."""
    mean_stds = torch.stack([torch.exp(0.5 * expert.log_var).mean(-1) for expert in experts])
    return (0.5 * mean_stds.min(0).values).clamp(*STEP_SIZE_BOUNDS)


class _DualAveraging:
    """Per-row dual averaging of log ε towards a target acceptance (Hoffman & Gelman 2014)."""

    def __init__(self, step_size: Tensor, target: float = TARGET_ACCEPTANCE) -> None:
        self.target = target
        self.mu = torch.log(_DUAL_AVERAGING_MU_FACTOR * step_size)
        self.t = 0
        self.h_bar = torch.zeros_like(step_size)
        self.log_step_bar = torch.zeros_like(step_size)

    def update(self, accept_prob: Tensor) -> Tensor:
        """Feed one iteration's mean acceptance probability per row; return the next ε."""
        self.t += 1
        weight = 1.0 / (self.t + _DUAL_AVERAGING_T0)
        self.h_bar = (1.0 - weight) * self.h_bar + weight * (self.target - accept_prob)
        log_step = self.mu - math.sqrt(self.t) / _DUAL_AVERAGING_GAMMA * self.h_bar
        log_step = log_step.clamp(*(math.log(b) for b in STEP_SIZE_BOUNDS))
        decay = self.t**-_DUAL_AVERAGING_KAPPA
        self.log_step_bar = decay * log_step + (1.0 - decay) * self.log_step_bar
        return torch.exp(log_step)

    def final(self) -> Tensor:
        """The averaged iterate ε̄, used once burn-in is over."""
        return torch.exp(self.log_step_bar)


class _RunningVariance:
    """Per-row, per-dimension variance over chains x iterations (Welford, batched as Chan et al.)."""

    def __init__(self, like: Tensor) -> None:
        self.count = 0
        self.mean = torch.zeros_like(like, dtype=torch.float64)
        self.sum_sq = torch.zeros_like(like, dtype=torch.float64)

    def add(self, z: Tensor) -> None:
        """Add all chains of one iteration, ``z`` of shape (C, n, D)."""
        z = z.double()
        batch_count = z.shape[0]
        batch_mean = z.mean(0)
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.sum_sq += ((z - batch_mean) ** 2).sum(0) + delta**2 * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.count = total

    def regularised_inverse_mass(self) -> Tensor:
        """M⁻¹ = (c/(c+5))·v + 1e-3·5/(c+5), shrinking a noisy variance towards a small value."""
        c, prior = self.count, _MASS_PRIOR_COUNT
        variance = self.sum_sq / max(c - 1, 1)
        return (c / (c + prior)) * variance + _MASS_PRIOR_VALUE * prior / (c + prior)


def _leapfrog(
    z: Tensor,
    momentum: Tensor,
    grad: Tensor,
    step: Tensor,
    inverse_mass: Tensor,
    n_leapfrog: int,
    target: LogTarget,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n_leapfrog`` steps from (z, p) with the cached gradient; one target evaluation per step."""
    momentum = momentum + 0.5 * step * grad
    for i in range(n_leapfrog):
        z = z + step * inverse_mass * momentum
        log_prob, grad = _log_target_and_grad(z, target)
        momentum = momentum + (step if i < n_leapfrog - 1 else 0.5 * step) * grad
    return z, momentum, log_prob, grad


def _is_finite_state(z: Tensor, log_prob: Tensor, grad: Tensor) -> Tensor:
    """(C, n) mask of chains whose position, target and gradient are all finite."""
    return torch.isfinite(log_prob) & torch.isfinite(z).all(-1) & torch.isfinite(grad).all(-1)


def _start_chains(
    experts: Sequence[Expert], target: LogTarget, n_chains: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Initial positions with their cached target and gradient; non-finite starts move to 0."""
    z = _initial_positions(experts, n_chains, generator)
    log_prob, grad = _log_target_and_grad(z, target)
    finite = _is_finite_state(z, log_prob, grad)
    if not bool(finite.all()):
        z = torch.where(finite[..., None], z, torch.zeros_like(z))
        log_prob, grad = _log_target_and_grad(z, target)
    return z, log_prob, grad


def _hmc_transition(
    state: tuple[Tensor, Tensor, Tensor],
    step: Tensor,
    inverse_mass: Tensor,
    n_leapfrog: int,
    target: LogTarget,
    generator: torch.Generator,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor, Tensor]:
    """One HMC iteration of every chain.

    Returns the new (z, log π, ∇ log π), the (C, n) accepted mask and log acceptance ratio,
    and the number of divergent trajectories (a 0-d tensor: no host synchronisation).
    """
    z, log_prob, grad = state
    jitter = torch.rand(z.shape[:-1], generator=generator, device=z.device, dtype=z.dtype)
    step = step * (1.0 + STEP_SIZE_JITTER * (2.0 * jitter - 1.0))  # (C, n)
    momentum = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    momentum = momentum / inverse_mass.sqrt()  # p ~ N(0, M)
    energy = -log_prob + 0.5 * (momentum**2 * inverse_mass).sum(-1)
    z_new, momentum, log_prob_new, grad_new = _leapfrog(
        z, momentum, grad, step[..., None], inverse_mass, n_leapfrog, target
    )
    energy_new = -log_prob_new + 0.5 * (momentum**2 * inverse_mass).sum(-1)
    valid = _is_finite_state(z_new, log_prob_new, grad_new) & torch.isfinite(energy_new)
    log_accept = torch.where(valid, energy - energy_new, -torch.inf)
    log_accept = torch.nan_to_num(log_accept, nan=-torch.inf, posinf=torch.inf)
    n_divergent = (~valid | (energy_new - energy > _DIVERGENCE_THRESHOLD)).sum()

    uniform = torch.rand(log_accept.shape, generator=generator, device=z.device, dtype=z.dtype)
    accept = torch.log(uniform) < log_accept
    # Rejection by selection, never by arithmetic: a NaN proposal cannot reach the state.
    state = (
        torch.where(accept[..., None], z_new, z),
        torch.where(accept, log_prob_new, log_prob),
        torch.where(accept[..., None], grad_new, grad),
    )
    return state, accept, log_accept, n_divergent


def _hmc_rows(
    experts: Sequence[Expert],
    target: LogTarget,
    n_chains: int,
    n_steps: int,
    n_leapfrog: int,
    step_size: float | str,
    generator: torch.Generator,
    adapt_mass: bool,
) -> HMCResult:
    """HMC for one chunk of rows: all chains of all rows advance together as one (C, n, D) tensor."""
    state = _start_chains(experts, target, n_chains, generator)
    n_rows, dim = state[0].shape[1:]
    device, dtype = state[0].device, state[0].dtype
    adapt_step = step_size == "auto"
    if adapt_step:
        step = _initial_step_size(experts).to(dtype)
        dual_averaging = _DualAveraging(step)
    else:
        step = torch.full((n_rows,), float(step_size), device=device, dtype=dtype)
    n_burn = int(n_steps * _BURN_IN_FRACTION)
    window_start, window_end = (n_burn // 4, n_burn // 2) if adapt_mass else (0, 0)
    running_variance = _RunningVariance(state[0][0])
    inverse_mass = torch.ones((n_rows, dim), device=device, dtype=dtype)

    position_sum = torch.zeros((n_rows, dim), device=device, dtype=torch.float64)
    accepted = torch.zeros(n_rows, device=device, dtype=torch.float64)
    n_divergent = torch.zeros((), device=device, dtype=torch.int64)
    for t in range(1, n_steps + 1):
        state, accept, log_accept, divergent = _hmc_transition(state, step, inverse_mass, n_leapfrog, target, generator)
        if t > n_burn:
            position_sum += state[0].sum(0, dtype=torch.float64)
            accepted += accept.sum(0, dtype=torch.float64)
            n_divergent += divergent
            continue
        if window_start < t <= window_end:
            running_variance.add(state[0])
            if t == window_end:
                inverse_mass = running_variance.regularised_inverse_mass().to(dtype)
                if adapt_step:  # the current ε was tuned for the identity mass
                    dual_averaging = _DualAveraging(step)
        if adapt_step:
            step = dual_averaging.update(torch.exp(log_accept.clamp(max=0.0)).mean(0))
            if t == n_burn:
                step = dual_averaging.final()

    n_kept = n_chains * (n_steps - n_burn)
    acceptance_per_row = (accepted / n_kept).to(dtype)
    z = state[0]
    return HMCResult(
        mean=(position_sum / n_kept).to(dtype),
        draws=z,
        acceptance=float(acceptance_per_row.mean()),
        acceptance_per_row=acceptance_per_row,
        step_size=step,
        n_divergent=int(n_divergent),
        escaped=(z.abs() > ESCAPE_RADIUS).any(-1).any(0),
    )


def _check_arguments(
    experts: Sequence[Expert], n_chains: int, n_steps: int, n_leapfrog: int, step_size: float | str
) -> None:
    """Raise ValueError naming the first invalid argument of :func:`hmc_sample`."""
    if len(experts) == 0:
        raise ValueError("hmc_sample needs at least one expert; got an empty sequence.")
    shape = experts[0].loc.shape
    for j, expert in enumerate(experts):
        mean, log_var = expert.loc, expert.log_var
        if mean.ndim != 2 or mean.shape != shape or log_var.shape != shape:
            raise ValueError(
                f"Expert {j}: mean and log-variance must both have the shape (n, D) = {tuple(shape)} "
                f"of expert 0; got {tuple(mean.shape)} and {tuple(log_var.shape)}."
            )
    for name, value in [("n_chains", n_chains), ("n_steps", n_steps), ("n_leapfrog", n_leapfrog)]:
        check_int(value, name)
    if step_size == "auto":
        return
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size < math.inf:
        raise ValueError(f'step_size must be "auto" or a positive finite float; got {step_size!r}.')


@torch.no_grad()
def hmc_sample(
    experts: Sequence[Expert],
    n_chains: int,
    n_steps: int,
    n_leapfrog: int,
    step_size: float | str = "auto",
    generator: torch.Generator | None = None,
    *,
    max_chain_rows: int | None = None,
    adapt_mass: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log_target: Callable[[Tensor, slice], Tensor] | None = None,
) -> HMCResult:
    """Sample the product-of-experts posterior π_S of every row (or another target) with HMC.

    Parameters
    ----------
    experts : sequence of FlowDistribution
        The s experts of the conditioning set, for the n rows (base mean and log-variance
        (n, D) each); ``flow(z)`` returns ``(u, log_det)`` and ``flow.inverse(u)`` ``(z, _)``.
    n_chains : int
        Independent chains per row, C.
    n_steps : int
        HMC iterations T; the first ``n_steps // 2`` are burn-in (adaptation, then discarded).
    n_leapfrog : int
        Leapfrog steps L per iteration, one target-and-gradient evaluation each.
    step_size : "auto" or float, default="auto"
        ``"auto"``: per-row dual averaging towards acceptance 0.75 during burn-in, starting from
        half the smallest expert's mean base standard deviation, then frozen. A float fixes ε.
    generator : torch.Generator, optional
        Source of all randomness (on the experts' device); the global RNG is never used.
    max_chain_rows : int, optional
        Most chains x rows simulated at once; defaults to 2**10 on CPU, 2**16 on CUDA.
    adapt_mass : bool, default=False
        Adapt a diagonal mass matrix per row from positions in burn-in iterations
        [n_burn/4, n_burn/2), then restart step-size adaptation.
    progress : callable, optional
        Called as ``progress(chunk_index, n_chunks)`` after each chunk of rows.
    log_target : callable, optional
        ``log_target(z, rows)``: the unnormalised log target of rows ``rows`` (a slice) at
        z (C, n_rows, D), shape (C, n_rows). ``None``: the product of ``experts`` divided by the
        prior, :func:`product_of_experts_log_prob`. The experts still start the chains and set
        the first step size.

    Returns
    -------
    HMCResult
        Posterior mean, final draws and diagnostics, rows in input order.

    Notes
    -----
    The target is ``Σ_j log q_j(z | x_j) − (s − 1)·log N(z; 0, I)`` (docs/algorithm.md §4.2);
    one target-and-gradient evaluation per leapfrog step, cached for accepted states, so a
    chain costs ``1 + n_steps * n_leapfrog`` evaluations. Chains start from a uniformly chosen
    expert through its inverse flow; chains whose start is not finite restart at 0. Each
    chain's step is jittered by ±10 % every iteration, which keeps a fixed trajectory length
    from resonating with the target's scales. A proposal with a non-finite position, target,
    gradient or energy is rejected by selection, so rejected chains keep their last finite
    state. Rows are chunked sequentially and draw from one generator: results are reproducible
    for a fixed seed and ``max_chain_rows``, statistically but not bitwise equal across chunk
    sizes.

    References
    ----------
    Neal, R. M. (2011). MCMC using Hamiltonian dynamics. Handbook of MCMC, chapter 5.
    Hoffman, M. D. and Gelman, A. (2014). The No-U-Turn Sampler. JMLR 15, section 3.2.

    Examples
    --------
    >>> import torch
    >>> class Identity(torch.nn.Module):
    ...     def forward(self, z):
    ...         return z, z.new_zeros(z.shape[:-1])
    ...     def inverse(self, u):
    ...         return u, u.new_zeros(u.shape[:-1])
    >>> from skjnf._distributions import FlowDistribution
    >>> expert = FlowDistribution(torch.ones(2, 3), torch.zeros(2, 3), Identity())
    >>> result = hmc_sample([expert, expert], 16, 20, 5, generator=torch.Generator().manual_seed(0))
    >>> result.mean.shape, result.draws.shape
    (torch.Size([2, 3]), torch.Size([16, 2, 3]))
    """
    _check_arguments(experts, n_chains, n_steps, n_leapfrog, step_size)
    if generator is None:
        generator = torch.Generator(device=experts[0].loc.device)
    n_rows = len(experts[0])
    if max_chain_rows is None:
        is_cuda = experts[0].loc.device.type == "cuda"
        max_chain_rows = MAX_CHAIN_ROWS_CUDA if is_cuda else MAX_CHAIN_ROWS_CPU
    parts = row_chunks(n_rows, n_chains, max_chain_rows)
    chunks = []
    for index, rows in enumerate(parts):
        chunk_experts = [expert.rows(rows) for expert in experts]
        if log_target is None:
            target = partial(product_of_experts_log_prob, experts=chunk_experts)
        else:
            target = partial(log_target, rows=rows)
        chunks.append(_hmc_rows(chunk_experts, target, n_chains, n_steps, n_leapfrog, step_size, generator, adapt_mass))
        if progress is not None:
            progress(index, len(parts))
    return _concatenate(chunks, experts, n_chains)


def _concatenate(chunks: list[HMCResult], experts: Sequence[Expert], n_chains: int) -> HMCResult:
    """Join per-chunk results along the row axis."""
    if not chunks:
        mean = experts[0].loc
        return HMCResult(
            mean=mean.clone(),
            draws=mean.new_empty((n_chains, *mean.shape)),
            acceptance=math.nan,
            acceptance_per_row=mean.new_empty(0),
            step_size=mean.new_empty(0),
            n_divergent=0,
            escaped=mean.new_empty(0, dtype=torch.bool),
        )
    acceptance_per_row = torch.cat([c.acceptance_per_row for c in chunks])
    return HMCResult(
        mean=torch.cat([c.mean for c in chunks]),
        draws=torch.cat([c.draws for c in chunks], dim=1),
        acceptance=float(acceptance_per_row.mean()),
        acceptance_per_row=acceptance_per_row,
        step_size=torch.cat([c.step_size for c in chunks]),
        n_divergent=sum(c.n_divergent for c in chunks),
        escaped=torch.cat([c.escaped for c in chunks]),
    )
