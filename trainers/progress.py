"""The training progress bar the project's nnU-Net trainers share (rank 0, standard error).

nnU-Net prints one block per epoch; a run of few long epochs (pretraining: one epoch is
``checkpoint_every`` iterations) would show nothing for minutes. The bar counts iterations.

nnU-Net imports the trainer modules by bare module name through ``nnUNet_extTrainer``: absolute
imports only.
"""

from __future__ import annotations


class TrainingProgressMixin:
    """A tqdm bar of the training iterations, closed when training ends; mix in before ``nnUNetTrainer``."""

    _progress = None  # the tqdm bar (rank 0), or None

    def start_progress(self, total: int, initial: int, desc: str, **tqdm_kwargs) -> None:
        """Open the bar on rank 0 unless it is open (``total`` and ``initial`` in iterations)."""
        if self._progress is None and self.local_rank == 0:
            from tqdm import tqdm

            self._progress = tqdm(total=int(total), initial=int(initial), unit="it", desc=desc, mininterval=1.0,
                                  dynamic_ncols=True, **tqdm_kwargs)

    def advance_progress(self, **postfix) -> None:
        """One iteration done; ``postfix`` (e.g. the loss) is shown beside the bar."""
        if self._progress is not None:
            self._progress.set_postfix(refresh=False, **postfix)
            self._progress.update(1)

    def on_train_end(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        super().on_train_end()
