"""The study's pipelines: Phase 1 (baseline AQI) and Phase 2.1 (steering-vector extraction).

Each phase module exposes ``add_arguments(parser)`` and ``run_from_args(args) -> int`` for the
CLI, and a typed ``run_phaseN(config, loader=...)`` for Python use.
"""
