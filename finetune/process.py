"""What training changes process-wide, undone (:func:`process_state_kept`), and Lightning's warnings and log lines
silenced for a block (:func:`quiet_lightning`): ``finetune.train.fine_tune`` leaves the interpreter as it found it."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.utils.deterministic

# Lightning's warnings about deliberate choices (in-process loading, BatchNorm pinned in eval mode, per-epoch metrics),
# and about Lightning >= 2.5's own use of torch APIs that newer torch deprecates (LeafSpec; torch.distributed.nn's
# all_gather under DDP), which no configuration of ours avoids.
KNOWN_WARNINGS = (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*", ".*log_every_n_steps.*",
                  ".*LeafSpec.*", ".*all_gather is deprecated.*")
# Lightning's informational lines (accelerator summary, tips); they go to these loggers at INFO.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


@contextmanager
def process_state_kept():
    """Undo what training changes process-wide: the random generators, torch's deterministic mode, thread count and
    cuDNN flags, the environment variables Lightning sets (``seed_everything``'s, the DDP launcher's), and the SIGINT
    handler (Lightning ignores Ctrl-C once it has seen one)."""
    # Not Lightning's isolate_rng: it does not restore the generators when the block raises (Ctrl-C included).
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.utils.deterministic.fill_uninitialized_memory)
    threads = torch.get_num_threads()
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    environ = dict(os.environ)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[2]
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})


@contextmanager
def quiet_lightning(verbose: bool = False):
    """Silence Lightning's known warnings about this design's choices and, unless ``verbose``, its
    informational lines (accelerator summary, tips), for the block only: filters and levels come back."""
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    try:
        with warnings.catch_warnings():
            for pattern in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", pattern)
            if not verbose:
                for name in LIGHTNING_LOGGERS:
                    logging.getLogger(name).setLevel(logging.WARNING)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
