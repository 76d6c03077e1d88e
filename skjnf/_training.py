"""The two training stages, each a skorch ``NeuralNet`` over a view of the shared JNF module."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from skorch import NeuralNet
from skorch.callbacks import Callback, ProgressBar
from skorch.helper import predefined_split
from torch import Tensor, nn

from ._batch import StageBatch

__all__ = ["STAGES", "BlockDataset", "train_stage", "MAX_GRAD_NORM", "PATIENCE"]

#: Gradient-norm clipping after ``backward``: a safety net so one bad batch cannot wreck Adam's moments.
MAX_GRAD_NORM = 100.0
#: Epochs without improvement before ``early_stopping`` ends a stage ...
PATIENCE = 10
#: ... and at least this many optimizer steps without: on a small table an epoch is one to three
#: steps, and ten of them are too few for the validation loss to move beyond its noise. Wine (133
#: rows, one step per epoch) and breast cancer (3 steps) stopped stage 1 at epochs 37-76 and lost
#: 0.4-1.1 nats of held-out log-likelihood per row to the 100-epoch fits of 0.1.0 (three seeds);
#: with 100 steps they were within 0.05 (cancer) and 0.16 (wine). Tables of ~1,000 rows and more
#: (>= 10 steps per epoch) keep 10 epochs.
PATIENCE_STEPS = 100
#: Human-readable stage names, used in logs and error messages.
STAGES = {"joint": "stage 1 (joint VAE)", "flows": "stage 2 (flows)"}


class BlockDataset(torch.utils.data.Dataset):
    """The rows of a :class:`~skjnf._batch.StageBatch`, as a dataset skorch can split and iterate."""

    def __init__(self, data: StageBatch):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        return self.data.rows(index), torch.zeros(())


class BatchIterator:
    """Slices whole tensors per batch: far cheaper than a DataLoader collating single rows."""

    def __init__(self, dataset: BlockDataset, batch_size: int, shuffle: bool = False, generator=None):
        self.data, self.n = dataset.data, len(dataset)
        self.batch_size = min(batch_size, self.n)
        self.shuffle, self.generator = shuffle, generator

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else None
        device = next(iter(self.data.blocks.values())).device
        for start in range(0, self.n, self.batch_size):
            stop = start + self.batch_size
            yield self.data.rows(slice(start, stop) if order is None else order[start:stop].to(device)), None


class StageModule(nn.Module):
    """One stage as skorch sees it: ``forward(batch)`` (a :class:`~skjnf._batch.StageBatch`)
    returns the per-row stage loss.

    ``parts`` are groups of modules with disjoint parameters and ``part_losses(jnf, batch,
    noise, active)`` returns one per-row loss per part (None for a part whose training has
    stopped, :meth:`stop_part`); the stage loss is their sum. Stage 1 is one part (the joint
    VAE); stage 2 has one per expert and one for the subset posterior.
    """

    def __init__(
        self,
        jnf: nn.Module,
        part_losses: Callable,
        parts: list[list[nn.Module]],
        generator,
        label: str,
        noise_dim: int,
        part_rows: Callable | None = None,
    ):
        super().__init__()
        self.jnf = jnf
        self.part_losses, self.generator, self.label, self.noise_dim = part_losses, generator, label, noise_dim
        self._parts = parts
        # (name, parameter) of each part, listed once: skorch asks for them at every step
        self._named_parameters = [
            [(f"part{i}.{k}.{name}", p) for k, module in enumerate(part) for name, p in module.named_parameters()]
            for i, part in enumerate(parts)
        ]
        self.active = [True] * len(parts)  # parts still training
        self._mode = None  # the mode train() last set on every submodule
        # part_rows(batch) -> rows each part's loss counts (default: all): a part whose loss is
        # zero on some rows (an expert on rows missing its modality) is averaged over its own rows.
        self.part_rows = part_rows

    @property
    def n_parts(self) -> int:
        return len(self._parts)

    def named_trainable_parameters(self, parts=None):
        for i in range(self.n_parts) if parts is None else parts:
            yield from self._named_parameters[i]

    def stop_part(self, i: int) -> None:
        """Stop training part i: its loss is no longer computed and Adam skips its parameters."""
        self.active[i] = False
        for _, param in self.named_trainable_parameters([i]):
            param.requires_grad_(False)
            param.grad = None

    def resume_parts(self) -> None:
        """Make every part trainable again (after the stage)."""
        for i in range(self.n_parts):
            for _, param in self.named_trainable_parameters([i]):
                param.requires_grad_(True)
        self.active = [True] * self.n_parts

    def trainable_state(self, parts=None) -> list[Tensor]:
        return [p.detach().cpu().clone() for _, p in self.named_trainable_parameters(parts)]

    def load_trainable_state(self, state: list[Tensor], parts=None) -> None:
        with torch.no_grad():
            for (_, param), saved in zip(self.named_trainable_parameters(parts), state):
                param.copy_(saved)

    def _noise(self, batch: StageBatch) -> Tensor:
        if batch.noise is not None:
            return batch.noise
        device = next(iter(batch.blocks.values())).device
        return torch.randn(len(batch), self.noise_dim, generator=self.generator, device=device)

    def train(self, mode: bool = True) -> StageModule:
        """Set the mode of every submodule only when it changes: skorch calls this before every
        batch, and walking JNF's few hundred submodules each time cost 7 % of a fit. The first
        call always sets it (the shared module may come out of the other stage in eval mode)."""
        if mode is not self._mode:
            super().train(mode)
            self._mode = mode
        return self

    def forward(self, batch: StageBatch) -> Tensor:
        losses = self.part_losses(self.jnf, batch, self._noise(batch), self.active)
        return sum(loss for loss in losses if loss is not None)

    def part_sums(self, batch: StageBatch) -> tuple[Tensor, Tensor]:
        """Each part's loss summed over the batch's rows, and the rows it counts (P,) each, on the
        batch's device (no host transfer)."""
        n = len(batch)
        losses = self.part_losses(self.jnf, batch, self._noise(batch), self.active)
        zero = next(loss for loss in losses if loss is not None).new_zeros(())
        sums = torch.stack([zero if loss is None else loss.sum() for loss in losses])
        rows = sums.new_full((len(losses),), float(n)) if self.part_rows is None else self.part_rows(batch).to(sums)
        return sums, rows

    @torch.no_grad()
    def mean_part_losses(self, data: StageBatch, batch_size: int) -> list[float]:
        """Each part's mean per-row loss over ``data`` (with its fixed noise), in eval mode."""
        was_training = self.training
        self.eval()
        totals = [self.part_sums(data.rows(slice(i, i + batch_size))) for i in range(0, len(data), batch_size)]
        self.train(was_training)
        return _part_means(totals)


