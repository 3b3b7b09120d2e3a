"""The training and evaluation machinery behind ``train.py``, ``eval.py`` and ``predict.py``.

Modules (one job each; the map is in ``docs/design.md``): ``config`` (train.py's flags -> frozen
``RunConfig``), ``runtime`` (device / amp / channels-last of every entry point), ``kd`` (teacher,
student, combined loss), ``schedule`` (poly lr, the per-iteration ``plan``), ``trainer`` (step, loop,
resumable state), ``checkpoint`` (checkpoint files, reference export), ``inference`` (test-time
augmentation), ``evaluation`` (distributed mIoU), ``prediction`` (PNG output), ``inference_cli``
(eval.py / predict.py start-up), ``sliding``, ``metrics``, ``finite``, ``flops``, ``distributed``,
``signals``, ``lock``, ``logger``, ``dashboards``. Import the modules directly; this package imports
nothing so that ``import fastdist`` stays light.
"""
