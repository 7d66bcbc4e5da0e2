"""Keep processes forked after torch has run from deadlocking in torch's CPU thread pool.

Stage tpo runs the image processor in the main process before LLaMA-Factory tokenises (the data checks
expand every image into its tokens, see :mod:`..checks.data`). An image larger than a few thousand pixels
makes that torch work parallel, so torch's OpenMP thread pool starts in the main process. LLaMA-Factory's
``get_dataset`` then forks ``preprocessing_num_workers`` map workers (``datasets`` with ``num_proc``), and
a fork copies the pool's bookkeeping but none of its threads: the first parallel torch operation in a
worker (the image processor again) waits forever for threads that do not exist. Nothing fails; the run
hangs after "Running tokenizer on dataset … 100%". ``OMP_NUM_THREADS=1`` hides it, and users do not set it.

The remedy is the one torch's own ``DataLoader`` applies to its workers: a forked child runs torch on one
thread, so it never enters the inherited pool. That holds for every fork of the process, whatever torch
work preceded it (the training data, the evaluation data, a later map), instead of depending on the order
of the checks. One thread per map worker is also what a pool of ``preprocessing_num_workers`` processes
wants: each worker is one of many, and more threads would oversubscribe the cores.
"""

import os


_installed = False


def single_threaded_torch_in_forked_children() -> None:
    """From now on, every child this process forks runs torch on one thread (idempotent)."""
    global _installed
    if _installed:
        return
    import torch

    os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
    _installed = True
