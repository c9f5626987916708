"""The paper's math-reasoning experiment: pod recipes (``*.yaml`` for ``qsharp train``) and a
CPU-sized demo (``python -m experiments.math experiments/math/demo.yaml``)."""
