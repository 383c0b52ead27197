"""absl flag definitions by concern, their validators, and getters that build config objects.

Entry points call the `define_*` functions they need, then `fill(ConfigClass)` after
parsing. Library code takes the returned config objects and never reads FLAGS.
"""
from flags.core import (  # noqa: F401
    DistributedConfig,
    PerformanceConfig,
    define_base,
    define_distributed,
    define_elastic,
    define_faults,
    define_fields,
    define_performance,
    define_precision,
    define_run_records,
    define_schedule,
    define_shared,
    fill,
    flagfile_text,
    get_distributed_config,
    get_performance_config,
    launcher_rank,
    launcher_world_size,
    positive,
)
