"""One model across ranks on mx.distributed (issue #25, part 2; a start).

Rank 0 owns the scheduler and sampling; every step it sends its `SchedulerOutput`
(omlx.scheduler.step) to the other ranks, and each rank runs the same pass over its shard of
the weights (the model's own `shard()`, tensor parallel) and its own paged KV pool.
`omlx serve --distributed` (serve.py, group_engine.py) serves a model this way under
`mlx.launch`; `python -m omlx.distributed.generate` runs scripted requests without HTTP.
"""
