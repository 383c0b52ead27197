"""absl flag definitions by concern, their validators, and getters that build config objects.

Entry points call the `define_*` functions they need, then the getters after parsing.
Library code takes the returned config objects and never reads FLAGS.
"""
from flags.core import (  # noqa: F401
    BaseConfig,
    DistributedConfig,
    PerformanceConfig,
    ScheduleConfig,
    define_base,
    define_distributed,
    define_performance,
    define_schedule,
    get_base_config,
    get_distributed_config,
    get_performance_config,
    get_schedule_config,
    launcher_world_size,
)