def _part_means(totals: list[tuple[Tensor, Tensor]]) -> list[float]:
    """Mean per-row loss of each part from per-batch ``(sums, rows)``: one host transfer."""
    sums, rows = (torch.stack(column).sum(0) for column in zip(*totals))
    return [total / count if count else math.inf for total, count in zip(sums.tolist(), rows.tolist())]


class ClipGradNorm(Callback):
    """Scale the gradients so that their global L2 norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``), with one fused norm over every tensor, and on the CPU,
    where comparing costs nothing, no scaling pass when the norm is already below: the
    scaling reads and writes every gradient each step. On other devices the scale is applied
    unconditionally (capped at 1), so that no step waits on the host."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_grad_computed(self, net, named_parameters, **kwargs):
        grads = [p.grad for _, p in named_parameters if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if grads[0].device.type == "cpu" and float(norm) <= self.max_norm:
            return
        torch._foreach_mul_(grads, torch.clamp(self.max_norm / (norm + 1e-6), max=1.0))


def fused_adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (AdamW: decoupled weight decay, when ``weight_decay`` > 0) with the fused kernel where
    this torch and device have one (CPU since torch 2.4).

    Same update as the default implementation; on CPU it is ~10x faster per step, which for
    JNF's 0.5-2M parameters and small batches is a third of the training time. Its moments and
    weights are kept out of float32's slow subnormal range (:class:`FlushTinyValues`).
    """
    params = list(params)
    optimizer = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    try:
        adam = optimizer(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        adam = optimizer(params, lr=lr, weight_decay=weight_decay)
    adam.register_step_post_hook(FlushTinyValues())
    return adam


#: Entries of the weights and Adam's moments below this are set to zero (:class:`FlushTinyValues`) ...
TINY_VALUE = 1e-30
#: ... every this many steps: between two flushes a first moment decays by at most 0.9^100 (to no
#: less than 2.7e-35), so it never reaches float32's subnormal range (below 1.2e-38).
FLUSH_EVERY = 100


class FlushTinyValues:
    """Optimizer step post-hook that zeroes the entries of the weights and of Adam's moments
    below ``TINY_VALUE`` every ``FLUSH_EVERY`` steps.

    When a weight's gradient becomes zero for good (a ReLU unit no row activates any more), its
    first moment decays by β1 = 0.9 a step and turns subnormal after ~800 steps (the weight itself,
    under weight decay, after tens of thousands); CPUs compute on subnormal floats many times
    slower. On 10^5 rows of the three-view table 46 % of stage 1's first moments were subnormal
    by epoch 6, and each epoch after the first took 8.6 s instead of 4.7 (stage 2: 13.8 s instead
    of 10.3). Zeroing them changes an update by at most ``lr * TINY_VALUE / eps`` (1e-25). Done on
    the data rather than through the CPU's flush-to-zero mode (``torch.set_flush_denormal``),
    which is process-wide state, set per thread.
    """

    def __init__(self, every: int = FLUSH_EVERY, tiny: float = TINY_VALUE):
        self.every, self.tiny, self.steps = every, tiny, 0

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps % self.every:
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    state = optimizer.state.get(param, {})
                    for values in (param, state.get("exp_avg"), state.get("exp_avg_sq")):
                        if values is not None:
                            values.masked_fill_(values.abs() < self.tiny, 0.0)


class _StopStage(Exception):
    """Raised by early stopping; caught by :func:`train_stage` (never a KeyboardInterrupt)."""


class BestEpoch(Callback):
    """Keeps a CPU copy of each part's weights at its best epoch, restores them at the end.

    With a validation set every part of the stage is judged by its own validation loss and
    stops on its own: the parts have disjoint parameters and the stage loss is their sum, so this
    is the same as training each part alone with its own early stopping (one expert that
    overfits early no longer holds the others back, nor drags them along), and a stopped part
    costs nothing more (on the digits in six views, stage 2's experts kept epochs 11 to 39 of 49).
    Without one, the whole stage is judged by its training loss. Early stopping ends the stage
    once no part improved for ``patience`` epochs.
    """

    def __init__(self, monitor: str, patience: int | None):
        self.monitor, self.patience = monitor, patience

    def initialize(self):
        self.best_losses_, self.best_epochs_, self.states_, self.misses_ = None, None, None, None
        return self

    def _part_losses(self, net) -> list[float | None]:
        if self.monitor != "valid_loss" or net.module_.n_parts == 1:  # skorch's own figure is the one needed
            return [net.history[-1, self.monitor]]
        means = _part_means(net.valid_part_totals_)  # kept by StageNet.validation_step
        return [loss if active else None for loss, active in zip(means, net.module_.active)]

    def on_epoch_end(self, net, **kwargs):
        losses = self._part_losses(net)
        net.history.record("part_losses", losses)
        if self.best_losses_ is None:
            n = len(losses)
            self.best_losses_, self.best_epochs_, self.states_ = [math.inf] * n, [0] * n, [None] * n
            self.misses_ = [0] * n
        for i, loss in enumerate(losses):
            if loss is None:  # a stopped part
                continue
            if loss < self.best_losses_[i]:
                self.best_losses_[i], self.best_epochs_[i], self.misses_[i] = loss, len(net.history), 0
                self.states_[i] = net.module_.trainable_state(self._parts(i, len(losses)))
            else:
                self.misses_[i] += 1
                if self.patience is not None and self.misses_[i] >= self.patience and len(losses) > 1:
                    net.module_.stop_part(i)
        if self.patience is not None and all(misses >= self.patience for misses in self.misses_):
            raise _StopStage

    @staticmethod
    def _parts(i: int, n_losses: int):
        return [i] if n_losses > 1 else None  # one loss: the whole stage

    def on_train_end(self, net, **kwargs):
        net.module_.resume_parts()
        for i, state in enumerate(self.states_ or []):
            if state is not None:
                net.module_.load_trainable_state(state, self._parts(i, len(self.states_)))

    @property
    def best_epoch_(self) -> int:
        """The last epoch whose weights were kept for some part (0 if none)."""
        return max(self.best_epochs_ or [0])


class StageNet(NeuralNet):
    """skorch's loop with JNF's stage loss and parameter subset. Batch losses stay on the device
    until the epoch ends (one host transfer per epoch, none per step), where they are recorded
    and checked; the validation pass also keeps each part's loss, for :class:`BestEpoch`."""

    #: Record each batch's loss as it comes (a host transfer per batch), for the progress bar.
    record_each_batch = False

    def get_all_learnable_params(self):
        yield from self.module_.named_trainable_parameters()

    def infer(self, x: StageBatch, **fit_params) -> Tensor:
        return self.module_(x)

    def get_loss(self, y_pred, y_true=None, X=None, training=False):
        return y_pred.mean()

    def validation_step(self, batch, **fit_params):
        """The validation loss from each part's sums over the batch, which are kept: one pass
        gives skorch's ``valid_loss`` and every part's own loss."""
        self._set_training(False)
        with torch.no_grad():
            sums, rows = self.module_.part_sums(batch[0])
        self.valid_part_totals_.append((sums, rows))
        return {"loss": sums.sum() / len(batch[0]), "y_pred": None}

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        if iterator is None:
            return
        if not training:
            self.valid_part_totals_ = []
        losses = []
        for batch in iterator:
            self.notify("on_batch_begin", batch=batch, training=training)
            step = step_fn(batch, **fit_params)
            losses.append(step["loss"].detach())
            self.history.record_batch(prefix + "_batch_size", len(batch[0]))
            if self.record_each_batch:
                self.history.record_batch(prefix + "_loss", losses[-1].item())
            self.notify("on_batch_end", batch=batch, training=training, **step)
        values = torch.stack(losses).tolist() if losses else []
        for i, (row, value) in enumerate(zip(self.history[-1]["batches"][-len(values) :], values)):
            if not math.isfinite(value):
                where = f"batch {i + 1}" if training else "validation"
                raise FloatingPointError(
                    f"Non-finite loss ({value}) in {self.module_.label}, epoch {len(self.history)}, {where}. "
                    "Try a lower lr, standardised inputs, or a larger likelihood_scale."
                )
            row[prefix + "_loss"] = value
        self.history.record(prefix + "_batch_count", len(values))


def train_stage(
    stage: StageModule,
    train: StageBatch,
    valid: StageBatch | None,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    undecayed_parts: tuple[int, ...] = (),
    batch_size: int,
    early_stopping: bool,
    shuffle_generator: torch.Generator,
    verbose: int,
) -> dict:
    """Train one stage with a fresh Adam over its parameters; restore its best epoch.

    ``weight_decay`` applies to every part but those listed in ``undecayed_parts``.

    Returns the stage's history: per-epoch train / validation losses and the best epoch.
    """
    monitor = "valid_loss" if valid is not None else "train_loss"
    steps_per_epoch = math.ceil(len(train) / batch_size)
    patience = max(PATIENCE, math.ceil(PATIENCE_STEPS / steps_per_epoch))
    best = BestEpoch(monitor, patience if early_stopping else None)
    net = StageNet(
        module=stage,
        criterion=nn.Identity,  # unused: the stage module returns its loss
        optimizer=fused_adam,
        optimizer__weight_decay=weight_decay,
        optimizer__param_groups=[(f"part{i}.*", {"weight_decay": 0.0}) for i in undecayed_parts],
        lr=lr,
        max_epochs=epochs,
        batch_size=batch_size,
        iterator_train=BatchIterator,
        iterator_train__shuffle=True,
        iterator_train__generator=shuffle_generator,
        iterator_valid=BatchIterator,
        train_split=predefined_split(BlockDataset(valid)) if valid is not None else None,
        callbacks=[("clip", ClipGradNorm(MAX_GRAD_NORM)), ("best", best)]
        + ([("progress", ProgressBar())] if verbose >= 2 else []),
        device=None,
        verbose=int(verbose > 0),
    )
    if verbose:
        print(f"Training {stage.label} for {epochs} epochs")
    net.initialize()
    net.record_each_batch = verbose >= 2  # the progress bar shows each batch's loss
    dataset = BlockDataset(train)
    if epochs > 0:
        net.notify("on_train_begin", X=dataset, y=None)
        try:
            net.fit_loop(dataset, epochs=epochs)
        except _StopStage:
            if verbose:
                print(
                    f"Early stopping {stage.label} at epoch {len(net.history)}: no part improved its "
                    f"{'validation' if valid is not None else 'training'} loss for {patience} epochs "
                    f"({patience * steps_per_epoch} steps)"
                )
        net.notify("on_train_end", X=dataset, y=None)
        if verbose:
            print(f"{stage.label}: kept the weights of epoch {best.best_epoch_} of {len(net.history)}")
    rows = [
        {
            "epoch": int(row["epoch"]),
            "train_loss": float(row["train_loss"]),
            "valid_loss": None if row.get("valid_loss") is None else float(row["valid_loss"]),
            "dur": float(row["dur"]),  # seconds, skorch's EpochTimer
            **(
                {"part_losses": [None if v is None else float(v) for v in row["part_losses"]]}
                if stage.n_parts > 1 and valid is not None
                else {}
            ),
        }
        for row in net.history
    ]
    return {
        "epochs": rows,
        "best_epoch": best.best_epoch_,
        "monitor": monitor,
        "part_best_epochs": list(best.best_epochs_ or []),
        "part_best_losses": [float(v) for v in best.best_losses_ or []],
    }
