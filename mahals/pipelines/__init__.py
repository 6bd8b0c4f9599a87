"""The study's pipelines: Phase 1 (baseline AQI) and Phase 2.1 (steering-vector extraction).

Each phase module exposes a typed ``run_phaseN(config, loader=...)`` returning a
:class:`~mahals.pipelines.common.RunSummary`, and ``add_arguments(parser)`` /
``run_from_args(args) -> int`` for the CLI. Shared parts: :mod:`.slot` (one model in memory at
a time), :mod:`.caching` (activations cached with their identity), :mod:`.checkpoint`
(resumable runs), :mod:`.common` (the checkpointed loop, shared options, CLI errors),
:mod:`.console` (log output in the reference implementation's console shape),
:mod:`.conversations` (Phase 2.1's data and texts), :mod:`.phase2_pair` (one pair's run).
"""
