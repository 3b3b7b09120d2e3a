"""The training and evaluation machinery behind ``train.py``, ``eval.py`` and ``predict.py``.

Modules: ``config`` (command line, resolved config), ``kd`` (teacher, student, combined loss),
``trainer`` (step and loop), ``checkpoint`` (atomic training state, reference export), ``logger``
(console, progress bar, JSON lines), ``schedule`` (poly lr), ``signals`` (preemption),
``distributed`` (process group), ``metrics`` and ``evaluation`` (validation). Import the modules
directly; this package imports nothing so that ``import fastdist`` stays light.
"""
